//! What the client asks the person at the terminal, or reads from standard input for scripts.
//! Secrets are never taken as arguments: those end up in shell history and `ps`.

use std::io::{BufRead, Write};

use anyhow::{Context, bail};

/// A line typed after `prompt` (shown on standard error, so standard output stays clean).
pub fn prompt_line(prompt: &str) -> anyhow::Result<String> {
    eprint!("{prompt}");
    std::io::stderr().flush().ok();
    let line = read_line().context("reading from standard input")?;
    let line = line.trim();
    if line.is_empty() {
        bail!("no answer given");
    }
    Ok(line.to_owned())
}

/// The first line of standard input, for `--password-stdin` and friends. Only the line ending
/// is removed: spaces may belong to the secret.
pub fn secret_from_stdin(what: &str) -> anyhow::Result<String> {
    let line = read_line().with_context(|| format!("reading the {what} from standard input"))?;
    let secret = line.trim_end_matches(['\n', '\r']);
    if secret.is_empty() {
        bail!("standard input holds no {what}");
    }
    Ok(secret.to_owned())
}

/// A secret typed without echo.
pub fn password(prompt: &str) -> anyhow::Result<String> {
    let secret = rpassword::prompt_password(prompt)
        .context("cannot ask for a password without a terminal; pass it on standard input with --password-stdin")?;
    if secret.is_empty() {
        bail!("no password given");
    }
    Ok(secret)
}

/// A new secret, typed twice.
pub fn new_password() -> anyhow::Result<String> {
    let first = password("New password (at least 12 characters): ")?;
    let second = password("Repeat it: ")?;
    if first != second {
        bail!("the two passwords differ");
    }
    Ok(first)
}

fn read_line() -> std::io::Result<String> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line)
}
