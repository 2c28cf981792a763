//! The HTTP surface: the accept loop (one hyper HTTP/1.1 connection per socket, `TCP_NODELAY`
//! on), the dispatch by method and path, and thin handlers: authenticate, read the body, hand
//! the request to the proxy, map the outcome to a response. Every error is answered in
//! OpenAI's envelope ([`crate::openai`]).

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use metrics_exporter_prometheus::PrometheusHandle;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::breaker::BreakerPolicy;
use crate::config::GatewayConfig;
use crate::error::Error;
use crate::ledger::{self, Ledger};
use crate::limits::{Decision, RateLimiter, Refusal, Unavailable};
use crate::metering::Meter;
use crate::openai::{self, ApiError, ErrorCode, ParsedRequest, RequestHead, Usage};
use crate::proxy::{self, Answer, Call, Endpoint, Failure, Unanswered, Upstreams};
use crate::retry::RetryBudget;
use crate::snapshot::{KeyEntry, Route, Snapshot};
use crate::sse::{RelaySettings, SseRelay};
use crate::state::{Registry, RouteState};
use crate::telemetry::{NO_ROUTE, NO_TARGET, RouteMetrics};

/// The data plane. Cheap to clone: everything is behind one `Arc`.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

struct Shared {
    config: GatewayConfig,
    snapshot: Arc<ArcSwap<Snapshot>>,
    meter: Meter,
    prometheus: PrometheusHandle,
    limiter: Arc<RateLimiter>,
    registry: Arc<Registry>,
    upstreams: Upstreams,
    policy: BreakerPolicy,
    /// Requests answered before they had a route (bad key, unknown model, bad body).
    unrouted: RouteMetrics,
}

impl Gateway {
    /// A gateway with an empty snapshot (every key unknown until the first refresh). A provider
    /// client that cannot be built from the configuration (a bad proxy URL) is logged and
    /// disables provider targets only; a Redis URL that does not parse is logged and Redis
    /// taken as unreachable. [`Gateway::try_new`] refuses both instead.
    pub fn new(config: GatewayConfig, meter: Meter, metrics: PrometheusHandle) -> Gateway {
        let upstreams = Upstreams::lenient(&config);
        let limiter = RateLimiter::lenient(config.redis.as_ref());
        Self::with_parts(config, meter, metrics, upstreams, limiter)
    }

    /// Like [`Gateway::new`], but a configuration error is an error.
    pub fn try_new(
        config: GatewayConfig,
        meter: Meter,
        metrics: PrometheusHandle,
    ) -> Result<Gateway, Error> {
        let upstreams = Upstreams::new(&config)?;
        let limiter = RateLimiter::new(config.redis.as_ref())?;
        Ok(Self::with_parts(config, meter, metrics, upstreams, limiter))
    }

    fn with_parts(
        config: GatewayConfig,
        meter: Meter,
        prometheus: PrometheusHandle,
        upstreams: Upstreams,
        limiter: RateLimiter,
    ) -> Gateway {
        let policy =
            BreakerPolicy { failures: config.breaker_failures, open_for: config.breaker_open };
        Gateway {
            shared: Arc::new(Shared {
                config,
                snapshot: Arc::new(ArcSwap::from_pointee(Snapshot::default())),
                meter,
                prometheus,
                limiter: Arc::new(limiter),
                registry: Arc::new(Registry::default()),
                upstreams,
                policy,
                unrouted: RouteMetrics::new(NO_ROUTE),
            }),
        }
    }

    /// Where the refresher stores each new snapshot; the request path only loads it.
    pub fn snapshot_handle(&self) -> Arc<ArcSwap<Snapshot>> {
        self.shared.snapshot.clone()
    }

    /// Serves on `listener` until `shutdown`; then stops accepting and waits for the requests in
    /// flight (streams included) to finish. The caller bounds how long it waits.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) -> io::Result<()> {
        let shared = self.shared;
        let scraper = tokio::spawn(crate::balance::scrape_queues(
            shared.snapshot.clone(),
            shared.registry.clone(),
            shared.upstreams.replica_client(),
            shared.config.scrape_interval,
            shutdown.child_token(),
        ));
        let limiter = shared.limiter.clone();
        tokio::spawn(async move { limiter.warm_up().await });
        let graceful = GracefulShutdown::new();
        let mut http = hyper::server::conn::http1::Builder::new();
        // The timer enables hyper's default header-read timeout (slow clients cannot hold a
        // connection open forever before sending a request).
        http.timer(TokioTimer::new()).keep_alive(true);
        loop {
            let accepted = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Without it a response written in two pieces waits for a delayed ACK (≈40 ms).
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY not set");
            }
            let shared = shared.clone();
            let service = service_fn(move |request| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(shared, request).await) }
            });
            let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            });
        }
        drop(listener);
        graceful.shutdown().await;
        if let Err(e) = scraper.await {
            tracing::warn!(error = %e, "queue scraper ended abnormally");
        }
        Ok(())
    }
}

/// The body of every response: a complete one, or a relayed stream.
pub(crate) enum GatewayBody {
    Full(Option<Bytes>),
    Stream(Box<SseRelay>),
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Self::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Self::Stream(relay) => Pin::new(relay.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(data) => data.is_none(),
            Self::Stream(relay) => relay.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Self::Stream(relay) => relay.size_hint(),
        }
    }
}

async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> Response<GatewayBody> {
    let path = request.uri().path();
    let get = request.method() == Method::GET;
    let post = request.method() == Method::POST;
    let endpoint = match path {
        "/v1/chat/completions" => Some(Endpoint::ChatCompletions),
        "/v1/completions" => Some(Endpoint::Completions),
        "/v1/embeddings" => Some(Endpoint::Embeddings),
        _ => None,
    };
    match (endpoint, path) {
        (Some(endpoint), _) if post => inference(shared, request, endpoint).await,
        (None, "/v1/models") if get => models(&shared, request.headers(), None),
        (None, p) if get && p.starts_with("/v1/models/") => {
            let id = p["/v1/models/".len()..].to_owned();
            models(&shared, request.headers(), Some(&id))
        }
        (None, "/healthz") if get => text(StatusCode::OK, "ok\n"),
        (None, "/readyz") if get => ready(&shared),
        (None, "/metrics") if get => {
            let mut r = text(StatusCode::OK, shared.prometheus.render());
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
            r
        }
        (Some(_), _) | (None, "/v1/models" | "/healthz" | "/readyz" | "/metrics") => {
            error_response(&ApiError::new(
                ErrorCode::MethodNotAllowed,
                "method not allowed on this path",
            ))
        }
        _ => error_response(&ApiError::new(ErrorCode::UnknownUrl, "unknown path")),
    }
}

/// `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`.
async fn inference(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    endpoint: Endpoint,
) -> Response<GatewayBody> {
    let started = Instant::now();
    let at = ledger::now();
    let (head, body) = request.into_parts();
    let Admitted { key, body, parsed, route } =
        match admit(&shared, &head.headers, body, at.timestamp_millis()).await {
            Ok(admitted) => admitted,
            Err(e) => {
                shared.unrouted.request(NO_TARGET, e.code.status().as_u16());
                return error_response(&e);
            }
        };
    let route_state = shared.route_state(&route);
    let mut ledger = Ledger::open(
        shared.meter.clone(),
        shared.limiter.clone(),
        key.clone(),
        route.clone(),
        route_state.clone(),
        started,
        at,
    );
    let request_id = request_id_header(ledger.id);
    let decision = match shared.limiter.check(&key, &route).await {
        Ok(decision) => decision,
        Err(Unavailable) => {
            let error = ApiError::new(
                ErrorCode::RateLimiterUnavailable,
                "The rate limiter is unavailable; retry shortly.",
            );
            ledger.close(error.code.status().as_u16(), Usage::default());
            let mut response = error_response(&error);
            response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(1));
            if let Some(id) = request_id {
                response.headers_mut().insert(HeaderName::from_static("x-request-id"), id);
            }
            return response;
        }
    };
    let mut response = if decision.allowed() {
        let stream = parsed.stream && endpoint.streams();
        let deadline = tokio::time::Instant::from_std(started + shared.config.overall_timeout);
        let call = Call {
            route: &route,
            route_state: &route_state,
            endpoint,
            body: &body,
            request: &parsed,
            stream,
            deadline,
        };
        let outcome =
            proxy::call(&shared.upstreams, &shared.registry, &shared.config, shared.policy, call)
                .await;
        let relay = RelaySettings {
            keepalive: shared.config.keepalive,
            max_line_bytes: shared.config.max_line_bytes,
            deadline,
            idle_timeout: shared.config.try_timeout,
            strip_usage: !parsed.include_usage,
        };
        answer(outcome, ledger, relay)
    } else {
        ledger.close(StatusCode::TOO_MANY_REQUESTS.as_u16(), Usage::default());
        rate_limited(&decision)
    };
    if decision.is_limited() {
        rate_limit_headers(response.headers_mut(), &decision);
    }
    if let Some(id) = request_id {
        response.headers_mut().insert(HeaderName::from_static("x-request-id"), id);
    }
    response
}

/// A request with a valid key, a readable body and a route its project may use.
struct Admitted {
    key: KeyEntry,
    body: Bytes,
    parsed: ParsedRequest,
    route: Arc<Route>,
}

async fn admit(
    shared: &Shared,
    headers: &HeaderMap,
    body: Incoming,
    now_ms: i64,
) -> Result<Admitted, ApiError> {
    let key = authenticate(&shared.snapshot, headers, now_ms)?;
    let body = read_body(headers, body, shared.config.max_request_bytes).await?;
    let parsed = RequestHead::parse(&body)?;
    let route =
        shared.snapshot.load().route(key.project_id, &parsed.model).cloned().ok_or_else(|| {
            ApiError::new(
                ErrorCode::ModelNotFound,
                format!(
                    "The model `{}` does not exist or you do not have access to it.",
                    parsed.model
                ),
            )
            .with_param("model")
        })?;
    Ok(Admitted { key, body, parsed, route })
}

/// The client's response for what the attempt loop got. The ledger is closed here, or handed
/// to the stream relay, which closes it when the stream ends.
fn answer(
    outcome: Result<Answer, Unanswered>,
    mut ledger: Ledger,
    relay: RelaySettings,
) -> Response<GatewayBody> {
    match outcome {
        Ok(Answer::Full { status, content_type, body, usage, attempt }) => {
            ledger.set_target(Some(attempt.target.clone()));
            drop(attempt);
            if status.is_success() {
                ledger.first_token();
            }
            ledger.close(status.as_u16(), usage);
            let mut r = full(status, body);
            r.headers_mut().insert(
                CONTENT_TYPE,
                content_type.unwrap_or(HeaderValue::from_static("application/json")),
            );
            r
        }
        Ok(Answer::Stream { body, attempt }) => {
            ledger.set_target(Some(attempt.target.clone()));
            stream_response(SseRelay::new(body, attempt, ledger, relay))
        }
        Err(unanswered) => {
            let error = match &unanswered.failure {
                Some(failure) => failure.to_api_error(),
                None => ApiError::new(ErrorCode::Unavailable, "no healthy upstream for this model"),
            };
            // The one log line of a failed request: the client's body says nothing of the cause.
            tracing::warn!(
                request_id = %ledger.id,
                target_label = unanswered.last.as_ref().map_or(NO_TARGET, |t| t.label.as_str()),
                failure = ?unanswered.failure,
                status = error.code.status().as_u16(),
                "no upstream answered",
            );
            ledger.set_target(unanswered.last);
            ledger.close(error.code.status().as_u16(), Usage::default());
            let mut r = error_response(&error);
            if error.code == ErrorCode::UpstreamRateLimited {
                let wait = unanswered
                    .failure
                    .as_ref()
                    .and_then(Failure::retry_after)
                    .unwrap_or(Duration::from_secs(1));
                r.headers_mut().insert(RETRY_AFTER, retry_after_value(wait));
            }
            r
        }
    }
}

/// 429 for a request the limiter refused.
fn rate_limited(decision: &Decision) -> Response<GatewayBody> {
    let (code, what) = match decision.refusal {
        Some(Refusal::Tokens) => (ErrorCode::TokensRateLimited, "tokens"),
        _ => (ErrorCode::RequestsRateLimited, "requests"),
    };
    let message = format!(
        "Rate limit reached for {what} per minute; retry after {:.1}s.",
        decision.retry_after.as_secs_f64()
    );
    let mut r = error_response(&ApiError::new(code, message));
    r.headers_mut().insert(RETRY_AFTER, retry_after_value(decision.retry_after));
    r
}

impl Shared {
    fn route_state(&self, route: &Route) -> Arc<RouteState> {
        self.registry.route(route, || {
            RetryBudget::new(self.config.retry_budget_ratio, self.config.retry_budget_per_second)
        })
    }
}

/// The key presented as `Authorization: Bearer <key>`, if it is active.
fn authenticate(
    snapshot: &ArcSwap<Snapshot>,
    headers: &HeaderMap,
    now_ms: i64,
) -> Result<KeyEntry, ApiError> {
    let presented = headers
        .get(AUTHORIZATION)
        .map(HeaderValue::as_bytes)
        .and_then(|v| v.strip_prefix(b"Bearer ").or_else(|| v.strip_prefix(b"bearer ")))
        .map(<[u8]>::trim_ascii)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidApiKey,
                "Missing API key: send it as `Authorization: Bearer <key>`.",
            )
        })?;
    let hash: [u8; 32] = Sha256::digest(presented).into();
    snapshot
        .load()
        .key(&hash, now_ms)
        .cloned()
        .ok_or_else(|| ApiError::new(ErrorCode::InvalidApiKey, "Incorrect API key provided."))
}

async fn read_body(headers: &HeaderMap, body: Incoming, max: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorCode::RequestTooLarge,
            format!("the request body is larger than {max} bytes"),
        )
    };
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(too_large()),
        Err(_) => {
            Err(ApiError::new(ErrorCode::InvalidRequest, "the request body could not be read"))
        }
    }
}

/// `GET /v1/models` (the routes the key's project may use) and `GET /v1/models/{model}`.
fn models(shared: &Shared, headers: &HeaderMap, id: Option<&str>) -> Response<GatewayBody> {
    let now_ms = ledger::now().timestamp_millis();
    let key = match authenticate(&shared.snapshot, headers, now_ms) {
        Ok(key) => key,
        Err(e) => return error_response(&e),
    };
    let snapshot = shared.snapshot.load();
    let body = match id {
        None => openai::model_list(snapshot.routes_of(key.project_id).map(|r| r.name.as_str())),
        Some(id) => match snapshot.route(key.project_id, id) {
            Some(route) => openai::model_object(&route.name),
            None => {
                return error_response(
                    &ApiError::new(
                        ErrorCode::ModelNotFound,
                        format!("The model `{id}` does not exist or you do not have access to it."),
                    )
                    .with_param("model"),
                );
            }
        },
    };
    json(StatusCode::OK, body)
}

/// `GET /readyz`: ready once a snapshot is loaded and while it is fresh.
fn ready(shared: &Shared) -> Response<GatewayBody> {
    let built_at = shared.snapshot.load().built_at;
    match built_at {
        Some(t) if t.elapsed() <= shared.config.stale_window => text(StatusCode::OK, "ready\n"),
        Some(_) => text(StatusCode::SERVICE_UNAVAILABLE, "snapshot is stale\n"),
        None => text(StatusCode::SERVICE_UNAVAILABLE, "no snapshot loaded yet\n"),
    }
}

fn full(status: StatusCode, body: Bytes) -> Response<GatewayBody> {
    let mut response = Response::new(GatewayBody::Full(Some(body)));
    *response.status_mut() = status;
    response
}

fn json(status: StatusCode, body: Bytes) -> Response<GatewayBody> {
    let mut r = full(status, body);
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<GatewayBody> {
    let mut r = full(status, body.into());
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn error_response(e: &ApiError) -> Response<GatewayBody> {
    json(e.code.status(), e.envelope())
}

fn stream_response(relay: SseRelay) -> Response<GatewayBody> {
    let mut r = Response::new(GatewayBody::Stream(Box::new(relay)));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Asks reverse proxies in front of us (nginx) not to buffer the stream.
    h.insert(HeaderName::from_static("x-accel-buffering"), HeaderValue::from_static("no"));
    r
}

fn request_id_header(id: uuid::Uuid) -> Option<HeaderValue> {
    let mut buffer = uuid::Uuid::encode_buffer();
    HeaderValue::from_str(id.hyphenated().encode_lower(&mut buffer)).ok()
}

/// Whole seconds, rounded up, at least 1.
fn retry_after_value(wait: Duration) -> HeaderValue {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    HeaderValue::from(secs.max(1))
}

fn rate_limit_headers(headers: &mut HeaderMap, decision: &Decision) {
    let quotas = [("requests", decision.requests), ("tokens", decision.tokens)];
    for (what, quota) in quotas {
        let Some(q) = quota else { continue };
        let (limit, remaining, reset) = match what {
            "requests" => (LIMIT_REQUESTS, REMAINING_REQUESTS, RESET_REQUESTS),
            _ => (LIMIT_TOKENS, REMAINING_TOKENS, RESET_TOKENS),
        };
        headers.insert(HeaderName::from_static(limit), HeaderValue::from(q.limit));
        headers.insert(HeaderName::from_static(remaining), HeaderValue::from(q.remaining));
        if let Ok(v) = HeaderValue::from_str(&reset_text(q.reset)) {
            headers.insert(HeaderName::from_static(reset), v);
        }
    }
}

const LIMIT_REQUESTS: &str = "x-ratelimit-limit-requests";
const REMAINING_REQUESTS: &str = "x-ratelimit-remaining-requests";
const RESET_REQUESTS: &str = "x-ratelimit-reset-requests";
const LIMIT_TOKENS: &str = "x-ratelimit-limit-tokens";
const REMAINING_TOKENS: &str = "x-ratelimit-remaining-tokens";
const RESET_TOKENS: &str = "x-ratelimit-reset-tokens";

/// A duration as OpenAI writes its reset headers: `120ms`, `1.5s`, `6m0s`.
fn reset_text(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let minutes = ms / 60_000;
    let rest_ms = ms % 60_000;
    let seconds = if rest_ms.is_multiple_of(1000) {
        format!("{}s", rest_ms / 1000)
    } else {
        let s = format!("{:.3}", rest_ms as f64 / 1000.0);
        format!("{}s", s.trim_end_matches('0'))
    };
    if minutes > 0 { format!("{minutes}m{seconds}") } else { seconds }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_headers_read_like_openai() {
        assert_eq!(reset_text(Duration::from_millis(120)), "120ms");
        assert_eq!(reset_text(Duration::from_millis(1500)), "1.5s");
        assert_eq!(reset_text(Duration::from_secs(1)), "1s");
        assert_eq!(reset_text(Duration::from_secs(360)), "6m0s");
        assert_eq!(reset_text(Duration::from_millis(61_250)), "1m1.25s");
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_value(Duration::from_millis(1)), "1");
        assert_eq!(retry_after_value(Duration::from_millis(19_999)), "20");
        assert_eq!(retry_after_value(Duration::ZERO), "1");
    }
}
