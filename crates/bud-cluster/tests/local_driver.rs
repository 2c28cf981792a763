//! The local driver against real processes: a small Python HTTP server stands in for the engine
//! (it answers `GET /health`, and has fault switches like `bud engine-sim`'s).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test fails by panicking")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use bud_cluster::driver::local::{LocalConfig, LocalDriver};
use bud_cluster::driver::{DriverError, EndpointSpec, ObservedEndpoint};
use bud_domain::{EndpointId, FailureReason, ProjectId};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::time::Instant;

const ENGINE: &str = r#"
import argparse, http.server, os, signal, sys, threading
p = argparse.ArgumentParser()
p.add_argument("--port", type=int, required=True)
p.add_argument("--model", default="m")
p.add_argument("--fail-start", action="store_true")
p.add_argument("--crash-after", type=float)
p.add_argument("--never-healthy", action="store_true")
p.add_argument("--ignore-term", action="store_true")
p.add_argument("--lines", type=int, default=0)
a = p.parse_args()
print(f"engine {a.model} port {a.port} gpus={os.environ.get('CUDA_VISIBLE_DEVICES', '-')}", flush=True)
for i in range(a.lines):
    print(f"line {i}", flush=True)
if a.fail_start:
    print("engine failed to start: boom", file=sys.stderr, flush=True)
    sys.exit(1)
if a.ignore_term:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if a.crash_after is not None:
    threading.Timer(a.crash_after, lambda: os._exit(3)).start()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/health" and not a.never_healthy
        body = a.model.encode()
        self.send_response(200 if ok else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", a.port), Handler).serve_forever()
"#;

/// Long enough for a loaded two-core machine; the tests end as soon as the condition holds.
const PATIENCE: Duration = Duration::from_secs(30);

struct Fixture {
    dir: tempfile::TempDir,
    driver: LocalDriver,
}

impl Fixture {
    async fn new() -> Fixture {
        Fixture::with(|_| {}).await
    }

    async fn with(adjust: impl FnOnce(&mut LocalConfig)) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path());
        adjust(&mut config);
        let driver = LocalDriver::new(config).await.unwrap();
        Fixture { dir, driver }
    }

    fn folder(&self, id: EndpointId) -> PathBuf {
        self.dir.path().join("state").join(id.to_string())
    }

    fn record(&self, id: EndpointId, replica: u32) -> Option<serde_json::Value> {
        let path = self.folder(id).join(format!("replica-{replica}.json"));
        let bytes = std::fs::read(path).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn pid(&self, id: EndpointId, replica: u32) -> Option<u32> {
        Some(self.record(id, replica)?["pid"].as_u64()? as u32)
    }

    fn log(&self, id: EndpointId, replica: u32) -> String {
        std::fs::read_to_string(self.folder(id).join(format!("replica-{replica}.log")))
            .unwrap_or_default()
    }

    async fn observed(&self, id: EndpointId) -> Option<ObservedEndpoint> {
        self.driver.observe().await.unwrap().remove(&id)
    }

    /// Polls `observe` until `done` holds for the endpoint.
    async fn wait_for(
        &self,
        id: EndpointId,
        what: &str,
        done: impl Fn(&ObservedEndpoint) -> bool,
    ) -> ObservedEndpoint {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let seen = self.observed(id).await;
            if let Some(seen) = seen.as_ref().filter(|s| done(s)) {
                return seen.clone();
            }
            assert!(Instant::now() < deadline, "never {what}; last seen: {seen:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_ready(&self, id: EndpointId, n: u32) -> ObservedEndpoint {
        self.wait_for(id, &format!("{n} ready"), |s| s.ready == n && s.replicas == n).await
    }

    /// Polls until `pid` of replica `n` is recorded and differs from `old`.
    async fn wait_new_pid(&self, id: EndpointId, replica: u32, old: Option<u32>) -> u32 {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(pid) = self.pid(id, replica).filter(|pid| Some(*pid) != old) {
                return pid;
            }
            assert!(Instant::now() < deadline, "replica {replica} never got a new pid");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn config(dir: &Path) -> LocalConfig {
    let script = dir.join("engine.py");
    std::fs::write(&script, ENGINE).unwrap();
    let command = ["python3", script.to_str().unwrap(), "--port", "{port}", "--model", "{model}"];
    LocalConfig {
        command: command.iter().map(|s| s.to_string()).collect(),
        state_dir: dir.join("state"),
        health_path: "/health".into(),
        health_interval: Duration::from_millis(100),
        start_timeout: Duration::from_secs(20),
        restart_backoff: (Duration::from_millis(100), Duration::from_millis(400)),
        crash_loop: (3, Duration::from_secs(30)),
        stop_grace: Duration::from_secs(5),
        gpus: 0,
    }
}

fn spec(replicas: u32, engine_args: &[&str]) -> EndpointSpec {
    EndpointSpec {
        id: EndpointId::new(),
        project_id: ProjectId::new(),
        served_name: "tiny".into(),
        model_source: "hf://tiny/tiny".into(),
        engine_args: engine_args.iter().map(|s| s.to_string()).collect(),
        replicas,
        gpus_per_replica: 0,
        generation: 1,
    }
}

/// A process is gone once even its `/proc` entry is: the driver has waited for it.
fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn replicas_become_ready_and_their_addresses_answer() {
    let f = Fixture::new().await;
    let spec = spec(2, &[]);
    f.driver.ensure(&spec).await.unwrap();

    let seen = f.wait_ready(spec.id, 2).await;
    assert_eq!(seen.generation, 1);
    assert_eq!(seen.failure, None);
    assert_eq!(seen.addresses.len(), 2);
    assert_ne!(seen.addresses[0], seen.addresses[1]);
    for address in &seen.addresses {
        let body = reqwest::get(format!("http://{address}/health")).await.unwrap();
        assert_eq!(body.status(), 200);
        assert_eq!(body.text().await.unwrap(), "tiny", "the {{model}} placeholder was filled in");
    }
    let record = f.record(spec.id, 0).unwrap();
    assert_eq!(record["generation"], 1);
    assert!(seen.addresses.contains(&format!("127.0.0.1:{}", record["port"])));
    assert!(f.log(spec.id, 0).contains("--- started pid "));

    // Ensuring what already runs changes nothing.
    let pids = (f.pid(spec.id, 0), f.pid(spec.id, 1));
    f.driver.ensure(&spec).await.unwrap();
    assert_eq!((f.pid(spec.id, 0), f.pid(spec.id, 1)), pids);
    f.driver.shutdown().await;
}

#[tokio::test]
async fn scaling_up_starts_replicas_and_scaling_down_stops_the_highest() {
    let f = Fixture::new().await;
    let mut spec = spec(3, &[]);
    f.driver.ensure(&spec).await.unwrap();
    f.wait_ready(spec.id, 3).await;
    let pids: Vec<u32> = (0..3).map(|n| f.pid(spec.id, n).unwrap()).collect();

    spec.replicas = 1;
    f.driver.ensure(&spec).await.unwrap();
    assert!(gone(pids[1]) && gone(pids[2]), "stopped replicas leave no process");
    assert!(!gone(pids[0]));
    assert!(f.record(spec.id, 1).is_none() && f.record(spec.id, 2).is_none());
    let seen = f.observed(spec.id).await.unwrap();
    assert_eq!((seen.replicas, seen.ready), (1, 1));
    assert!(f.log(spec.id, 2).contains("stopped (killed by SIGTERM)"));

    spec.replicas = 2;
    f.driver.ensure(&spec).await.unwrap();
    f.wait_ready(spec.id, 2).await;
    assert_eq!(f.pid(spec.id, 0), Some(pids[0]));
    f.driver.shutdown().await;
}

#[tokio::test]
async fn a_changed_engine_replaces_every_replica_and_a_new_generation_alone_keeps_ready_ones() {
    let f = Fixture::new().await;
    let mut spec = spec(2, &[]);
    f.driver.ensure(&spec).await.unwrap();
    f.wait_ready(spec.id, 2).await;
    let old: Vec<u32> = (0..2).map(|n| f.pid(spec.id, n).unwrap()).collect();

    spec.generation = 2;
    f.driver.ensure(&spec).await.unwrap();
    let seen = f.observed(spec.id).await.unwrap();
    assert_eq!((seen.generation, seen.ready), (2, 2));
    assert_eq!((0..2).map(|n| f.pid(spec.id, n).unwrap()).collect::<Vec<_>>(), old);

    spec.generation = 3;
    spec.engine_args = vec!["--lines".into(), "1".into()];
    f.driver.ensure(&spec).await.unwrap();
    assert!(old.iter().all(|pid| gone(*pid)), "replaced replicas leave no process");
    let seen = f.wait_ready(spec.id, 2).await;
    assert_eq!(seen.generation, 3);
    for n in 0..2 {
        assert_eq!(f.record(spec.id, n).unwrap()["generation"], 3);
        assert!(f.log(spec.id, n).contains("line 0"));
    }
    f.driver.shutdown().await;
}

#[tokio::test]
async fn a_new_generation_restarts_a_failed_replica_afresh() {
    let f = Fixture::new().await;
    let mut spec = spec(1, &["--fail-start"]);
    f.driver.ensure(&spec).await.unwrap();
    f.wait_for(spec.id, "a failure", |s| s.failure.is_some()).await;

    spec.generation = 2;
    f.driver.ensure(&spec).await.unwrap();
    let seen = f.observed(spec.id).await.unwrap();
    assert_eq!((seen.generation, seen.replicas, seen.failure), (2, 1, None));
    f.driver.shutdown().await;
}

#[tokio::test]
async fn a_replica_killed_from_outside_is_restarted() {
    let f = Fixture::new().await;
    let spec = spec(1, &[]);
    f.driver.ensure(&spec).await.unwrap();
    f.wait_ready(spec.id, 1).await;
    let pid = f.pid(spec.id, 0).unwrap();

    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let new = f.wait_new_pid(spec.id, 0, Some(pid)).await;
    assert_ne!(new, pid);
    let seen = f.wait_ready(spec.id, 1).await;
    assert_eq!(seen.failure, None, "one crash is no crash loop");
    assert!(f.log(spec.id, 0).contains("exited (killed by SIGKILL); restarting in 100ms"));
    f.driver.shutdown().await;
}

#[tokio::test]
async fn an_engine_that_exits_at_once_is_a_start_failure_with_its_output() {
    let f = Fixture::new().await;
    let spec = spec(1, &["--fail-start"]);
    f.driver.ensure(&spec).await.unwrap();

    let seen = f.wait_for(spec.id, "a failure", |s| s.failure.is_some()).await;
    let (reason, detail) = seen.failure.unwrap();
    assert_eq!(reason, FailureReason::StartFailure, "{detail}");
    assert!(detail.contains("replica 0 exited before becoming ready 3 times in a row"), "{detail}");
    assert!(detail.contains("exit status 1"), "{detail}");
    assert!(detail.contains("engine failed to start: boom"), "{detail}");
    assert!(!detail.contains("--- started"), "the driver's own lines are left out: {detail}");
    assert_eq!((seen.replicas, seen.ready), (1, 0));
    f.driver.shutdown().await;
}

#[tokio::test]
async fn a_missing_engine_binary_is_a_start_failure() {
    let f = Fixture::with(|c| c.command = vec!["/nonexistent/engine".into()]).await;
    let spec = spec(1, &[]);
    f.driver.ensure(&spec).await.unwrap();

    let seen = f.wait_for(spec.id, "a failure", |s| s.failure.is_some()).await;
    let (reason, detail) = seen.failure.unwrap();
    assert_eq!(reason, FailureReason::StartFailure);
    assert!(detail.contains("cannot run `/nonexistent/engine`"), "{detail}");
    assert!(f.log(spec.id, 0).contains("cannot run `/nonexistent/engine`"));
    f.driver.shutdown().await;
}

#[tokio::test]
async fn an_engine_that_keeps_crashing_after_it_was_ready_is_a_crash_loop() {
    let f = Fixture::new().await;
    let spec = spec(1, &["--crash-after", "1"]);
    f.driver.ensure(&spec).await.unwrap();
    f.wait_ready(spec.id, 1).await;

    let seen = f.wait_for(spec.id, "a failure", |s| s.failure.is_some()).await;
    let (reason, detail) = seen.failure.unwrap();
    assert_eq!(reason, FailureReason::CrashLoop, "{detail}");
    assert_eq!(
        detail,
        "replica 0 exited 3 times in 30s (last: exit status 3); see the endpoint logs"
    );
    // It is still supervised: restarts go on, backing off.
    let pid = f.wait_new_pid(spec.id, 0, None).await;
    f.wait_new_pid(spec.id, 0, Some(pid)).await;
    f.driver.shutdown().await;
}

#[tokio::test]
async fn an_engine_that_never_gets_healthy_is_restarted_after_the_start_timeout() {
    let f = Fixture::with(|c| c.start_timeout = Duration::from_millis(800)).await;
    let spec = spec(1, &["--never-healthy"]);
    f.driver.ensure(&spec).await.unwrap();
    let first = f.wait_new_pid(spec.id, 0, None).await;
    assert_eq!(f.observed(spec.id).await.unwrap().ready, 0);

    let second = f.wait_new_pid(spec.id, 0, Some(first)).await;
    assert!(gone(first));
    assert_ne!(first, second);
    let log = f.log(spec.id, 0);
    assert!(log.contains("not healthy within 800ms; stopping it"), "{log}");
    assert_eq!(f.observed(spec.id).await.unwrap().ready, 0);
    f.driver.shutdown().await;
}

#[tokio::test]
async fn gpus_are_handed_out_one_replica_each_and_never_twice() {
    let f = Fixture::with(|c| c.gpus = 2).await;
    let mut first = spec(1, &[]);
    first.gpus_per_replica = 1;
    f.driver.ensure(&first).await.unwrap();
    f.wait_ready(first.id, 1).await;
    assert!(f.log(first.id, 0).contains("gpus=0"));

    let mut second = spec(2, &[]);
    second.gpus_per_replica = 1;
    f.driver.ensure(&second).await.unwrap();
    let seen = f.observed(second.id).await.unwrap();
    assert_eq!(seen.replicas, 0, "nothing starts without its GPUs");
    assert_eq!(
        seen.failure,
        Some((FailureReason::InsufficientGpus, "needs 2 GPUs, 1 free".into()))
    );
    let inventory = f.driver.probe().await.unwrap();
    assert_eq!((inventory.nodes, inventory.gpus_total, inventory.gpus_allocatable), (1, 2, 1));
    assert!(!inventory.device_plugin_running);

    f.driver.remove(first.id).await.unwrap();
    f.driver.ensure(&second).await.unwrap();
    let seen = f.wait_ready(second.id, 2).await;
    assert_eq!(seen.failure, None);
    let logs = f.log(second.id, 0) + &f.log(second.id, 1);
    assert!(logs.contains("gpus=0") && logs.contains("gpus=1"), "{logs}");
    assert_eq!(f.driver.probe().await.unwrap().gpus_allocatable, 0);
    f.driver.shutdown().await;
    assert_eq!(f.driver.probe().await.unwrap().gpus_allocatable, 2);
}

#[tokio::test]
async fn remove_stops_every_process_and_keeps_the_logs() {
    let f = Fixture::new().await;
    let spec = spec(2, &[]);
    f.driver.ensure(&spec).await.unwrap();
    f.wait_ready(spec.id, 2).await;
    let pids: Vec<u32> = (0..2).map(|n| f.pid(spec.id, n).unwrap()).collect();

    f.driver.remove(spec.id).await.unwrap();
    assert!(pids.iter().all(|pid| gone(*pid)));
    assert!(f.record(spec.id, 0).is_none() && f.record(spec.id, 1).is_none());
    assert!(f.observed(spec.id).await.is_none());
    let logs = f.driver.logs(spec.id, 10).await.unwrap();
    assert!(logs.contains("==> replica 0 <==") && logs.contains("==> replica 1 <=="), "{logs}");
    assert!(logs.contains("stopped (killed by SIGTERM)"), "{logs}");

    f.driver.remove(spec.id).await.unwrap();
    f.driver.remove(EndpointId::new()).await.unwrap();
}

#[tokio::test]
async fn an_engine_that_ignores_sigterm_is_killed_after_the_grace() {
    let f = Fixture::with(|c| c.stop_grace = Duration::from_millis(500)).await;
    let spec = spec(1, &["--ignore-term"]);
    f.driver.ensure(&spec).await.unwrap();
    f.wait_ready(spec.id, 1).await;
    let pid = f.pid(spec.id, 0).unwrap();

    let started = Instant::now();
    f.driver.remove(spec.id).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert!(gone(pid));
    assert!(f.log(spec.id, 0).contains("stopped (killed by SIGKILL)"));
}

#[tokio::test]
async fn logs_show_the_tail_of_each_replica() {
    let f = Fixture::new().await;
    let spec = spec(2, &["--lines", "5"]);
    f.driver.ensure(&spec).await.unwrap();
    f.wait_ready(spec.id, 2).await;

    let all = f.driver.logs(spec.id, 100).await.unwrap();
    let (first, second) = all.split_once("\n==> replica 1 <==\n").unwrap();
    for part in [first, second] {
        assert!(part.contains("--- started pid "), "{all}");
        assert!((0..5).all(|i| part.contains(&format!("line {i}\n"))), "{all}");
    }
    assert!(first.starts_with("==> replica 0 <==\n"));

    let tail = f.driver.logs(spec.id, 2).await.unwrap();
    let lines: Vec<&str> = tail.lines().collect();
    assert_eq!(lines.len(), 1 + 2 + 1 + 1 + 2, "two headed tails, a blank line between: {tail}");
    assert_eq!(lines[0], "==> replica 0 <==");
    assert_eq!(lines[3], "");
    assert_eq!(lines[4], "==> replica 1 <==");
    assert!(all.contains(lines[2]));

    assert!(matches!(f.driver.logs(EndpointId::new(), 10).await, Err(DriverError::NotFound)));
    f.driver.shutdown().await;
}

#[tokio::test]
async fn shutdown_and_drop_stop_every_replica() {
    let f = Fixture::new().await;
    let (a, b) = (spec(1, &[]), spec(2, &[]));
    f.driver.ensure(&a).await.unwrap();
    f.driver.ensure(&b).await.unwrap();
    f.wait_ready(a.id, 1).await;
    f.wait_ready(b.id, 2).await;
    let pids = [f.pid(a.id, 0).unwrap(), f.pid(b.id, 0).unwrap(), f.pid(b.id, 1).unwrap()];

    f.driver.shutdown().await;
    assert!(pids.iter().all(|pid| gone(*pid)));
    assert!(f.driver.observe().await.unwrap().is_empty());
    assert!(f.folder(a.id).join("replica-0.log").exists());
    assert!(!f.folder(a.id).join("replica-0.json").exists());

    // A driver dropped without shutdown stops its replicas all the same.
    f.driver.ensure(&a).await.unwrap();
    f.wait_ready(a.id, 1).await;
    let pid = f.pid(a.id, 0).unwrap();
    let Fixture { dir: _dir, driver } = f;
    drop(driver);
    let deadline = Instant::now() + PATIENCE;
    while !gone(pid) {
        assert!(Instant::now() < deadline, "the dropped driver's replica still runs");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn two_drivers_never_share_a_state_directory() {
    let f = Fixture::new().await;
    let second = LocalDriver::new(config(f.dir.path())).await;
    let Err(DriverError::Other(message)) = second else { panic!("a second driver started") };
    assert!(message.contains("another budcluster runs local replicas from"), "{message}");

    drop(f.driver);
    LocalDriver::new(config(f.dir.path())).await.unwrap();
}

#[tokio::test]
async fn a_new_driver_stops_what_a_crashed_one_left_running() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let id = EndpointId::new();
    let folder = config.state_dir.join(id.to_string());
    std::fs::create_dir_all(&folder).unwrap();

    // What a crashed budcluster leaves: an engine still running, its record and its log.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // `python3` may be a shim that execs the real interpreter: the command line then differs
    // from the argv, as it does for any engine that is a script.
    let mut argv = config.command.clone();
    argv[3] = port.to_string();
    argv[5] = "tiny".into();
    let mut orphan = std::process::Command::new(&argv[0]).args(&argv[1..]).spawn().unwrap();
    let record = |pid: u32, argv: &[String]| {
        serde_json::json!({
            "pid": pid, "port": port, "argv": argv, "generation": 1,
            "started_at": chrono::Utc::now(),
        })
        .to_string()
    };
    std::fs::write(folder.join("replica-0.json"), record(orphan.id(), &argv)).unwrap();
    std::fs::write(folder.join("replica-0.log"), "output of the old run\n").unwrap();
    // A record whose pid now belongs to another program must not get that program killed.
    let mut stranger = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    std::fs::write(folder.join("replica-1.json"), record(stranger.id(), &argv)).unwrap();
    // Half-written records are cleaned too.
    std::fs::write(folder.join("replica-2.json.tmp"), "{").unwrap();

    let driver = LocalDriver::new(config).await.unwrap();

    use std::os::unix::process::ExitStatusExt;
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = orphan.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            orphan.kill().unwrap();
            panic!("the orphan still runs");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.signal(), Some(Signal::SIGTERM as i32), "the orphan was stopped gracefully");
    assert_eq!(stranger.try_wait().unwrap(), None, "an unrelated process is left alone");
    stranger.kill().unwrap();
    stranger.wait().unwrap();
    let left: Vec<String> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, ["replica-0.log"], "records removed, logs kept");
    let logs = driver.logs(id, 10).await.unwrap();
    assert_eq!(logs, "==> replica 0 <==\noutput of the old run\n");
    assert!(driver.observe().await.unwrap().is_empty(), "the reconciler redeploys, not the driver");
}
