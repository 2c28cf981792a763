//! The fast mock upstream: an OpenAI-compatible engine that answers at once with canned bytes,
//! so that what a benchmark measures is the hop in front of it, not inference.
//!
//! - `POST /v1/chat/completions` answers a fixed chat completion with `usage`; with
//!   `"stream":true` in the body, a server-sent-event stream of [`MockConfig::chunks`] token
//!   chunks, a final chunk with `finish_reason`, a usage-only chunk when the body asks for
//!   `include_usage` (as vLLM does), and `data: [DONE]`.
//! - `GET /metrics` answers `vllm:num_requests_waiting 0`, which the gateway's queue scraper
//!   reads every two seconds.
//!
//! Each SSE event is written to the socket on its own: the body yields once between events,
//! and hyper flushes whenever the body is not ready, so the gateway reads a stream the way an
//! engine writes one (token by token) rather than one coalesced buffer.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Context as _;
use http_body_util::BodyExt;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the mock answers.
#[derive(Debug, Clone, Copy)]
pub struct MockConfig {
    /// Token chunks in a streamed answer, before the final and usage chunks.
    pub chunks: usize,
}

/// Binds `replicas` loopback listeners, each a separate "replica" of the same engine, and
/// serves them on the current runtime until `shutdown`. Returns their addresses.
pub async fn start(
    replicas: usize,
    config: MockConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<Vec<SocketAddr>> {
    let answers = Arc::new(Answers::new(config.chunks)?);
    let mut addresses = Vec::with_capacity(replicas);
    for _ in 0..replicas.max(1) {
        let listener =
            TcpListener::bind("127.0.0.1:0").await.context("binding the mock upstream")?;
        addresses.push(listener.local_addr().context("reading the mock's port")?);
        tokio::spawn(accept_loop(listener, answers.clone(), shutdown.clone()));
    }
    Ok(addresses)
}

/// The canned bytes, built once and shared by every answer (cloning [`Bytes`] copies nothing).
struct Answers {
    completion: Bytes,
    token: Bytes,
    last: Bytes,
    usage: Bytes,
    done: Bytes,
    metrics: Bytes,
    chunks: usize,
}

const MODEL: &str = "bench";
const PROMPT_TOKENS: u32 = 12;

impl Answers {
    fn new(chunks: usize) -> anyhow::Result<Self> {
        let completion_tokens = u32::try_from(chunks).unwrap_or(u32::MAX).max(1);
        let usage = serde_json::json!({
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": completion_tokens,
            "total_tokens": PROMPT_TOKENS + completion_tokens,
        });
        let completion = serde_json::json!({
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": MODEL,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                "finish_reason": "stop",
            }],
            "usage": usage,
        });
        let chunk = |delta: serde_json::Value, finish: Option<&str>| {
            serde_json::json!({
                "id": "chatcmpl-bench",
                "object": "chat.completion.chunk",
                "created": 1_700_000_000,
                "model": MODEL,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            })
        };
        let usage_chunk = serde_json::json!({
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": MODEL,
            "choices": [],
            "usage": usage,
        });
        let event = |value: &serde_json::Value| -> anyhow::Result<Bytes> {
            Ok(Bytes::from(format!("data: {}\n\n", serde_json::to_string(value)?)))
        };
        Ok(Self {
            completion: Bytes::from(serde_json::to_vec(&completion)?),
            token: event(&chunk(serde_json::json!({"content": " hello"}), None))?,
            last: event(&chunk(serde_json::json!({}), Some("stop")))?,
            usage: event(&usage_chunk)?,
            done: Bytes::from_static(b"data: [DONE]\n\n"),
            metrics: Bytes::from_static(
                b"# TYPE vllm:num_requests_waiting gauge\n\
                  vllm:num_requests_waiting{model_name=\"bench\"} 0\n",
            ),
            chunks,
        })
    }

    fn stream(&self, include_usage: bool) -> SseBody {
        let mut events = VecDeque::with_capacity(self.chunks + 3);
        events.extend(std::iter::repeat_n(self.token.clone(), self.chunks));
        events.push_back(self.last.clone());
        if include_usage {
            events.push_back(self.usage.clone());
        }
        events.push_back(self.done.clone());
        SseBody { events, yield_next: false }
    }
}

async fn accept_loop(listener: TcpListener, answers: Arc<Answers>, shutdown: CancellationToken) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).keep_alive(true);
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors and the like; the benchmark will report the errors.
                Err(_) => continue,
            },
        };
        // Without it a response written in two pieces waits for a delayed ACK (≈40 ms).
        let _ = stream.set_nodelay(true);
        let answers = answers.clone();
        let service = service_fn(move |request| {
            let answers = answers.clone();
            async move { Ok::<_, Infallible>(answer(&answers, request).await) }
        });
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                _ = connection => {}
            }
        });
    }
}

async fn answer(answers: &Answers, request: Request<Incoming>) -> Response<MockBody> {
    match (request.method(), request.uri().path()) {
        (&Method::POST, "/v1/chat/completions") => {}
        (&Method::GET, "/metrics") => {
            return respond(StatusCode::OK, "text/plain", MockBody::full(answers.metrics.clone()));
        }
        _ => return respond(StatusCode::NOT_FOUND, "text/plain", MockBody::full(Bytes::new())),
    }
    let Ok(body) = request.into_body().collect().await.map(|b| b.to_bytes()) else {
        return respond(StatusCode::BAD_REQUEST, "text/plain", MockBody::full(Bytes::new()));
    };
    // A substring test, not a parse: the loader writes these fields exactly so, and the gateway
    // passes the client's bytes through (it inserts `"include_usage":true` in the same form).
    if contains(&body, b"\"stream\":true") {
        let include_usage = contains(&body, b"\"include_usage\":true");
        let mut r = respond(
            StatusCode::OK,
            "text/event-stream",
            MockBody::Stream(answers.stream(include_usage)),
        );
        r.headers_mut().insert("cache-control", HeaderValue::from_static("no-cache"));
        r
    } else {
        respond(StatusCode::OK, "application/json", MockBody::full(answers.completion.clone()))
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn respond(status: StatusCode, content_type: &'static str, body: MockBody) -> Response<MockBody> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// A complete answer (sent with `Content-Length`) or a stream (sent chunked).
enum MockBody {
    Full(Option<Bytes>),
    Stream(SseBody),
}

/// The events of one streamed answer, handed out one per poll with a yield in between.
struct SseBody {
    events: VecDeque<Bytes>,
    /// Set after each event: the next poll returns `Pending` once (waking itself at once), so
    /// hyper flushes the event before writing the next one.
    yield_next: bool,
}

impl MockBody {
    fn full(bytes: Bytes) -> Self {
        Self::Full(Some(bytes))
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Self::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Self::Stream(sse) => {
                if sse.yield_next {
                    sse.yield_next = false;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                let next = sse.events.pop_front();
                sse.yield_next = next.is_some();
                Poll::Ready(next.map(|event| Ok(Frame::data(event))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(data) => data.is_none(),
            Self::Stream(sse) => sse.events.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Self::Stream(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::HttpClient;

    async fn ask(address: SocketAddr, body: &'static [u8]) -> String {
        let request = Request::post(format!("http://{address}/v1/chat/completions"))
            .body(crate::load::Body::new(Bytes::from_static(body)));
        let answer = match request {
            Ok(request) => HttpClient::new(1).send(request).await.ok(),
            Err(_) => None,
        };
        answer.map(|a| String::from_utf8_lossy(&a.body).into_owned()).unwrap_or_default()
    }

    #[tokio::test]
    async fn answers_a_completion_and_streams_token_by_token() {
        let shutdown = CancellationToken::new();
        let replicas = start(2, MockConfig { chunks: 3 }, shutdown.clone()).await.ok();
        let Some(&[address, _]) = replicas.as_deref() else {
            panic!("the mock did not start two replicas")
        };

        let completion = ask(address, br#"{"model":"bench"}"#).await;
        assert!(completion.contains(r#""object":"chat.completion""#), "{completion}");
        assert!(completion.contains(r#""completion_tokens":3"#), "{completion}");

        let stream = ask(address, br#"{"model":"bench","stream":true}"#).await;
        assert_eq!(stream.matches("data: ").count(), 3 + 2, "{stream}");
        assert!(stream.ends_with("data: [DONE]\n\n") && !stream.contains("usage"), "{stream}");

        let with_usage = ask(
            address,
            br#"{"model":"bench","stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .await;
        assert_eq!(with_usage.matches("data: ").count(), 3 + 3, "{with_usage}");
        assert!(with_usage.contains(r#""usage":{"#), "{with_usage}");
        shutdown.cancel();
    }
}
