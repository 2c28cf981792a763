//! `bud-bench gateway`: budgateway's cost as a proxy hop. The same load is sent in one run to a
//! fast mock upstream directly and through the gateway — with key authentication, rate limits
//! and metering on — and the table gives the difference: requests/s, added latency, the
//! gateway's CPU time per request and its resident memory, for non-streaming and streaming
//! requests; an optional soak shows whether memory stays flat.
//!
//! # Processes and CPUs
//! The gateway runs in a child process (this program re-executed as the hidden
//! `gateway-server`, see [`server`]) pinned with `taskset` to `--gateway-cpus` (CPU 0), so that
//! its CPU time can be read from `/proc/<pid>/stat` and nothing else runs on its core. This
//! process — the load generator on a current-thread runtime on the main thread, the mock
//! upstream on a one-worker runtime of its own — is pinned to `--loader-cpus` (CPU 1). Both
//! sides' CPU use is reported, so a run limited by the loader's core can be told from one
//! limited by the gateway's.
//!
//! # Scenarios
//! Each runs against the mock directly, then through a bare reverse proxy in the gateway's
//! place (hyper alone, see [`bare`]; `--no-bare-hop` leaves it out), then through the gateway,
//! with a warm-up whose answers are discarded before the measured phase. The proxy's CPU time
//! is read when the phase starts and again once the proxy is idle after it, so the usage
//! writes a phase leaves behind are charged to it and do not compete with the next one:
//!
//! 1. non-streaming, closed loop, `--concurrency` (64) in flight: throughput and CPU/request;
//! 2. non-streaming, closed loop, 1 in flight: the latency one request adds;
//! 3. non-streaming, open loop at `--rate` (2,000) requests/s: the tail latency added under a
//!    steady load;
//! 4. streaming, closed loop, `--concurrency` in flight: throughput and CPU/request of SSE.
//!
//! Then, with `--soak-secs`, the gateway alone under an open loop of `--soak-rate` requests/s,
//! half of them streamed, its resident memory sampled every second.
//!
//! # Metering
//! The meter always runs as in production (a record per request, a bounded channel, a writer
//! task batching into a sink). The sink is a counter by default; `--sink store` writes into a
//! fresh SQLite database through the store's sink, whose inserts then run on the gateway's
//! pinned core and cost more than the proxying itself.

mod bare;
mod mock;
mod process;
pub mod server;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use comfy_table::{Table, presets};
use hyper::Request;
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{StatusCode, Uri};
use tokio_util::sync::CancellationToken;

use crate::Verdict;
use crate::load::{self, Body, HttpClient, LatencyHistogram, Phases, RequestFactory, Tally};
use mock::MockConfig;
use process::{Clock, Memory, Pid};
use server::SinkChoice;

/// The issue's targets, for the gateway pinned to one core of this 2-core machine.
const TARGET_THROUGHPUT: f64 = 25_000.0;
const TARGET_CPU_PER_REQUEST: Duration = Duration::from_micros(40);
const TARGET_ADDED_P50: Duration = Duration::from_micros(100);
const TARGET_ADDED_P99: Duration = Duration::from_millis(1);
const TARGET_RATE: u32 = 2_000;
/// Resident memory counts as flat when it stays within this fraction over the soak.
const TARGET_RSS_DRIFT: f64 = 0.10;
/// The open loop must deliver at least this fraction of its rate for its target to count.
const MIN_ACHIEVED_RATE: f64 = 0.95;
/// A core this busy limited the scenario.
const SATURATED: f64 = 0.95;
/// How often [`Bench::settle`] looks at the gateway's CPU time, and how long it waits at most.
const SETTLE_STEP: Duration = Duration::from_millis(250);
const SETTLE_LIMIT: Duration = Duration::from_secs(120);

const CHAT_BODY: &[u8] =
    br#"{"model":"bench","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}"#;
/// Without `stream_options`, as most clients send it: the gateway inserts `include_usage` to
/// meter the stream and removes the usage chunk from what it relays.
const STREAM_BODY: &[u8] = br#"{"model":"bench","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16,"stream":true}"#;

#[derive(Debug, clap::Args)]
pub struct GatewayArgs {
    /// Measured seconds per scenario and path, after the warm-up.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(1..))]
    seconds: u64,
    /// Warm-up seconds before each measured phase, whose answers are discarded.
    #[arg(long, default_value_t = 2)]
    warmup_seconds: u64,
    /// Requests in flight in the throughput scenarios (one connection each).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Requests per second of the open-loop scenario.
    #[arg(long, default_value_t = TARGET_RATE, value_parser = clap::value_parser!(u32).range(1..))]
    rate: u32,
    /// Token chunks in a streamed answer (then a final chunk, the usage chunk and `[DONE]`).
    #[arg(long, default_value_t = 8)]
    stream_chunks: u16,
    /// Replicas of the mock upstream, each a target of the gateway's route.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    replicas: u16,
    /// Seconds of the memory soak after the scenarios; 0 skips it (600 for the 10-minute soak).
    #[arg(long, default_value_t = 0)]
    soak_secs: u64,
    /// Requests per second of the soak, half of them streamed.
    #[arg(long, default_value_t = TARGET_RATE, value_parser = clap::value_parser!(u32).range(1..))]
    soak_rate: u32,
    /// Seconds between reads of the gateway's `/metrics`, as a Prometheus scraping it would;
    /// 0 never reads it.
    #[arg(long, default_value_t = 15)]
    scrape_secs: u64,
    /// Where the gateway's meter writes usage. `count` by default: with `store` the SQLite
    /// inserts, run on the gateway's core, cost more than the proxying itself (see README).
    #[arg(long, value_enum, default_value_t = SinkChoice::Count)]
    sink: SinkChoice,
    /// Counts the gateway's rate limits in this Redis (one script call per request, failing
    /// closed) instead of in its process; e.g. `redis://127.0.0.1:6379`.
    #[arg(long)]
    redis_url: Option<String>,
    /// Worker threads of the gateway's runtime.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    gateway_threads: u16,
    /// CPUs the gateway's process is pinned to (a `taskset` list).
    #[arg(long, default_value = "0")]
    gateway_cpus: String,
    /// CPUs this process — the load generator and the mock upstream — is pinned to.
    #[arg(long, default_value = "1")]
    loader_cpus: String,
    /// Pins nothing: both processes run wherever the scheduler puts them.
    #[arg(long)]
    no_pin: bool,
    /// Leaves out the bare reverse proxy (hyper's server and client, nothing else) otherwise
    /// measured in the gateway's place, pinned the same way, as the cost of the hop itself.
    #[arg(long = "no-bare-hop", action = clap::ArgAction::SetFalse)]
    bare_hop: bool,
}

/// Starts the mock and the gateway, measures, stops both and prints the report.
pub fn run(args: &GatewayArgs) -> anyhow::Result<Verdict> {
    // First, while this is the only thread: every thread started later inherits the pinning.
    if !args.no_pin {
        process::pin_this_process(&args.loader_cpus)?;
    }
    let clock = Clock::new();
    let load_before = load_average();
    let mock_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("mock-upstream")
        .enable_all()
        .build()
        .context("starting the mock upstream's runtime")?;
    let loader_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the load generator's runtime")?;
    let mock_shutdown = CancellationToken::new();
    let mock_config = MockConfig { chunks: usize::from(args.stream_chunks) };
    let replicas = mock_runtime.block_on(mock::start(
        usize::from(args.replicas),
        mock_config,
        mock_shutdown.clone(),
    ))?;

    let mut gateway = GatewayProcess::spawn(args, &replicas, false)?;
    let mut bare =
        if args.bare_hop { Some(GatewayProcess::spawn(args, &replicas, true)?) } else { None };
    println!("{}", describe_setup(args, gateway.pid));
    let scraper = Scraper::start(gateway.address, args.scrape_secs)?;
    let measured = loader_runtime.block_on(async {
        tokio::select! {
            report = measure(args, &replicas, &gateway, bare.as_ref(), clock) => report,
            () = interrupted() => Err(anyhow!("interrupted")),
        }
    });
    // Closes the loader's kept-alive connections, which the gateway's drain would wait for.
    drop(loader_runtime);
    scraper.stop();
    let usage = gateway.stop().and_then(|u| u.context("the gateway wrote no usage line"));
    if let Some(bare) = &mut bare
        && let Err(e) = bare.stop()
    {
        eprintln!("the bare proxy did not stop cleanly: {e:#}");
    }
    mock_shutdown.cancel();
    drop(mock_runtime);

    let report = measured?;
    println!("\n{}", report.render(args, usage.as_ref()));
    // Others' work on the same two cores moves every figure: say how busy the machine was.
    println!("load average (1, 5, 15 min): {load_before} before, {} after", load_average());
    if let Err(e) = &usage {
        eprintln!("the gateway's usage counts are missing: {e:#}");
    }
    Ok(report.verdict())
}

// ---- measuring ------------------------------------------------------------------------------

/// How a scenario applies load.
#[derive(Debug, Clone, Copy)]
enum Load {
    Closed(usize),
    Open(u32),
}

/// One scenario, measured once per path.
struct Scenario {
    name: &'static str,
    stream: bool,
    load: Load,
    direct: Run,
    /// With `--bare-hop`: through the bare reverse proxy.
    bare: Option<Run>,
    gateway: Run,
}

/// One measured phase and what the processes spent on it.
struct Run {
    tally: Tally,
    /// The measured phase, from the first read of CPU time to the end of its last request.
    wall: Duration,
    /// The gateway's CPU time during the phase.
    gateway_cpu: Duration,
    /// The gateway's CPU time from the phase's start until it was idle again: with the work
    /// the phase left behind (usage still to be written), which is what its requests cost.
    gateway_cpu_settled: Duration,
    /// How long the gateway stayed busy after the phase's last answer.
    settle: Duration,
    /// [`Run::gateway_cpu_settled`] by thread name (live threads only).
    gateway_threads: BTreeMap<String, Duration>,
    /// This process's CPU time during the phase: the load generator and the mock upstream.
    loader_cpu: Duration,
    /// The gateway's memory at the end of the phase.
    gateway_memory: Memory,
}

struct Soak {
    rate: u32,
    run: Run,
    /// VmRSS every second, with its time since the soak began.
    samples: Vec<(Duration, u64)>,
}

struct Report {
    scenarios: Vec<Scenario>,
    /// After the scenarios, before the soak.
    memory: Memory,
    soak: Option<Soak>,
}

/// What the measured phases share.
struct Bench<'a> {
    client: HttpClient,
    clock: Clock,
    /// The gateway's process, sampled during the soak.
    gateway_pid: u32,
    warmup: Duration,
    measure: Duration,
    args: &'a GatewayArgs,
}

/// Where requests go: the mock directly, or the gateway with the key.
struct Destination {
    base: String,
    key: Option<HeaderValue>,
}

async fn measure(
    args: &GatewayArgs,
    replicas: &[SocketAddr],
    gateway: &GatewayProcess,
    bare: Option<&GatewayProcess>,
    clock: Clock,
) -> anyhow::Result<Report> {
    let first = replicas.first().context("the mock has no replica")?;
    let direct = Destination { base: format!("http://{first}"), key: None };
    let through = Destination {
        base: format!("http://{}", gateway.address),
        key: Some(HeaderValue::from_str(&format!("Bearer {}", server::KEY))?),
    };
    let bench = Bench {
        client: HttpClient::new(usize::from(args.concurrency)),
        clock,
        gateway_pid: gateway.pid,
        warmup: Duration::from_secs(args.warmup_seconds),
        measure: Duration::from_secs(args.seconds),
        args,
    };
    let bare_destination =
        bare.map(|bare| Destination { base: format!("http://{}", bare.address), key: None });
    let mut destinations = vec![("direct", &direct), ("through the gateway", &through)];
    destinations.extend(bare_destination.as_ref().map(|d| ("through the bare proxy", d)));
    check_answers(&bench.client, &destinations).await?;

    let concurrency = usize::from(args.concurrency);
    let plan = [
        ("non-streaming", false, Load::Closed(concurrency)),
        ("non-streaming", false, Load::Closed(1)),
        ("non-streaming", false, Load::Open(args.rate)),
        ("streaming", true, Load::Closed(concurrency)),
    ];
    let mut scenarios = Vec::with_capacity(plan.len());
    for (name, stream, load) in plan {
        let progress = |path: &str| {
            eprintln!(
                "{name}, {}: {path} ({} s warm-up + {} s)",
                describe_load(load),
                args.warmup_seconds,
                args.seconds
            );
        };
        progress("direct");
        // The direct path has no proxy: the gateway's pid only serves to wait until it is idle.
        let direct_run = bench.run(chat(&direct, stream)?, load, gateway.pid).await?;
        let bare_run = match (bare, &bare_destination) {
            (Some(bare), Some(destination)) => {
                progress("through the bare proxy");
                Some(bench.run(chat(destination, stream)?, load, bare.pid).await?)
            }
            _ => None,
        };
        progress("through the gateway");
        let gateway_run = bench.run(chat(&through, stream)?, load, gateway.pid).await?;
        scenarios.push(Scenario {
            name,
            stream,
            load,
            direct: direct_run,
            bare: bare_run,
            gateway: gateway_run,
        });
    }
    let memory = Memory::read(Pid::Other(gateway.pid))?;
    let soak = match args.soak_secs {
        0 => None,
        secs => Some(bench.soak(&through, Duration::from_secs(secs)).await?),
    };
    Ok(Report { scenarios, memory, soak })
}

impl Bench<'_> {
    /// A warm-up, then the measured phase with this process's and `proxy`'s CPU time read at
    /// its ends.
    async fn run(&self, requests: RequestFactory, load: Load, proxy: u32) -> anyhow::Result<Run> {
        if !self.warmup.is_zero() {
            self.drive(requests.clone(), load, self.warmup).await?;
        }
        self.settle(proxy).await?;
        self.measured(proxy, || self.drive(requests, load, self.measure)).await
    }

    async fn drive(
        &self,
        requests: RequestFactory,
        load: Load,
        seconds: Duration,
    ) -> anyhow::Result<Tally> {
        let phases = Phases { warmup: Duration::ZERO, measure: seconds };
        match load {
            Load::Closed(concurrency) => {
                load::closed_loop(&self.client, requests, concurrency, phases).await
            }
            Load::Open(rate) => load::open_loop(&self.client, requests, rate, phases).await,
        }
    }

    async fn measured<F, Fut>(&self, proxy: u32, phase: F) -> anyhow::Result<Run>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = anyhow::Result<Tally>>,
    {
        let gateway = Pid::Other(proxy);
        let started = Instant::now();
        let threads_before = self.clock.cpu_by_thread(gateway)?;
        let (gateway_before, loader_before) =
            (self.clock.cpu_time(gateway)?, self.clock.cpu_time(Pid::This)?);
        let tally = phase().await?;
        let (gateway_after, loader_after) =
            (self.clock.cpu_time(gateway)?, self.clock.cpu_time(Pid::This)?);
        let wall = started.elapsed();
        let gateway_memory = Memory::read(gateway)?;
        let settle = self.settle(proxy).await?;
        let gateway_settled = self.clock.cpu_time(gateway)?;
        let mut gateway_threads = self.clock.cpu_by_thread(gateway)?;
        for (name, cpu) in &mut gateway_threads {
            *cpu = cpu.saturating_sub(threads_before.get(name).copied().unwrap_or_default());
        }
        Ok(Run {
            tally,
            wall,
            gateway_cpu: gateway_after.saturating_sub(gateway_before),
            gateway_cpu_settled: gateway_settled.saturating_sub(gateway_before),
            settle,
            gateway_threads,
            loader_cpu: loader_after.saturating_sub(loader_before),
            gateway_memory,
        })
    }

    /// Waits until the gateway is idle — busy less than a tenth of [`SETTLE_STEP`] — so that
    /// the work a phase leaves behind (usage records still being written) is charged to that
    /// phase and does not compete with the next. Returns how long it took; gives up with a
    /// warning after [`SETTLE_LIMIT`].
    async fn settle(&self, proxy: u32) -> anyhow::Result<Duration> {
        let gateway = Pid::Other(proxy);
        let started = Instant::now();
        let mut before = self.clock.cpu_time(gateway)?;
        loop {
            tokio::time::sleep(SETTLE_STEP).await;
            let now = self.clock.cpu_time(gateway)?;
            let busy = now.saturating_sub(before);
            // The step itself is not counted: the last one found the gateway idle.
            let waited = started.elapsed().saturating_sub(SETTLE_STEP);
            if busy <= SETTLE_STEP / 10 {
                return Ok(waited);
            }
            if waited >= SETTLE_LIMIT {
                eprintln!("the gateway is still busy {waited:?} after the phase; going on");
                return Ok(waited);
            }
            before = now;
        }
    }

    /// The gateway alone under an open loop alternating non-streaming and streaming requests,
    /// its RSS sampled every second.
    async fn soak(&self, through: &Destination, length: Duration) -> anyhow::Result<Soak> {
        let rate = self.args.soak_rate;
        eprintln!(
            "soak: {} s at {rate} requests/s through the gateway, half streamed",
            length.as_secs()
        );
        let (plain, streamed) = (chat(through, false)?, chat(through, true)?);
        let mixed: RequestFactory =
            Arc::new(move |n| if n % 2 == 0 { plain(n) } else { streamed(n) });
        let sampler = RssSampler::start(self.gateway_pid)?;
        let run =
            self.measured(self.gateway_pid, || self.drive(mixed, Load::Open(rate), length)).await;
        let samples = sampler.stop()?;
        Ok(Soak { rate, run: run?, samples })
    }
}

/// Sends one request of each kind both ways and checks the answers, so that a misconfigured
/// gateway fails here with its answer rather than as a table of errors.
async fn check_answers(
    client: &HttpClient,
    destinations: &[(&str, &Destination)],
) -> anyhow::Result<()> {
    for &(path, destination) in destinations {
        for stream in [false, true] {
            let answer = client.send(chat(destination, stream)?(0)?).await?;
            let body = String::from_utf8_lossy(&answer.body);
            ensure!(
                answer.status == StatusCode::OK,
                "a check request {path} answered {}: {body}",
                answer.status
            );
            let expected = if stream { "data: [DONE]" } else { "\"usage\"" };
            ensure!(body.contains(expected), "a check answer {path} lacks {expected}: {body}");
        }
    }
    Ok(())
}

/// `POST /v1/chat/completions` to `destination`, streamed or not.
fn chat(destination: &Destination, stream: bool) -> anyhow::Result<RequestFactory> {
    let uri: Uri = format!("{}/v1/chat/completions", destination.base).parse()?;
    let body = Bytes::from_static(if stream { STREAM_BODY } else { CHAT_BODY });
    let key = destination.key.clone();
    Ok(Arc::new(move |_| {
        let mut request = Request::post(uri.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(key) = &key {
            request = request.header(AUTHORIZATION, key.clone());
        }
        Ok(request.body(Body::new(body.clone()))?)
    }))
}

/// Completes when the user presses Ctrl-C; never if that cannot be listened for.
async fn interrupted() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

// ---- the gateway's process ------------------------------------------------------------------

/// The gateway's child process. Dropping it kills the child if it is still running.
struct GatewayProcess {
    child: Child,
    /// Closing it tells the child to stop.
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    pid: u32,
    address: SocketAddr,
}

/// The gateway meter's counts at the end.
struct UsageCounts {
    recorded: u64,
    written: u64,
    dropped: u64,
}

impl GatewayProcess {
    /// The gateway, or with `bare` the bare reverse proxy.
    fn spawn(args: &GatewayArgs, replicas: &[SocketAddr], bare: bool) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding this program to re-execute it")?;
        // `taskset` execs the program, so the child's pid is the gateway's.
        let mut command = if args.no_pin {
            Command::new(exe)
        } else {
            let mut taskset = Command::new("taskset");
            taskset.args(["-c", &args.gateway_cpus]).arg(exe);
            taskset
        };
        let upstream: Vec<String> = replicas.iter().map(SocketAddr::to_string).collect();
        command
            .arg("gateway-server")
            .args(["--upstream", &upstream.join(",")])
            .args(["--threads", &args.gateway_threads.to_string()])
            .args(["--sink", args.sink.as_arg()])
            .args(bare.then_some("--bare"))
            .args(args.redis_url.iter().flat_map(|url| ["--redis-url", url.as_str()]))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn().context("starting the gateway's process (taskset)")?;
        let pid = child.id();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().map(BufReader::new);
        let Some(stdout) = stdout else {
            let _ = child.kill();
            bail!("the gateway's stdout was not captured");
        };
        let mut process = GatewayProcess {
            child,
            stdin,
            stdout,
            pid,
            address: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let line = process.read_line()?;
        process.address = line
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("the gateway did not start (it said {line:?})"))?;
        Ok(process)
    }

    /// Tells the child to stop and returns its meter's final counts (the bare proxy has none).
    fn stop(&mut self) -> anyhow::Result<Option<UsageCounts>> {
        drop(self.stdin.take());
        let mut counts = None;
        let mut line = String::new();
        while self.stdout.read_line(&mut line).context("reading the gateway's output")? > 0 {
            if let Some(text) = line.trim_end().strip_prefix("usage ") {
                counts = Some(parse_counts(text)?);
            }
            line.clear();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait()?.is_none() {
            ensure!(Instant::now() < deadline, "the gateway did not exit within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(counts)
    }

    fn read_line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line).context("reading the gateway's output")?;
        ensure!(n > 0, "the gateway's process ended (its errors are above)");
        Ok(line.trim_end().to_owned())
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `recorded=1 written=1 dropped=0`.
fn parse_counts(text: &str) -> anyhow::Result<UsageCounts> {
    let value = |name: &str| -> anyhow::Result<u64> {
        text.split_whitespace()
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name} in the gateway's usage line {text:?}"))
    };
    Ok(UsageCounts {
        recorded: value("recorded")?,
        written: value("written")?,
        dropped: value("dropped")?,
    })
}

// ---- background threads ---------------------------------------------------------------------

/// Reads the gateway's `/metrics` at an interval, as Prometheus would. The exporter keeps
/// histogram samples until they are rendered, so a gateway nobody scrapes holds more memory;
/// scraping is part of running it as deployed.
struct Scraper {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Scraper {
    fn start(gateway: SocketAddr, every_secs: u64) -> anyhow::Result<Self> {
        if every_secs == 0 {
            return Ok(Self { stop: None, thread: None });
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("metrics-scraper".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(Duration::from_secs(every_secs))
                {
                    if let Err(e) = scrape(gateway) {
                        eprintln!("reading the gateway's /metrics failed: {e:#}");
                    }
                }
            })
            .context("starting the metrics scraper")?;
        Ok(Self { stop: Some(stop), thread: Some(thread) })
    }

    fn stop(mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn scrape(gateway: SocketAddr) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect_timeout(&gateway, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    ensure!(
        answer.starts_with(b"HTTP/1.1 200"),
        "answered {:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(40)])
    );
    Ok(())
}

/// Samples the gateway's VmRSS every second until stopped, printing progress every minute.
struct RssSampler {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<anyhow::Result<Vec<(Duration, u64)>>>,
}

impl RssSampler {
    fn start(pid: u32) -> anyhow::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("rss-sampler".into())
            .spawn(move || {
                let started = Instant::now();
                let mut samples = Vec::new();
                loop {
                    let at = started.elapsed();
                    let rss = Memory::read(Pid::Other(pid))?.rss_kib;
                    samples.push((at, rss));
                    if samples.len() % 60 == 0 {
                        eprintln!("soak: {} min, gateway RSS {}", samples.len() / 60, mib(rss));
                    }
                    let next = Duration::from_secs(samples.len() as u64);
                    match stopped.recv_timeout(next.saturating_sub(started.elapsed())) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => return Ok(samples),
                    }
                }
            })
            .context("starting the RSS sampler")?;
        Ok(Self { stop, thread })
    }

    fn stop(self) -> anyhow::Result<Vec<(Duration, u64)>> {
        drop(self.stop);
        self.thread.join().map_err(|_| anyhow!("the RSS sampler panicked"))?
    }
}

// ---- report ---------------------------------------------------------------------------------

fn describe_setup(args: &GatewayArgs, gateway_pid: u32) -> String {
    let pinning = if args.no_pin {
        "not pinned".to_owned()
    } else {
        format!(
            "gateway (pid {gateway_pid}) pinned to CPU {}, loader and mock to CPU {}",
            args.gateway_cpus, args.loader_cpus
        )
    };
    let sink = match args.sink {
        SinkChoice::Store => "a fresh SQLite database (StoreSink)",
        SinkChoice::Count => "a counting sink (no database)",
    };
    let scrape = match args.scrape_secs {
        0 => "never".to_owned(),
        s => format!("every {s} s"),
    };
    // The URL may carry a password: name the host only.
    let limits = match &args.redis_url {
        None => "in the process".to_owned(),
        Some(url) => {
            format!("in Redis at {}", url.rsplit_once('@').map_or(url.as_str(), |(_, h)| h))
        }
    };
    format!(
        "bud-bench gateway: {}; {pinning}; gateway runtime of {} worker(s); key auth, rpm/tpm \
         limits on key and route counted {limits}, usage metered into {sink}; {} mock replica(s), {} chunks per \
         stream; /metrics read {scrape}; {} s warm-up + {} s per scenario and path{}",
        describe_cpus(),
        args.gateway_threads,
        args.replicas,
        args.stream_chunks,
        args.warmup_seconds,
        args.seconds,
        if args.bare_hop {
            "; a bare reverse proxy measured too, pinned like the gateway"
        } else {
            ""
        },
    )
}

fn describe_cpus() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    // Counted from /proc, not asked of the scheduler: this process is pinned to one by now.
    let cpus = info.lines().filter(|l| l.starts_with("processor")).count();
    let model = info
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map_or("unknown CPU", |l| l.trim_start_matches([' ', '\t', ':']));
    format!("{cpus} × {model}")
}

/// The first three fields of `/proc/loadavg`.
fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn describe_load(load: Load) -> String {
    match load {
        Load::Closed(n) => format!("closed, {n} in flight"),
        Load::Open(rate) => format!("open, {rate}/s"),
    }
}

impl Run {
    fn cpu_per_request(cpu: Duration, tally: &Tally) -> Duration {
        Duration::from_secs_f64(load::ratio(cpu.as_secs_f64(), tally.requests() as f64))
    }

    /// The gateway's CPU time per request, with the work left after the phase.
    fn gateway_per_request(&self) -> Duration {
        Self::cpu_per_request(self.gateway_cpu_settled, &self.tally)
    }

    fn gateway_busy(&self) -> f64 {
        load::ratio(self.gateway_cpu.as_secs_f64(), self.wall.as_secs_f64())
    }

    fn loader_busy(&self) -> f64 {
        load::ratio(self.loader_cpu.as_secs_f64(), self.wall.as_secs_f64())
    }
}

impl Scenario {
    fn title(&self) -> String {
        format!("{}, {}", self.name, describe_load(self.load))
    }

    /// The gateway's latency minus the direct one at quantile `q`, in seconds.
    fn added(&self, q: f64) -> f64 {
        self.added_by(&self.gateway, q)
    }

    /// `run`'s latency minus the direct one at quantile `q`, in seconds.
    fn added_by(&self, run: &Run, q: f64) -> f64 {
        let at = |l: &LatencyHistogram| l.quantile(q).as_secs_f64();
        at(run.tally.latency()) - at(self.direct.tally.latency())
    }

    /// Every path measured, in the order they ran, by name.
    fn paths(&self) -> Vec<(&'static str, &Run)> {
        let mut paths = vec![("direct", &self.direct)];
        paths.extend(self.bare.as_ref().map(|run| ("bare hop", run)));
        paths.push(("gateway", &self.gateway));
        paths
    }

    fn is(&self, stream: bool, load: fn(Load) -> bool) -> bool {
        self.stream == stream && load(self.load)
    }
}

impl Report {
    fn verdict(&self) -> Verdict {
        let runs = self.scenarios.iter().flat_map(|s| s.paths().into_iter().map(|(_, r)| r));
        let soak = self.soak.as_ref().map(|s| &s.run);
        if runs.chain(soak).any(|r| r.tally.error_rate() > load::MAX_ERROR_RATE) {
            Verdict::TooManyErrors
        } else {
            Verdict::Clean
        }
    }

    fn render(&self, args: &GatewayArgs, usage: Result<&UsageCounts, &anyhow::Error>) -> String {
        let mut out = format!("{}\n", self.table());
        out.push_str(&self.targets(args));
        out.push_str("\nproxy CPU µs per request by thread (the phase and the work it left):");
        let proxy_runs = self.scenarios.iter().flat_map(|s| {
            let bare = s.bare.as_ref().map(|run| (format!("{} (bare hop)", s.title()), run));
            bare.into_iter().chain([(s.title(), &s.gateway)])
        });
        let soak = self.soak.as_ref().map(|s| ("soak".to_owned(), &s.run));
        for (title, run) in proxy_runs.chain(soak) {
            let threads: Vec<String> = run
                .gateway_threads
                .iter()
                .filter(|(_, cpu)| !cpu.is_zero())
                .map(|(name, cpu)| {
                    format!("{name} {}", micros(Run::cpu_per_request(*cpu, &run.tally)))
                })
                .collect();
            out.push_str(&format!("\n  {title}: {}", threads.join(", ")));
        }
        out.push_str(&format!(
            "\npeak RSS of the gateway (VmHWM): {} after the scenarios",
            mib(self.memory.peak_kib)
        ));
        if let Some(soak) = &self.soak {
            out.push_str(&format!(", {} after the soak", mib(soak.run.gateway_memory.peak_kib)));
        }
        out.push_str(&format!(
            "\nmetering into {}: ",
            match args.sink {
                SinkChoice::Store => "SQLite",
                SinkChoice::Count => "a counting sink",
            }
        ));
        match usage {
            Ok(u) => out.push_str(&format!(
                "{} records, {} written, {} dropped",
                u.recorded, u.written, u.dropped
            )),
            Err(e) => out.push_str(&format!("counts unavailable ({e:#})")),
        }
        if let Some(soak) = &self.soak {
            out.push_str(&format!("\n\n{}", soak.render()));
        }
        let runs = self
            .scenarios
            .iter()
            .flat_map(|s| s.paths().into_iter().map(|(p, r)| (s.title(), p, r)));
        let soak = self.soak.as_ref().map(|s| ("soak".to_owned(), "gateway", &s.run));
        for (title, path, run) in runs.chain(soak) {
            for (kind, count) in run.tally.errors() {
                out.push_str(&format!("\n  {title} ({path}): {count} × {kind}"));
            }
        }
        out
    }

    fn table(&self) -> Table {
        let mut table = Table::new();
        table.load_preset(presets::ASCII_MARKDOWN).set_header(vec![
            "scenario",
            "path",
            "requests",
            "errors",
            "req/s",
            "req/s ÷ direct",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "added p50 ms",
            "added p99 ms",
            "proxy CPU µs/req",
            "proxy core",
            "loader+mock core",
            "proxy busy after",
            "proxy RSS",
        ]);
        for s in &self.scenarios {
            for (path, run) in s.paths() {
                let t = &run.tally;
                let l = t.latency();
                let through = path != "direct";
                let relative = match s.load {
                    Load::Open(_) => "(fixed rate)".to_owned(),
                    Load::Closed(_) => {
                        format!("{:.3}", load::ratio(t.throughput(), s.direct.tally.throughput()))
                    }
                };
                let dash = || "-".to_owned();
                table.add_row(vec![
                    s.title(),
                    path.to_owned(),
                    t.requests().to_string(),
                    format!("{} ({:.2}%)", t.error_count(), 100.0 * t.error_rate()),
                    format!("{:.0}", t.throughput()),
                    relative,
                    ms(l.quantile(0.50)),
                    ms(l.quantile(0.99)),
                    ms(l.quantile(0.999)),
                    if through { format!("{:.3}", s.added_by(run, 0.50) * 1e3) } else { dash() },
                    if through { format!("{:.3}", s.added_by(run, 0.99) * 1e3) } else { dash() },
                    if through { micros(run.gateway_per_request()) } else { dash() },
                    percent(run.gateway_busy()),
                    percent(run.loader_busy()),
                    if through { format!("{:.1} s", run.settle.as_secs_f64()) } else { dash() },
                    if through { mib(run.gateway_memory.rss_kib) } else { dash() },
                ]);
            }
        }
        table
    }

    /// One line per target: PASS, FAIL or why it was not measured.
    fn targets(&self, args: &GatewayArgs) -> String {
        let mut lines = vec![format!(
            "targets (gateway on CPU {}, loader and mock on CPU {}):",
            args.gateway_cpus, args.loader_cpus
        )];
        let verdict = |met: bool| if met { "PASS" } else { "FAIL" };
        let clean = |r: &Run| r.tally.error_rate() <= load::MAX_ERROR_RATE;
        let many = |l: Load| matches!(l, Load::Closed(n) if n > 1);

        if let Some(s) = self.scenarios.iter().find(|s| s.is(false, many)) {
            let g = &s.gateway;
            let rps = g.tally.throughput();
            // A saturated loader core means the gateway was not the limit: say so.
            let limit = if g.loader_busy() >= SATURATED && g.gateway_busy() < SATURATED {
                "; the loader's core was saturated, not the gateway's: its capacity is higher"
            } else {
                ""
            };
            let bare = s.bare.as_ref().map_or(String::new(), |b| {
                format!(
                    "; the bare hop: {:.0} requests/s at {} µs",
                    b.tally.throughput(),
                    micros(b.gateway_per_request())
                )
            });
            lines.push(format!(
                "  ≥ {:.0} non-streaming requests/s ({}): {} ({rps:.0} requests/s, gateway core {}, \
                 loader+mock core {}{limit}{bare})",
                TARGET_THROUGHPUT,
                describe_load(s.load),
                verdict(rps >= TARGET_THROUGHPUT && clean(g)),
                percent(g.gateway_busy()),
                percent(g.loader_busy()),
            ));
            let cpu = g.gateway_per_request();
            lines.push(format!(
                "  gateway CPU ≤ {} µs per non-streaming request ({}): {} ({} µs; streaming: {})",
                TARGET_CPU_PER_REQUEST.as_micros(),
                describe_load(s.load),
                verdict(cpu <= TARGET_CPU_PER_REQUEST && clean(g)),
                micros(cpu),
                self.scenarios
                    .iter()
                    .find(|s| s.is(true, many))
                    .map_or("not measured".to_owned(), |s| {
                        format!("{} µs", micros(s.gateway.gateway_per_request()))
                    }),
            ));
        }
        if let Some(s) =
            self.scenarios.iter().find(|s| s.is(false, |l| matches!(l, Load::Closed(1))))
        {
            let added = s.added(0.50);
            let bare = s.bare.as_ref().map_or(String::new(), |b| {
                format!("; the bare hop adds {:.3} ms", s.added_by(b, 0.50) * 1e3)
            });
            lines.push(format!(
                "  added p50 ≤ {} ms at concurrency 1: {} ({:.3} ms: p50 {} ms direct, {} ms \
                 through the gateway{bare})",
                TARGET_ADDED_P50.as_secs_f64() * 1e3,
                verdict(added <= TARGET_ADDED_P50.as_secs_f64() && clean(&s.gateway)),
                added * 1e3,
                ms(s.direct.tally.latency().quantile(0.50)),
                ms(s.gateway.tally.latency().quantile(0.50)),
            ));
        }
        if let Some(s) = self.scenarios.iter().find(|s| s.is(false, |l| matches!(l, Load::Open(_))))
        {
            let g = &s.gateway;
            let added = s.added(0.99);
            let met = added < TARGET_ADDED_P99.as_secs_f64()
                && g.tally.throughput() >= MIN_ACHIEVED_RATE * f64::from(args.rate)
                && clean(g);
            let scope = if args.rate == TARGET_RATE { "" } else { " (the target names 2000/s)" };
            let lag = g.tally.send_lag().map_or(String::new(), |lag| {
                format!("; the generator's own lateness p99 {} ms", ms(lag.quantile(0.99)))
            });
            let bare = s.bare.as_ref().map_or(String::new(), |b| {
                format!("; the bare hop adds {:.3} ms", s.added_by(b, 0.99) * 1e3)
            });
            lines.push(format!(
                "  added p99 < {} ms at {} requests/s{scope}: {} ({:.3} ms: p99 {} ms direct, {} \
                 ms through the gateway; {:.1} requests/s achieved, {} errors{lag}{bare})",
                TARGET_ADDED_P99.as_millis(),
                args.rate,
                verdict(met),
                added * 1e3,
                ms(s.direct.tally.latency().quantile(0.99)),
                ms(g.tally.latency().quantile(0.99)),
                g.tally.throughput(),
                g.tally.error_count(),
            ));
        }
        match &self.soak {
            Some(soak) => {
                let drift = soak.drift();
                lines.push(format!(
                    "  RSS flat (within {:.0}%) over the {} s soak: {} (last window {:+.1}% of the \
                     first, max/min {:.3})",
                    TARGET_RSS_DRIFT * 100.0,
                    soak.run.wall.as_secs(),
                    verdict(drift.flat() && clean(&soak.run)),
                    (drift.last_over_first - 1.0) * 100.0,
                    drift.max_over_min,
                ));
            }
            None => lines.push(format!(
                "  RSS flat (within {:.0}%) over a soak: not run (--soak-secs 0)",
                TARGET_RSS_DRIFT * 100.0
            )),
        }
        lines.join("\n")
    }
}

/// How the soak's resident memory moved.
struct Drift {
    window: Duration,
    first_kib: f64,
    last_kib: f64,
    min_kib: u64,
    max_kib: u64,
    last_over_first: f64,
    max_over_min: f64,
}

impl Drift {
    /// The first and last minute's mean of `samples` (a quarter of their span if it is
    /// shorter than 4 minutes), and the extremes.
    fn of(samples: &[(Duration, u64)]) -> Drift {
        let end = samples.last().map_or(Duration::ZERO, |(at, _)| *at);
        let window = Duration::from_secs(60).min(end / 4).max(Duration::from_secs(1));
        let mean = |keep: &dyn Fn(Duration) -> bool| {
            let picked: Vec<u64> =
                samples.iter().filter(|(at, _)| keep(*at)).map(|(_, kib)| *kib).collect();
            load::ratio(picked.iter().sum::<u64>() as f64, picked.len() as f64)
        };
        let first_kib = mean(&|at| at < window);
        let last_kib = mean(&|at| at + window > end);
        let min_kib = samples.iter().map(|(_, kib)| *kib).min().unwrap_or(0);
        let max_kib = samples.iter().map(|(_, kib)| *kib).max().unwrap_or(0);
        Drift {
            window,
            first_kib,
            last_kib,
            min_kib,
            max_kib,
            last_over_first: load::ratio(last_kib, first_kib),
            max_over_min: load::ratio(max_kib as f64, min_kib as f64),
        }
    }

    fn flat(&self) -> bool {
        (self.last_over_first - 1.0).abs() <= TARGET_RSS_DRIFT
            && self.max_over_min <= 1.0 + TARGET_RSS_DRIFT
    }
}

impl Soak {
    fn drift(&self) -> Drift {
        Drift::of(&self.samples)
    }

    fn render(&self) -> String {
        let t = &self.run.tally;
        let d = self.drift();
        let minutes: Vec<String> = self
            .samples
            .chunks(60)
            .map(|minute| {
                let sum: u64 = minute.iter().map(|(_, kib)| kib).sum();
                format!("{:.1}", sum as f64 / minute.len() as f64 / 1024.0)
            })
            .collect();
        format!(
            "soak: {} s open loop at {}/s (half streamed) through the gateway: {} requests, {} \
             errors, {:.1} requests/s achieved, p50 {} ms, p99 {} ms, p99.9 {} ms; gateway CPU \
             {} µs/request, core {}\n\
             gateway RSS: first {} s {:.1} MiB, last {} s {:.1} MiB ({:+.1}%), min {} max {} \
             (max/min {:.3}), peak (VmHWM) {}\n\
             RSS MiB by minute: {}",
            self.run.wall.as_secs(),
            self.rate,
            t.requests(),
            t.error_count(),
            t.throughput(),
            ms(t.latency().quantile(0.50)),
            ms(t.latency().quantile(0.99)),
            ms(t.latency().quantile(0.999)),
            micros(self.run.gateway_per_request()),
            percent(self.run.gateway_busy()),
            d.window.as_secs(),
            d.first_kib / 1024.0,
            d.window.as_secs(),
            d.last_kib / 1024.0,
            (d.last_over_first - 1.0) * 100.0,
            mib(d.min_kib),
            mib(d.max_kib),
            d.max_over_min,
            mib(self.run.gateway_memory.peak_kib),
            minutes.join(" "),
        )
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

fn micros(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

fn percent(fraction: f64) -> String {
    format!("{:.0}%", fraction * 100.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(kib: impl IntoIterator<Item = u64>) -> Vec<(Duration, u64)> {
        kib.into_iter().enumerate().map(|(s, k)| (Duration::from_secs(s as u64), k)).collect()
    }

    #[test]
    fn flat_memory_is_flat() {
        let drift = Drift::of(&samples(std::iter::repeat_n(40_000, 600)));
        assert_eq!(drift.window, Duration::from_secs(60));
        assert!(drift.flat());
        assert!((drift.last_over_first - 1.0).abs() < 1e-9);
    }

    #[test]
    fn memory_growing_by_a_fifth_is_not_flat() {
        // 40 MiB rising steadily to 48 MiB over ten minutes.
        let drift = Drift::of(&samples((0..600).map(|s| 40_960 + s * 14)));
        assert!(!drift.flat());
        assert!(drift.last_over_first > 1.15 && drift.max_over_min > 1.15);
    }

    #[test]
    fn a_short_soak_compares_quarters() {
        let drift = Drift::of(&samples([100, 100, 100, 100, 100, 100, 100, 100, 200]));
        assert_eq!(drift.window, Duration::from_secs(2));
        assert!((drift.first_kib - 100.0).abs() < 1e-9);
        assert!((drift.last_kib - 150.0).abs() < 1e-9);
        assert!(!drift.flat());
    }

    #[test]
    fn the_usage_line_is_parsed() {
        let counts = parse_counts("recorded=10 written=9 dropped=1").ok();
        let fields = counts.map(|c| (c.recorded, c.written, c.dropped));
        assert_eq!(fields, Some((10, 9, 1)));
        assert!(parse_counts("recorded=10 written=9").is_err());
    }
}
