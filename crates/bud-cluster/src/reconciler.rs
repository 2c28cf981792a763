//! The control loops: one task per cluster, which probes the cluster on its own schedule and
//! runs reconcile passes (observe → `plan` → apply) every interval or when woken. A cluster that
//! hangs or fails only slows its own task.
//!
//! Several budcluster replicas may run against one database: a pass runs only while this
//! replica holds the cluster's lease (`cluster:<id>`), renewed before it expires.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bud_domain::{ClusterId, ClusterStatus, EndpointId, FailureReason};
use bud_store::{AuditEvent, Cluster, Endpoint, EndpointEvent, ProbeRecord, Store};
use chrono::Utc;
use rand::Rng;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::ClusterConfig;
use crate::driver::{Driver, DriverError, EndpointSpec};
use crate::drivers::Drivers;
use crate::plan::{Action, ClusterReach, plan};

/// Shared by every cluster task.
pub(crate) struct Loops {
    pub store: Store,
    pub drivers: Arc<Drivers>,
    pub config: ClusterConfig,
    pub wake: Arc<Notify>,
}

/// Starts and stops one task per cluster as clusters come and go, until `shutdown`.
pub(crate) async fn supervise(loops: Arc<Loops>, shutdown: CancellationToken) {
    let mut tasks: HashMap<ClusterId, (CancellationToken, tokio::task::JoinHandle<()>)> =
        HashMap::new();
    loop {
        match loops.store.all_clusters().await {
            Ok(clusters) => {
                tasks.retain(|id, (token, handle)| {
                    let keep = clusters.iter().any(|c| c.id == *id) && !handle.is_finished();
                    if !keep {
                        token.cancel();
                    }
                    keep
                });
                for cluster in clusters {
                    tasks.entry(cluster.id).or_insert_with(|| {
                        let token = shutdown.child_token();
                        let handle =
                            tokio::spawn(cluster_task(loops.clone(), cluster.id, token.clone()));
                        (token, handle)
                    });
                }
            }
            Err(e) => tracing::warn!(error = %e, "listing clusters failed; retrying"),
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = loops.wake.notified() => {}
            () = tokio::time::sleep(loops.config.reconcile_interval) => {}
        }
    }
    for (_, (token, handle)) in tasks {
        token.cancel();
        let _ = handle.await;
    }
}

/// Per-cluster state kept between passes.
struct ClusterTask {
    id: ClusterId,
    lease_until: Option<Instant>,
    next_probe: Instant,
    last_probe_write: Option<Instant>,
}

async fn cluster_task(loops: Arc<Loops>, id: ClusterId, shutdown: CancellationToken) {
    let mut task =
        ClusterTask { id, lease_until: None, next_probe: Instant::now(), last_probe_write: None };
    loop {
        if let Err(e) = tick(&loops, &mut task).await {
            tracing::warn!(cluster_id = %id, error = %e, "cluster pass failed");
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = loops.wake.notified() => {}
            () = tokio::time::sleep(loops.config.reconcile_interval) => {}
        }
    }
    if task.lease_until.is_some() {
        let _ = loops.store.release_lease(&lease_name(id), &loops.config.replica_id).await;
    }
}

fn lease_name(id: ClusterId) -> String {
    format!("cluster:{id}")
}

async fn tick(loops: &Loops, task: &mut ClusterTask) -> anyhow::Result<()> {
    if !holds_lease(loops, task).await? {
        return Ok(());
    }
    let Some(cluster) = loops.store.cluster(task.id).await? else { return Ok(()) };
    let driver = loops.drivers.driver(&cluster).await;
    if Instant::now() >= task.next_probe {
        probe(loops, task, &cluster, driver.as_deref()).await?;
    }
    // Re-read: the probe may have changed the status.
    let Some(cluster) = loops.store.cluster(task.id).await? else { return Ok(()) };
    if cluster.status == ClusterStatus::Deleting {
        return teardown(loops, &cluster, driver.as_deref()).await;
    }
    reconcile(loops, &cluster, driver.as_deref()).await
}

/// Takes or renews the lease when it is missing or past half its time; otherwise no write.
async fn holds_lease(loops: &Loops, task: &mut ClusterTask) -> anyhow::Result<bool> {
    let ttl = loops.config.lease_ttl;
    let fresh = task
        .lease_until
        .is_some_and(|until| until.saturating_duration_since(Instant::now()) > ttl / 2);
    if fresh {
        return Ok(true);
    }
    let asked = Instant::now();
    let held = loops
        .store
        .try_acquire_lease(&lease_name(task.id), &loops.config.replica_id, Utc::now(), ttl)
        .await?;
    task.lease_until = held.then_some(asked + ttl);
    Ok(held)
}

async fn probe(
    loops: &Loops,
    task: &mut ClusterTask,
    cluster: &Cluster,
    driver: Option<&Driver>,
) -> anyhow::Result<()> {
    let config = &loops.config;
    if matches!(cluster.status, ClusterStatus::Error | ClusterStatus::Deleting) {
        // ERROR waits for a refresh or a new kubeconfig; DELETING is being torn down.
        task.next_probe = Instant::now() + config.probe_interval;
        return Ok(());
    }
    let result = match driver {
        Some(d) => match tokio::time::timeout(config.probe_timeout, d.probe()).await {
            Ok(r) => r,
            Err(_) => Err(DriverError::Unreachable(format!(
                "no answer within {:?}",
                config.probe_timeout
            ))),
        },
        None => Err(DriverError::Refused(
            "the kubeconfig cannot be used; re-register the cluster".into(),
        )),
    };
    let (record, delay) = match result {
        Ok(inventory) => {
            let record = ProbeRecord {
                status: ClusterStatus::Available,
                reason: String::new(),
                consecutive_failures: 0,
                inventory: Some(inventory),
                checked_at: Utc::now(),
            };
            (record, config.probe_interval)
        }
        Err(e) => {
            let failures = cluster.consecutive_failures + 1;
            let status = if failures >= i64::from(config.max_probe_failures) {
                ClusterStatus::Error
            } else {
                ClusterStatus::NotAvailable
            };
            let reason = if status == ClusterStatus::Error {
                format!(
                    "{e} ({failures} failed checks; refresh the cluster or update its kubeconfig to retry)"
                )
            } else {
                format!("{e} ({failures} of {} failed checks)", config.max_probe_failures)
            };
            let record = ProbeRecord {
                status,
                reason,
                consecutive_failures: failures,
                inventory: cluster.inventory,
                checked_at: Utc::now(),
            };
            (record, backoff(config.probe_interval, failures))
        }
    };
    task.next_probe = Instant::now() + jitter(delay);
    let changed = record.status != cluster.status
        || record.reason != cluster.reason
        || record.consecutive_failures != cluster.consecutive_failures
        || record.inventory != cluster.inventory;
    let heartbeat_due =
        task.last_probe_write.is_none_or(|at| at.elapsed() >= config.probe_heartbeat);
    if (changed || heartbeat_due)
        && loops.store.record_probe(cluster.id, cluster.status, &record).await?
    {
        task.last_probe_write = Some(Instant::now());
        if record.status != cluster.status {
            tracing::info!(cluster_id = %cluster.id, from = %cluster.status, to = %record.status, reason = %record.reason, "cluster status changed");
        }
    }
    Ok(())
}

/// The wait before the next check: `base` while healthy, then doubling with each consecutive
/// failure, at most eight times `base`.
fn backoff(base: Duration, failures: i64) -> Duration {
    let doublings = u32::try_from((failures - 1).clamp(0, 3)).unwrap_or(3);
    base.saturating_mul(1 << doublings)
}

/// ±20 % so that many clusters probed on one schedule do not move in lockstep.
fn jitter(d: Duration) -> Duration {
    let factor = rand::thread_rng().gen_range(0.8..1.2);
    d.mul_f64(factor)
}

/// One reconcile pass of `id`, as the cluster's task runs it, without lease or probe.
pub(crate) async fn pass(loops: &Loops, id: ClusterId) -> anyhow::Result<()> {
    let Some(cluster) = loops.store.cluster(id).await? else { return Ok(()) };
    let driver = loops.drivers.driver(&cluster).await;
    reconcile(loops, &cluster, driver.as_deref()).await
}

async fn reconcile(
    loops: &Loops,
    cluster: &Cluster,
    driver: Option<&Driver>,
) -> anyhow::Result<()> {
    let desired = loops.store.endpoints_on_cluster(cluster.id).await?;
    let observation = match driver {
        Some(d) if cluster.status != ClusterStatus::Error => {
            match tokio::time::timeout(loops.config.observe_timeout, d.observe()).await {
                Ok(Ok(o)) => Some(o),
                Ok(Err(e)) => {
                    tracing::debug!(cluster_id = %cluster.id, error = %e, "observe failed");
                    None
                }
                Err(_) => None,
            }
        }
        _ => None,
    };
    let reach =
        if observation.is_some() { ClusterReach::Reachable } else { ClusterReach::Unreachable };
    let observation = observation.unwrap_or_default();
    let actions = plan(&desired, &observation, reach, Utc::now());
    for action in actions {
        apply(loops, cluster, driver, &desired, action).await?;
    }
    Ok(())
}

async fn apply(
    loops: &Loops,
    cluster: &Cluster,
    driver: Option<&Driver>,
    desired: &[Endpoint],
    action: Action,
) -> anyhow::Result<()> {
    let store = &loops.store;
    match action {
        Action::Ensure { endpoint } => {
            let (Some(driver), Some(e)) = (driver, desired.iter().find(|e| e.id == endpoint))
            else {
                return Ok(());
            };
            let spec = spec_of(store, e).await?;
            if let Err(err) = driver.ensure(&spec).await {
                tracing::warn!(endpoint_id = %endpoint, cluster_id = %cluster.id, error = %err, "ensure failed");
                event(
                    store,
                    endpoint,
                    "warning",
                    format!("deploying on cluster {} failed: {err}", cluster.name),
                )
                .await?;
            }
        }
        Action::Remove { endpoint } => {
            if let Some(driver) = driver
                && let Err(err) = driver.remove(endpoint).await
            {
                tracing::warn!(endpoint_id = %endpoint, cluster_id = %cluster.id, error = %err, "remove failed");
            }
        }
        Action::Transition { endpoint, change, generation } => {
            if store.transition_endpoint(endpoint, &change, Some(generation), None).await? {
                tracing::info!(endpoint_id = %endpoint, cluster_id = %cluster.id, from = %change.from, to = %change.to,
                    reason = change.reason.map(FailureReason::as_str).unwrap_or(""), "endpoint status changed");
            }
        }
        Action::SetReady { endpoint, ready, addresses } => {
            store.set_ready_replicas(endpoint, ready, &addresses).await?;
        }
    }
    Ok(())
}

/// What the driver needs to run an endpoint: its record and its model's name and source.
async fn spec_of(store: &Store, e: &Endpoint) -> anyhow::Result<EndpointSpec> {
    let model = store
        .model(e.model_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("model {} of endpoint {} is gone", e.model_id, e.id))?;
    Ok(EndpointSpec {
        id: e.id,
        project_id: e.project_id,
        served_name: model.name.to_string(),
        model_source: model.source_uri.to_string(),
        engine_args: e.engine_args.clone(),
        replicas: u32::try_from(e.replicas).unwrap_or(0),
        gpus_per_replica: u32::try_from(e.gpus_per_replica).unwrap_or(0),
        generation: e.generation,
    })
}

async fn event(
    store: &Store,
    endpoint: EndpointId,
    kind: &str,
    message: String,
) -> anyhow::Result<()> {
    let event = EndpointEvent {
        id: uuid::Uuid::now_v7().to_string(),
        endpoint_id: endpoint,
        at: Utc::now(),
        kind: kind.into(),
        message,
    };
    store.add_endpoint_event(&event).await?;
    Ok(())
}

/// A cluster being deleted with force: remove what runs there, then the endpoints and the
/// cluster itself. Each step is idempotent, so a crash midway is finished by the next pass.
async fn teardown(loops: &Loops, cluster: &Cluster, driver: Option<&Driver>) -> anyhow::Result<()> {
    let store = &loops.store;
    for e in store.endpoints_on_cluster(cluster.id).await? {
        if let Some(d) = driver
            && let Err(err) = d.remove(e.id).await
        {
            tracing::warn!(endpoint_id = %e.id, error = %err, "removal during cluster deletion failed; retrying next pass");
            return Ok(());
        }
        store
            .delete_endpoint(
                e.id,
                &system_audit("endpoint.delete", "endpoint", e.id, "cluster deleted with force"),
            )
            .await?;
    }
    store
        .delete_cluster(
            cluster.id,
            &system_audit("cluster.delete", "cluster", cluster.id, "deleted"),
        )
        .await?;
    loops.drivers.forget(cluster.id).await;
    tracing::info!(cluster_id = %cluster.id, "cluster deleted");
    Ok(())
}

fn system_audit(action: &str, resource_type: &str, id: impl ToString, note: &str) -> AuditEvent {
    AuditEvent {
        at: Utc::now(),
        actor_id: None,
        actor: "budcluster".into(),
        action: action.into(),
        resource_type: resource_type.into(),
        resource_id: id.to_string(),
        project_id: None,
        details: serde_json::json!({ "note": note }),
        request_id: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_bounded() {
        let base = Duration::from_secs(10);
        assert_eq!(backoff(base, 0), base);
        assert!(backoff(base, 1) <= backoff(base, 3));
        assert_eq!(backoff(base, 1), base);
        assert_eq!(backoff(base, 2), base * 2);
        assert_eq!(backoff(base, 100), base * 8);
    }
}
