//! A cluster simulated in memory: replicas "start" when ensured and become ready after a
//! delay, every call can be slowed by a latency. It runs nothing; it exists so the reconciler
//! can be benchmarked and tested at a scale (thousands of endpoints, dozens of clusters) that
//! real drivers cannot reach on one machine.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bud_domain::EndpointId;
use bud_store::Inventory;

use super::{DriverError, EndpointSpec, Observation, ObservedEndpoint};

/// How the simulated cluster behaves.
#[derive(Debug, Clone, Copy)]
pub struct SimulatedConfig {
    /// Added to every call, as a network round trip would be.
    pub latency: Duration,
    /// Time from `ensure` to a replica being ready.
    pub ready_after: Duration,
    pub nodes: i64,
    pub gpus: i64,
}

impl Default for SimulatedConfig {
    fn default() -> Self {
        Self {
            latency: Duration::from_millis(1),
            ready_after: Duration::from_millis(50),
            nodes: 4,
            gpus: 32,
        }
    }
}

struct Deployment {
    generation: i64,
    replicas: u32,
    since: Instant,
}

pub struct SimulatedCluster {
    config: SimulatedConfig,
    deployments: Mutex<HashMap<EndpointId, Deployment>>,
    /// Calls that change something (`ensure`, `remove`), for tests and benchmarks.
    changes: std::sync::atomic::AtomicU64,
}

impl SimulatedCluster {
    pub fn new(config: SimulatedConfig) -> Self {
        Self { config, deployments: Mutex::new(HashMap::new()), changes: Default::default() }
    }

    /// How many changing calls (`ensure`, `remove`) the reconciler has made.
    pub fn changes(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<EndpointId, Deployment>> {
        self.deployments.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub async fn probe(&self) -> Result<Inventory, DriverError> {
        tokio::time::sleep(self.config.latency).await;
        Ok(Inventory {
            nodes: self.config.nodes,
            gpus_total: self.config.gpus,
            gpus_allocatable: self.config.gpus,
            device_plugin_running: true,
        })
    }

    pub async fn observe(&self) -> Result<Observation, DriverError> {
        tokio::time::sleep(self.config.latency).await;
        let table = self.table();
        Ok(table
            .iter()
            .map(|(id, d)| {
                let ready =
                    if d.since.elapsed() >= self.config.ready_after { d.replicas } else { 0 };
                let seen = ObservedEndpoint {
                    generation: d.generation,
                    replicas: d.replicas,
                    ready,
                    failure: None,
                    addresses: (0..ready).map(|i| format!("10.0.0.{i}:8000")).collect(),
                };
                (*id, seen)
            })
            .collect())
    }

    pub async fn ensure(&self, spec: &EndpointSpec) -> Result<(), DriverError> {
        tokio::time::sleep(self.config.latency).await;
        self.changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut table = self.table();
        let d = table.entry(spec.id).or_insert(Deployment {
            generation: spec.generation,
            replicas: 0,
            since: Instant::now(),
        });
        if d.replicas != spec.replicas || d.generation != spec.generation {
            *d = Deployment {
                generation: spec.generation,
                replicas: spec.replicas,
                since: Instant::now(),
            };
        }
        Ok(())
    }

    pub async fn remove(&self, id: EndpointId) -> Result<(), DriverError> {
        tokio::time::sleep(self.config.latency).await;
        self.changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.table().remove(&id);
        Ok(())
    }

    pub async fn logs(&self, id: EndpointId, _tail: usize) -> Result<String, DriverError> {
        if self.table().contains_key(&id) {
            Ok("(a simulated cluster keeps no logs)\n".into())
        } else {
            Err(DriverError::NotFound)
        }
    }

    pub async fn shutdown(&self) {}
}
