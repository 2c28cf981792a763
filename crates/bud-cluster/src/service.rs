//! The budcluster service: starts the drivers and the control loops, and answers what budapp
//! asks of the clusters themselves (logs, engine metrics, a nudge to reconcile now).

use std::collections::HashMap;
use std::sync::Arc;

use bud_auth::secrets::Keyring;
use bud_domain::{ClusterId, ClusterStatus, EndpointId, Name};
use bud_protocol::control::EndpointMetricsDto;
use bud_store::{AuditEvent, Cluster, ClusterKind, Store, StoreError};
use chrono::Utc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::ClusterConfig;
use crate::driver::local::LocalDriver;
use crate::driver::{Driver, DriverError};
use crate::drivers::Drivers;
use crate::engine_metrics::Scraper;
use crate::reconciler::{self, Loops};

/// Name of the cluster that stands for this machine in the embedded setup.
pub const LOCAL_CLUSTER: &str = "local";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The endpoint or cluster does not exist (or runs nothing yet).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The cluster or budcluster cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The driver failed.
    #[error(transparent)]
    Driver(#[from] DriverError),
}

pub struct ClusterService {
    loops: Arc<Loops>,
    scraper: Scraper,
}

impl ClusterService {
    /// Builds the drivers (cleaning up local replicas left by a crashed predecessor) and, with
    /// the local driver, makes sure the `local` cluster exists.
    pub async fn start(
        store: Store,
        keyring: Keyring,
        config: ClusterConfig,
    ) -> Result<Arc<Self>, ClusterError> {
        Self::start_with(store, keyring, config, HashMap::new()).await
    }

    /// As [`ClusterService::start`], with drivers chosen by the caller for some clusters
    /// (simulated clusters in benchmarks and tests).
    pub async fn start_with(
        store: Store,
        keyring: Keyring,
        config: ClusterConfig,
        overrides: HashMap<ClusterId, Driver>,
    ) -> Result<Arc<Self>, ClusterError> {
        let local = match &config.local {
            Some(local) => Some(Driver::Local(LocalDriver::new(local.clone()).await?)),
            None => None,
        };
        if local.is_some() {
            ensure_local_cluster(&store).await?;
        }
        let drivers =
            Arc::new(Drivers::new(local, overrides, keyring, config.allow_exec_kubeconfig));
        let loops = Arc::new(Loops { store, drivers, config, wake: Arc::new(Notify::new()) });
        Ok(Arc::new(Self { loops, scraper: Scraper::new() }))
    }

    /// Runs the control loops until `shutdown`, then stops what runs in this process.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        reconciler::supervise(self.loops.clone(), shutdown).await;
        self.loops.drivers.shutdown().await;
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.loops.config
    }

    /// Runs one reconcile pass over `cluster` now, outside the loops (benchmarks and tests:
    /// a pass that finds nothing to change must write nothing).
    pub async fn reconcile_once(&self, cluster: ClusterId) -> Result<(), ClusterError> {
        reconciler::pass(&self.loops, cluster)
            .await
            .map_err(|e| ClusterError::Unavailable(format!("{e:#}")))
    }

    /// Reconcile now rather than at the next interval (after a user change).
    pub fn wake(&self) {
        self.loops.wake.notify_waiters();
    }

    /// The last `tail` lines of each replica's output.
    pub async fn logs(&self, id: EndpointId, tail: usize) -> Result<String, ClusterError> {
        let driver = self.driver_of(id).await?;
        match driver.logs(id, tail).await {
            Err(DriverError::NotFound) => Err(ClusterError::NotFound("logs")),
            other => Ok(other?),
        }
    }

    /// Queue depth, throughput and latency read from the endpoint's engines.
    pub async fn metrics(&self, id: EndpointId) -> Result<EndpointMetricsDto, ClusterError> {
        let driver = self.driver_of(id).await?;
        let observation = tokio::time::timeout(self.loops.config.observe_timeout, driver.observe())
            .await
            .map_err(|_| {
                ClusterError::Unavailable("the cluster did not answer in time".into())
            })??;
        let addresses = observation.get(&id).map(|o| o.addresses.clone()).unwrap_or_default();
        Ok(self.scraper.metrics(id, &addresses).await)
    }

    async fn driver_of(&self, id: EndpointId) -> Result<Arc<Driver>, ClusterError> {
        let store = &self.loops.store;
        let endpoint = store.endpoint(id).await?.ok_or(ClusterError::NotFound("endpoint"))?;
        let cluster =
            store.cluster(endpoint.cluster_id).await?.ok_or(ClusterError::NotFound("cluster"))?;
        self.loops.drivers.driver(&cluster).await.ok_or_else(|| {
            ClusterError::Unavailable(format!(
                "cluster {} cannot be reached from this budcluster",
                cluster.name
            ))
        })
    }
}

async fn ensure_local_cluster(store: &Store) -> Result<(), ClusterError> {
    if store.cluster_by_name(LOCAL_CLUSTER).await?.is_some() {
        return Ok(());
    }
    let now = Utc::now();
    let cluster = Cluster {
        id: ClusterId::new(),
        name: Name::parse("name", LOCAL_CLUSTER)
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?,
        kind: ClusterKind::Local,
        kubeconfig_ciphertext: String::new(),
        namespace: String::new(),
        status: ClusterStatus::Registering,
        reason: String::new(),
        consecutive_failures: 0,
        last_checked_at: None,
        inventory: None,
        created_by: None,
        created_at: now,
        updated_at: now,
    };
    let audit = AuditEvent {
        at: now,
        actor_id: None,
        actor: "budcluster".into(),
        action: "cluster.create".into(),
        resource_type: "cluster".into(),
        resource_id: cluster.id.to_string(),
        project_id: None,
        details: serde_json::json!({"name": LOCAL_CLUSTER, "kind": "local"}),
        request_id: None,
    };
    match store.create_cluster(&cluster, &audit).await {
        // Another replica created it first.
        Ok(()) | Err(StoreError::Conflict { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
