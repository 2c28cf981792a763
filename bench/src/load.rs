//! The load generator every benchmark shares: an HTTP/1 client over a pool of kept-alive
//! connections, a closed loop and an open loop to drive it, and the latency statistics they
//! report.
//!
//! - A **closed loop** runs `C` workers, each sending its next request as soon as the previous
//!   one is answered. It finds the throughput the server sustains at that concurrency; its
//!   latencies are those of a server kept exactly `C` requests busy.
//! - An **open loop** sends requests on a fixed schedule whatever the answers, the way
//!   independent clients do. Latency runs from each request's *scheduled* send time, so a
//!   server that stalls is charged for every request that would have been sent meanwhile
//!   (no coordinated omission). The schedule is kept by a thread of its own sleeping with the
//!   operating system's timer, because tokio's timer ticks in whole milliseconds, which at
//!   500 requests/s would add up to a millisecond of the generator's own lateness to each
//!   request. What lateness remains is reported as the send lag.
//!
//! Both run a warm-up first (connections opened, caches filled) whose answers are discarded.
//! An answer that is not 2xx, a transport failure and a request not answered within
//! [`REQUEST_TIMEOUT`] are errors.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinSet;

/// How long one request may take before it counts as an error, so that a server that hangs
/// cannot hang the benchmark.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Above this fraction of errors a scenario's figures describe failures, not the service.
pub const MAX_ERROR_RATE: f64 = 0.01;

/// The body type of every request.
pub type Body = Full<Bytes>;

/// Builds the `n`th request of a scenario (`n` counts from 0 across all workers, so it can make
/// names unique). Called on the loader's hot path: keep it cheap.
pub type RequestFactory = Arc<dyn Fn(u64) -> anyhow::Result<Request<Body>> + Send + Sync>;

/// How long a scenario warms up and then measures.
#[derive(Debug, Clone, Copy)]
pub struct Phases {
    pub warmup: Duration,
    pub measure: Duration,
}

/// An HTTP/1 client keeping connections alive in a pool; cheap to clone.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, Body>,
}

/// A complete answer: the whole body is read, which also returns the connection to the pool.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

/// What one scenario observed during its measured phase.
pub struct Tally {
    /// Latency of every measured request, answered or not.
    latency: LatencyHistogram,
    /// Open loop only: the latency split into the generator's lateness and the answer time.
    split: Option<Split>,
    errors: BTreeMap<String, u64>,
    /// Requests scheduled (open loop) or sent (closed loop) from here on are measured.
    measure_from: Instant,
    /// No request is sent after this in a closed loop, nor scheduled in an open one.
    stop_at: Instant,
    last_answer: Option<Instant>,
}

/// An open loop's latency in two parts. On a busy machine the generator itself runs late;
/// this shows how much of the latency is its own.
struct Split {
    /// From the scheduled time to the actual send.
    send_lag: LatencyHistogram,
    /// From the actual send to the answer: what a closed-loop client would have measured.
    service: LatencyHistogram,
}

/// Latencies with three significant digits from 1 µs to one minute (longer ones are counted
/// as one minute).
#[derive(Clone)]
pub struct LatencyHistogram {
    micros: Histogram<u64>,
}

impl HttpClient {
    /// `pool_size` bounds the idle connections kept per host: the concurrency of the heaviest
    /// closed loop, so that none of its workers has to reconnect.
    pub fn new(pool_size: usize) -> Self {
        let mut connector = HttpConnector::new();
        // Without it Nagle's algorithm and delayed acknowledgements add tens of milliseconds.
        connector.set_nodelay(true);
        let inner = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(pool_size)
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Self { inner }
    }

    /// Sends `request` and reads the whole answer, whatever its status.
    pub async fn send(&self, request: Request<Body>) -> anyhow::Result<Answer> {
        let response = self.inner.request(request).await.context("sending the request")?;
        let status = response.status();
        let body = response.into_body().collect().await.context("reading the answer")?.to_bytes();
        Ok(Answer { status, body })
    }

    /// Like [`HttpClient::send`], but a timeout or an answer that is not 2xx is an error
    /// named by its kind, as the loops count them.
    async fn exchange(&self, request: Request<Body>) -> Result<(), String> {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.inner.request(request)).await {
            Err(_) => Err("timeout".to_owned()),
            Ok(Err(e)) => Err(format!("transport: {e}")),
            Ok(Ok(response)) => {
                let status = response.status();
                // Read to the end even on errors, so that the connection can be reused.
                let read = response.into_body().collect().await;
                match (status.is_success(), read) {
                    (true, Ok(_)) => Ok(()),
                    (false, _) => Err(format!("HTTP {}", status.as_u16())),
                    (true, Err(e)) => Err(format!("transport: {e}")),
                }
            }
        }
    }
}

/// Runs `concurrency` workers back to back for the warm-up and then the measured phase.
pub async fn closed_loop(
    client: &HttpClient,
    requests: RequestFactory,
    concurrency: usize,
    phases: Phases,
) -> anyhow::Result<Tally> {
    let measure_from = Instant::now() + phases.warmup;
    let stop_at = measure_from + phases.measure;
    let sequence = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (client, requests, sequence) = (client.clone(), requests.clone(), sequence.clone());
        workers.spawn(async move {
            let mut tally = Tally::new(measure_from, stop_at, false)?;
            loop {
                let sent = Instant::now();
                if sent >= stop_at {
                    break;
                }
                let request = requests(sequence.fetch_add(1, Ordering::Relaxed))?;
                let outcome = client.exchange(request).await;
                tally.record(Sample { due: sent, sent, answered: Instant::now(), outcome });
            }
            anyhow::Ok(tally)
        });
    }
    let mut tally = Tally::new(measure_from, stop_at, false)?;
    while let Some(worker) = workers.join_next().await {
        tally.merge(worker.context("a load worker failed")??)?;
    }
    Ok(tally)
}

/// Sends `rate` requests per second on a fixed schedule, whatever the answers, through the
/// warm-up and the measured phase, then waits for the last answers.
pub async fn open_loop(
    client: &HttpClient,
    requests: RequestFactory,
    rate: u32,
    phases: Phases,
) -> anyhow::Result<Tally> {
    let rate = f64::from(rate.max(1));
    // A short lead so that the first requests are not already late when the loop starts.
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + phases.warmup;
    let stop_at = measure_from + phases.measure;
    let total = ((phases.warmup + phases.measure).as_secs_f64() * rate).ceil() as u64;

    let (schedule, mut due_times) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let ticker = std::thread::Builder::new()
        .name("bench-schedule".into())
        .spawn(move || {
            for n in 0..total {
                let due = start + Duration::from_secs_f64(n as f64 / rate);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                // The loader is gone (it failed or was interrupted): stop sending.
                if schedule.send((n, due)).is_err() {
                    break;
                }
            }
        })
        .context("starting the schedule thread")?;

    let mut tally = Tally::new(measure_from, stop_at, true)?;
    let mut in_flight = JoinSet::new();
    let mut schedule_open = true;
    while schedule_open || !in_flight.is_empty() {
        tokio::select! {
            tick = due_times.recv(), if schedule_open => match tick {
                Some((n, due)) => {
                    let request = requests(n)?;
                    let client = client.clone();
                    in_flight.spawn(async move {
                        let sent = Instant::now();
                        let outcome = client.exchange(request).await;
                        Sample { due, sent, answered: Instant::now(), outcome }
                    });
                }
                None => schedule_open = false,
            },
            Some(done) = in_flight.join_next() => tally.record(done.context("a request task failed")?),
        }
    }
    ticker.join().map_err(|_| anyhow!("the schedule thread panicked"))?;
    Ok(tally)
}

/// One request as a loop saw it.
struct Sample {
    /// When it should have been sent: the schedule's time in an open loop, else when it was.
    due: Instant,
    sent: Instant,
    answered: Instant,
    outcome: Result<(), String>,
}

impl Tally {
    /// Measured requests, answered or failed.
    pub fn requests(&self) -> u64 {
        self.latency.count()
    }

    /// Failed requests by kind (`HTTP 503`, `timeout`, `transport: …`).
    pub fn errors(&self) -> &BTreeMap<String, u64> {
        &self.errors
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn error_rate(&self) -> f64 {
        ratio(self.error_count() as f64, self.requests() as f64)
    }

    /// From the start of the measured phase to its end or to the last answer, whichever is
    /// later, so that requests still in flight at the end do not inflate the throughput.
    pub fn window(&self) -> Duration {
        let end = self.last_answer.map_or(self.stop_at, |last| last.max(self.stop_at));
        end.saturating_duration_since(self.measure_from)
    }

    /// Measured requests per second of the window.
    pub fn throughput(&self) -> f64 {
        ratio(self.requests() as f64, self.window().as_secs_f64())
    }

    pub fn latency(&self) -> &LatencyHistogram {
        &self.latency
    }

    /// How late the open loop sent requests after their scheduled time: the generator's own
    /// share of the latency. `None` for a closed loop.
    pub fn send_lag(&self) -> Option<&LatencyHistogram> {
        self.split.as_ref().map(|split| &split.send_lag)
    }

    /// Open loop only: latency from the actual send to the answer, leaving out the generator's
    /// lateness. `None` for a closed loop, whose latency is measured that way anyway.
    pub fn service_time(&self) -> Option<&LatencyHistogram> {
        self.split.as_ref().map(|split| &split.service)
    }

    fn new(measure_from: Instant, stop_at: Instant, open: bool) -> anyhow::Result<Self> {
        Ok(Self {
            latency: LatencyHistogram::new()?,
            split: if open {
                Some(Split {
                    send_lag: LatencyHistogram::new()?,
                    service: LatencyHistogram::new()?,
                })
            } else {
                None
            },
            errors: BTreeMap::new(),
            measure_from,
            stop_at,
            last_answer: None,
        })
    }

    /// Adds the counts of a tally of the same phase, e.g. another worker's.
    fn merge(&mut self, other: Tally) -> anyhow::Result<()> {
        self.latency.merge(&other.latency)?;
        if let (Some(split), Some(other)) = (&mut self.split, &other.split) {
            split.send_lag.merge(&other.send_lag)?;
            split.service.merge(&other.service)?;
        }
        for (kind, count) in other.errors {
            *self.errors.entry(kind).or_default() += count;
        }
        self.last_answer = self.last_answer.max(other.last_answer);
        Ok(())
    }

    /// Counts `sample` if it belongs to the measured phase.
    fn record(&mut self, sample: Sample) {
        if sample.due < self.measure_from {
            return;
        }
        self.latency.record(sample.answered.saturating_duration_since(sample.due));
        if let Some(split) = &mut self.split {
            split.send_lag.record(sample.sent.saturating_duration_since(sample.due));
            split.service.record(sample.answered.saturating_duration_since(sample.sent));
        }
        if let Err(kind) = sample.outcome {
            *self.errors.entry(kind).or_default() += 1;
        }
        self.last_answer = self.last_answer.max(Some(sample.answered));
    }
}

impl LatencyHistogram {
    const MAX_MICROS: u64 = 60_000_000;

    pub fn new() -> anyhow::Result<Self> {
        let micros = Histogram::new_with_bounds(1, Self::MAX_MICROS, 3)
            .map_err(|e| anyhow!("creating a latency histogram: {e:?}"))?;
        Ok(Self { micros })
    }

    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.micros.saturating_record(micros.max(1));
    }

    pub fn merge(&mut self, other: &LatencyHistogram) -> anyhow::Result<()> {
        self.micros.add(&other.micros).map_err(|e| anyhow!("merging latency histograms: {e:?}"))
    }

    pub fn count(&self) -> u64 {
        self.micros.len()
    }

    /// The latency below which a fraction `q` of the samples lie, e.g. 0.99 for p99.
    pub fn quantile(&self, q: f64) -> Duration {
        Duration::from_micros(self.micros.value_at_quantile(q))
    }

    pub fn max(&self) -> Duration {
        Duration::from_micros(self.micros.max())
    }
}

/// `a / b`, or 0 when `b` is 0.
pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}
