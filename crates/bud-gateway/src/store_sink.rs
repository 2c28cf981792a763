//! The usage sink over the control plane's database: each batch is one transaction of
//! idempotent inserts (a record whose id is stored already is skipped), so the meter may retry a
//! batch whose answer it lost without counting it twice.

use std::future::Future;
use std::pin::Pin;

use bud_store::{Store, UsageRow};

use crate::metering::{UsageRecord, UsageSink};

/// Writes usage into the store's `usage` table.
#[derive(Debug, Clone)]
pub struct StoreSink(pub Store);

impl UsageSink for StoreSink {
    fn write<'a>(
        &'a self,
        batch: &'a [UsageRecord],
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            let rows: Vec<UsageRow> = batch.iter().map(usage_row).collect();
            self.0.insert_usage(&rows).await.map(|_| ()).map_err(|e| chain(&e))
        })
    }
}

fn usage_row(r: &UsageRecord) -> UsageRow {
    UsageRow {
        id: r.id,
        at: r.at,
        key_id: r.key_id,
        project_id: r.project_id,
        model: r.model.clone(),
        route: r.route.clone(),
        target: r.target.clone(),
        prompt_tokens: i64::from(r.prompt_tokens),
        completion_tokens: i64::from(r.completion_tokens),
        latency_ms: i64::from(r.latency_ms),
        status: i64::from(r.status),
    }
}

/// The error with its causes, as the meter logs one string.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bud_domain::{ApiKeyId, ProjectId};
    use bud_store::{UsageFilter, UsageGroup};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::metering::{Meter, MeterConfig};

    fn record(project: ProjectId, model: &str, status: u16) -> UsageRecord {
        UsageRecord {
            id: uuid::Uuid::new_v4(),
            at: chrono::Utc::now(),
            key_id: ApiKeyId::new(),
            project_id: project,
            model: model.to_owned(),
            route: "endpoint:e".to_owned(),
            target: "replica:e/127.0.0.1:8000".to_owned(),
            prompt_tokens: 7,
            completion_tokens: 3,
            latency_ms: 40,
            status,
        }
    }

    fn today(project: ProjectId) -> UsageFilter {
        let now = chrono::Utc::now();
        UsageFilter {
            since: now - chrono::Duration::hours(1),
            until: now + chrono::Duration::hours(1),
            project: Some(project),
            key: None,
            model: None,
            group_by: UsageGroup::Model,
        }
    }

    #[tokio::test]
    async fn a_batch_written_twice_counts_once() {
        let db = bud_store::testing::fresh_sqlite().await.unwrap();
        let sink = StoreSink(db.store().clone());
        let project = ProjectId::new();
        let batch = vec![record(project, "llama", 200), record(project, "llama", 502)];
        sink.write(&batch).await.unwrap();
        sink.write(&batch).await.unwrap();
        let summary = db.usage_summary(&today(project)).await.unwrap();
        assert_eq!(summary.len(), 1);
        assert_eq!((summary[0].requests, summary[0].errors), (2, 1));
        assert_eq!((summary[0].prompt_tokens, summary[0].completion_tokens), (14, 6));
        db.cleanup().await;
    }

    #[tokio::test]
    async fn the_meter_writes_through_the_sink_and_flushes_at_shutdown() {
        let db = bud_store::testing::fresh_sqlite().await.unwrap();
        let shutdown = CancellationToken::new();
        let config = MeterConfig { interval: Duration::from_secs(3600), ..MeterConfig::default() };
        let sink = Arc::new(StoreSink(db.store().clone()));
        let (meter, writer) = Meter::new(config, sink, shutdown.clone());
        let writer = tokio::spawn(writer);
        let project = ProjectId::new();
        for _ in 0..5 {
            meter.record(record(project, "llama", 200));
        }
        shutdown.cancel();
        writer.await.unwrap();
        let summary = db.usage_summary(&today(project)).await.unwrap();
        assert_eq!(summary[0].requests, 5);
        db.cleanup().await;
    }

    #[tokio::test]
    async fn a_failing_store_is_reported_with_its_cause() {
        let db = bud_store::testing::fresh_sqlite().await.unwrap();
        let sink = StoreSink(db.store().clone());
        db.store().close().await;
        let err = sink.write(&[record(ProjectId::new(), "m", 200)]).await.unwrap_err();
        assert!(err.starts_with("database unavailable: "), "{err}");
        db.cleanup().await;
    }
}
