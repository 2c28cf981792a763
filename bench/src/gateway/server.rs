//! `bud-bench gateway-server` (hidden): budgateway in a process of its own, so that the
//! benchmark can pin it to a CPU and read its CPU time and memory from `/proc`.
//!
//! It serves a snapshot built here — one key, one route `bench` over the mock's replicas, both
//! with request and token limits high enough never to refuse, so the limiter runs on every
//! request — with metering on, writes `listening <address>` on stdout once it accepts, and
//! serves until its stdin closes (the benchmark closes it, or dies). Then it drains, flushes
//! the meter, writes `usage recorded=<n> written=<n> dropped=<n>` and removes its database.
//! With `--bare` it runs the bare reverse proxy of [`super::bare`] instead.

use std::collections::HashMap;
use std::future::Future;
use std::io::{Read, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use bud_domain::{ApiKeyId, EndpointId, ProjectId};
use bud_gateway::config::{OnUnreachable, RedisLimits};
use bud_gateway::metering::{Meter, MeterConfig, UsageRecord, UsageSink};
use bud_gateway::snapshot::{KeyEntry, Route, Snapshot, Target, Upstream};
use bud_gateway::store_sink::StoreSink;
use bud_gateway::{Gateway, GatewayConfig};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Verdict;

/// The API key the benchmark presents.
pub const KEY: &str = "sk-bud-bench-0123456789abcdef";
/// The route's public model name.
pub const MODEL: &str = "bench";
/// Requests and tokens per minute of the key and the route: limited, so the limiter does its
/// work on every request, but far above anything this machine can send.
const LIMIT_PER_MINUTE: u32 = 1_000_000_000;
/// How long the gateway may take to finish the requests in flight once told to stop.
const DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// The replicas' `host:port`, comma-separated: each becomes a target of the route.
    #[arg(long, value_delimiter = ',', required = true)]
    upstream: Vec<String>,
    /// Port on 127.0.0.1; 0 picks a free one (the address is written on stdout).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Worker threads of the gateway's runtime.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    threads: u16,
    /// Where usage records go.
    #[arg(long, value_enum, default_value_t = SinkChoice::Count)]
    sink: SinkChoice,
    /// Runs a bare reverse proxy instead of the gateway (see `bare.rs`); it writes no usage line.
    #[arg(long)]
    bare: bool,
    /// Counts the rate limits in this Redis (failing closed) instead of in the process.
    #[arg(long)]
    redis_url: Option<String>,
}

/// Where the meter writes usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SinkChoice {
    /// A fresh SQLite database, through the sink `bud serve` uses: metering as in production
    /// on SQLite, its inserts paid for by the gateway's process.
    Store,
    /// Counts records and writes nothing: the gateway's own cost of metering alone.
    Count,
}

impl SinkChoice {
    pub fn as_arg(self) -> &'static str {
        match self {
            Self::Store => "store",
            Self::Count => "count",
        }
    }
}

/// Runs the gateway until stdin closes.
pub fn serve(args: &ServerArgs) -> anyhow::Result<Verdict> {
    // As `bud serve` logs by default: JSON at `info`. The gateway logs nothing per request at
    // that level, so this costs nothing unless something goes wrong, and then it shows.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::stderr)
        .json()
        .try_init()
        .map_err(|e| anyhow!("cannot install the log subscriber: {e}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(args.threads))
        .thread_name(if args.bare { "bare-proxy" } else { "budgateway" })
        .enable_all()
        .build()
        .context("starting the gateway's runtime")?;
    runtime.block_on(run(args))?;
    Ok(Verdict::Clean)
}

async fn run(args: &ServerArgs) -> anyhow::Result<()> {
    if args.bare {
        let (listener, shutdown) = listen(args.port).await?;
        let serving =
            tokio::spawn(super::bare::serve(listener, args.upstream.clone(), shutdown.clone()));
        shutdown.cancelled().await;
        let _ = serving.await;
        return Ok(());
    }
    let db = match args.sink {
        SinkChoice::Store => {
            Some(bud_store::testing::fresh_sqlite().await.context("creating the usage database")?)
        }
        SinkChoice::Count => None,
    };
    let sink: Arc<dyn UsageSink> = match &db {
        Some(db) => Arc::new(StoreSink(db.store().clone())),
        None => Arc::new(CountingSink::default()),
    };
    let meter_shutdown = CancellationToken::new();
    let (meter, writer) = Meter::new(MeterConfig::default(), sink, meter_shutdown.clone());
    let writer = tokio::spawn(writer);
    // Failing closed, so that a Redis that stops answering shows as errors, not as a run that
    // quietly counted in the process.
    let redis = args.redis_url.as_ref().map(|url| RedisLimits {
        key_prefix: format!("bud-bench-{}", uuid::Uuid::new_v4().simple()),
        ..RedisLimits::new(url, OnUnreachable::FailClosed)
    });
    let config = GatewayConfig { redis, ..GatewayConfig::default() };
    let gateway = Gateway::try_new(config, meter.clone(), bud_telemetry::metrics_handle())
        .context("building the gateway")?;
    gateway.snapshot_handle().store(Arc::new(snapshot(&args.upstream)));

    let (listener, shutdown) = listen(args.port).await?;
    let serving = tokio::spawn(gateway.serve(listener, shutdown.clone()));

    shutdown.cancelled().await;
    match tokio::time::timeout(DRAIN, serving).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => eprintln!("gateway-server: the gateway stopped with an error: {e}"),
        Ok(Err(e)) => eprintln!("gateway-server: the gateway's task failed: {e}"),
        Err(_) => eprintln!("gateway-server: requests still in flight after {DRAIN:?}"),
    }
    meter_shutdown.cancel();
    if let Err(e) = writer.await {
        eprintln!("gateway-server: the usage writer failed: {e}");
    }
    let counts = meter.counts();
    say(&format!(
        "usage recorded={} written={} dropped={}",
        counts.recorded.load(Ordering::Relaxed),
        counts.written.load(Ordering::Relaxed),
        counts.dropped.load(Ordering::Relaxed),
    ))?;
    if let Some(db) = db {
        db.cleanup().await;
    }
    Ok(())
}

/// Binds the port, says `listening <address>`, and returns the listener and the token that
/// stdin's end cancels. The listener accepts from the moment it is bound, so a connection made
/// on hearing the address waits in the backlog until serving starts.
async fn listen(port: u16) -> anyhow::Result<(TcpListener, CancellationToken)> {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("binding port {port} on 127.0.0.1"))?;
    let address = listener.local_addr().context("reading the bound port")?;
    let shutdown = CancellationToken::new();
    stop_when_stdin_closes(shutdown.clone())?;
    // Ctrl-C in a terminal reaches the whole process group. Ignored here, the process stops
    // when the benchmark closes stdin (or exits), and still removes its database.
    tokio::spawn(async { while tokio::signal::ctrl_c().await.is_ok() {} });
    say(&format!("listening {address}"))?;
    Ok((listener, shutdown))
}

/// One key of one project, allowed one route, `bench`, over every replica.
fn snapshot(upstreams: &[String]) -> Snapshot {
    let project_id = ProjectId::new();
    let endpoint_id = EndpointId::new();
    let key = KeyEntry {
        id: ApiKeyId::new(),
        project_id,
        expires_at_ms: None,
        rpm: Some(LIMIT_PER_MINUTE),
        tpm: Some(LIMIT_PER_MINUTE),
    };
    let targets = upstreams
        .iter()
        .map(|address| Target {
            label: format!("replica:{endpoint_id}/{address}"),
            weight: 1,
            upstream: Upstream::Replica {
                endpoint_id,
                address: address.clone(),
                served_model: MODEL.to_owned(),
            },
        })
        .collect();
    let route = Route {
        name: MODEL.to_owned(),
        label: format!("endpoint:{endpoint_id}"),
        targets,
        fallbacks: Vec::new(),
        rpm: Some(LIMIT_PER_MINUTE),
        tpm: Some(LIMIT_PER_MINUTE),
    };
    let hash: [u8; 32] = Sha256::digest(KEY.as_bytes()).into();
    Snapshot {
        version: 1,
        built_at: Some(Instant::now()),
        keys: HashMap::from([(hash, key)]),
        routes: HashMap::from([(project_id, HashMap::from([(MODEL.to_owned(), Arc::new(route))]))]),
    }
}

/// Cancels `shutdown` when stdin reaches its end: the parent closed it, or ended.
fn stop_when_stdin_closes(shutdown: CancellationToken) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("stdin-watch".into())
        .spawn(move || {
            let mut buffer = [0u8; 64];
            let mut stdin = std::io::stdin().lock();
            while matches!(stdin.read(&mut buffer), Ok(n) if n > 0) {}
            shutdown.cancel();
        })
        .context("starting the stdin watcher")?;
    Ok(())
}

/// One line to the benchmark, which reads stdout line by line.
fn say(line: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).context("writing to the benchmark")
}

/// Counts records and keeps nothing.
#[derive(Debug, Default)]
struct CountingSink {
    records: AtomicU64,
}

impl UsageSink for CountingSink {
    fn write<'a>(
        &'a self,
        batch: &'a [UsageRecord],
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        self.records.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_admits_the_key_to_the_route_over_every_replica() {
        let upstreams = ["127.0.0.1:1".to_owned(), "127.0.0.1:2".to_owned()];
        let snapshot = snapshot(&upstreams);
        let hash: [u8; 32] = Sha256::digest(KEY.as_bytes()).into();
        let key = snapshot.key(&hash, 0).cloned();
        let route = key.as_ref().and_then(|k| snapshot.route(k.project_id, MODEL));
        let targets = route.map(|r| r.targets.len());
        assert_eq!(targets, Some(2));
        assert!(key.is_some_and(|k| k.rpm.is_some() && k.tpm.is_some()));
        assert!(route.is_some_and(|r| r.rpm.is_some() && r.tpm.is_some()));
    }
}
