//! Sending a request upstream: the two HTTP clients (replicas over a kept-alive HTTP/1.1 pool,
//! providers over reqwest with rustls and the configured proxies), and the attempt loop that
//! picks targets, times attempts out, and retries or falls back while the client has seen
//! nothing yet.
//!
//! An attempt is over, for retrying purposes, when the client would see its first byte: for a
//! non-streaming request that is the complete answer (read here, so a cut or malformed answer
//! can still be retried), for a stream the response head. After that the answer is the
//! client's, and a failure can only end it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use crate::config::GatewayConfig;
use crate::error::Error;
use crate::openai::{AnswerUsage, ApiError, ErrorCode, ParsedRequest, Usage};
use crate::snapshot::{Route, Target, Upstream};
use crate::state::{Attempt, Registry, RouteState, TargetState, monotonic_ms};
use crate::{balance, breaker::BreakerPolicy};

/// The replicas' client: HTTP/1.1, connections kept alive in a pool, `TCP_NODELAY` on.
pub type ReplicaClient = Client<HttpConnector, Full<Bytes>>;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The OpenAI endpoints the gateway forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
            Self::Embeddings => "/v1/embeddings",
        }
    }

    /// The path after a provider's base URL (which ends in `/v1`).
    fn provider_path(self) -> &'static str {
        &self.path()["/v1".len()..]
    }

    /// Whether `stream: true` means a server-sent-event answer.
    pub fn streams(self) -> bool {
        !matches!(self, Self::Embeddings)
    }
}

/// Both clients. Built once; cheap to share.
pub struct Upstreams {
    replica: ReplicaClient,
    /// The error is kept, not raised, when the gateway is built with [`Upstreams::lenient`]:
    /// then provider targets fail (502) while replicas keep working.
    provider: Result<reqwest::Client, Arc<str>>,
}

impl Upstreams {
    pub fn new(config: &GatewayConfig) -> Result<Self, Error> {
        Ok(Self { replica: replica_client(config), provider: Ok(provider_client(config)?) })
    }

    /// Like [`Upstreams::new`], but a provider client that cannot be built (a bad proxy URL)
    /// only disables provider targets.
    pub fn lenient(config: &GatewayConfig) -> Self {
        let provider = provider_client(config).map_err(|e| {
            let message = error_chain(&e);
            tracing::error!(error = %message, "provider targets disabled: their client cannot be built");
            Arc::from(message)
        });
        Self { replica: replica_client(config), provider }
    }

    pub fn replica_client(&self) -> ReplicaClient {
        self.replica.clone()
    }

    /// Sends one request to `target` and returns its response head; the body follows.
    async fn send(
        &self,
        target: &Target,
        endpoint: Endpoint,
        body: Bytes,
    ) -> Result<UpstreamResponse, Failure> {
        match &target.upstream {
            Upstream::Replica { address, .. } => {
                let uri = Uri::builder()
                    .scheme("http")
                    .authority(address.as_str())
                    .path_and_query(endpoint.path())
                    .build()
                    .map_err(|e| {
                        Failure::Misconfigured(format!("replica address {address:?}: {e}"))
                    })?;
                let mut request = Request::new(Full::new(body));
                *request.method_mut() = http::Method::POST;
                *request.uri_mut() = uri;
                request
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                let response = self.replica.request(request).await.map_err(|e| {
                    if e.is_connect() {
                        Failure::Connect(error_chain(&e))
                    } else {
                        Failure::Broken(error_chain(&e))
                    }
                })?;
                let (head, body) = response.into_parts();
                Ok(UpstreamResponse {
                    status: head.status,
                    headers: head.headers,
                    body: UpstreamBody::Replica(body),
                })
            }
            Upstream::Provider { base_url, api_key, .. } => {
                let client =
                    self.provider.as_ref().map_err(|e| Failure::Misconfigured(e.to_string()))?;
                let url = format!("{}{}", base_url.trim_end_matches('/'), endpoint.provider_path());
                let mut request =
                    client.post(url).header(CONTENT_TYPE, "application/json").body(body);
                // The provider's key goes to this provider only; the client's key goes nowhere.
                if let Some(key) = api_key {
                    request = request.bearer_auth(key);
                }
                let response = request.send().await.map_err(|e| {
                    if e.is_connect() {
                        Failure::Connect(error_chain(&e))
                    } else {
                        Failure::Broken(error_chain(&e))
                    }
                })?;
                let status = response.status();
                let headers = response.headers().clone();
                Ok(UpstreamResponse {
                    status,
                    headers,
                    body: UpstreamBody::Provider(reqwest::Body::from(response)),
                })
            }
        }
    }
}

fn replica_client(config: &GatewayConfig) -> ReplicaClient {
    let mut connector = HttpConnector::new();
    // Without it a kept-alive connection can wait for a delayed ACK on every request.
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(config.try_timeout));
    connector.set_keepalive(Some(Duration::from_secs(60)));
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(connector)
}

fn provider_client(config: &GatewayConfig) -> Result<reqwest::Client, Error> {
    // `no_proxy()` first: reqwest would otherwise read the `*_proxy` environment variables.
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .connect_timeout(config.try_timeout)
        .pool_idle_timeout(Duration::from_secs(90));
    let bypass = config.no_proxy.as_deref().and_then(reqwest::NoProxy::from_string);
    if let Some(url) = &config.http_proxy {
        let proxy = reqwest::Proxy::http(url)
            .map_err(|source| Error::Proxy { which: "http_proxy", source })?;
        builder = builder.proxy(proxy.no_proxy(bypass.clone()));
    }
    if let Some(url) = &config.https_proxy {
        let proxy = reqwest::Proxy::https(url)
            .map_err(|source| Error::Proxy { which: "https_proxy", source })?;
        builder = builder.proxy(proxy.no_proxy(bypass));
    }
    builder.build().map_err(Error::ProviderClient)
}

/// An error and its sources, for one log line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

/// An upstream's response head, with its body to come.
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: UpstreamBody,
}

/// The body of an upstream response, from either client.
pub enum UpstreamBody {
    Replica(Incoming),
    Provider(reqwest::Body),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Replica(b) => {
                Pin::new(b).poll_frame(cx).map(|f| f.map(|r| r.map_err(Into::into)))
            }
            Self::Provider(b) => {
                Pin::new(b).poll_frame(cx).map(|f| f.map(|r| r.map_err(Into::into)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Replica(b) => b.is_end_stream(),
            Self::Provider(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Replica(b) => b.size_hint(),
            Self::Provider(b) => b.size_hint(),
        }
    }
}

/// Why an attempt failed. Every kind is retried (on another target, or the same one when it
/// is the only one) while the budget and the deadline allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The connection could not be made.
    Connect(String),
    /// The attempt's time ran out.
    Timeout,
    /// The connection broke: reset, closed early, not HTTP.
    Broken(String),
    /// 5xx or 429.
    Status { status: StatusCode, retry_after: Option<Duration> },
    /// A 2xx answer that is not JSON.
    Malformed(String),
    /// A non-streaming answer larger than `max_response_bytes`.
    TooLarge,
    /// The target cannot be reached as configured (bad address, no provider client).
    Misconfigured(String),
}

impl Failure {
    /// What the client gets when this was the last failure.
    pub fn to_api_error(&self) -> ApiError {
        match self {
            Self::Timeout => ApiError::new(ErrorCode::Timeout, "the model did not answer in time"),
            Self::Status { status, .. } if *status == StatusCode::TOO_MANY_REQUESTS => {
                ApiError::new(
                    ErrorCode::UpstreamRateLimited,
                    "the model is overloaded; retry later",
                )
            }
            Self::Status { status, .. } if *status == StatusCode::SERVICE_UNAVAILABLE => {
                ApiError::new(ErrorCode::Unavailable, "the model is unavailable; retry later")
            }
            _ => ApiError::new(ErrorCode::BadGateway, "the model failed to answer"),
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// What the attempt loop got.
pub enum Answer {
    /// A complete answer: a 2xx of a non-streaming request, or a 4xx passed to the client as it
    /// is (never retried: the request, not the target, is at fault).
    Full {
        status: StatusCode,
        content_type: Option<HeaderValue>,
        body: Bytes,
        usage: Usage,
        attempt: Attempt,
    },
    /// The head of a successful stream; the attempt's outcome is settled by the relay.
    Stream { body: UpstreamBody, attempt: Attempt },
}

/// No target answered.
pub struct Unanswered {
    /// `None` when no target could even be tried.
    pub failure: Option<Failure>,
    /// The target tried last, for the metrics and the usage record.
    pub last: Option<Arc<TargetState>>,
}

/// One request as the attempt loop needs it.
pub struct Call<'a> {
    pub route: &'a Route,
    pub route_state: &'a RouteState,
    pub endpoint: Endpoint,
    pub body: &'a Bytes,
    pub request: &'a ParsedRequest,
    /// Whether the answer is a stream.
    pub stream: bool,
    pub deadline: Instant,
}

/// Pause before trying the same (only) target again after a failure without `Retry-After`.
const SAME_TARGET_BACKOFF: Duration = Duration::from_millis(50);

/// Tries the route's targets until one answers: primaries by least load, then fallbacks in
/// order, each at most once; a route with a single target gets one second try. Every attempt
/// after the first needs the route's retry budget.
pub async fn call(
    upstreams: &Upstreams,
    registry: &Registry,
    config: &GatewayConfig,
    policy: BreakerPolicy,
    call: Call<'_>,
) -> Result<Answer, Unanswered> {
    let route = call.route;
    let primaries = registry.targets(&route.targets);
    let fallbacks = registry.targets(&route.fallbacks);
    let only_target = route.targets.len() + route.fallbacks.len() == 1;
    call.route_state.budget.deposit();

    let mut tried_primaries: u64 = 0;
    let mut next_fallback = 0;
    let mut attempts = 0u32;
    let mut second_try = false;
    let mut last: Option<(Failure, Arc<TargetState>)> = None;
    // The body for the last model name used: targets serving the same name share it.
    let mut prepared: Option<(&str, Bytes)> = None;

    loop {
        let now_ms = monotonic_ms();
        let choice = if let Some(i) =
            balance::pick(&route.targets, &primaries, tried_primaries, &policy, now_ms)
        {
            tried_primaries |= 1 << i;
            Some((&route.targets[i], &primaries[i], false))
        } else if let Some(j) = (next_fallback..route.fallbacks.len())
            .find(|&j| fallbacks[j].breaker.available(&policy, now_ms))
        {
            next_fallback = j + 1;
            Some((&route.fallbacks[j], &fallbacks[j], true))
        } else if only_target && attempts == 1 && !second_try {
            // One more try of the only target, if it is still allowed one.
            second_try = true;
            let (target, state) = match (route.targets.first(), route.fallbacks.first()) {
                (Some(t), _) => (t, &primaries[0]),
                (None, Some(t)) => (t, &fallbacks[0]),
                (None, None) => break,
            };
            state.breaker.available(&policy, now_ms).then_some((target, state, false))
        } else {
            None
        };
        let Some((target, state, is_fallback)) = choice else { break };

        if attempts > 0 {
            if !call.route_state.budget.withdraw() {
                tracing::debug!(route = %route.label, "retry budget spent; not retrying");
                break;
            }
            call.route_state.metrics.retries.increment(1);
            if is_fallback {
                call.route_state.metrics.fallbacks.increment(1);
            }
            let same_target = last.as_ref().is_some_and(|(_, t)| Arc::ptr_eq(t, state));
            if same_target {
                let wait =
                    last.as_ref().and_then(|(f, _)| f.retry_after()).unwrap_or(SAME_TARGET_BACKOFF);
                if Instant::now() + wait >= call.deadline {
                    break;
                }
                tokio::time::sleep(wait).await;
            }
        }
        let Some(mut attempt) = Attempt::start(state, policy) else {
            // Another request took the half-open probe in the meantime.
            continue;
        };
        attempts += 1;

        let model = served_model(target);
        let body = match &prepared {
            Some((m, b)) if *m == model => b.clone(),
            _ => {
                let b = call.request.upstream_body(call.body, model, call.stream);
                prepared = Some((model, b.clone()));
                b
            }
        };
        let try_deadline = (Instant::now() + config.try_timeout).min(call.deadline);
        let outcome = tokio::time::timeout_at(
            try_deadline,
            try_once(
                upstreams,
                target,
                call.endpoint,
                body,
                call.stream,
                config.max_response_bytes,
            ),
        )
        .await
        .unwrap_or(Err(Failure::Timeout));
        match outcome {
            Ok(Tried::Full { status, content_type, body, usage }) => {
                attempt.succeeded();
                return Ok(Answer::Full { status, content_type, body, usage, attempt });
            }
            Ok(Tried::Stream(body)) => return Ok(Answer::Stream { body, attempt }),
            Err(failure) => {
                match &failure {
                    // Alive but busy: not a reason to take it out of rotation.
                    Failure::Status { status, .. } if *status == StatusCode::TOO_MANY_REQUESTS => {
                        attempt.neutral()
                    }
                    _ => attempt.failed(),
                }
                tracing::debug!(route = %route.label, target_label = %target.label, ?failure, "attempt failed");
                last = Some((failure, attempt.target.clone()));
            }
        }
        if Instant::now() >= call.deadline {
            break;
        }
    }
    Err(match last {
        Some((failure, target)) => Unanswered { failure: Some(failure), last: Some(target) },
        None => Unanswered { failure: None, last: None },
    })
}

fn served_model(target: &Target) -> &str {
    match &target.upstream {
        Upstream::Replica { served_model, .. } => served_model,
        Upstream::Provider { model, .. } => model,
    }
}

enum Tried {
    Full { status: StatusCode, content_type: Option<HeaderValue>, body: Bytes, usage: Usage },
    Stream(UpstreamBody),
}

async fn try_once(
    upstreams: &Upstreams,
    target: &Target,
    endpoint: Endpoint,
    body: Bytes,
    stream: bool,
    max_response_bytes: usize,
) -> Result<Tried, Failure> {
    let response = upstreams.send(target, endpoint, body).await?;
    let status = response.status;
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        let retry_after = crate::retry::retry_after(&response.headers, SystemTime::now());
        return Err(Failure::Status { status, retry_after });
    }
    if stream && status.is_success() {
        return Ok(Tried::Stream(response.body));
    }
    let content_type = response.headers.get(CONTENT_TYPE).cloned();
    let body = match Limited::new(response.body, max_response_bytes).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => return Err(Failure::TooLarge),
        Err(e) => return Err(Failure::Broken(error_chain(&*e))),
    };
    let usage = if status.is_success() {
        serde_json::from_slice::<AnswerUsage>(&body)
            .map_err(|e| Failure::Malformed(e.to_string()))?
            .usage
            .unwrap_or_default()
    } else {
        Usage::default()
    };
    Ok(Tried::Full { status, content_type, body, usage })
}
