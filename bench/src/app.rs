//! `bud-bench app`: budapp's REST API on SQLite and on PostgreSQL, started in-process on a
//! fresh database, measured in four scenarios, compared with a baseline taken in the same run.
//!
//! - **baseline**: `GET /healthz`, no token and no database, closed loop: what the HTTP stack,
//!   the middleware and this machine allow at all.
//! - **read**: `GET /projects/{id}` with a bearer token, closed loop: token verification, the
//!   caller's user, grants and memberships, then the project: four queries a request.
//! - **write**: `POST /projects`, closed loop: the reads of authentication, then a transaction
//!   inserting the project, the creator's membership and a record in the hash-chained audit log
//!   (which serialises writers).
//! - **target**: the read at a fixed rate, open loop, against "p99 < 5 ms at 500 requests/s".
//!
//! The write scenario runs last: every project it creates makes the token's user a member of
//! one more project, and authentication loads all of a caller's memberships, so reads measured
//! after it would measure a different user.
//!
//! # Two runtimes
//! budapp runs on a multi-thread tokio runtime of its own with `--server-threads` workers (1 by
//! default); the load generator runs on a current-thread runtime on the main thread. They share
//! no scheduler, so a busy loader cannot delay the server's tasks in its run queue nor the
//! other way round, and on this 2-core machine each gets a core (PostgreSQL's backends compete
//! for both). The server's runtime is multi-thread, like the `bud` binary's, so it schedules
//! tasks as in production (work stealing, a blocking pool for password hashing). Everything
//! of the server, its database pool included, is created on its runtime.

use std::time::Duration;

use anyhow::{Context, anyhow, bail, ensure};
use bud_app::{AppConfig, AppState};
use bud_auth::{password, secrets};
use bud_domain::Email;
use bud_protocol::control::{CreateProjectRequest, LoginRequest, ProjectDto, TokenResponse};
use bud_store::Backend;
use bud_store::testing::{self, TestDatabase};
use comfy_table::{Table, presets};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use rand::seq::SliceRandom;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Verdict;
use crate::load::{self, Body, HttpClient, Phases, RequestFactory, Tally};

/// Projects created before measuring; the read scenarios pick among them at random.
const SEEDED_PROJECTS: usize = 50;
/// The latency target, stated for PostgreSQL at [`TARGET_RATE`].
const TARGET_P99: Duration = Duration::from_millis(5);
const TARGET_RATE: u32 = 500;
/// The open loop must deliver at least this fraction of its rate for the target to count as met.
const MIN_ACHIEVED_RATE: f64 = 0.95;
const ADMIN_EMAIL: &str = "admin@bud.local";

#[derive(Debug, clap::Args)]
pub struct AppArgs {
    /// Which databases to run budapp on, one after the other.
    #[arg(long, value_enum, default_value_t = BackendChoice::Both)]
    backend: BackendChoice,
    /// Measured seconds per scenario, after the warm-up.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    seconds: u64,
    /// Warm-up seconds per scenario, whose answers are discarded.
    #[arg(long, default_value_t = 2)]
    warmup_seconds: u64,
    /// Requests per second of the open-loop target scenario.
    #[arg(long, default_value_t = TARGET_RATE, value_parser = clap::value_parser!(u32).range(1..))]
    rate: u32,
    /// Requests in flight in the closed-loop scenarios (one connection each).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Worker threads of budapp's runtime.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    server_threads: u16,
    /// A PostgreSQL URL whose user may create and drop databases; the benchmark creates a fresh
    /// one and drops it at the end.
    #[arg(
        long,
        env = "BUD_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    postgres_url: String,
    /// Where budapp's logs go. `sink` formats them as production does (JSON, one line per
    /// request at `info`) and discards them, so their cost is measured but not the terminal's.
    #[arg(long, value_enum, default_value_t = ServerLog::Sink)]
    server_log: ServerLog,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum BackendChoice {
    Sqlite,
    Postgres,
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ServerLog {
    Sink,
    Stderr,
    Off,
}

/// Runs the scenarios on each chosen backend and prints a table per backend.
pub fn run(args: &AppArgs) -> anyhow::Result<Verdict> {
    init_server_log(args.server_log)?;
    let backends = match args.backend {
        BackendChoice::Sqlite => vec![Backend::Sqlite],
        BackendChoice::Postgres => vec![Backend::Postgres],
        BackendChoice::Both => vec![Backend::Sqlite, Backend::Postgres],
    };
    println!("{}", describe_setup(args));
    let mut verdict = Verdict::Clean;
    for backend in backends {
        let report = bench_backend(backend, args)?;
        println!("\n{}", report.render(args));
        if report.scenarios.iter().any(|s| s.tally.error_rate() > load::MAX_ERROR_RATE) {
            verdict = Verdict::TooManyErrors;
        }
    }
    Ok(verdict)
}

/// The figures of one backend; the baseline comes first.
struct BackendReport {
    backend: Backend,
    scenarios: Vec<Scenario>,
}

struct Scenario {
    name: &'static str,
    /// How the load was applied, e.g. "closed, 16 in flight".
    load: String,
    /// Whether throughput is the server's to choose (closed loop) or fixed by the schedule.
    open_loop: bool,
    tally: Tally,
}

/// budapp serving on loopback, with the database it owns.
struct Server {
    url: String,
    admin_password: String,
    shutdown: CancellationToken,
    serving: tokio::task::JoinHandle<std::io::Result<()>>,
    db: TestDatabase,
}

/// Starts budapp on `backend`, measures, and stops it and removes its database whether the
/// measurement succeeded or not (Ctrl-C during the measurement included).
fn bench_backend(backend: Backend, args: &AppArgs) -> anyhow::Result<BackendReport> {
    let server_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(args.server_threads))
        .thread_name("budapp")
        .enable_all()
        .build()
        .context("starting budapp's runtime")?;
    let loader_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the load generator's runtime")?;

    eprintln!("{}: creating a fresh database and starting budapp", backend_name(backend));
    let server = server_runtime.block_on(Server::start(backend, &args.postgres_url))?;
    let measured = loader_runtime.block_on(async {
        tokio::select! {
            report = measure(backend, &server, args) => report,
            () = interrupted() => Err(anyhow!("interrupted")),
        }
    });
    // Dropping the loader's runtime closes its pooled connections, which budapp's graceful
    // shutdown would otherwise wait for.
    drop(loader_runtime);
    server_runtime.block_on(server.stop());
    measured
}

impl Server {
    async fn start(backend: Backend, postgres_url: &str) -> anyhow::Result<Self> {
        // From here on a failure drops `db`, which removes the database.
        let db = match backend {
            Backend::Sqlite => {
                testing::fresh_sqlite().await.context("creating a SQLite database")?
            }
            Backend::Postgres => testing::fresh_postgres(postgres_url).await.context(
                "creating a PostgreSQL database (is the server at --postgres-url or \
                 BUD_BENCH_POSTGRES_URL running, and may its user create databases?)",
            )?,
        };
        let keyring =
            secrets::Keyring::new("bench", vec![("bench".into(), secrets::generate_key())])
                .context("creating the keyring")?;
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding a loopback port")?;
        let url = format!("http://{}", listener.local_addr().context("reading the bound port")?);
        let config = AppConfig {
            public_url: url.clone(),
            // Outlasts any run, so the token logged in once is valid to the end.
            access_token_ttl: Duration::from_secs(24 * 3600),
            ..AppConfig::default()
        };
        let state = AppState::build(config, db.store().clone(), keyring)
            .await
            .context("building budapp's state")?;
        let admin_password = password::generate_password();
        let email = Email::parse("email", ADMIN_EMAIL)?;
        bud_app::identity::ensure_first_admin(&state, &email, Some(admin_password.clone()))
            .await
            .context("creating the admin account")?;
        let shutdown = CancellationToken::new();
        let serving = tokio::spawn(bud_app::run(listener, state, shutdown.clone()));
        Ok(Self { url, admin_password, shutdown, serving, db })
    }

    /// Stops serving (waiting at most five seconds) and removes the database.
    async fn stop(self) {
        self.shutdown.cancel();
        match tokio::time::timeout(Duration::from_secs(5), self.serving).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("budapp stopped with an error: {e}"),
            Ok(Err(e)) => eprintln!("budapp's task failed: {e}"),
            Err(_) => eprintln!("budapp did not stop within 5 s; removing its database anyway"),
        }
        self.db.cleanup().await;
    }
}

/// Completes when the user presses Ctrl-C; never if that cannot be listened for.
async fn interrupted() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Seeds, then runs the four scenarios against the baseline.
async fn measure(
    backend: Backend,
    server: &Server,
    args: &AppArgs,
) -> anyhow::Result<BackendReport> {
    let client = HttpClient::new(usize::from(args.concurrency));
    let base = server.url.as_str();
    let token = login(&client, base, &server.admin_password).await?;
    let projects = seed_projects(&client, base, &token).await?;
    let phases = Phases {
        warmup: Duration::from_secs(args.warmup_seconds),
        measure: Duration::from_secs(args.seconds),
    };
    let concurrency = usize::from(args.concurrency);
    let closed = format!("closed, {concurrency} in flight");
    let progress = |name: &str| {
        eprintln!(
            "{}: {name} ({} s warm-up + {} s)",
            backend_name(backend),
            args.warmup_seconds,
            args.seconds
        );
    };

    progress("baseline");
    let baseline = load::closed_loop(&client, healthz(base)?, concurrency, phases).await?;
    progress("read");
    let read =
        load::closed_loop(&client, read_project(&token, &projects)?, concurrency, phases).await?;
    progress("target");
    let target =
        load::open_loop(&client, read_project(&token, &projects)?, args.rate, phases).await?;
    progress("write");
    let write =
        load::closed_loop(&client, create_project(base, &token)?, concurrency, phases).await?;

    let scenario = |name, load: &str, open_loop, tally| Scenario {
        name,
        load: load.to_owned(),
        open_loop,
        tally,
    };
    Ok(BackendReport {
        backend,
        scenarios: vec![
            scenario("baseline: GET /healthz", &closed, false, baseline),
            scenario("read: GET /projects/{id}", &closed, false, read),
            scenario("write: POST /projects", &closed, false, write),
            scenario("target: GET /projects/{id}", &format!("open, {}/s", args.rate), true, target),
        ],
    })
}

// ---- requests -------------------------------------------------------------------------------

/// Logs the admin in and returns the `Authorization` header value for its access token.
async fn login(client: &HttpClient, base: &str, password: &str) -> anyhow::Result<HeaderValue> {
    let body = LoginRequest { email: ADMIN_EMAIL.to_owned(), password: password.to_owned() };
    let request = json_request(Method::POST, &format!("{base}/auth/login"), None, &body)?;
    let answer = client.send(request).await.context("logging in")?;
    ensure!(
        answer.status == StatusCode::OK,
        "logging in answered {}: {}",
        answer.status,
        String::from_utf8_lossy(&answer.body)
    );
    let tokens: TokenResponse =
        serde_json::from_slice(&answer.body).context("reading the login answer")?;
    HeaderValue::from_str(&format!("Bearer {}", tokens.access_token))
        .context("the access token is not a valid header value")
}

/// Creates [`SEEDED_PROJECTS`] projects; their creator, the token's user, is a member of each.
async fn seed_projects(
    client: &HttpClient,
    base: &str,
    token: &HeaderValue,
) -> anyhow::Result<Vec<Uri>> {
    let mut uris = Vec::with_capacity(SEEDED_PROJECTS);
    for n in 0..SEEDED_PROJECTS {
        let body = CreateProjectRequest { name: format!("bench-seed-{n}"), description: None };
        let request = json_request(Method::POST, &format!("{base}/projects"), Some(token), &body)?;
        let answer = client.send(request).await.context("seeding projects")?;
        if answer.status != StatusCode::CREATED {
            bail!(
                "creating a seed project answered {}: {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            );
        }
        let project: ProjectDto =
            serde_json::from_slice(&answer.body).context("reading a created project")?;
        uris.push(format!("{base}/projects/{}", project.id).parse()?);
    }
    Ok(uris)
}

fn healthz(base: &str) -> anyhow::Result<RequestFactory> {
    let uri: Uri = format!("{base}/healthz").parse()?;
    Ok(std::sync::Arc::new(move |_| Ok(Request::get(uri.clone()).body(Body::default())?)))
}

/// One of `projects`, chosen at random for each request.
fn read_project(token: &HeaderValue, projects: &[Uri]) -> anyhow::Result<RequestFactory> {
    let (token, projects) = (token.clone(), projects.to_vec());
    ensure!(!projects.is_empty(), "no projects to read");
    Ok(std::sync::Arc::new(move |_| {
        let uri = projects.choose(&mut rand::thread_rng()).context("no projects to read")?;
        Ok(Request::get(uri.clone()).header(AUTHORIZATION, token.clone()).body(Body::default())?)
    }))
}

/// A project named after the request's sequence number, unique within the run's database.
fn create_project(base: &str, token: &HeaderValue) -> anyhow::Result<RequestFactory> {
    let (uri, token): (Uri, _) = (format!("{base}/projects").parse()?, token.clone());
    Ok(std::sync::Arc::new(move |n| {
        let body = CreateProjectRequest { name: format!("bench-write-{n}"), description: None };
        Ok(Request::post(uri.clone())
            .header(AUTHORIZATION, token.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(Body::from(serde_json::to_vec(&body)?))?)
    }))
}

fn json_request(
    method: Method,
    uri: &str,
    token: Option<&HeaderValue>,
    body: &impl serde::Serialize,
) -> anyhow::Result<Request<Body>> {
    let mut request =
        Request::builder().method(method).uri(uri).header(CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        request = request.header(AUTHORIZATION, token.clone());
    }
    Ok(request.body(Body::from(serde_json::to_vec(body)?))?)
}

// ---- report ---------------------------------------------------------------------------------

fn backend_name(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "SQLite",
        Backend::Postgres => "PostgreSQL",
    }
}

fn describe_setup(args: &AppArgs) -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let log = match args.server_log {
        ServerLog::Sink => "JSON at info, discarded",
        ServerLog::Stderr => "JSON at info, to stderr",
        ServerLog::Off => "off",
    };
    format!(
        "bud-bench app: {cpus} CPUs; budapp on a runtime of {} worker(s), the load generator on \
         a current-thread runtime; closed loops {} in flight, open loop {}/s; {} s warm-up + {} \
         s per scenario; budapp's logs: {log}; database pool: 10 connections",
        args.server_threads, args.concurrency, args.rate, args.warmup_seconds, args.seconds
    )
}

impl BackendReport {
    /// A table of absolute figures and ratios to the baseline, the target's verdict, and what
    /// failed.
    fn render(&self, args: &AppArgs) -> String {
        let mut table = Table::new();
        table.load_preset(presets::ASCII_MARKDOWN).set_header(vec![
            "scenario",
            "load",
            "requests",
            "errors",
            "req/s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "req/s ÷ baseline",
            "p50 ÷ baseline",
            "p99 ÷ baseline",
        ]);
        let Some(baseline) = self.scenarios.first().map(|s| &s.tally) else {
            return String::new();
        };
        for s in &self.scenarios {
            let t = &s.tally;
            let l = t.latency();
            let relative = |a: Duration, b: Duration| {
                format!("{:.1}", load::ratio(a.as_secs_f64(), b.as_secs_f64()))
            };
            table.add_row(vec![
                s.name.to_owned(),
                s.load.clone(),
                t.requests().to_string(),
                format!("{} ({:.2}%)", t.error_count(), 100.0 * t.error_rate()),
                format!("{:.0}", t.throughput()),
                ms(l.quantile(0.50)),
                ms(l.quantile(0.99)),
                ms(l.quantile(0.999)),
                ms(l.max()),
                if s.open_loop {
                    "(fixed rate)".to_owned()
                } else {
                    format!("{:.3}", load::ratio(t.throughput(), baseline.throughput()))
                },
                relative(l.quantile(0.50), baseline.latency().quantile(0.50)),
                relative(l.quantile(0.99), baseline.latency().quantile(0.99)),
            ]);
        }
        let mut out = format!("{}\n{table}\n", backend_name(self.backend));
        if let Some(target) = self.scenarios.iter().find(|s| s.open_loop) {
            out.push_str(&self.target_verdict(&target.tally, args.rate));
        }
        for s in &self.scenarios {
            for (kind, count) in s.tally.errors() {
                out.push_str(&format!("\n  {}: {count} × {kind}", s.name));
            }
        }
        out
    }

    fn target_verdict(&self, target: &Tally, rate: u32) -> String {
        let p99 = target.latency().quantile(0.99);
        let met = p99 < TARGET_P99
            && target.throughput() >= MIN_ACHIEVED_RATE * f64::from(rate)
            && target.error_rate() <= load::MAX_ERROR_RATE;
        let scope = match (self.backend, rate == TARGET_RATE) {
            (Backend::Postgres, true) => "",
            (Backend::Postgres, false) => " (the target names 500 requests/s)",
            (Backend::Sqlite, _) => " (the target is stated for PostgreSQL; for reference)",
        };
        // Shown so that a miss caused by the generator running late can be told apart.
        let split = match (target.send_lag(), target.service_time()) {
            (Some(lag), Some(service)) => format!(
                "; of which the generator's lateness p99 {} ms, send to answer p99 {} ms",
                ms(lag.quantile(0.99)),
                ms(service.quantile(0.99))
            ),
            _ => String::new(),
        };
        format!(
            "target p99 < {} ms at {rate} requests/s{scope}: {} (p99 {} ms, p99.9 {} ms at \
             {:.1} requests/s achieved, {} errors{split})",
            TARGET_P99.as_millis(),
            if met { "PASS" } else { "FAIL" },
            ms(p99),
            ms(target.latency().quantile(0.999)),
            target.throughput(),
            target.error_count(),
        )
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

/// Installs a global subscriber formatting budapp's logs as the `bud` binary does by default.
fn init_server_log(mode: ServerLog) -> anyhow::Result<()> {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false);
    let result = match mode {
        ServerLog::Off => return Ok(()),
        ServerLog::Sink => builder.with_writer(std::io::sink).try_init(),
        ServerLog::Stderr => builder.with_writer(std::io::stderr).try_init(),
    };
    result.map_err(|e| anyhow!("cannot install the log subscriber: {e}"))
}
