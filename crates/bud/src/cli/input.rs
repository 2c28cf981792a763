//! What the client asks the person at the terminal, or reads from standard input for scripts.
//! Secrets are never taken as arguments: those end up in shell history and `ps`.

use std::io::{BufRead, Read, Write};
use std::path::Path;

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

/// The whole of a file, or of standard input when `path` is `-`, for `--kubeconfig` and
/// friends; refused when empty.
pub fn text_from(path: &Path, what: &str) -> anyhow::Result<String> {
    let text = if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .lock()
            .read_to_string(&mut text)
            .with_context(|| format!("reading the {what} from standard input"))?;
        text
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("reading the {what} from {}", path.display()))?
    };
    if text.trim().is_empty() {
        bail!("the {what} is empty");
    }
    Ok(text)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_read_whole_and_an_empty_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(&path, "apiVersion: v1\nkind: Config\n").unwrap();
        assert_eq!(text_from(&path, "kubeconfig").unwrap(), "apiVersion: v1\nkind: Config\n");

        std::fs::write(&path, "\n  \n").unwrap();
        assert_eq!(
            text_from(&path, "kubeconfig").unwrap_err().to_string(),
            "the kubeconfig is empty"
        );

        let missing = dir.path().join("missing");
        let e = text_from(&missing, "kubeconfig").unwrap_err().to_string();
        assert_eq!(e, format!("reading the kubeconfig from {}", missing.display()));
    }
}
