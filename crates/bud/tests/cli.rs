#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The `bud` client against a real `bud serve`, as processes talking over loopback: log in,
//! create a project, create and revoke an API key, log out.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BUD: &str = env!("CARGO_BIN_EXE_bud");
const ADMIN_EMAIL: &str = "admin@bud.local";
const ADMIN_PASSWORD: &str = "correct horse battery staple";

/// `bud serve` on a free port with a fresh data directory; killed on drop.
struct Server {
    child: Child,
    url: String,
    log: PathBuf,
    /// Holds the data directory, the server's log and the client's credentials.
    dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = dir.path().join("serve.log");
        let child = Command::new(BUD)
            .arg("serve")
            .env_clear()
            .env("BUD_DATA_DIR", dir.path().join("data"))
            .env("BUD_SERVER_APP_PORT", port.to_string())
            .env("BUD_ADMIN_EMAIL", ADMIN_EMAIL)
            .env("BUD_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("BUD_LOG_LEVEL", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut server = Self { child, url: format!("http://127.0.0.1:{port}"), log, dir };
        server.wait_until_listening(port);
        server
    }

    fn wait_until_listening(&mut self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("bud serve exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "bud serve did not listen within 60s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn config_dir(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    /// Runs `bud <args>` as a client of this server, with `stdin` on its standard input.
    fn bud(&self, args: &[&str], stdin: &str) -> Output {
        client(&self.config_dir(), args, stdin)
    }

    /// Runs `bud <args>`, which must succeed; its standard output.
    fn ok(&self, args: &[&str]) -> String {
        let output = self.bud(args, "");
        let stdout = String::from_utf8(output.stdout).unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "bud {args:?} failed:\n{stdout}\n{stderr}\n{}",
            self.log()
        );
        stdout
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut args = args.to_vec();
        args.push("--json");
        serde_json::from_str(&self.ok(&args)).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

fn client(config_dir: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(BUD)
        .args(args)
        .env_clear()
        .env("BUD_CONFIG_DIR", config_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn an_admin_logs_in_creates_a_project_and_a_key_revokes_it_and_logs_out() {
    let server = Server::start();
    let url = server.url.as_str();

    // Not logged in yet.
    let output = server.bud(&["whoami"], "");
    assert!(!output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stderr).trim(),
        "error: not logged in: run `bud login`"
    );

    // Log in, with the password on standard input.
    let login = ["login", "--url", url, "--email", ADMIN_EMAIL, "--password-stdin"];
    let output = server.bud(&login, &format!("{ADMIN_PASSWORD}\n"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(stdout.trim(), format!("Logged in to {url} as {ADMIN_EMAIL}"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let credentials = server.config_dir().join("credentials.json");
        let mode = std::fs::metadata(credentials).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    assert!(server.ok(&["whoami"]).contains(ADMIN_EMAIL));

    // A project, in a table and in JSON.
    let project =
        server.json(&["projects", "create", "search", "--description", "the search team"]);
    let project_id = project["id"].as_str().unwrap().to_owned();
    let table = server.ok(&["projects", "list"]);
    assert!(table.lines().next().unwrap().starts_with("ID"), "{table}");
    assert!(table.lines().any(|l| l.starts_with(&project_id) && l.contains("search")), "{table}");

    // A key: its secret is shown once, with a warning.
    let created = server.ok(&["keys", "create", "--project", &project_id, "ci-bot", "--rpm", "60"]);
    assert!(created.contains("shown only once"), "{created}");
    let secret = created.lines().find_map(|l| l.strip_prefix("secret: ")).unwrap();
    assert!(secret.starts_with("bud_sk_"), "{created}");
    let keys = server.json(&["keys", "list", "--project", &project_id]);
    let key = &keys["data"][0];
    assert_eq!(key["name"], "ci-bot");
    assert_eq!(key["rpm_limit"], 60);
    assert!(secret.starts_with(key["prefix"].as_str().unwrap()));

    // Revoked, and listed as such.
    let key_id = key["id"].as_str().unwrap();
    let revoked = server.json(&["keys", "revoke", key_id]);
    assert_eq!(revoked["status"], "revoked");
    let table = server.ok(&["keys", "list", "--project", &project_id]);
    assert!(table.lines().any(|l| l.starts_with(key_id) && l.contains("revoked")), "{table}");

    // The server's errors come out as one line with their code and request id.
    let missing = server.bud(&["projects", "show", "00000000-0000-0000-0000-000000000000"], "");
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.starts_with("error: project not found (code not_found, request "), "{stderr}");

    // Everything above is in the audit log, and the chain holds.
    let audit = server.json(&["audit", "list", "--action", "key.revoke"]);
    assert_eq!(audit["data"].as_array().unwrap().len(), 1, "{audit}");
    assert!(server.ok(&["audit", "verify"]).starts_with("Audit chain intact"));

    // Log out: the session ends and the credentials are gone.
    assert_eq!(server.ok(&["logout"]).trim(), format!("Logged out of {url}"));
    assert!(!server.config_dir().join("credentials.json").exists());
    assert!(!server.bud(&["whoami"], "").status.success());
}

#[test]
fn an_unreachable_server_is_named() {
    let config = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let output = client(
        config.path(),
        &["login", "--url", &url, "--email", ADMIN_EMAIL, "--password-stdin"],
        "whatever-password\n",
    );
    assert!(!output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stderr).trim(),
        format!("error: cannot reach budapp at {url}: is `bud serve` running?")
    );
}
