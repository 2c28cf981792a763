//! The driver of each cluster: the one local driver for `local` clusters, and a Kubernetes
//! client per registered kubeconfig, built on first use and rebuilt when the kubeconfig changes.

use std::collections::HashMap;
use std::sync::Arc;

use bud_auth::secrets::{Keyring, aad};
use bud_domain::ClusterId;
use bud_store::{Cluster, ClusterKind};
use tokio::sync::Mutex;

use crate::driver::Driver;

pub(crate) struct Drivers {
    local: Option<Arc<Driver>>,
    /// Drivers given by the caller for particular clusters (simulated clusters in benchmarks
    /// and tests); they win over the cluster's kind.
    overrides: HashMap<ClusterId, Arc<Driver>>,
    keyring: Keyring,
    /// Kubernetes drivers by cluster, with the ciphertext they were built from.
    kubernetes: Mutex<HashMap<ClusterId, (String, Arc<Driver>)>>,
    allow_exec_kubeconfig: bool,
}

impl Drivers {
    pub fn new(
        local: Option<Driver>,
        overrides: HashMap<ClusterId, Driver>,
        keyring: Keyring,
        allow_exec_kubeconfig: bool,
    ) -> Self {
        Self {
            local: local.map(Arc::new),
            overrides: overrides.into_iter().map(|(id, d)| (id, Arc::new(d))).collect(),
            keyring,
            kubernetes: Mutex::new(HashMap::new()),
            allow_exec_kubeconfig,
        }
    }

    /// The driver for `cluster`, or `None` when it cannot be built (no local driver in this
    /// process, a kubeconfig that no longer opens or parses); the prober reports why.
    pub async fn driver(&self, cluster: &Cluster) -> Option<Arc<Driver>> {
        if let Some(driver) = self.overrides.get(&cluster.id) {
            return Some(driver.clone());
        }
        match cluster.kind {
            ClusterKind::Local => self.local.clone(),
            ClusterKind::Kubernetes => {
                let mut cache = self.kubernetes.lock().await;
                if let Some((ciphertext, driver)) = cache.get(&cluster.id)
                    && *ciphertext == cluster.kubeconfig_ciphertext
                {
                    return Some(driver.clone());
                }
                let driver = Arc::new(self.build_kubernetes(cluster).await?);
                cache.insert(cluster.id, (cluster.kubeconfig_ciphertext.clone(), driver.clone()));
                Some(driver)
            }
        }
    }

    async fn build_kubernetes(&self, cluster: &Cluster) -> Option<Driver> {
        let yaml = self
            .keyring
            .decrypt(&cluster.kubeconfig_ciphertext, aad::kubeconfig(cluster.id).as_bytes())
            .map_err(|e| tracing::warn!(cluster_id = %cluster.id, error = %e, "cannot open the kubeconfig"))
            .ok()?;
        let yaml = String::from_utf8(yaml).ok()?;
        crate::driver::kubernetes::KubernetesDriver::new(
            &yaml,
            &cluster.namespace,
            self.allow_exec_kubeconfig,
        )
        .await
        .map(Driver::Kubernetes)
        .map_err(
            |e| tracing::warn!(cluster_id = %cluster.id, error = %e, "cannot use the kubeconfig"),
        )
        .ok()
    }

    pub async fn forget(&self, id: ClusterId) {
        self.kubernetes.lock().await.remove(&id);
    }

    /// Stops what runs in this process.
    pub async fn shutdown(&self) {
        if let Some(local) = &self.local {
            local.shutdown().await;
        }
    }
}
