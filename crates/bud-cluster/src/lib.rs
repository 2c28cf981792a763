//! budcluster: keeps model endpoints deployed on clusters.
//!
//! The store holds what should run (endpoints and their status); drivers say what does run
//! ([`driver`]); a pure [`plan`] decides what to change; the [`reconciler`] loops apply it, one
//! task per cluster, and probe each cluster with backoff. budapp reaches this service through a
//! [`ClusterClient`]: in process in the embedded setup, over HTTP when the services are split.

pub mod api;
pub mod client;
pub mod driver;
mod drivers;
pub mod engine_metrics;
pub mod kubeconfig;
pub mod plan;
mod reconciler;
pub mod service;

use std::time::Duration;

pub use client::ClusterClient;
pub use service::{ClusterError, ClusterService};

/// budcluster's settings; defaults work on one machine.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Names this replica in leases; unique per process.
    pub replica_id: String,
    /// How often each cluster is reconciled when nothing wakes it.
    pub reconcile_interval: Duration,
    /// How often a healthy cluster is checked; failures back off from here.
    pub probe_interval: Duration,
    /// How long one check may take before the cluster counts as unreachable.
    pub probe_timeout: Duration,
    /// Failed checks in a row after which a cluster goes to ERROR.
    pub max_probe_failures: u32,
    /// While nothing changes, a check is recorded at most this often (its `last_checked_at`).
    pub probe_heartbeat: Duration,
    /// How long a driver may take to say what runs on a cluster.
    pub observe_timeout: Duration,
    /// How long a replica holds a cluster's lease without renewing it.
    pub lease_ttl: Duration,
    /// Runs the local driver in this process (the embedded setup) with these settings.
    pub local: Option<driver::local::LocalConfig>,
    /// Accept kubeconfigs whose users run commands (`exec`, `auth-provider`).
    pub allow_exec_kubeconfig: bool,
    /// Workloads namespace of new Kubernetes clusters.
    pub default_namespace: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            replica_id: format!("budcluster-{}", uuid::Uuid::new_v4().simple()),
            reconcile_interval: Duration::from_secs(2),
            probe_interval: Duration::from_secs(10),
            probe_timeout: Duration::from_secs(5),
            max_probe_failures: 5,
            probe_heartbeat: Duration::from_secs(60),
            observe_timeout: Duration::from_secs(10),
            lease_ttl: Duration::from_secs(15),
            local: None,
            allow_exec_kubeconfig: false,
            default_namespace: "bud-workloads".into(),
        }
    }
}
