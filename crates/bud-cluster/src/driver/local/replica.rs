//! One replica's supervisor: a task that starts the engine, watches its health, restarts it
//! with backoff when it exits, and reports what a person should know (start failure, crash
//! loop). The task owns the child process; when the task ends, the process is gone.

use std::collections::VecDeque;
use std::fs::File;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bud_domain::FailureReason;
use chrono::Utc;
use nix::sys::signal::Signal;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{LocalConfig, lock, logs, process, records};
use crate::driver::EndpointSpec;

/// Attempts in a row that exit with an error before their first healthy answer, after which the
/// replica reports `StartFailure`.
const START_FAILURES: u32 = 3;
/// Health checks in a row that fail before a ready replica counts as not ready.
const FAILED_PROBES: u32 = 3;
/// Lines of the engine's output quoted in a start failure.
const OUTPUT_LINES: usize = 10;

/// What every supervisor shares.
pub(super) struct Context {
    pub config: LocalConfig,
    pub http: reqwest::Client,
}

/// The driver's handle on a supervised replica.
pub(super) struct Replica {
    /// GPU indices this replica holds for as long as it is in the table, across restarts.
    pub gpus: Vec<u32>,
    status: Arc<Mutex<Status>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// What a replica's supervisor last saw.
#[derive(Debug, Clone, Default)]
pub(super) struct Status {
    /// The engine answers its health check.
    pub ready: bool,
    /// The port of the running engine, if one runs.
    pub port: Option<u16>,
    /// Why the replica is not coming up by itself; cleared when it recovers.
    pub failure: Option<(FailureReason, String)>,
}

impl Replica {
    /// Starts supervising replica `index` of `spec`; `stop` ends the supervision.
    pub fn start(
        context: Arc<Context>,
        spec: Arc<EndpointSpec>,
        index: u32,
        gpus: Vec<u32>,
        stop: CancellationToken,
    ) -> Replica {
        let status = Arc::new(Mutex::new(Status::default()));
        let folder = context.config.state_dir.join(spec.id.to_string());
        let supervisor = Supervisor {
            record_path: folder.join(format!("replica-{index}.json")),
            log_path: folder.join(format!("replica-{index}.log")),
            backoff: context.config.restart_backoff.0,
            failed_starts: 0,
            exits: VecDeque::new(),
            context,
            spec,
            index,
            gpus: gpus.clone(),
            status: status.clone(),
            stop: stop.clone(),
        };
        let task = tokio::spawn(supervisor.run());
        Replica { gpus, status, stop, task }
    }

    pub fn status(&self) -> Status {
        lock(&self.status).clone()
    }

    /// Tells the supervisor to stop the engine (SIGTERM, grace, SIGKILL) and not restart it.
    pub fn begin_stop(&self) {
        self.stop.cancel();
    }

    /// Returns once the supervisor has ended, and with it the engine process.
    pub async fn stopped(self) {
        if let Err(e) = self.task.await {
            // The child was dropped with the task, and `kill_on_drop` killed it.
            tracing::error!(error = %e, "a replica supervisor panicked");
        }
    }
}

struct Supervisor {
    context: Arc<Context>,
    spec: Arc<EndpointSpec>,
    index: u32,
    gpus: Vec<u32>,
    status: Arc<Mutex<Status>>,
    stop: CancellationToken,
    record_path: PathBuf,
    log_path: PathBuf,
    /// Delay before the next restart.
    backoff: Duration,
    /// Attempts in a row that failed before ever becoming healthy.
    failed_starts: u32,
    /// When recent attempts ended; those older than the crash-loop window are dropped.
    exits: VecDeque<Instant>,
}

/// How one run of the engine ended.
enum Outcome {
    /// No process could be started (missing binary, no log file, no port).
    SpawnFailed(String),
    /// The engine exited by itself.
    Exited {
        how: String,
        success: bool,
        /// How long it had been ready; `None` if it never answered its health check.
        ready_for: Option<Duration>,
        /// Its last lines of output, for a start failure.
        output: Vec<String>,
    },
    /// The engine did not answer its health check within the start timeout and was killed.
    StartTimeout,
    /// The supervisor was told to stop; the engine is gone.
    Stopped,
}

/// What woke a supervisor up while an engine runs.
enum Event {
    Exited(std::io::Result<std::process::ExitStatus>),
    Stop,
    StartDeadline,
    Probed(bool),
}

impl Supervisor {
    async fn run(mut self) {
        loop {
            let outcome = self.attempt().await;
            if matches!(outcome, Outcome::Stopped) {
                return;
            }
            let delay = self.backoff;
            self.account(outcome, delay);
            self.backoff = (self.backoff * 2).min(self.context.config.restart_backoff.1);
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Starts the engine once and watches it until it exits or the supervisor is stopped.
    async fn attempt(&mut self) -> Outcome {
        let mut log = match logs::open(&self.log_path) {
            Ok(log) => log,
            Err(e) => {
                return Outcome::SpawnFailed(format!(
                    "cannot open the log {}: {e}",
                    self.log_path.display()
                ));
            }
        };
        let port = match process::free_port() {
            Ok(port) => port,
            Err(e) => return Outcome::SpawnFailed(format!("no free port on 127.0.0.1: {e}")),
        };
        let argv = self.argv(port);
        let mut child = match self.spawn(&argv, &log) {
            Ok(child) => child,
            Err(e) => {
                let detail = format!("cannot run `{}`: {e}", argv[0]);
                logs::note(&mut log, &detail);
                return Outcome::SpawnFailed(detail);
            }
        };
        let Some(pid) = child.id() else {
            // Only an already-waited child has no pid; a fresh one always has.
            return Outcome::SpawnFailed("the engine vanished as it started".into());
        };
        logs::note(&mut log, &format!("started pid {pid} port {port}"));
        let output_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let record = records::Record {
            pid,
            port,
            argv,
            generation: self.spec.generation,
            started_at: Utc::now(),
            start_ticks: process::start_ticks(pid),
        };
        if let Err(e) = records::write(&self.record_path, &record) {
            tracing::warn!(error = %e, "cannot write a replica record; a crash would leave it running");
        }
        self.update(|s| s.port = Some(port));

        let outcome = self.watch(&mut child, pid, port, &mut log, output_start).await;

        // An engine's workers may outlive it; they share its process group. The group id stays
        // taken while any member lives, so this reaches no one else.
        process::signal_group(pid, Signal::SIGKILL);
        records::remove(&self.record_path);
        self.update(|s| {
            s.ready = false;
            s.port = None;
        });
        outcome
    }

    fn spawn(&self, argv: &[String], log: &File) -> std::io::Result<Child> {
        let mut command = Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?)
            // Its own process group, so stopping it reaches the workers it forks, and a Ctrl-C
            // meant for budcluster does not reach it before budcluster stops it gracefully.
            .process_group(0)
            .kill_on_drop(true);
        if self.context.config.gpus > 0 {
            let visible: Vec<String> = self.gpus.iter().map(u32::to_string).collect();
            command.env("CUDA_VISIBLE_DEVICES", visible.join(","));
        }
        command.spawn()
    }

    /// Watches a started engine: first until it answers its health check (or the start timeout
    /// passes), then for as long as it runs.
    async fn watch(
        &mut self,
        child: &mut Child,
        pid: u32,
        port: u16,
        log: &mut File,
        output_start: u64,
    ) -> Outcome {
        let context = self.context.clone();
        let config = &context.config;
        let url = format!("http://127.0.0.1:{port}{}", config.health_path);
        let probe_timeout =
            config.health_interval.clamp(Duration::from_millis(200), Duration::from_secs(5));
        let start_poll = config.health_interval.min(Duration::from_millis(200));
        let deadline = tokio::time::sleep(config.start_timeout);
        tokio::pin!(deadline);

        loop {
            let probe = probe_after(context.http.clone(), url.clone(), start_poll, probe_timeout);
            let event = tokio::select! {
                status = child.wait() => Event::Exited(status),
                () = self.stop.cancelled() => Event::Stop,
                () = &mut deadline => Event::StartDeadline,
                healthy = probe => Event::Probed(healthy),
            };
            match event {
                Event::Exited(status) => {
                    let output =
                        logs::tail(&self.log_path, output_start, OUTPUT_LINES).unwrap_or_default();
                    let success = status.as_ref().is_ok_and(|s| s.success());
                    let how = process::describe_exit(&status);
                    return Outcome::Exited { how, success, ready_for: None, output };
                }
                Event::Stop => return self.stopped(child, pid, log).await,
                Event::StartDeadline => {
                    let limit = human(config.start_timeout);
                    logs::note(log, &format!("not healthy within {limit}; stopping it"));
                    let how = process::terminate(child, pid, config.stop_grace).await;
                    logs::note(log, &format!("stopped ({how})"));
                    return Outcome::StartTimeout;
                }
                Event::Probed(true) => break,
                Event::Probed(false) => {}
            }
        }

        logs::note(log, "ready");
        let ready_since = Instant::now();
        let mut failed_probes = 0;
        self.update(|s| {
            s.ready = true;
            if matches!(s.failure, Some((FailureReason::StartFailure, _))) {
                s.failure = None;
            }
        });
        self.failed_starts = 0;
        loop {
            let probe = probe_after(
                context.http.clone(),
                url.clone(),
                config.health_interval,
                probe_timeout,
            );
            let event = tokio::select! {
                status = child.wait() => Event::Exited(status),
                () = self.stop.cancelled() => Event::Stop,
                healthy = probe => Event::Probed(healthy),
            };
            match event {
                Event::Exited(status) => {
                    let success = status.as_ref().is_ok_and(|s| s.success());
                    let how = process::describe_exit(&status);
                    let ready_for = Some(ready_since.elapsed());
                    return Outcome::Exited { how, success, ready_for, output: Vec::new() };
                }
                Event::Stop => return self.stopped(child, pid, log).await,
                Event::StartDeadline => {}
                Event::Probed(true) => {
                    if failed_probes >= FAILED_PROBES {
                        logs::note(log, "healthy again");
                        self.update(|s| s.ready = true);
                    }
                    failed_probes = 0;
                }
                Event::Probed(false) => {
                    failed_probes += 1;
                    if failed_probes == FAILED_PROBES {
                        logs::note(
                            log,
                            &format!("not ready: {FAILED_PROBES} health checks failed"),
                        );
                        self.update(|s| s.ready = false);
                    }
                }
            }
            let window = config.crash_loop.1;
            if failed_probes < FAILED_PROBES && ready_since.elapsed() >= window {
                // Up long enough: it is not looping any more.
                self.backoff = config.restart_backoff.0;
                self.update(|s| {
                    if matches!(s.failure, Some((FailureReason::CrashLoop, _))) {
                        s.failure = None;
                    }
                });
            }
        }
    }

    async fn stopped(&self, child: &mut Child, pid: u32, log: &mut File) -> Outcome {
        let how = process::terminate(child, pid, self.context.config.stop_grace).await;
        logs::note(log, &format!("stopped ({how})"));
        Outcome::Stopped
    }

    /// Counts an attempt that ended by itself, notes it in the log, and decides the replica's
    /// failure.
    fn account(&mut self, outcome: Outcome, delay: Duration) {
        let (threshold, window) = self.context.config.crash_loop;
        let now = Instant::now();
        self.exits.push_back(now);
        while self.exits.front().is_some_and(|t| now.duration_since(*t) > window) {
            self.exits.pop_front();
        }
        let index = self.index;
        let (last, start_failure) = match outcome {
            Outcome::SpawnFailed(detail) => {
                self.failed_starts += 1;
                let failure = format!(
                    "replica {index} could not be started {} times in a row (last: {detail})",
                    self.failed_starts
                );
                (detail, Some(failure))
            }
            Outcome::Exited { how, success, ready_for: None, output } => {
                if success {
                    self.failed_starts = 0;
                } else {
                    self.failed_starts += 1;
                }
                let mut failure = format!(
                    "replica {index} exited before becoming ready {} times in a row (last: {how})",
                    self.failed_starts
                );
                if !output.is_empty() {
                    failure.push_str("; its last output:\n");
                    failure.push_str(&output.join("\n"));
                }
                (how, Some(failure))
            }
            Outcome::Exited { how, ready_for: Some(_), .. } => {
                self.failed_starts = 0;
                (how, None)
            }
            Outcome::StartTimeout => {
                (format!("not healthy within {}", human(self.context.config.start_timeout)), None)
            }
            Outcome::Stopped => return,
        };
        let mut log = logs::open(&self.log_path);
        if let Ok(log) = log.as_mut() {
            logs::note(log, &format!("exited ({last}); restarting in {}", human(delay)));
        }
        tracing::warn!(
            endpoint_id = %self.spec.id,
            replica = index,
            exit = %last,
            "replica exited; restarting in {}",
            human(delay)
        );

        let failure = match start_failure {
            Some(detail) if self.failed_starts >= START_FAILURES => {
                Some((FailureReason::StartFailure, detail))
            }
            _ if self.exits.len() >= threshold as usize => {
                let detail = format!(
                    "replica {index} exited {} times in {} (last: {last}); see the endpoint logs",
                    self.exits.len(),
                    human(window)
                );
                Some((FailureReason::CrashLoop, detail))
            }
            _ => None,
        };
        if let Some(failure) = failure {
            self.update(|s| s.failure = Some(failure));
        }
    }

    /// The engine command for this replica on `port`.
    fn argv(&self, port: u16) -> Vec<String> {
        let spec = &self.spec;
        let vars = [
            ("model", spec.served_name.clone()),
            ("source", spec.model_source.clone()),
            ("port", port.to_string()),
            ("endpoint", spec.id.to_string()),
            ("replica", self.index.to_string()),
        ];
        let mut argv: Vec<String> =
            self.context.config.command.iter().map(|part| render(part, &vars)).collect();
        argv.extend(spec.engine_args.iter().cloned());
        argv
    }

    fn update(&self, change: impl FnOnce(&mut Status)) {
        change(&mut lock(&self.status));
    }
}

/// Waits `after`, then asks the health check; true on a 2xx answer within `timeout`.
async fn probe_after(
    http: reqwest::Client,
    url: String,
    after: Duration,
    timeout: Duration,
) -> bool {
    tokio::time::sleep(after).await;
    match http.get(&url).timeout(timeout).send().await {
        Ok(response) => response.status().is_success(),
        Err(_) => false,
    }
}

/// Replaces `{name}` placeholders in one pass, so a value holding braces is never expanded
/// again; unknown placeholders stay as they are.
fn render(template: &str, vars: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let value = after.find('}').and_then(|close| {
            vars.iter().find(|(name, _)| *name == &after[..close]).map(|v| (close, v))
        });
        match value {
            Some((close, (_, value))) => {
                out.push_str(value);
                rest = &after[close + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// A duration as a person writes it: `500ms`, `60s`, `1.5s`.
fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vec<(&'static str, String)> {
        vec![("model", "llama-{port}".into()), ("port", "8001".into())]
    }

    #[test]
    fn placeholders_are_replaced_once() {
        assert_eq!(render("--port={port}", &vars()), "--port=8001");
        assert_eq!(render("{model}", &vars()), "llama-{port}");
        assert_eq!(render("{unknown} {port}", &vars()), "{unknown} 8001");
        assert_eq!(render("{ {port}}", &vars()), "{ 8001}");
        assert_eq!(render("no braces", &vars()), "no braces");
        assert_eq!(render("open {", &vars()), "open {");
    }

    #[test]
    fn durations_read_like_a_person_wrote_them() {
        assert_eq!(human(Duration::from_millis(500)), "500ms");
        assert_eq!(human(Duration::from_secs(60)), "60s");
        assert_eq!(human(Duration::from_millis(1500)), "1.5s");
    }
}
