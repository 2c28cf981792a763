//! Usage metering off the hot path: requests hand a [`UsageRecord`] to a bounded channel without
//! waiting; one writer task batches records into the sink (the store), retries failed batches
//! from a bounded buffer, counts what it had to drop, and flushes on shutdown. Each record has
//! its own id and the sink inserts idempotently, so a batch written twice is counted once.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bud_domain::{ApiKeyId, ProjectId, Timestamp};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One answered request's usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    /// Unique per request: the sink ignores a record it already has.
    pub id: uuid::Uuid,
    pub at: Timestamp,
    pub key_id: ApiKeyId,
    pub project_id: ProjectId,
    /// The route's public model name.
    pub model: String,
    /// The route label and the target label that answered.
    pub route: String,
    pub target: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub latency_ms: u32,
    /// HTTP status the client got (499 when it went away).
    pub status: u16,
}

/// Where batches go; implemented over the store.
pub trait UsageSink: Send + Sync + 'static {
    fn write<'a>(
        &'a self,
        batch: &'a [UsageRecord],
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;
}

#[derive(Debug, Clone, Copy)]
pub struct MeterConfig {
    /// Records waiting in the channel before new ones are dropped (the hot path never waits).
    pub channel: usize,
    /// Records held for retry while the sink fails; beyond it the oldest are dropped.
    pub buffer: usize,
    pub batch: usize,
    pub interval: Duration,
}

impl Default for MeterConfig {
    fn default() -> Self {
        Self { channel: 65_536, buffer: 100_000, batch: 500, interval: Duration::from_millis(500) }
    }
}

/// The hot path's handle: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Meter {
    tx: mpsc::Sender<UsageRecord>,
    counts: Arc<Counts>,
}

#[derive(Debug, Default)]
pub struct Counts {
    pub recorded: AtomicU64,
    pub written: AtomicU64,
    pub dropped: AtomicU64,
}

impl Meter {
    /// The handle and the writer task to run until `shutdown` (it flushes what it holds then).
    pub fn new(
        config: MeterConfig,
        sink: Arc<dyn UsageSink>,
        shutdown: CancellationToken,
    ) -> (Meter, impl Future<Output = ()>) {
        let (tx, rx) = mpsc::channel(config.channel.max(1));
        let counts = Arc::new(Counts::default());
        let writer = write_loop(config, sink, rx, counts.clone(), shutdown);
        (Meter { tx, counts }, writer)
    }

    /// Hands a record to the writer; when the channel is full the record is dropped and counted.
    pub fn record(&self, record: UsageRecord) {
        self.counts.recorded.fetch_add(1, Ordering::Relaxed);
        if self.tx.try_send(record).is_err() {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("gateway_usage_dropped_total").increment(1);
        }
    }

    pub fn counts(&self) -> &Counts {
        &self.counts
    }
}

async fn write_loop(
    config: MeterConfig,
    sink: Arc<dyn UsageSink>,
    mut rx: mpsc::Receiver<UsageRecord>,
    counts: Arc<Counts>,
    shutdown: CancellationToken,
) {
    let mut pending: VecDeque<UsageRecord> = VecDeque::new();
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            () = shutdown.cancelled() => true,
            _ = ticker.tick() => false,
        };
        while let Ok(r) = rx.try_recv() {
            pending.push_back(r);
        }
        let overflow = pending.len().saturating_sub(config.buffer);
        if overflow > 0 {
            pending.drain(..overflow);
            counts.dropped.fetch_add(overflow as u64, Ordering::Relaxed);
            metrics::counter!("gateway_usage_dropped_total").increment(overflow as u64);
            tracing::warn!(
                dropped = overflow,
                "usage buffer full while the store fails; oldest records dropped"
            );
        }
        while !pending.is_empty() {
            let n = pending.len().min(config.batch.max(1));
            let batch: Vec<UsageRecord> = pending.iter().take(n).cloned().collect();
            match sink.write(&batch).await {
                Ok(()) => {
                    pending.drain(..n);
                    counts.written.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(error = %e, held = pending.len(), "writing usage failed; keeping it for the next try");
                    break;
                }
            }
        }
        if stopping {
            rx.close();
            while let Some(r) = rx.recv().await {
                pending.push_back(r);
            }
            if !pending.is_empty() {
                let batch: Vec<UsageRecord> = pending.drain(..).collect();
                match sink.write(&batch).await {
                    Ok(()) => {
                        counts.written.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        counts.dropped.fetch_add(batch.len() as u64, Ordering::Relaxed);
                        tracing::error!(error = %e, lost = batch.len(), "usage not written at shutdown");
                    }
                }
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// A sink that fails while `down` is set, and keeps what it was given (ids deduplicated, as
    /// the store's `ON CONFLICT DO NOTHING` does).
    #[derive(Default)]
    struct Flaky {
        down: AtomicBool,
        rows: Mutex<Vec<uuid::Uuid>>,
        calls: AtomicU64,
    }

    impl UsageSink for Flaky {
        fn write<'a>(
            &'a self,
            batch: &'a [UsageRecord],
        ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::Relaxed);
                if self.down.load(Ordering::Relaxed) {
                    return Err("store down".into());
                }
                let mut rows = self.rows.lock().unwrap();
                for r in batch {
                    if !rows.contains(&r.id) {
                        rows.push(r.id);
                    }
                }
                Ok(())
            })
        }
    }

    fn record() -> UsageRecord {
        UsageRecord {
            id: uuid::Uuid::now_v7(),
            at: chrono::Utc::now(),
            key_id: ApiKeyId::new(),
            project_id: ProjectId::new(),
            model: "m".into(),
            route: "r".into(),
            target: "t".into(),
            prompt_tokens: 1,
            completion_tokens: 2,
            latency_ms: 3,
            status: 200,
        }
    }

    fn config(buffer: usize) -> MeterConfig {
        MeterConfig { channel: 1000, buffer, batch: 7, interval: Duration::from_millis(10) }
    }

    #[tokio::test]
    async fn an_outage_is_buffered_then_written_once() {
        let sink = Arc::new(Flaky::default());
        sink.down.store(true, Ordering::Relaxed);
        let stop = CancellationToken::new();
        let (meter, writer) = Meter::new(config(1000), sink.clone(), stop.clone());
        let writer = tokio::spawn(writer);
        for _ in 0..50 {
            meter.record(record());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(sink.rows.lock().unwrap().is_empty());
        assert!(sink.calls.load(Ordering::Relaxed) > 1, "retried while down");
        sink.down.store(false, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(sink.rows.lock().unwrap().len(), 50);
        assert_eq!(meter.counts().written.load(Ordering::Relaxed), 50, "each record counted once");
        assert_eq!(meter.counts().dropped.load(Ordering::Relaxed), 0);
        stop.cancel();
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_long_outage_keeps_bounded_memory_and_counts_what_it_dropped() {
        let sink = Arc::new(Flaky::default());
        sink.down.store(true, Ordering::Relaxed);
        let stop = CancellationToken::new();
        let (meter, writer) = Meter::new(config(20), sink.clone(), stop.clone());
        let writer = tokio::spawn(writer);
        for _ in 0..100 {
            meter.record(record());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        sink.down.store(false, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let written = sink.rows.lock().unwrap().len() as u64;
        let dropped = meter.counts().dropped.load(Ordering::Relaxed);
        assert_eq!(written, 20, "the buffer holds at most 20");
        assert_eq!(written + dropped, 100, "every record is either written or counted as dropped");
        stop.cancel();
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn shutdown_flushes_what_is_pending() {
        let sink = Arc::new(Flaky::default());
        let stop = CancellationToken::new();
        let slow = MeterConfig { interval: Duration::from_secs(3600), ..config(1000) };
        let (meter, writer) = Meter::new(slow, sink.clone(), stop.clone());
        let writer = tokio::spawn(writer);
        for _ in 0..30 {
            meter.record(record());
        }
        stop.cancel();
        writer.await.unwrap();
        assert_eq!(sink.rows.lock().unwrap().len(), 30);
    }
}
