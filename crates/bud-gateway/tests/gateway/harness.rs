//! The gateway on port 0 with snapshots built in the test, usage collected into a `Vec`, and a
//! process-wide Prometheus recorder so `/metrics` can be read.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bud_domain::{ApiKeyId, EndpointId, ProjectId, ProviderId};
use bud_gateway::metering::{Meter, MeterConfig, UsageRecord, UsageSink};
use bud_gateway::snapshot::{KeyEntry, Route, Snapshot, Target, Upstream};
use bud_gateway::{Gateway, GatewayConfig};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The key every test world hands out.
pub const KEY: &str = "sk-bud-test-key";

pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| PrometheusBuilder::new().install_recorder().unwrap()).clone()
}

/// Timeouts short enough for tests.
pub fn config() -> GatewayConfig {
    GatewayConfig {
        try_timeout: Duration::from_millis(500),
        overall_timeout: Duration::from_secs(4),
        ..GatewayConfig::default()
    }
}

#[derive(Default)]
pub struct VecSink(Mutex<Vec<UsageRecord>>);

impl UsageSink for VecSink {
    fn write<'a>(
        &'a self,
        batch: &'a [UsageRecord],
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        self.0.lock().unwrap().extend_from_slice(batch);
        Box::pin(async { Ok(()) })
    }
}

pub struct TestGateway {
    pub url: String,
    pub addr: SocketAddr,
    pub gateway: Gateway,
    pub client: reqwest::Client,
    sink: Arc<VecSink>,
    pub shutdown: CancellationToken,
    pub serving: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestGateway {
    pub async fn spawn(config: GatewayConfig, snapshot: Snapshot) -> TestGateway {
        let sink = Arc::new(VecSink::default());
        let meter_config =
            MeterConfig { interval: Duration::from_millis(5), ..MeterConfig::default() };
        let (meter, writer) = Meter::new(meter_config, sink.clone(), CancellationToken::new());
        tokio::spawn(writer);
        let gateway = Gateway::new(config, meter, prometheus());
        gateway.snapshot_handle().store(Arc::new(snapshot));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let serving = tokio::spawn(gateway.clone().serve(listener, shutdown.clone()));
        TestGateway {
            url: format!("http://{addr}"),
            addr,
            gateway,
            client: reqwest::Client::new(),
            sink,
            shutdown,
            serving,
        }
    }

    pub fn post(&self, path: &str, body: serde_json::Value) -> reqwest::RequestBuilder {
        self.client.post(format!("{}{path}", self.url)).bearer_auth(KEY).json(&body)
    }

    pub fn chat(&self, body: serde_json::Value) -> reqwest::RequestBuilder {
        self.post("/v1/chat/completions", body)
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(format!("{}{path}", self.url))
    }

    pub fn records(&self) -> Vec<UsageRecord> {
        self.sink.0.lock().unwrap().clone()
    }

    /// The usage records once there are at least `n` (waits up to 3 s).
    pub async fn records_eventually(&self, n: usize) -> Vec<UsageRecord> {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let records = self.records();
            if records.len() >= n || Instant::now() > deadline {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        self.get("/metrics").send().await.unwrap().text().await.unwrap()
    }
}

pub fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

pub fn key_entry(project: ProjectId) -> KeyEntry {
    KeyEntry { id: ApiKeyId::new(), project_id: project, expires_at_ms: None, rpm: None, tpm: None }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A label unique in this test process, so tests' metric series do not mix.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

pub fn replica(addr: SocketAddr, served_model: &str) -> Target {
    let endpoint_id = EndpointId::new();
    Target {
        label: format!("replica:{}/{addr}", unique("ep")),
        weight: 1,
        upstream: Upstream::Replica {
            endpoint_id,
            address: addr.to_string(),
            served_model: served_model.to_owned(),
        },
    }
}

pub fn provider(addr: SocketAddr, api_key: Option<&str>, model: &str) -> Target {
    let provider_id = ProviderId::new();
    Target {
        label: format!("provider:{}", unique("p")),
        weight: 1,
        upstream: Upstream::Provider {
            provider_id,
            base_url: format!("http://{addr}/v1"),
            api_key: api_key.map(str::to_owned),
            model: model.to_owned(),
        },
    }
}

pub fn route(name: &str, targets: Vec<Target>, fallbacks: Vec<Target>) -> Route {
    Route {
        name: name.to_owned(),
        label: unique(&format!("route:{name}-")),
        targets,
        fallbacks,
        rpm: None,
        tpm: None,
    }
}

/// One project, with [`KEY`] and the given routes.
pub struct World {
    pub project: ProjectId,
    pub key: KeyEntry,
    pub routes: Vec<Route>,
}

impl World {
    pub fn new(routes: Vec<Route>) -> World {
        let project = ProjectId::new();
        World { project, key: key_entry(project), routes }
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot =
            Snapshot { version: 1, built_at: Some(Instant::now()), ..Snapshot::default() };
        snapshot.keys.insert(hash(KEY), self.key.clone());
        let routes = snapshot.routes.entry(self.project).or_default();
        for r in &self.routes {
            routes.insert(r.name.clone(), Arc::new(r.clone()));
        }
        snapshot
    }
}

/// A gateway whose one route `chat` goes to `targets`, then `fallbacks`.
pub async fn gateway_for(targets: Vec<Target>, fallbacks: Vec<Target>) -> TestGateway {
    gateway_with(config(), targets, fallbacks).await
}

pub async fn gateway_with(
    config: GatewayConfig,
    targets: Vec<Target>,
    fallbacks: Vec<Target>,
) -> TestGateway {
    let world = World::new(vec![route("chat", targets, fallbacks)]);
    TestGateway::spawn(config, world.snapshot()).await
}

pub fn chat_body(stream: bool) -> serde_json::Value {
    serde_json::json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": stream})
}

/// What a client read of a stream.
pub struct Transcript {
    pub text: String,
}

impl Transcript {
    pub fn has_done(&self) -> bool {
        self.text.contains("data: [DONE]")
    }

    /// The `data:` payloads, in order.
    pub fn data(&self) -> Vec<&str> {
        self.text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).collect()
    }

    pub fn error_events(&self) -> Vec<serde_json::Value> {
        self.data()
            .into_iter()
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .filter(|v| v.get("error").is_some())
            .collect()
    }
}

pub async fn read_stream(response: reqwest::Response) -> Transcript {
    let text = response.text().await.unwrap();
    Transcript { text }
}
