//! `bud endpoints`: deploy a model on a cluster and follow it to RUNNING; scale, stop, start,
//! retry and delete it; read its engines' logs and load.
//!
//! The lifecycle verbs return once budcluster has done what was asked, not when budapp has
//! recorded it: they follow the endpoint with [`wait_for`], the one waiting loop, unless told
//! `--no-wait`.

use std::future::Future;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bud_protocol::control::{
    CreateEndpointRequest, EndpointDto, EndpointList, EndpointMetricsDto, Percentiles,
    UpdateEndpointRequest,
};
use clap::{ArgGroup, Subcommand};
use uuid::Uuid;

use super::http::{Api, LIST_CAP};
use super::output::{self, Format};

/// How often a waiting verb reads the endpoint again.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// How long past the endpoint's deployment timeout a waiting verb keeps waiting. By then
/// budcluster should have put it in ERROR `timeout`; if it has not, something else is wrong
/// (budcluster down, a stuck stop) and the person should look rather than wait on.
const WAIT_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, Subcommand)]
pub enum EndpointsCommand {
    /// Deploy a model on a cluster, then follow it until it is RUNNING (or in ERROR).
    Create {
        #[arg(long, value_name = "PROJECT_ID")]
        project: Uuid,
        #[arg(long, value_name = "MODEL_ID")]
        model: Uuid,
        /// The `local` cluster when left out.
        #[arg(long, value_name = "CLUSTER_ID")]
        cluster: Option<Uuid>,
        name: String,
        /// Replicas to run; 1 by default.
        #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
        replicas: Option<i64>,
        /// Replicas kept when scaling down; 0 by default.
        #[arg(long, value_parser = clap::value_parser!(i64).range(0..))]
        min_replicas: Option<i64>,
        /// GPUs per replica; 0 for engine-sim and 1 for real engines by default.
        #[arg(long, value_parser = clap::value_parser!(i64).range(0..))]
        gpus: Option<i64>,
        /// Seconds to reach RUNNING before the endpoint goes to ERROR `timeout`; 600 by default.
        #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(i64).range(1..))]
        timeout: Option<i64>,
        /// An argument appended to the engine's command, e.g. `--engine-arg=--dtype=half`;
        /// repeat it for more.
        #[arg(long = "engine-arg", value_name = "ARG", allow_hyphen_values = true)]
        engine_args: Vec<String>,
        /// Print the endpoint as created and return without following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// List the endpoints you can see.
    List {
        /// Only this project's endpoints.
        #[arg(long, value_name = "PROJECT_ID")]
        project: Option<Uuid>,
    },
    /// Show an endpoint: status and why, replicas ready, recent events.
    Show { id: Uuid },
    /// Change how many replicas an endpoint runs.
    #[command(group(ArgGroup::new("change").required(true).multiple(true)))]
    Scale {
        id: Uuid,
        #[arg(long, group = "change", value_parser = clap::value_parser!(i64).range(1..))]
        replicas: Option<i64>,
        #[arg(long, group = "change", value_parser = clap::value_parser!(i64).range(0..))]
        min_replicas: Option<i64>,
    },
    /// Stop an endpoint's replicas, then follow it until it is STOPPED.
    Stop {
        id: Uuid,
        /// Return once the stop is recorded, without following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Start a stopped endpoint, then follow it until it is RUNNING.
    Start {
        id: Uuid,
        /// Return once the start is recorded, without following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Deploy an endpoint in ERROR again, then follow it until it is RUNNING.
    Retry {
        id: Uuid,
        /// Return once the retry is recorded, without following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Delete a STOPPED or ERROR endpoint.
    Rm { id: Uuid },
    /// Print the last lines of each replica's engine output, as they are (also with --json).
    Logs {
        id: Uuid,
        /// Lines per replica; 200 by default.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000))]
        tail: Option<u32>,
    },
    /// Show an endpoint's load: queue depth, running requests, throughput, latency.
    Metrics { id: Uuid },
}

pub async fn endpoints(
    command: EndpointsCommand,
    api: &mut Api,
    format: Format,
) -> anyhow::Result<String> {
    match command {
        EndpointsCommand::Create {
            project,
            model,
            cluster,
            name,
            replicas,
            min_replicas,
            gpus,
            timeout,
            engine_args,
            no_wait,
        } => {
            let request = CreateEndpointRequest {
                project_id: project,
                model_id: model,
                cluster_id: cluster,
                name,
                replicas,
                min_replicas,
                gpus_per_replica: gpus,
                engine_args,
                deployment_timeout_secs: timeout,
            };
            let created: EndpointDto = api.post("/endpoints", &request).await?;
            follow(api, format, created, Goal::Running, no_wait).await
        }
        EndpointsCommand::List { project } => {
            let filters: Vec<(&str, String)> =
                project.map(|p| ("project_id", p.to_string())).into_iter().collect();
            format.list(&api.list::<EndpointList>("/endpoints", &filters, LIST_CAP).await?)
        }
        EndpointsCommand::Show { id } => {
            format.render(&api.get::<EndpointDto>(&format!("/endpoints/{id}"), &[]).await?, show)
        }
        EndpointsCommand::Scale { id, replicas, min_replicas } => {
            let request = UpdateEndpointRequest { replicas, min_replicas };
            format.one(&api.patch::<EndpointDto>(&format!("/endpoints/{id}"), &request).await?)
        }
        EndpointsCommand::Stop { id, no_wait } => {
            let stopping = lifecycle(api, id, "stop").await?;
            follow(api, format, stopping, Goal::Stopped, no_wait).await
        }
        EndpointsCommand::Start { id, no_wait } => {
            let starting = lifecycle(api, id, "start").await?;
            follow(api, format, starting, Goal::Running, no_wait).await
        }
        EndpointsCommand::Retry { id, no_wait } => {
            let retrying = lifecycle(api, id, "retry").await?;
            follow(api, format, retrying, Goal::Running, no_wait).await
        }
        EndpointsCommand::Rm { id } => {
            api.delete::<()>(&format!("/endpoints/{id}"), &[]).await?;
            format.done(format!("Deleted endpoint {id}"))
        }
        EndpointsCommand::Logs { id, tail } => {
            let query: Vec<(&str, String)> =
                tail.map(|n| ("tail", n.to_string())).into_iter().collect();
            let text = api.get_text(&format!("/endpoints/{id}/logs"), &query).await?;
            // `output::print` ends the output with a line end: the text's own last one goes.
            Ok(text.strip_suffix('\n').map(str::to_owned).unwrap_or(text))
        }
        EndpointsCommand::Metrics { id } => {
            let path = format!("/endpoints/{id}/metrics");
            format.render(&api.get::<EndpointMetricsDto>(&path, &[]).await?, metrics)
        }
    }
}

/// What a lifecycle verb waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Goal {
    Running,
    Stopped,
}

impl Goal {
    fn status(self) -> &'static str {
        match self {
            Goal::Running => "RUNNING",
            Goal::Stopped => "STOPPED",
        }
    }
}

/// Time as [`wait_for`] sees it; the tests pass a clock that jumps instead of sleeping.
trait Clock {
    fn now(&self) -> Instant;

    fn sleep(&self, period: Duration) -> impl Future<Output = ()>;
}

/// The real clock, sleeping on the runtime's timer.
struct WallClock;

impl Clock for WallClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&self, period: Duration) -> impl Future<Output = ()> {
        tokio::time::sleep(period)
    }
}

/// Follows `endpoint`, as `fetch` reads it every `interval`, until its status is `goal`'s,
/// writing a line to `out` (`DEPLOYING 1/2 replicas ready`) whenever its status or ready
/// replicas change. Fails, with the reason, when it goes to ERROR; when it is stopped while
/// it should become RUNNING; and when it is still on its way after its deployment timeout
/// and [`WAIT_GRACE`].
async fn wait_for(
    goal: Goal,
    mut endpoint: EndpointDto,
    mut fetch: impl AsyncFnMut() -> anyhow::Result<EndpointDto>,
    interval: Duration,
    clock: &impl Clock,
    out: &mut impl Write,
) -> anyhow::Result<EndpointDto> {
    let timeout = u64::try_from(endpoint.deployment_timeout_secs).unwrap_or(0);
    let limit = Duration::from_secs(timeout) + WAIT_GRACE;
    let deadline = clock.now() + limit;
    let mut shown = String::new();
    loop {
        let line = progress(&endpoint);
        if line != shown {
            writeln!(out, "{line}").context("writing progress")?;
            shown = line;
        }
        if endpoint.status == goal.status() {
            return Ok(endpoint);
        }
        if endpoint.status == "ERROR" {
            bail!("{}", failure(&endpoint));
        }
        if goal == Goal::Running && matches!(endpoint.status.as_str(), "STOPPING" | "STOPPED") {
            bail!("endpoint {} was stopped before it was running", endpoint.name);
        }
        if clock.now() >= deadline {
            bail!(
                "endpoint {} is still {} ({} replicas ready) after {}s; follow it with `bud endpoints show {}`",
                endpoint.name,
                endpoint.status,
                output::replicas(&endpoint),
                limit.as_secs(),
                endpoint.id
            );
        }
        clock.sleep(interval).await;
        let name = endpoint.name.clone();
        endpoint = fetch().await.with_context(|| format!("checking on endpoint {name}"))?;
    }
}

/// After a lifecycle verb: the endpoint as budapp answered with `--no-wait`, else as it is
/// once it reached `goal`.
async fn follow(
    api: &mut Api,
    format: Format,
    endpoint: EndpointDto,
    goal: Goal,
    no_wait: bool,
) -> anyhow::Result<String> {
    if no_wait {
        return format.one(&endpoint);
    }
    let path = format!("/endpoints/{}", endpoint.id);
    // Progress on standard output for people; on standard error when that carries JSON.
    let mut out: Box<dyn Write> = match format {
        Format::Table => Box::new(std::io::stdout()),
        Format::Json => Box::new(std::io::stderr()),
    };
    let fetch = async || api.get::<EndpointDto>(&path, &[]).await;
    let reached = wait_for(goal, endpoint, fetch, POLL_INTERVAL, &WallClock, &mut out).await?;
    format.render(&reached, show)
}

/// POST `/endpoints/{id}/{verb}`: stop, start or retry.
async fn lifecycle(api: &mut Api, id: Uuid, verb: &str) -> anyhow::Result<EndpointDto> {
    api.post(&format!("/endpoints/{id}/{verb}"), &serde_json::json!({})).await
}

/// One line of progress: `DEPLOYING 1/2 replicas ready`.
fn progress(endpoint: &EndpointDto) -> String {
    format!("{} {} replicas ready", endpoint.status, output::replicas(endpoint))
}

/// Why an endpoint is in ERROR, and where to go from there.
fn failure(endpoint: &EndpointDto) -> String {
    let reason = endpoint.reason.as_deref().unwrap_or("no reason given");
    let detail = if endpoint.reason_detail.is_empty() {
        String::new()
    } else {
        format!(": {}", endpoint.reason_detail)
    };
    format!(
        "endpoint {} is in ERROR: {reason}{detail}; see `bud endpoints logs {id}`, then `bud endpoints retry {id}`",
        endpoint.name,
        id = endpoint.id
    )
}

/// An endpoint's details, then its recent events.
fn show(endpoint: &EndpointDto) -> String {
    output::details_with_events(endpoint, &endpoint.events)
}

/// The engines' load as field/value lines.
fn metrics(m: &EndpointMetricsDto) -> String {
    output::fields(vec![
        ("ENDPOINT", m.endpoint_id.to_string()),
        ("REPLICAS SCRAPED", m.replicas_scraped.to_string()),
        ("QUEUE DEPTH", count(m.queue_depth)),
        ("RUNNING", count(m.running)),
        ("GPU CACHE USAGE", format!("{:.1}%", m.gpu_cache_usage * 100.0)),
        ("REQUESTS/S", format!("{:.2}", m.requests_per_second)),
        ("TOKENS/S", format!("{:.1}", m.tokens_per_second)),
        ("LATENCY P50/P95/P99", percentiles(m.latency_seconds.as_ref())),
        ("TTFT P50/P95/P99", percentiles(m.time_to_first_token_seconds.as_ref())),
        ("WINDOW", format!("{:.0}s", m.window_seconds)),
    ])
}

/// Gauges summed over replicas are whole numbers; anything else keeps a decimal.
fn count(value: f64) -> String {
    if value.fract() == 0.0 { format!("{value:.0}") } else { format!("{value:.1}") }
}

fn percentiles(p: Option<&Percentiles>) -> String {
    let ms = |seconds: f64| format!("{:.1} ms", seconds * 1000.0);
    p.map_or_else(
        || "- (no requests yet)".to_owned(),
        |p| format!("{} / {} / {}", ms(p.p50), ms(p.p95), ms(p.p99)),
    )
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};
    use std::collections::VecDeque;

    use chrono::{TimeZone, Utc};

    use super::*;

    /// A clock that jumps by each sleep, and counts them.
    struct FakeClock {
        now: Cell<Instant>,
        sleeps: Cell<u32>,
    }

    impl FakeClock {
        fn new() -> Self {
            Self { now: Cell::new(Instant::now()), sleeps: Cell::new(0) }
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Instant {
            self.now.get()
        }

        fn sleep(&self, period: Duration) -> impl Future<Output = ()> {
            self.now.set(self.now.get() + period);
            self.sleeps.set(self.sleeps.get() + 1);
            std::future::ready(())
        }
    }

    fn endpoint(status: &str, ready: i64, desired: i64) -> EndpointDto {
        let at = Utc.with_ymd_and_hms(2025, 3, 14, 9, 26, 53).unwrap();
        EndpointDto {
            id: Uuid::nil(),
            project_id: Uuid::nil(),
            model_id: Uuid::nil(),
            cluster_id: Uuid::nil(),
            name: "chat".into(),
            status: status.into(),
            reason: None,
            reason_detail: String::new(),
            replicas_desired: desired,
            replicas_ready: ready,
            min_replicas: 0,
            gpus_per_replica: 0,
            engine_args: vec![],
            deployment_timeout_secs: 600,
            status_since: at,
            events: vec![],
            created_at: at,
            updated_at: at,
        }
    }

    /// Waits from `first` while the fetches answer `then`, in order, and the last one after
    /// that: what was written, what came of it, and how often it slept.
    async fn watch(
        goal: Goal,
        first: EndpointDto,
        then: Vec<EndpointDto>,
    ) -> (String, anyhow::Result<EndpointDto>, u32) {
        let last = then.last().cloned().unwrap_or_else(|| first.clone());
        let script = RefCell::new(VecDeque::from(then));
        let fetch = async || Ok(script.borrow_mut().pop_front().unwrap_or_else(|| last.clone()));
        let clock = FakeClock::new();
        let mut out = Vec::new();
        let result = wait_for(goal, first, fetch, POLL_INTERVAL, &clock, &mut out).await;
        (String::from_utf8(out).unwrap(), result, clock.sleeps.get())
    }

    #[tokio::test]
    async fn each_change_of_status_or_readiness_is_one_line_until_running() {
        let (out, result, sleeps) = watch(
            Goal::Running,
            endpoint("PENDING", 0, 2),
            vec![
                endpoint("DEPLOYING", 0, 2),
                endpoint("DEPLOYING", 0, 2),
                endpoint("DEPLOYING", 1, 2),
                endpoint("RUNNING", 2, 2),
            ],
        )
        .await;

        assert_eq!(
            out,
            "PENDING 0/2 replicas ready\nDEPLOYING 0/2 replicas ready\n\
             DEPLOYING 1/2 replicas ready\nRUNNING 2/2 replicas ready\n"
        );
        assert_eq!(result.unwrap().status, "RUNNING");
        assert_eq!(sleeps, 4);
    }

    #[tokio::test]
    async fn an_endpoint_already_there_needs_no_polling() {
        let (out, result, sleeps) = watch(Goal::Stopped, endpoint("STOPPED", 0, 1), vec![]).await;
        assert_eq!(out, "STOPPED 0/1 replicas ready\n");
        assert!(result.is_ok());
        assert_eq!(sleeps, 0);
    }

    #[tokio::test]
    async fn error_fails_with_the_reason_and_its_detail() {
        let mut failed = endpoint("ERROR", 0, 1);
        failed.reason = Some("crash_loop".into());
        failed.reason_detail = "the engine exited 5 times: exit status 1".into();

        let (out, result, _) =
            watch(Goal::Running, endpoint("DEPLOYING", 0, 1), vec![failed]).await;

        assert_eq!(out, "DEPLOYING 0/1 replicas ready\nERROR 0/1 replicas ready\n");
        let message = result.unwrap_err().to_string();
        assert!(
            message.starts_with(
                "endpoint chat is in ERROR: crash_loop: the engine exited 5 times: exit status 1; "
            ),
            "{message}"
        );
        assert!(message.contains("bud endpoints retry 00000000-"), "{message}");
    }

    #[tokio::test]
    async fn it_gives_up_after_the_deployment_timeout_and_the_grace_saying_where_it_is() {
        let mut first = endpoint("DEPLOYING", 1, 2);
        first.deployment_timeout_secs = 5;

        let (out, result, sleeps) = watch(Goal::Running, first, vec![]).await;

        assert_eq!(out, "DEPLOYING 1/2 replicas ready\n");
        assert_eq!(sleeps, 35);
        let message = result.unwrap_err().to_string();
        assert!(
            message.starts_with("endpoint chat is still DEPLOYING (1/2 replicas ready) after 35s"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn stopping_waits_for_stopped_and_a_stop_ends_a_wait_for_running() {
        let (out, result, _) = watch(
            Goal::Stopped,
            endpoint("STOPPING", 2, 2),
            vec![endpoint("STOPPING", 0, 2), endpoint("STOPPED", 0, 2)],
        )
        .await;
        assert_eq!(
            out,
            "STOPPING 2/2 replicas ready\nSTOPPING 0/2 replicas ready\nSTOPPED 0/2 replicas ready\n"
        );
        assert_eq!(result.unwrap().status, "STOPPED");

        let (_, result, _) =
            watch(Goal::Running, endpoint("DEPLOYING", 0, 1), vec![endpoint("STOPPING", 0, 1)])
                .await;
        assert_eq!(
            result.unwrap_err().to_string(),
            "endpoint chat was stopped before it was running"
        );
    }

    #[tokio::test]
    async fn a_failed_fetch_ends_the_wait_with_its_cause() {
        let clock = FakeClock::new();
        let mut out = Vec::new();
        let fetch = async || -> anyhow::Result<EndpointDto> { bail!("cannot reach budapp") };
        let e = wait_for(
            Goal::Running,
            endpoint("PENDING", 0, 1),
            fetch,
            POLL_INTERVAL,
            &clock,
            &mut out,
        )
        .await
        .unwrap_err();
        assert_eq!(format!("{e:#}"), "checking on endpoint chat: cannot reach budapp");
    }

    #[test]
    fn show_lists_recent_events_after_the_details() {
        let mut e = endpoint("RUNNING", 2, 2);
        e.engine_args = vec!["--dtype".into(), "half precision".into()];
        e.events = vec![bud_protocol::control::EndpointEventDto {
            at: e.created_at,
            kind: "status".into(),
            message: "all replicas ready".into(),
        }];
        let rendered = show(&e);
        assert!(
            rendered.lines().any(|l| l.starts_with("READY") && l.ends_with("2/2 replicas ready")),
            "{rendered}"
        );
        assert!(rendered.contains("--dtype 'half precision'"), "{rendered}");
        let (_, events) = rendered.split_once("Recent events (newest first):\n").unwrap();
        assert!(events.starts_with("AT"), "{rendered}");
        assert!(events.contains("2025-03-14 09:26:53  status  all replicas ready"), "{rendered}");
        assert!(!show(&endpoint("RUNNING", 1, 1)).contains("Recent events"));
    }

    #[test]
    fn metrics_are_field_value_lines_with_dashes_before_any_request() {
        let mut m = EndpointMetricsDto {
            endpoint_id: Uuid::nil(),
            replicas_scraped: 2,
            queue_depth: 3.0,
            running: 1.5,
            gpu_cache_usage: 0.25,
            requests_per_second: 4.0,
            tokens_per_second: 64.31,
            latency_seconds: None,
            time_to_first_token_seconds: Some(Percentiles { p50: 0.02, p95: 0.0345, p99: 0.1 }),
            window_seconds: 10.0,
        };
        let rendered = metrics(&m);
        let value = |field: &str| {
            rendered
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .map(str::trim)
                .unwrap_or_else(|| panic!("no {field} in {rendered}"))
                .to_owned()
        };
        assert_eq!(value("QUEUE DEPTH"), "3");
        assert_eq!(value("RUNNING"), "1.5");
        assert_eq!(value("REPLICAS SCRAPED"), "2");
        assert_eq!(value("REQUESTS/S"), "4.00");
        assert_eq!(value("TOKENS/S"), "64.3");
        assert_eq!(value("GPU CACHE USAGE"), "25.0%");
        assert_eq!(value("LATENCY P50/P95/P99"), "- (no requests yet)");
        assert_eq!(value("TTFT P50/P95/P99"), "20.0 ms / 34.5 ms / 100.0 ms");
        m.latency_seconds = Some(Percentiles { p50: 1.0, p95: 2.0, p99: 3.0 });
        assert!(metrics(&m).contains("1000.0 ms / 2000.0 ms / 3000.0 ms"));
    }
}
