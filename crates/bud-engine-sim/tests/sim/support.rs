//! Helpers shared by the tests: in-process calls, a served engine, metrics and SSE parsing.

use std::io;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use bud_engine_sim::{SimConfig, SimEngine};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

pub const MODEL: &str = "sim-model";

/// A configuration with no latency, so in-process tests answer at once.
pub fn instant() -> SimConfig {
    let mut config = SimConfig::new(MODEL);
    config.ttft_ms = 0;
    config.itl_ms = 0;
    config
}

pub fn app(config: SimConfig) -> Router {
    bud_engine_sim::router(SimEngine::new(config))
}

/// A response read whole.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

pub async fn call(app: &Router, method: Method, uri: &str, body: Option<Value>) -> Reply {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    Reply { status, headers, body: String::from_utf8(bytes.to_vec()).unwrap() }
}

pub async fn post(app: &Router, uri: &str, body: Value) -> Reply {
    call(app, Method::POST, uri, Some(body)).await
}

pub async fn get(app: &Router, uri: &str) -> Reply {
    call(app, Method::GET, uri, None).await
}

/// A chat request with one user message.
pub fn chat(content: &str) -> Value {
    serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": content}]})
}

/// The payloads of a body's `data:` events, JSON where they parse (`[DONE]` stays a string).
pub fn sse_events(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| {
            let data = event.strip_prefix("data: ").unwrap_or_else(|| panic!("{event:?}"));
            serde_json::from_str(data).unwrap_or_else(|_| Value::String(data.to_owned()))
        })
        .collect()
}

/// The value of one series on a metrics page.
pub fn sample(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {series} in\n{page}"))
        .parse()
        .unwrap()
}

pub fn gauge(page: &str, name: &str) -> f64 {
    sample(page, &format!("{name}{{model_name=\"{MODEL}\"}}"))
}

pub fn finished(page: &str, reason: &str) -> f64 {
    let series = format!(
        "vllm:request_success_total{{finished_reason=\"{reason}\",model_name=\"{MODEL}\"}}"
    );
    sample(page, &series)
}

/// Polls `probe` every few milliseconds until it holds, for at most `within`; returns how long
/// it took, or panics with `what`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut probe: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    loop {
        if probe().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The engine served on a loopback port by `run`, as the binary serves it.
pub struct Served {
    pub url: String,
    pub client: reqwest::Client,
    /// Polls metrics on connections of its own, leaving the test's pooled ones alone.
    metrics_client: reqwest::Client,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<io::Result<()>>,
}

impl Served {
    pub async fn start(config: SimConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(bud_engine_sim::run(config, listener, shutdown.clone()));
        let (client, metrics_client) = (reqwest::Client::new(), reqwest::Client::new());
        Self { url, client, metrics_client, shutdown, task }
    }

    pub fn post(&self, path: &str, body: &Value) -> reqwest::RequestBuilder {
        self.client.post(format!("{}{path}", self.url)).json(body)
    }

    pub async fn metrics(&self) -> String {
        let response = self.metrics_client.get(format!("{}/metrics", self.url)).send().await;
        response.unwrap().text().await.unwrap()
    }

    pub async fn stop(self) -> io::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("run did not return after shutdown")
            .unwrap()
    }
}
