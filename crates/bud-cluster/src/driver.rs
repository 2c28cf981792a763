//! What budcluster asks of a cluster, whatever runs it: report its inventory, say what it runs,
//! make an endpoint run a number of replicas, remove an endpoint, show logs. Every call is
//! idempotent, so a reconcile pass that is cut short and run again converges.

pub mod kubernetes;
pub mod local;
pub mod simulated;

use std::collections::HashMap;

use bud_domain::{EndpointId, FailureReason, ProjectId};
use bud_store::Inventory;

/// What an endpoint should run, as the driver needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    pub id: EndpointId,
    pub project_id: ProjectId,
    /// The name clients ask for (`model` in OpenAI requests).
    pub served_name: String,
    /// Where the weights come from (`hf://…`, `s3://…`, a path).
    pub model_source: String,
    /// Extra engine arguments, appended to the engine command.
    pub engine_args: Vec<String>,
    pub replicas: u32,
    pub gpus_per_replica: u32,
    /// The endpoint's spec generation; a replica started for another generation is replaced.
    pub generation: i64,
}

/// What a driver sees of one endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObservedEndpoint {
    /// The spec generation the running replicas were made for.
    pub generation: i64,
    /// Replicas that exist (starting, ready or failing).
    pub replicas: u32,
    /// Replicas that answer their health check.
    pub ready: u32,
    /// A failure that will not go away by waiting, with what the cluster said about it.
    pub failure: Option<(FailureReason, String)>,
    /// `host:port` of each ready replica, for the gateway and for metrics.
    pub addresses: Vec<String>,
}

/// Everything a driver runs, by endpoint.
pub type Observation = HashMap<EndpointId, ObservedEndpoint>;

/// Why a driver call failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The cluster does not answer (connection refused, timeout, TLS failure).
    #[error("cluster unreachable: {0}")]
    Unreachable(String),
    /// The cluster answered but refused (authentication, authorization, validation).
    #[error("cluster refused the request: {0}")]
    Refused(String),
    /// The endpoint does not exist on the cluster (logs of a removed endpoint).
    #[error("not found on the cluster")]
    NotFound,
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// A cluster driver. Implemented by an enum so the reconciler needs no trait objects.
pub enum Driver {
    Local(local::LocalDriver),
    Kubernetes(kubernetes::KubernetesDriver),
    /// A cluster simulated in memory, for benchmarks and tests of the reconciler.
    Simulated(simulated::SimulatedCluster),
}

impl Driver {
    /// Nodes, GPUs and whether the GPU device plugin runs; an error when unreachable.
    pub async fn probe(&self) -> Result<Inventory, DriverError> {
        match self {
            Driver::Local(d) => d.probe().await,
            Driver::Kubernetes(d) => d.probe().await,
            Driver::Simulated(d) => d.probe().await,
        }
    }

    /// Every endpoint this driver runs on the cluster.
    pub async fn observe(&self) -> Result<Observation, DriverError> {
        match self {
            Driver::Local(d) => d.observe().await,
            Driver::Kubernetes(d) => d.observe().await,
            Driver::Simulated(d) => d.observe().await,
        }
    }

    /// Makes the endpoint run `spec.replicas` replicas of `spec.generation`.
    pub async fn ensure(&self, spec: &EndpointSpec) -> Result<(), DriverError> {
        match self {
            Driver::Local(d) => d.ensure(spec).await,
            Driver::Kubernetes(d) => d.ensure(spec).await,
            Driver::Simulated(d) => d.ensure(spec).await,
        }
    }

    /// Removes every replica and object of the endpoint; removing what is gone succeeds.
    pub async fn remove(&self, id: EndpointId) -> Result<(), DriverError> {
        match self {
            Driver::Local(d) => d.remove(id).await,
            Driver::Kubernetes(d) => d.remove(id).await,
            Driver::Simulated(d) => d.remove(id).await,
        }
    }

    /// The last `tail` lines of each replica's output, oldest first, each replica headed.
    pub async fn logs(&self, id: EndpointId, tail: usize) -> Result<String, DriverError> {
        match self {
            Driver::Local(d) => d.logs(id, tail).await,
            Driver::Kubernetes(d) => d.logs(id, tail).await,
            Driver::Simulated(d) => d.logs(id, tail).await,
        }
    }

    /// Stops whatever the driver runs in this process (local replicas at shutdown).
    pub async fn shutdown(&self) {
        match self {
            Driver::Local(d) => d.shutdown().await,
            Driver::Kubernetes(d) => d.shutdown().await,
            Driver::Simulated(d) => d.shutdown().await,
        }
    }
}
