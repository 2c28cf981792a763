#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The `bud` client against a real `bud serve`, as processes talking over loopback: log in,
//! create a project, create and revoke an API key, log out; deploy engine-sim endpoints on the
//! local cluster, follow, scale, stop and remove them, and check that no engine outlives them
//! or the server.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BUD: &str = env!("CARGO_BIN_EXE_bud");
const ADMIN_EMAIL: &str = "admin@bud.local";
const ADMIN_PASSWORD: &str = "correct horse battery staple";

/// `bud serve` on free ports with a fresh data directory; stopped on drop.
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
        let port = free_port();
        let log = dir.path().join("serve.log");
        let child = Command::new(BUD)
            .arg("serve")
            .env_clear()
            .env("BUD_DATA_DIR", dir.path().join("data"))
            .env("BUD_SERVER_APP_PORT", port.to_string())
            // budcluster listens too: on a port of its own, so that the servers of tests
            // running side by side do not collide.
            .env("BUD_CLUSTERS_PORT", free_port().to_string())
            .env("BUD_GATEWAY_PORT", free_port().to_string())
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

    fn login(&self) {
        let login = ["login", "--url", &self.url, "--email", ADMIN_EMAIL, "--password-stdin"];
        let output = self.bud(&login, &format!("{ADMIN_PASSWORD}\n"));
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }

    /// Sends SIGTERM and waits up to `within` for the server to exit: its exit status, or
    /// `None` while it still runs.
    fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill");
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM first: the local driver's engines run in process groups of their own, and
        // only a server that shuts down cleanly stops them. SIGKILL if it does not.
        if self.child.try_wait().ok().flatten().is_none()
            && self.terminate(Duration::from_secs(20)).is_none()
        {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Calls `check` every 250 ms until it gives a value, or panics after `within` naming `what`.
fn eventually<T>(what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what} did not happen within {within:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The engine processes the local driver started, from the `--- started pid P port N at T ---`
/// lines it writes in each replica's log.
fn started_pids(logs: &str) -> Vec<u32> {
    logs.lines()
        .filter_map(|l| l.strip_prefix("--- started pid ")?.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Whether `pid` is a live engine-sim: a gone process has no `/proc/<pid>`, a zombie an empty
/// command line, and a reused pid another command line.
fn engine_alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == b"engine-sim"))
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

#[cfg(target_os = "linux")]
#[test]
fn an_endpoint_is_deployed_on_the_local_cluster_followed_scaled_stopped_and_removed() {
    let mut server = Server::start();
    server.login();

    // budcluster registers the local cluster and finds it available.
    eventually("the local cluster becoming AVAILABLE", Duration::from_secs(60), || {
        let table = server.ok(&["clusters", "list"]);
        table
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("local") && l.contains("AVAILABLE"))
            .then_some(())
    });
    let clusters = server.json(&["clusters", "list"]);
    let local = clusters["data"][0]["id"].as_str().unwrap().to_owned();
    let shown = server.ok(&["clusters", "show", &local]);
    assert!(shown.lines().any(|l| l.starts_with("STATUS") && l.ends_with("AVAILABLE")), "{shown}");
    assert!(shown.contains("Recent events (newest first):"), "{shown}");

    let project = server.json(&["projects", "create", "sims"])["id"].as_str().unwrap().to_owned();
    let model = server.json(&[
        "models",
        "add",
        "sim",
        "--source",
        "hf://org/sim",
        "--engine",
        "engine-sim",
    ]);
    let model = model["id"].as_str().unwrap().to_owned();

    // Created, then followed until RUNNING: progress lines, then the endpoint.
    let created = server.ok(&[
        "endpoints",
        "create",
        "--project",
        &project,
        "--model",
        &model,
        "ep",
        "--replicas",
        "2",
    ]);
    assert!(created.starts_with("PENDING 0/2 replicas ready\n"), "{created}");
    assert!(created.contains("\nRUNNING 2/2 replicas ready\n"), "{created}");
    assert!(
        created.lines().any(|l| l.starts_with("STATUS") && l.ends_with("RUNNING")),
        "{created}"
    );
    let listed = server.json(&["endpoints", "list", "--project", &project]);
    let endpoint = &listed["data"][0];
    assert_eq!(
        (endpoint["name"].as_str(), endpoint["replicas_ready"].as_i64()),
        (Some("ep"), Some(2))
    );
    let id = endpoint["id"].as_str().unwrap().to_owned();

    // The engines' output, one section per replica, as the server sent it.
    let logs = server.ok(&["endpoints", "logs", &id, "--tail", "50"]);
    assert!(logs.contains("==> replica 0 <==") && logs.contains("==> replica 1 <=="), "{logs}");
    let mut pids = started_pids(&logs);
    assert_eq!(pids.len(), 2, "{logs}");
    assert!(pids.iter().all(|p| engine_alive(*p)), "{pids:?}\n{logs}");

    let metrics = server.ok(&["endpoints", "metrics", &id]);
    for field in [
        "REPLICAS SCRAPED",
        "QUEUE DEPTH",
        "REQUESTS/S",
        "TOKENS/S",
        "LATENCY P50/P95/P99",
        "TTFT P50/P95/P99",
    ] {
        assert!(metrics.lines().any(|l| l.starts_with(field)), "{field} missing:\n{metrics}");
    }
    assert!(
        metrics.lines().any(|l| l.starts_with("REPLICAS SCRAPED") && l.ends_with('2')),
        "{metrics}"
    );

    // Scaled up: a third replica becomes ready.
    let scaled = server.json(&["endpoints", "scale", &id, "--replicas", "3"]);
    assert_eq!(scaled["replicas_desired"], 3);
    eventually("the third replica becoming ready", Duration::from_secs(60), || {
        let shown = server.json(&["endpoints", "show", &id]);
        (shown["replicas_ready"] == 3).then_some(())
    });
    let shown = server.ok(&["endpoints", "show", &id]);
    assert!(shown.contains("3/3 replicas ready"), "{shown}");
    assert!(shown.contains("Recent events (newest first):"), "{shown}");
    // Every engine ever started for it (a scale may restart replicas), three of them live.
    let logs = server.ok(&["endpoints", "logs", &id]);
    assert!(logs.contains("==> replica 2 <=="), "{logs}");
    pids = started_pids(&logs);
    let alive = pids.iter().filter(|p| engine_alive(**p)).count();
    assert_eq!(alive, 3, "{pids:?}\n{logs}");

    // Stopped: it returns at STOPPED, when no engine is left.
    let stopped = server.ok(&["endpoints", "stop", &id]);
    assert!(stopped.contains("STOPPED 0/3 replicas ready"), "{stopped}");
    let survivors: Vec<_> = pids.iter().copied().filter(|p| engine_alive(*p)).collect();
    assert!(survivors.is_empty(), "engines left running after stop: {survivors:?}");

    assert_eq!(server.ok(&["endpoints", "rm", &id]).trim(), format!("Deleted endpoint {id}"));
    assert!(!server.ok(&["endpoints", "list"]).contains(&id));

    // A second endpoint is left running: the server must take its engine down with it.
    let created =
        server.ok(&["endpoints", "create", "--project", &project, "--model", &model, "ep2"]);
    assert!(created.contains("RUNNING 1/1 replicas ready"), "{created}");
    let running = server.json(&["endpoints", "list", "--project", &project]);
    let id2 = running["data"][0]["id"].as_str().unwrap().to_owned();
    let pids2 = started_pids(&server.ok(&["endpoints", "logs", &id2]));
    assert_eq!(pids2.len(), 1);
    assert!(engine_alive(pids2[0]));

    let status =
        server.terminate(Duration::from_secs(30)).expect("bud serve did not stop within 30s");
    assert!(status.success(), "bud serve exited with {status}:\n{}", server.log());
    let survivors: Vec<_> =
        pids.iter().chain(&pids2).copied().filter(|p| engine_alive(*p)).collect();
    assert!(survivors.is_empty(), "engines outlived bud serve: {survivors:?}");
}
