//! The Kubernetes driver against a fake API server that plays an expected call scenario: each
//! test lists the calls the driver must make, in order, with the answers a real API server
//! gives; the fake answers anything else with 500 and the test fails on it. The manifests the
//! driver applies are snapshot-tested.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test fails by panicking")]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bud_cluster::driver::kubernetes::{KubernetesDriver, object_name, render};
use bud_cluster::driver::{DriverError, EndpointSpec, ObservedEndpoint};
use bud_domain::{EndpointId, FailureReason, ProjectId};
use bud_store::Inventory;
use serde_json::{Value, json};
use uuid::Uuid;

const NS: &str = "bud-workloads";
const MANAGED: &str = "app.kubernetes.io/managed-by=bud";

// ---------------------------------------------------------------------------------------------
// The fake API server.

/// One call the driver is expected to make, and the answer it gets.
struct Expected {
    method: Method,
    path: String,
    /// Query parameters the call must carry (others are allowed).
    query: Vec<(String, String)>,
    status: StatusCode,
    body: Value,
    /// How long to wait before answering, to make the client time out.
    delay: Option<Duration>,
}

/// A call the driver made.
#[derive(Debug, Clone)]
struct Call {
    content_type: String,
    body: Value,
}

#[derive(Default)]
struct Played {
    expected: VecDeque<Expected>,
    made: Vec<Call>,
    unexpected: Vec<String>,
}

/// An ordered list of expected calls, served on 127.0.0.1:0.
#[derive(Default)]
struct Scenario {
    calls: Vec<Expected>,
}

impl Scenario {
    fn new() -> Self {
        Self::default()
    }

    /// Expects `method path` with `query` among its parameters; answers `status` and `body`.
    fn on(
        mut self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        status: u16,
        body: Value,
    ) -> Self {
        self.calls.push(Expected {
            method,
            path: path.to_owned(),
            query: query.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            status: StatusCode::from_u16(status).unwrap(),
            body,
            delay: None,
        });
        self
    }

    /// Delays the answer to the last expected call.
    fn after(mut self, delay: Duration) -> Self {
        self.calls.last_mut().unwrap().delay = Some(delay);
        self
    }

    async fn serve(self) -> FakeApi {
        let played =
            Arc::new(Mutex::new(Played { expected: self.calls.into(), ..Played::default() }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let router = axum::Router::new().fallback(answer).with_state(played.clone());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        FakeApi { url, played }
    }
}

async fn answer(
    State(played): State<Arc<Mutex<Played>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let pairs: Vec<(String, String)> = reqwest::Url::parse(&format!("http://fake{uri}"))
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let next = {
        let mut played = played.lock().unwrap();
        let matches = played.expected.front().is_some_and(|e| {
            e.method == method && e.path == uri.path() && e.query.iter().all(|q| pairs.contains(q))
        });
        if matches {
            played.made.push(Call {
                content_type: headers
                    .get("content-type")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default(),
                body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            });
            played.expected.pop_front()
        } else {
            let wanted = played.expected.front().map(|e| format!("{} {}", e.method, e.path));
            played.unexpected.push(format!("{method} {uri} (expected {wanted:?})"));
            None
        }
    };
    let Some(e) = next else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(status(500, "InternalError", "unexpected call")),
        )
            .into_response();
    };
    if let Some(delay) = e.delay {
        tokio::time::sleep(delay).await;
    }
    if e.body.is_string() {
        // Pod logs are plain text.
        return (e.status, e.body.as_str().unwrap().to_owned()).into_response();
    }
    (e.status, axum::Json(e.body)).into_response()
}

struct FakeApi {
    url: String,
    played: Arc<Mutex<Played>>,
}

impl FakeApi {
    /// A driver whose client answers within `read_timeout`, with no retries.
    fn driver_with_timeout(&self, read_timeout: Duration) -> KubernetesDriver {
        KubernetesDriver::from_client(client(&self.url, read_timeout), NS)
    }

    fn driver(&self) -> KubernetesDriver {
        self.driver_with_timeout(Duration::from_secs(5))
    }

    /// The calls made so far.
    fn calls(&self) -> Vec<Call> {
        self.played.lock().unwrap().made.clone()
    }

    /// Asserts every expected call was made and nothing else was.
    fn finish(&self) {
        let played = self.played.lock().unwrap();
        assert!(played.unexpected.is_empty(), "unexpected calls: {:#?}", played.unexpected);
        let missing: Vec<String> =
            played.expected.iter().map(|e| format!("{} {}", e.method, e.path)).collect();
        assert!(missing.is_empty(), "expected calls not made: {missing:#?}");
    }
}

fn client(url: &str, read_timeout: Duration) -> kube::Client {
    let mut config = kube::Config::new(url.parse().unwrap());
    config.default_namespace = NS.to_owned();
    config.connect_timeout = Some(Duration::from_secs(1));
    config.read_timeout = Some(read_timeout);
    config.reset_reader_on_write = true;
    config.default_retry = false;
    kube::Client::try_from(config).unwrap()
}

// ---------------------------------------------------------------------------------------------
// What a real API server answers.

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn success() -> Value {
    json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success" })
}

fn list(kind: &str, api_version: &str, items: Vec<Value>) -> Value {
    json!({ "kind": kind, "apiVersion": api_version, "metadata": { "resourceVersion": "1000" }, "items": items })
}

fn spec(id: EndpointId) -> EndpointSpec {
    EndpointSpec {
        id,
        project_id: ProjectId::from_uuid(Uuid::from_u128(
            0x0193_0000_0000_7000_8000_0000_0000_00aa,
        )),
        served_name: "llama-3-8b".to_owned(),
        model_source: "hf://meta-llama/Meta-Llama-3-8B-Instruct".to_owned(),
        engine_args: vec!["--max-model-len".to_owned(), "8192".to_owned()],
        replicas: 2,
        gpus_per_replica: 1,
        generation: 3,
    }
}

fn endpoint_id() -> EndpointId {
    EndpointId::from_uuid(Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0001))
}

/// What the API server answers to an apply: the object, with server-set fields.
fn applied(object: &impl serde::Serialize) -> Value {
    let mut v = serde_json::to_value(object).unwrap();
    v["metadata"]["uid"] = json!("5b6f1a2e-0000-4000-8000-000000000001");
    v["metadata"]["resourceVersion"] = json!("1001");
    v["metadata"]["creationTimestamp"] = json!("2025-01-02T03:04:05Z");
    v
}

fn namespace() -> Value {
    json!({
        "kind": "Namespace", "apiVersion": "v1",
        "metadata": { "name": NS, "uid": "ns-uid", "labels": { "app.kubernetes.io/managed-by": "bud" } },
        "spec": { "finalizers": ["kubernetes"] },
        "status": { "phase": "Active" },
    })
}

fn deployment(id: EndpointId, generation: &str, replicas: i32, ready: i32) -> Value {
    let (d, _) = render(
        &EndpointSpec { replicas: replicas as u32, ..spec(id) },
        NS,
        "vllm/vllm-openai:latest",
    );
    let mut v = applied(&d);
    v["metadata"]["annotations"]["bud.dev/generation"] = json!(generation);
    v["metadata"]["generation"] = json!(4);
    v["status"] = json!({
        "observedGeneration": 4, "replicas": replicas, "updatedReplicas": replicas,
        "readyReplicas": ready, "availableReplicas": ready,
        "unavailableReplicas": replicas - ready,
        "conditions": [{
            "type": "Available", "status": if ready > 0 { "True" } else { "False" },
            "lastUpdateTime": "2025-01-02T03:04:05Z", "lastTransitionTime": "2025-01-02T03:04:05Z",
            "reason": "MinimumReplicasAvailable", "message": "Deployment has minimum availability.",
        }],
    });
    v
}

/// A pod of the endpoint; `container_state` is the engine's `state`, `conditions` its
/// conditions beyond the defaults.
fn pod(
    id: EndpointId,
    name: &str,
    phase: &str,
    ip: Option<&str>,
    conditions: Value,
    container: Option<Value>,
) -> Value {
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {
            "name": name, "namespace": NS, "uid": format!("uid-{name}"),
            "labels": {
                "app.kubernetes.io/name": "bud-endpoint",
                "app.kubernetes.io/managed-by": "bud",
                "bud.dev/endpoint-id": id.to_string(),
                "pod-template-hash": "6d4cf56db6",
            },
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{}-6d4cf56db6", object_name(id)),
                "uid": "rs-uid", "controller": true, "blockOwnerDeletion": true,
            }],
        },
        "spec": {
            "containers": [{ "name": "vllm", "image": "vllm/vllm-openai:latest" }],
            "nodeName": ip.map(|_| "gpu-node-1"),
        },
        "status": {
            "phase": phase,
            "conditions": conditions,
            "podIP": ip,
            "podIPs": ip.map(|ip| vec![json!({ "ip": ip })]),
            "containerStatuses": container.map(|c| vec![c]),
        },
    })
}

fn condition(kind: &str, status: &str, reason: Option<&str>, message: Option<&str>) -> Value {
    json!({
        "type": kind, "status": status, "reason": reason, "message": message,
        "lastProbeTime": null, "lastTransitionTime": "2025-01-02T03:04:05Z",
    })
}

fn ready_pod(id: EndpointId, name: &str, ip: &str) -> Value {
    pod(
        id,
        name,
        "Running",
        Some(ip),
        json!([
            condition("PodScheduled", "True", None, None),
            condition("Initialized", "True", None, None),
            condition("ContainersReady", "True", None, None),
            condition("Ready", "True", None, None),
        ]),
        Some(json!({
            "name": "vllm", "image": "docker.io/vllm/vllm-openai:latest",
            "imageID": "docker.io/vllm/vllm-openai@sha256:abc", "containerID": "containerd://1",
            "ready": true, "started": true, "restartCount": 0,
            "state": { "running": { "startedAt": "2025-01-02T03:05:00Z" } },
        })),
    )
}

fn waiting_pod(
    id: EndpointId,
    name: &str,
    reason: &str,
    message: &str,
    restarts: i32,
    last: Option<Value>,
) -> Value {
    pod(
        id,
        name,
        if restarts > 0 { "Running" } else { "Pending" },
        Some("10.244.1.9"),
        json!([
            condition("PodScheduled", "True", None, None),
            condition(
                "Ready",
                "False",
                Some("ContainersNotReady"),
                Some("containers with unready status: [vllm]")
            ),
        ]),
        Some(json!({
            "name": "vllm", "image": "vllm/vllm-openai:nope", "imageID": "", "ready": false,
            "started": false, "restartCount": restarts,
            "state": { "waiting": { "reason": reason, "message": message } },
            "lastState": last.map(|t| json!({ "terminated": t })).unwrap_or(json!({})),
        })),
    )
}

fn unschedulable_pod(id: EndpointId, name: &str, message: &str) -> Value {
    pod(
        id,
        name,
        "Pending",
        None,
        json!([condition("PodScheduled", "False", Some("Unschedulable"), Some(message))]),
        None,
    )
}

fn node(name: &str, capacity: &str, allocatable: &str) -> Value {
    json!({
        "kind": "Node", "apiVersion": "v1",
        "metadata": { "name": name, "uid": format!("uid-{name}"), "labels": { "kubernetes.io/hostname": name } },
        "spec": { "podCIDR": "10.244.0.0/24" },
        "status": {
            "capacity": { "cpu": "96", "memory": "1056780Mi", "pods": "110", "nvidia.com/gpu": capacity },
            "allocatable": { "cpu": "95500m", "memory": "1040000Mi", "pods": "110", "nvidia.com/gpu": allocatable },
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status",
                "lastHeartbeatTime": "2025-01-02T03:04:05Z", "lastTransitionTime": "2025-01-02T03:04:05Z",
            }],
            "nodeInfo": {
                "architecture": "amd64", "bootID": "b", "containerRuntimeVersion": "containerd://1.7.0",
                "kernelVersion": "6.8.0", "kubeProxyVersion": "", "kubeletVersion": "v1.31.0",
                "machineID": "m", "operatingSystem": "linux", "osImage": "Ubuntu 24.04", "systemUUID": "s",
            },
        },
    })
}

fn device_plugin_pod(phase: &str) -> Value {
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": { "name": "nvidia-device-plugin-ds-x7k2p", "namespace": "kube-system", "labels": { "name": "nvidia-device-plugin-ds" } },
        "spec": { "containers": [{ "name": "nvidia-device-plugin-ctr", "image": "nvcr.io/nvidia/k8s-device-plugin:v0.17.0" }] },
        "status": { "phase": phase },
    })
}

// Paths.

fn services_path(id: EndpointId) -> String {
    format!("/api/v1/namespaces/{NS}/services/{}", object_name(id))
}

fn deployment_path(id: EndpointId) -> String {
    format!("/apis/apps/v1/namespaces/{NS}/deployments/{}", object_name(id))
}

fn deployments_path() -> String {
    format!("/apis/apps/v1/namespaces/{NS}/deployments")
}

fn pods_path() -> String {
    format!("/api/v1/namespaces/{NS}/pods")
}

const APPLY: &[(&str, &str)] = &[("fieldManager", "bud"), ("force", "true")];

/// The calls `observe` makes, answered with `deployments` and `pods`.
fn observe_scenario(deployments: Vec<Value>, pods: Vec<Value>) -> Scenario {
    Scenario::new()
        .on(
            Method::GET,
            &deployments_path(),
            &[("labelSelector", MANAGED)],
            200,
            list("DeploymentList", "apps/v1", deployments),
        )
        .on(
            Method::GET,
            &pods_path(),
            &[("labelSelector", MANAGED)],
            200,
            list("PodList", "v1", pods),
        )
}

// ---------------------------------------------------------------------------------------------
// Manifests.

#[test]
fn rendered_deployment_and_service() {
    let (deployment, service) = render(&spec(endpoint_id()), NS, "vllm/vllm-openai:v0.8.5");
    insta::assert_yaml_snapshot!("deployment", deployment);
    insta::assert_yaml_snapshot!("service", service);
}

#[test]
fn a_cpu_endpoint_requests_no_gpu_and_sources_other_than_hf_pass_as_given() {
    let cpu = EndpointSpec {
        gpus_per_replica: 0,
        model_source: "s3://models/llama".to_owned(),
        ..spec(endpoint_id())
    };
    let (deployment, _) = render(&cpu, NS, "vllm/vllm-openai:latest");
    let pod = deployment.spec.template.spec.unwrap();
    let container = &pod.containers[0];
    assert!(container.resources.is_none());
    assert!(pod.tolerations.is_none());
    assert_eq!(container.args.as_ref().unwrap()[1], "s3://models/llama");
}

#[test]
fn object_names_are_dns_labels() {
    let name = object_name(endpoint_id());
    assert_eq!(name, "bud-ep-01930000-0000-7000-8000-000000000001");
    assert!(name.len() <= 63);
}

// ---------------------------------------------------------------------------------------------
// ensure

#[tokio::test]
async fn ensure_on_an_empty_namespace_creates_it_and_applies_both_objects() {
    let id = endpoint_id();
    let (d, s) = render(&spec(id), NS, "vllm/vllm-openai:latest");
    let fake = Scenario::new()
        .on(Method::POST, "/api/v1/namespaces", &[], 201, namespace())
        .on(Method::PATCH, &services_path(id), APPLY, 201, applied(&s))
        .on(Method::PATCH, &deployment_path(id), APPLY, 201, applied(&d))
        .serve()
        .await;

    fake.driver().ensure(&spec(id)).await.unwrap();
    fake.finish();

    let calls = fake.calls();
    assert_eq!(calls[0].body["metadata"]["name"], NS);
    assert_eq!(calls[1].content_type, "application/apply-patch+yaml");
    assert_eq!(calls[1].body, serde_json::to_value(&s).unwrap());
    assert_eq!(calls[2].content_type, "application/apply-patch+yaml");
    assert_eq!(calls[2].body, serde_json::to_value(&d).unwrap());
}

#[tokio::test]
async fn ensure_is_idempotent_when_everything_exists() {
    let id = endpoint_id();
    let (d, s) = render(&spec(id), NS, "vllm/vllm-openai:latest");
    let scenario = || {
        Scenario::new()
            .on(
                Method::POST,
                "/api/v1/namespaces",
                &[],
                409,
                status(409, "AlreadyExists", "namespaces \"bud-workloads\" already exists"),
            )
            .on(Method::PATCH, &services_path(id), APPLY, 200, applied(&s))
            .on(Method::PATCH, &deployment_path(id), APPLY, 200, applied(&d))
    };
    let mut twice = scenario();
    twice.calls.extend(scenario().calls);
    let fake = twice.serve().await;
    let driver = fake.driver();

    driver.ensure(&spec(id)).await.unwrap();
    driver.ensure(&spec(id)).await.unwrap();
    fake.finish();
    let calls = fake.calls();
    assert_eq!(calls[2].body, calls[5].body, "the same objects are applied each time");
}

#[tokio::test]
async fn ensure_uses_the_configured_image() {
    let id = endpoint_id();
    let (d, s) = render(&spec(id), NS, "registry.internal/vllm:v0.8.5");
    let fake = Scenario::new()
        .on(
            Method::POST,
            "/api/v1/namespaces",
            &[],
            409,
            status(409, "AlreadyExists", "already exists"),
        )
        .on(Method::PATCH, &services_path(id), APPLY, 200, applied(&s))
        .on(Method::PATCH, &deployment_path(id), APPLY, 200, applied(&d))
        .serve()
        .await;
    fake.driver().with_image("registry.internal/vllm:v0.8.5").ensure(&spec(id)).await.unwrap();
    fake.finish();
    assert_eq!(
        fake.calls()[2].body["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.internal/vllm:v0.8.5"
    );
}

#[tokio::test]
async fn ensure_without_the_right_to_create_namespaces_goes_on_to_apply() {
    let id = endpoint_id();
    let (d, s) = render(&spec(id), NS, "vllm/vllm-openai:latest");
    let fake = Scenario::new()
        .on(
            Method::POST,
            "/api/v1/namespaces",
            &[],
            403,
            status(
                403,
                "Forbidden",
                "namespaces is forbidden: User \"bud\" cannot create resource \"namespaces\"",
            ),
        )
        .on(Method::PATCH, &services_path(id), APPLY, 200, applied(&s))
        .on(Method::PATCH, &deployment_path(id), APPLY, 200, applied(&d))
        .serve()
        .await;
    fake.driver().ensure(&spec(id)).await.unwrap();
    fake.finish();
}

/// A 409 on an apply is not retried by the driver: the reconciler's next pass is the retry.
#[tokio::test]
async fn a_conflict_on_apply_is_an_error_not_retried() {
    let id = endpoint_id();
    let fake = Scenario::new()
        .on(Method::POST, "/api/v1/namespaces", &[], 409, status(409, "AlreadyExists", "already exists"))
        .on(
            Method::PATCH,
            &services_path(id),
            APPLY,
            409,
            status(409, "Conflict", "Operation cannot be fulfilled on services \"bud-ep\": the object has been modified"),
        )
        .serve()
        .await;
    let e = fake.driver().ensure(&spec(id)).await.unwrap_err();
    fake.finish();
    match e {
        DriverError::Other(m) => {
            assert!(m.contains("409 Conflict") && m.contains("the object has been modified"), "{m}")
        }
        other => panic!("expected Other, got {other:?}"),
    }
}

#[tokio::test]
async fn a_server_error_surfaces_with_its_message() {
    let id = endpoint_id();
    let fake = Scenario::new()
        .on(
            Method::POST,
            "/api/v1/namespaces",
            &[],
            500,
            status(500, "InternalError", "etcdserver: request timed out"),
        )
        .serve()
        .await;
    let e = fake.driver().ensure(&spec(id)).await.unwrap_err();
    fake.finish();
    match e {
        DriverError::Other(m) => assert_eq!(m, "500 InternalError: etcdserver: request timed out"),
        other => panic!("expected Other, got {other:?}"),
    }
}

#[tokio::test]
async fn an_invalid_object_is_refused() {
    let id = endpoint_id();
    let fake = Scenario::new()
        .on(
            Method::POST,
            "/api/v1/namespaces",
            &[],
            409,
            status(409, "AlreadyExists", "already exists"),
        )
        .on(
            Method::PATCH,
            &services_path(id),
            APPLY,
            422,
            status(
                422,
                "Invalid",
                "Service \"bud-ep\" is invalid: spec.ports[0].port: Invalid value: 0",
            ),
        )
        .serve()
        .await;
    let e = fake.driver().ensure(&spec(id)).await.unwrap_err();
    fake.finish();
    assert!(matches!(e, DriverError::Refused(ref m) if m.contains("spec.ports[0].port")), "{e:?}");
}

#[tokio::test]
async fn an_api_server_that_hangs_is_unreachable_within_the_timeout() {
    let id = endpoint_id();
    let fake = Scenario::new()
        .on(Method::POST, "/api/v1/namespaces", &[], 201, namespace())
        .after(Duration::from_secs(30))
        .serve()
        .await;
    let started = Instant::now();
    let e =
        fake.driver_with_timeout(Duration::from_millis(300)).ensure(&spec(id)).await.unwrap_err();
    let took = started.elapsed();
    fake.finish();
    assert!(matches!(e, DriverError::Unreachable(_)), "{e:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[tokio::test]
async fn a_closed_port_is_unreachable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let driver = KubernetesDriver::from_client(client(&url, Duration::from_secs(1)), NS);
    for e in
        [driver.probe().await.unwrap_err(), driver.ensure(&spec(endpoint_id())).await.unwrap_err()]
    {
        match e {
            DriverError::Unreachable(m) => assert!(m.to_lowercase().contains("connect"), "{m}"),
            other => panic!("expected Unreachable, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// observe

/// Observes a single endpoint with one Deployment and `pods`.
async fn observe_one(pods: Vec<Value>, replicas: i32, ready: i32) -> ObservedEndpoint {
    let id = endpoint_id();
    let fake = observe_scenario(vec![deployment(id, "3", replicas, ready)], pods).serve().await;
    let mut observation = fake.driver().observe().await.unwrap();
    fake.finish();
    assert_eq!(observation.len(), 1);
    observation.remove(&id).unwrap()
}

#[tokio::test]
async fn observe_an_empty_namespace() {
    let fake = observe_scenario(vec![], vec![]).serve().await;
    assert!(fake.driver().observe().await.unwrap().is_empty());
    fake.finish();
}

#[tokio::test]
async fn observe_a_healthy_deployment() {
    let id = endpoint_id();
    let seen = observe_one(
        vec![ready_pod(id, "bud-ep-1-b", "10.244.2.7"), ready_pod(id, "bud-ep-1-a", "10.244.1.5")],
        2,
        2,
    )
    .await;
    assert_eq!(
        seen,
        ObservedEndpoint {
            generation: 3,
            replicas: 2,
            ready: 2,
            failure: None,
            addresses: vec!["10.244.1.5:8000".to_owned(), "10.244.2.7:8000".to_owned()],
        }
    );
}

#[tokio::test]
async fn observe_keeps_endpoints_apart_and_skips_pods_without_a_deployment() {
    let a = endpoint_id();
    let b = EndpointId::from_uuid(Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0002));
    let gone = EndpointId::from_uuid(Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0003));
    let fake = observe_scenario(
        vec![deployment(a, "3", 1, 1), deployment(b, "7", 3, 0)],
        vec![
            ready_pod(a, "a-1", "10.244.1.5"),
            unschedulable_pod(b, "b-1", "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."),
            ready_pod(gone, "gone-1", "10.244.9.9"),
        ],
    )
    .serve()
    .await;
    let observation = fake.driver().observe().await.unwrap();
    fake.finish();
    assert_eq!(observation.len(), 2);
    assert_eq!(observation[&a].addresses, vec!["10.244.1.5:8000".to_owned()]);
    assert_eq!(observation[&a].failure, None);
    assert_eq!(
        (observation[&b].generation, observation[&b].replicas, observation[&b].ready),
        (7, 3, 0)
    );
    assert_eq!(observation[&b].failure.as_ref().unwrap().0, FailureReason::InsufficientGpus);
}

#[tokio::test]
async fn observe_an_image_that_cannot_be_pulled() {
    let id = endpoint_id();
    let message = "Back-off pulling image \"vllm/vllm-openai:nope\": ErrImagePull: failed to pull and unpack image \"docker.io/vllm/vllm-openai:nope\": not found";
    let seen =
        observe_one(vec![waiting_pod(id, "p", "ImagePullBackOff", message, 0, None)], 1, 0).await;
    assert_eq!(
        seen.failure,
        Some((FailureReason::ImagePullFailure, format!("ImagePullBackOff: {message}")))
    );
    assert!(seen.addresses.is_empty());
}

#[tokio::test]
async fn observe_too_few_gpus() {
    let id = endpoint_id();
    let message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: 3 No preemption victims found for incoming pod.";
    let seen = observe_one(vec![unschedulable_pod(id, "p", message)], 1, 0).await;
    assert_eq!(seen.failure, Some((FailureReason::InsufficientGpus, message.to_owned())));
}

#[tokio::test]
async fn observe_an_unbound_volume_claim() {
    let id = endpoint_id();
    let message = "0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims. preemption: 0/3 nodes are available: 3 Preemption is not helpful for scheduling.";
    let seen = observe_one(vec![unschedulable_pod(id, "p", message)], 1, 0).await;
    assert_eq!(seen.failure, Some((FailureReason::VolumeClaimPending, message.to_owned())));
}

#[tokio::test]
async fn observe_a_crash_loop() {
    let id = endpoint_id();
    let last = json!({
        "exitCode": 1, "reason": "Error",
        "message": "ValueError: No available memory for the cache blocks.",
        "startedAt": "2025-01-02T03:05:00Z", "finishedAt": "2025-01-02T03:06:00Z",
        "containerID": "containerd://2",
    });
    let seen = observe_one(
        vec![
            ready_pod(id, "a", "10.244.1.5"),
            waiting_pod(
                id,
                "b",
                "CrashLoopBackOff",
                "back-off 5m0s restarting failed container=vllm",
                5,
                Some(last),
            ),
        ],
        2,
        1,
    )
    .await;
    assert_eq!(
        seen.failure,
        Some((
            FailureReason::CrashLoop,
            "restarted 5 times; last exit code 1 (Error): ValueError: No available memory for the cache blocks."
                .to_owned()
        ))
    );
    assert_eq!((seen.ready, seen.addresses.len()), (1, 1));
}

#[tokio::test]
async fn observe_while_pods_start() {
    let id = endpoint_id();
    let seen =
        observe_one(vec![waiting_pod(id, "p", "ContainerCreating", "", 0, None)], 1, 0).await;
    assert_eq!(
        seen,
        ObservedEndpoint { generation: 3, replicas: 1, ready: 0, failure: None, addresses: vec![] }
    );
}

#[tokio::test]
async fn observe_refused() {
    let fake = Scenario::new()
        .on(
            Method::GET,
            &deployments_path(),
            &[("labelSelector", MANAGED)],
            403,
            status(
                403,
                "Forbidden",
                "deployments.apps is forbidden: User \"bud\" cannot list resource \"deployments\"",
            ),
        )
        .serve()
        .await;
    let e = fake.driver().observe().await.unwrap_err();
    fake.finish();
    assert!(matches!(e, DriverError::Refused(ref m) if m.contains("cannot list")), "{e:?}");
}

// ---------------------------------------------------------------------------------------------
// probe

#[tokio::test]
async fn probe_counts_nodes_gpus_and_the_device_plugin() {
    let fake = Scenario::new()
        .on(
            Method::GET,
            "/api/v1/nodes",
            &[],
            200,
            list("NodeList", "v1", vec![node("gpu-1", "8", "8"), node("gpu-2", "8", "6")]),
        )
        .on(
            Method::GET,
            "/api/v1/namespaces/kube-system/pods",
            &[("labelSelector", "name=nvidia-device-plugin-ds")],
            200,
            list("PodList", "v1", vec![device_plugin_pod("Running")]),
        )
        .serve()
        .await;
    let inventory = fake.driver().probe().await.unwrap();
    fake.finish();
    assert_eq!(
        inventory,
        Inventory { nodes: 2, gpus_total: 16, gpus_allocatable: 14, device_plugin_running: true }
    );
}

#[tokio::test]
async fn probe_without_a_running_device_plugin_tries_the_helm_label() {
    let mut cpu = node("cpu-1", "0", "0");
    cpu["status"]["capacity"].as_object_mut().unwrap().remove("nvidia.com/gpu");
    cpu["status"]["allocatable"].as_object_mut().unwrap().remove("nvidia.com/gpu");
    let fake = Scenario::new()
        .on(Method::GET, "/api/v1/nodes", &[], 200, list("NodeList", "v1", vec![cpu]))
        .on(
            Method::GET,
            "/api/v1/namespaces/kube-system/pods",
            &[("labelSelector", "name=nvidia-device-plugin-ds")],
            200,
            list("PodList", "v1", vec![device_plugin_pod("Pending")]),
        )
        .on(
            Method::GET,
            "/api/v1/namespaces/kube-system/pods",
            &[("labelSelector", "app.kubernetes.io/name=nvidia-device-plugin")],
            200,
            list("PodList", "v1", vec![]),
        )
        .serve()
        .await;
    let inventory = fake.driver().probe().await.unwrap();
    fake.finish();
    assert_eq!(
        inventory,
        Inventory { nodes: 1, gpus_total: 0, gpus_allocatable: 0, device_plugin_running: false }
    );
}

#[tokio::test]
async fn probe_with_bad_credentials_is_refused() {
    let fake = Scenario::new()
        .on(Method::GET, "/api/v1/nodes", &[], 401, status(401, "Unauthorized", "Unauthorized"))
        .serve()
        .await;
    let e = fake.driver().probe().await.unwrap_err();
    fake.finish();
    assert!(matches!(e, DriverError::Refused(ref m) if m.contains("401")), "{e:?}");
}

// ---------------------------------------------------------------------------------------------
// remove and logs

#[tokio::test]
async fn remove_deletes_both_objects() {
    let id = endpoint_id();
    let fake = Scenario::new()
        .on(Method::DELETE, &deployment_path(id), &[], 200, success())
        .on(Method::DELETE, &services_path(id), &[], 200, success())
        .serve()
        .await;
    fake.driver().remove(id).await.unwrap();
    fake.finish();
    assert_eq!(fake.calls()[0].body["propagationPolicy"], "Background");
}

#[tokio::test]
async fn removing_what_is_gone_succeeds() {
    let id = endpoint_id();
    let not_found =
        |kind: &str| status(404, "NotFound", &format!("{kind} \"{}\" not found", object_name(id)));
    let fake = Scenario::new()
        .on(Method::DELETE, &deployment_path(id), &[], 404, not_found("deployments.apps"))
        .on(Method::DELETE, &services_path(id), &[], 404, not_found("services"))
        .serve()
        .await;
    fake.driver().remove(id).await.unwrap();
    fake.finish();
}

#[tokio::test]
async fn logs_of_each_pod_are_headed() {
    let id = endpoint_id();
    let selector = format!("bud.dev/endpoint-id={id}");
    let last = json!({ "exitCode": 1, "reason": "Error", "startedAt": "2025-01-02T03:05:00Z", "finishedAt": "2025-01-02T03:06:00Z" });
    let fake = Scenario::new()
        .on(
            Method::GET,
            &pods_path(),
            &[("labelSelector", &selector)],
            200,
            list(
                "PodList",
                "v1",
                vec![
                    waiting_pod(id, "bud-ep-b", "CrashLoopBackOff", "back-off", 2, Some(last)),
                    ready_pod(id, "bud-ep-a", "10.244.1.5"),
                ],
            ),
        )
        .on(
            Method::GET,
            &format!("{}/bud-ep-a/log", pods_path()),
            &[("container", "vllm"), ("tailLines", "2")],
            200,
            json!("INFO: Started server process\nINFO: Uvicorn running on http://0.0.0.0:8000\n"),
        )
        .on(
            Method::GET,
            &format!("{}/bud-ep-b/log", pods_path()),
            &[("container", "vllm"), ("tailLines", "2"), ("previous", "true")],
            200,
            json!("torch.OutOfMemoryError: CUDA out of memory\nERROR: engine core failed"),
        )
        .serve()
        .await;
    let logs = fake.driver().logs(id, 2).await.unwrap();
    fake.finish();
    assert_eq!(
        logs,
        "==> pod bud-ep-a <==\nINFO: Started server process\nINFO: Uvicorn running on http://0.0.0.0:8000\n\
         \n==> pod bud-ep-b <==\ntorch.OutOfMemoryError: CUDA out of memory\nERROR: engine core failed\n"
    );
}

#[tokio::test]
async fn logs_of_a_pod_still_starting_say_why_there_are_none() {
    let id = endpoint_id();
    let selector = format!("bud.dev/endpoint-id={id}");
    let fake = Scenario::new()
        .on(
            Method::GET,
            &pods_path(),
            &[("labelSelector", &selector)],
            200,
            list("PodList", "v1", vec![waiting_pod(id, "p", "ContainerCreating", "", 0, None)]),
        )
        .on(
            Method::GET,
            &format!("{}/p/log", pods_path()),
            &[("container", "vllm")],
            400,
            status(
                400,
                "BadRequest",
                "container \"vllm\" in pod \"p\" is waiting to start: ContainerCreating",
            ),
        )
        .serve()
        .await;
    let logs = fake.driver().logs(id, 100).await.unwrap();
    fake.finish();
    assert_eq!(
        logs,
        "==> pod p <==\n(no logs: 400 BadRequest: container \"vllm\" in pod \"p\" is waiting to start: ContainerCreating)\n"
    );
}

#[tokio::test]
async fn logs_of_a_removed_endpoint_are_not_found() {
    let id = endpoint_id();
    let selector = format!("bud.dev/endpoint-id={id}");
    let fake = Scenario::new()
        .on(
            Method::GET,
            &pods_path(),
            &[("labelSelector", &selector)],
            200,
            list("PodList", "v1", vec![]),
        )
        .on(
            Method::GET,
            &deployment_path(id),
            &[],
            404,
            status(404, "NotFound", "deployments.apps not found"),
        )
        .serve()
        .await;
    let e = fake.driver().logs(id, 10).await.unwrap_err();
    fake.finish();
    assert!(matches!(e, DriverError::NotFound), "{e:?}");
}

// ---------------------------------------------------------------------------------------------
// new

#[tokio::test]
async fn new_runs_an_exec_kubeconfig_only_when_allowed() {
    let yaml = r#"apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: { server: 'https://127.0.0.1:6443', insecure-skip-tls-verify: true }
contexts:
- name: x
  context: { cluster: c, user: u }
current-context: x
users:
- name: u
  user:
    exec:
      apiVersion: client.authentication.k8s.io/v1beta1
      command: echo
      args: ['{"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential", "status": {"token": "t0k3n"}}']
"#;
    match KubernetesDriver::new(yaml, NS, false).await {
        Err(DriverError::Refused(m)) => {
            assert!(m.contains("clusters.allow_exec_kubeconfig"), "{m}")
        }
        Err(e) => panic!("expected Refused, got {e:?}"),
        Ok(_) => panic!("expected Refused, got a driver"),
    }
    // Allowed, kube runs the command as the client is built.
    assert!(KubernetesDriver::new(yaml, NS, true).await.is_ok());
}

#[tokio::test]
async fn new_builds_a_driver_that_reaches_the_kubeconfig_server() {
    let fake = Scenario::new()
        .on(
            Method::GET,
            "/api/v1/nodes",
            &[],
            200,
            list("NodeList", "v1", vec![node("gpu-1", "4", "4")]),
        )
        .on(
            Method::GET,
            "/api/v1/namespaces/kube-system/pods",
            &[("labelSelector", "name=nvidia-device-plugin-ds")],
            200,
            list("PodList", "v1", vec![device_plugin_pod("Running")]),
        )
        .serve()
        .await;
    let yaml = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {{ server: '{}' }}
contexts:
- name: x
  context: {{ cluster: c, user: u }}
users:
- name: u
  user: {{ token: t0k3n }}
",
        fake.url
    );
    let driver = KubernetesDriver::new(&yaml, NS, false).await.unwrap();
    assert_eq!(driver.probe().await.unwrap().gpus_total, 4);
    fake.finish();
}
