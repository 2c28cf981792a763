//! The Kubernetes driver: each endpoint is a Deployment of vLLM pods and a ClusterIP Service in
//! the cluster's workloads namespace, both named `bud-ep-<endpoint id>` and labelled
//! `app.kubernetes.io/managed-by=bud`, so `observe` finds everything Bud runs with two list
//! calls. Objects are written with server-side apply (field manager `bud`, forced), so
//! `ensure` is idempotent and leaves alone the fields other controllers and tools set.
//!
//! What the cluster says is read from pods, not events: the scheduler writes its reason into
//! the pod's `PodScheduled` condition and the kubelet its reason into the container status, so
//! one pod list gives every failure [`FailureReason`] names, without a third call per pass.
//!
//! [`FailureReason`]: bud_domain::FailureReason

mod manifest;
mod status;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use bud_domain::{EndpointId, ValidationError};
use bud_store::Inventory;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

pub use manifest::render;

use crate::driver::{DriverError, EndpointSpec, Observation, ObservedEndpoint};
use crate::kubeconfig::validate_kubeconfig;

/// The engine image unless the operator names another.
pub const DEFAULT_IMAGE: &str = "vllm/vllm-openai:latest";
/// Where vLLM listens in its pod, and the Service's port.
pub const ENGINE_PORT: u16 = 8000;
/// How long to wait for a TCP (and TLS) connection to the API server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for each response. Short: a reconcile pass or probe that waits on a stuck
/// API server holds up the cluster's other endpoints, and the next pass tries again anyway.
pub const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// Labels and annotations, shared with the manifest and the observation.
pub(crate) mod keys {
    pub const NAME: &str = "app.kubernetes.io/name";
    pub const NAME_VALUE: &str = "bud-endpoint";
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    pub const MANAGED_BY_VALUE: &str = "bud";
    pub const ENDPOINT_ID: &str = "bud.dev/endpoint-id";
    pub const PROJECT_ID: &str = "bud.dev/project-id";
    pub const GENERATION: &str = "bud.dev/generation";
    /// The engine container, for logs and container statuses.
    pub const CONTAINER: &str = "vllm";
    /// The server-side apply field manager.
    pub const FIELD_MANAGER: &str = "bud";
}

/// Device plugin pods in `kube-system`, by the labels of NVIDIA's static manifest and of its
/// Helm chart; the first selector that finds a running pod wins.
const DEVICE_PLUGIN_SELECTORS: [&str; 2] =
    ["name=nvidia-device-plugin-ds", "app.kubernetes.io/name=nvidia-device-plugin"];
/// The extended resource the NVIDIA device plugin advertises.
const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// Drives one Kubernetes cluster through its API server.
pub struct KubernetesDriver {
    client: kube::Client,
    /// Where endpoints' workloads go; created on first `ensure` when missing.
    namespace: String,
    /// The engine image every endpoint runs.
    image: String,
}

impl KubernetesDriver {
    /// A driver for the cluster `kubeconfig_yaml` names (its current context, or its only one),
    /// deploying to `namespace`. The kubeconfig is validated first, so one that would run
    /// commands on this host is refused here too unless `allow_exec` (when allowed, kube runs
    /// the exec plugin once here, as it builds the client). Connects to nothing: an
    /// unreachable cluster shows on the first `probe`.
    pub async fn new(
        kubeconfig_yaml: &str,
        namespace: &str,
        allow_exec: bool,
    ) -> Result<Self, DriverError> {
        let summary = validate_kubeconfig(kubeconfig_yaml, allow_exec).map_err(refused)?;
        // Parsed again: validation keeps no secrets around.
        let kubeconfig = Kubeconfig::from_yaml(kubeconfig_yaml)
            .map_err(|_| DriverError::Refused("kubeconfig is not valid".to_owned()))?;
        let options = KubeConfigOptions { context: Some(summary.context), ..Default::default() };
        let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .map_err(|e| DriverError::Refused(format!("kubeconfig cannot be used: {e}")))?;
        config.connect_timeout = Some(CONNECT_TIMEOUT);
        config.read_timeout = Some(READ_TIMEOUT);
        config.write_timeout = Some(READ_TIMEOUT);
        // The read timeout counts from the request, not from when a pooled connection idled.
        config.reset_reader_on_write = true;
        // kube's default retries 429/503/504 up to 15 times with backoff, which can hold a
        // reconcile pass for minutes; the reconciler's next pass is the retry.
        config.default_retry = false;
        let client = kube::Client::try_from(config).map_err(|e| map_kube_error(&e))?;
        Ok(Self::from_client(client, namespace))
    }

    /// A driver over a client built elsewhere (tests point one at a fake API server, with
    /// their own timeouts).
    pub fn from_client(client: kube::Client, namespace: &str) -> Self {
        Self { client, namespace: namespace.to_owned(), image: DEFAULT_IMAGE.to_owned() }
    }

    /// Runs `image` instead of [`DEFAULT_IMAGE`] (a mirror, a pinned version).
    pub fn with_image(mut self, image: &str) -> Self {
        image.clone_into(&mut self.image);
        self
    }

    /// Nodes, their `nvidia.com/gpu` capacity and allocatable, and whether the NVIDIA device
    /// plugin runs in `kube-system`.
    pub async fn probe(&self) -> Result<Inventory, DriverError> {
        let nodes = Api::<Node>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| map_kube_error(&e))?;
        let mut inventory = Inventory::default();
        for node in &nodes.items {
            inventory.nodes += 1;
            let status = node.status.as_ref();
            inventory.gpus_total += gpus(status.and_then(|s| s.capacity.as_ref()));
            inventory.gpus_allocatable += gpus(status.and_then(|s| s.allocatable.as_ref()));
        }
        let system = Api::<Pod>::namespaced(self.client.clone(), "kube-system");
        for selector in DEVICE_PLUGIN_SELECTORS {
            let pods = system
                .list(&ListParams::default().labels(selector))
                .await
                .map_err(|e| map_kube_error(&e))?;
            if pods.items.iter().any(status::is_running) {
                inventory.device_plugin_running = true;
                break;
            }
        }
        Ok(inventory)
    }

    /// Every endpoint with a Deployment in the namespace. `addresses` are the pod IPs of ready
    /// pods (`ip:8000`), not the Service: the gateway balances over replicas itself and sees
    /// each one's health, which a ClusterIP hides. Pod IPs are reachable from inside the
    /// cluster's network only, so a gateway outside the cluster needs a routed pod network.
    pub async fn observe(&self) -> Result<Observation, DriverError> {
        let managed = ListParams::default().labels(&managed_selector());
        let deployments = Api::<Deployment>::namespaced(self.client.clone(), &self.namespace)
            .list(&managed)
            .await
            .map_err(|e| map_kube_error(&e))?;
        let pods = self.pods().list(&managed).await.map_err(|e| map_kube_error(&e))?;

        let mut pods_by_endpoint: HashMap<EndpointId, Vec<&Pod>> = HashMap::new();
        for pod in &pods.items {
            if let Some(id) = endpoint_id(&pod.metadata) {
                pods_by_endpoint.entry(id).or_default().push(pod);
            }
        }
        let mut observation = Observation::new();
        for deployment in &deployments.items {
            let Some(id) = endpoint_id(&deployment.metadata) else { continue };
            let mut pods = pods_by_endpoint.remove(&id).unwrap_or_default();
            pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
            observation.insert(id, observe_endpoint(deployment, &pods));
        }
        Ok(observation)
    }

    /// Makes sure the namespace exists, then applies the endpoint's Service and Deployment.
    /// The Service goes first: a Deployment is what `observe` sees, so an `ensure` cut short
    /// after the Service is seen as not done and repeated. An apply answered 409 is not
    /// retried here: with `force` no field manager conflicts, so a 409 means the object is
    /// being deleted or was changed at that moment by another writer, and the reconciler's
    /// next pass (a few seconds on) is the retry.
    pub async fn ensure(&self, spec: &EndpointSpec) -> Result<(), DriverError> {
        self.ensure_namespace().await?;
        let (deployment, service) = render(spec, &self.namespace, &self.image);
        let apply = PatchParams::apply(keys::FIELD_MANAGER).force();
        let name = object_name(spec.id);
        Api::<Service>::namespaced(self.client.clone(), &self.namespace)
            .patch(&name, &apply, &Patch::Apply(&service))
            .await
            .map_err(|e| map_kube_error(&e))?;
        Api::<Deployment>::namespaced(self.client.clone(), &self.namespace)
            .patch(&name, &apply, &Patch::Apply(&deployment))
            .await
            .map_err(|e| map_kube_error(&e))?;
        Ok(())
    }

    /// Deletes the endpoint's Deployment (its pods go with it, in the background) and Service;
    /// what is already gone counts as removed.
    pub async fn remove(&self, id: EndpointId) -> Result<(), DriverError> {
        let name = object_name(id);
        let params = DeleteParams::background();
        let deleted = Api::<Deployment>::namespaced(self.client.clone(), &self.namespace)
            .delete(&name, &params)
            .await;
        ignore_not_found(deleted)?;
        let deleted = Api::<Service>::namespaced(self.client.clone(), &self.namespace)
            .delete(&name, &params)
            .await;
        ignore_not_found(deleted)?;
        Ok(())
    }

    /// The last `tail` lines of the engine container of each pod, in pod name order, each
    /// headed `==> pod NAME <==`. A pod that crashed shows its previous run (the one that
    /// failed); a pod that has no logs yet says why in place of them. `NotFound` when the
    /// endpoint has neither pods nor a Deployment.
    pub async fn logs(&self, id: EndpointId, tail: usize) -> Result<String, DriverError> {
        let selector = format!("{}={id}", keys::ENDPOINT_ID);
        let pods = self.pods();
        let mut list = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| map_kube_error(&e))?;
        if list.items.is_empty() {
            let deployments = Api::<Deployment>::namespaced(self.client.clone(), &self.namespace);
            return match deployments.get_opt(&object_name(id)).await {
                Ok(Some(_)) => Ok(String::new()),
                Ok(None) => Err(DriverError::NotFound),
                Err(e) => Err(map_kube_error(&e)),
            };
        }
        list.items.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        let mut out = String::new();
        for pod in &list.items {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let params = LogParams {
                container: Some(keys::CONTAINER.to_owned()),
                tail_lines: Some(i64::try_from(tail).unwrap_or(i64::MAX)),
                previous: status::crashed_before(pod),
                ..LogParams::default()
            };
            if !out.is_empty() {
                out.push('\n');
            }
            let _ = writeln!(out, "==> pod {name} <==");
            match pods.logs(&name, &params).await {
                Ok(text) => {
                    out.push_str(&text);
                    if !text.is_empty() && !text.ends_with('\n') {
                        out.push('\n');
                    }
                }
                // Unreachable fails the whole call; a pod that cannot show logs (still
                // pulling, being deleted) does not hide the others'.
                Err(e) => match map_kube_error(&e) {
                    unreachable @ DriverError::Unreachable(_) => return Err(unreachable),
                    other => {
                        let _ = writeln!(out, "(no logs: {})", status_message(&other));
                    }
                },
            }
        }
        Ok(out)
    }

    /// Nothing runs in this process: the cluster keeps the endpoints running.
    pub async fn shutdown(&self) {}

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Creates the namespace when missing. 409 means it exists; 403 means Bud may not create
    /// namespaces (RBAC limited to the namespace), in which case it is assumed to exist and the
    /// apply that follows says otherwise.
    async fn ensure_namespace(&self) -> Result<(), DriverError> {
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(self.namespace.clone()),
                labels: Some(
                    [(keys::MANAGED_BY.to_owned(), keys::MANAGED_BY_VALUE.to_owned())].into(),
                ),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        match Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &namespace)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 403 => {
                tracing::debug!(namespace = %self.namespace, code = s.code, "namespace not created");
                Ok(())
            }
            Err(e) => Err(map_kube_error(&e)),
        }
    }
}

/// The Deployment's and Service's name: unique per endpoint, a valid DNS label (42 chars).
pub fn object_name(id: EndpointId) -> String {
    format!("bud-ep-{id}")
}

fn managed_selector() -> String {
    format!("{}={}", keys::MANAGED_BY, keys::MANAGED_BY_VALUE)
}

fn endpoint_id(meta: &ObjectMeta) -> Option<EndpointId> {
    let value = meta.labels.as_ref()?.get(keys::ENDPOINT_ID)?;
    EndpointId::parse(keys::ENDPOINT_ID, value).ok()
}

/// The sum of a node's `nvidia.com/gpu`; GPUs are counted in whole units.
fn gpus(resources: Option<&BTreeMap<String, Quantity>>) -> i64 {
    resources
        .and_then(|r| r.get(GPU_RESOURCE))
        .and_then(|q| q.0.trim().parse::<i64>().ok())
        .unwrap_or(0)
}

fn observe_endpoint(deployment: &Deployment, pods: &[&Pod]) -> ObservedEndpoint {
    let generation = deployment
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(keys::GENERATION))
        .and_then(|g| g.parse().ok())
        .unwrap_or(0);
    let replicas = deployment.spec.replicas.unwrap_or(1);
    let ready = deployment.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0);
    let mut addresses: Vec<String> = pods
        .iter()
        .filter(|p| status::is_ready(p))
        .filter_map(|p| p.status.as_ref()?.pod_ip.as_deref())
        .map(|ip| {
            if ip.contains(':') {
                format!("[{ip}]:{ENGINE_PORT}")
            } else {
                format!("{ip}:{ENGINE_PORT}")
            }
        })
        .collect();
    addresses.sort();
    ObservedEndpoint {
        generation,
        replicas: u32::try_from(replicas).unwrap_or(0),
        ready: u32::try_from(ready).unwrap_or(0),
        failure: pods.iter().find_map(|p| status::failure(p)),
        addresses,
    }
}

fn ignore_not_found<T>(result: Result<T, kube::Error>) -> Result<(), DriverError> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(map_kube_error(&e)),
    }
}

fn refused(e: ValidationError) -> DriverError {
    DriverError::Refused(e.to_string())
}

fn status_message(e: &DriverError) -> String {
    match e {
        DriverError::Unreachable(m) | DriverError::Refused(m) | DriverError::Other(m) => m.clone(),
        DriverError::NotFound => "not found".to_owned(),
    }
}

/// Sorts kube's errors into what the reconciler and prober act on: no answer (connection,
/// timeout, TLS), a refusal (credentials, permissions, a rejected object), the rest.
fn map_kube_error(e: &kube::Error) -> DriverError {
    match e {
        kube::Error::Api(s) => {
            let message = match (s.reason.is_empty(), s.message.is_empty()) {
                (false, false) => format!("{} {}: {}", s.code, s.reason, s.message),
                (true, false) => format!("{}: {}", s.code, s.message),
                (false, true) => format!("{} {}", s.code, s.reason),
                (true, true) => format!("{}", s.code),
            };
            match s.code {
                400 | 401 | 403 | 422 => DriverError::Refused(message),
                // Not `NotFound`, which says the endpoint is gone: a 404 here is a missing
                // namespace or API, which the operator must fix.
                _ => DriverError::Other(message),
            }
        }
        kube::Error::HyperError(_)
        | kube::Error::Service(_)
        | kube::Error::RustlsTls(_)
        | kube::Error::TlsRequired => DriverError::Unreachable(chain(e)),
        kube::Error::Auth(_) => DriverError::Refused(chain(e)),
        _ => DriverError::Other(chain(e)),
    }
}

/// An error and its causes, `: `-separated, each cause once (kube's messages often repeat
/// their source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}
