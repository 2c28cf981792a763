//! A fake OpenAI-compatible upstream, written over raw TCP so that it can misbehave in every way
//! a real one does: refuse, hang, reset, answer 429 or 500, cut a body or a stream, send
//! malformed JSON or an endless line. It counts the requests it gets, keeps their bodies and
//! `Authorization` headers, and notes when a client closed a connection it was still answering.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// Tokens of usage every answer reports for its prompt.
pub const PROMPT_TOKENS: u32 = 7;

/// How the fake answers one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behavior {
    /// A normal answer (SSE when the request streams) with `tokens` completion tokens.
    Ok,
    /// A normal answer after a delay.
    Delay(Duration),
    /// A stream whose first token comes after a delay (the head goes out at once).
    FirstTokenAfter(Duration),
    /// A stream of `n` tokens, `every` apart.
    Slow { n: u32, every: Duration },
    /// An error status with an OpenAI error body, and `Retry-After` if given.
    Status(u16, Option<&'static str>),
    /// Read the request and never answer.
    Hang,
    /// Read the request and reset the connection.
    Reset,
    /// Non-stream: a 200 that is not JSON. Stream: two tokens, then a malformed event.
    Malformed,
    /// Non-stream: a body shorter than its `content-length`, then close. Stream: two tokens,
    /// then close without the chunked terminator.
    Cut,
    /// Stream: two tokens, then a proper end of body without `[DONE]`.
    EndWithoutDone,
    /// The response head, then silence (no body).
    HangAfterHead,
    /// Stream: two tokens, then silence.
    HangMidStream,
    /// Stream: two tokens, then a reset.
    ResetMidStream,
    /// Stream: two tokens, then a line that never ends. Non-stream: a body that never ends.
    EndlessLine,
}

/// What the fake saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub authorization: Option<String>,
    pub body: serde_json::Value,
}

#[derive(Default)]
struct State {
    script: Mutex<VecDeque<Behavior>>,
    default: Mutex<Option<Behavior>>,
    tokens: AtomicU32,
    waiting: AtomicU32,
    requests: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    closed: Mutex<Vec<Instant>>,
    closed_notify: Notify,
}

pub struct FakeUpstream {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl FakeUpstream {
    /// A fake answering `Ok` with 3 tokens unless told otherwise.
    pub async fn start() -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        state.tokens.store(3, Ordering::Relaxed);
        *state.default.lock().unwrap() = Some(Behavior::Ok);
        let s = state.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                socket.set_nodelay(true).unwrap();
                tokio::spawn(connection(socket, s.clone()));
            }
        });
        FakeUpstream { addr, state }
    }

    /// An address where nothing listens.
    pub async fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }

    /// Answers with `b` from now on (after any scripted answers).
    pub fn always(&self, b: Behavior) -> &Self {
        *self.state.default.lock().unwrap() = Some(b);
        self
    }

    /// Answers the next requests with these, in order.
    pub fn script(&self, behaviors: impl IntoIterator<Item = Behavior>) -> &Self {
        self.state.script.lock().unwrap().extend(behaviors);
        self
    }

    pub fn set_tokens(&self, n: u32) -> &Self {
        self.state.tokens.store(n, Ordering::Relaxed);
        self
    }

    /// What `/metrics` reports as `vllm:num_requests_waiting`.
    pub fn set_waiting(&self, n: u32) {
        self.state.waiting.store(n, Ordering::Relaxed);
    }

    /// Inference requests received.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// When clients closed connections the fake was still answering on.
    pub fn closed(&self) -> Vec<Instant> {
        self.state.closed.lock().unwrap().clone()
    }

    /// Waits until a client has closed a connection mid-answer, and says when it did.
    pub async fn wait_closed(&self, within: Duration) -> Option<Instant> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.state.closed_notify.notified();
            if let Some(t) = self.closed().first() {
                return Some(*t);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.closed().first().copied();
            }
        }
    }
}

fn next_behavior(state: &State) -> Behavior {
    if let Some(b) = state.script.lock().unwrap().pop_front() {
        return b;
    }
    state.default.lock().unwrap().clone().unwrap_or(Behavior::Ok)
}

struct Request {
    method: String,
    path: String,
    authorization: Option<String>,
    body: Vec<u8>,
}

async fn read_request(
    reader: &mut (impl AsyncRead + Unpin),
    buffer: &mut Vec<u8>,
) -> Option<Request> {
    loop {
        if let Some(end) = find(buffer, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
            let mut lines = head.split("\r\n");
            let mut first = lines.next()?.split(' ');
            let method = first.next()?.to_owned();
            let path = first.next()?.to_owned();
            let mut length = 0;
            let mut authorization = None;
            for line in lines {
                let (name, value) = line.split_once(':')?;
                match name.to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().ok()?,
                    "authorization" => authorization = Some(value.trim().to_owned()),
                    _ => {}
                }
            }
            while buffer.len() < end + 4 + length {
                let mut chunk = [0u8; 8192];
                let n = reader.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buffer.extend_from_slice(&chunk[..n]);
            }
            let body = buffer[end + 4..end + 4 + length].to_vec();
            buffer.drain(..end + 4 + length);
            return Some(Request { method, path, authorization, body });
        }
        let mut chunk = [0u8; 8192];
        let n = reader.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

struct InFlight<'a>(&'a State);

impl<'a> InFlight<'a> {
    fn new(state: &'a State) -> Self {
        let n = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(n, Ordering::SeqCst);
        InFlight(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn connection(socket: TcpStream, state: Arc<State>) {
    let (mut reader, mut writer) = socket.into_split();
    let mut buffer = Vec::new();
    while let Some(request) = read_request(&mut reader, &mut buffer).await {
        if request.method == "GET" && request.path == "/metrics" {
            let body = format!(
                "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{model_name=\"m\"}} {}\n",
                state.waiting.load(Ordering::Relaxed)
            );
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            if writer.write_all(format!("{head}{body}").as_bytes()).await.is_err() {
                return;
            }
            continue;
        }
        state.requests.fetch_add(1, Ordering::SeqCst);
        let _in_flight = InFlight::new(&state);
        let body: serde_json::Value =
            serde_json::from_slice(&request.body).unwrap_or(serde_json::Value::Null);
        state.seen.lock().unwrap().push(Seen {
            path: request.path.clone(),
            authorization: request.authorization.clone(),
            body: body.clone(),
        });
        let behavior = next_behavior(&state);
        let answer = Answer::new(&request.path, &body, state.tokens.load(Ordering::Relaxed));
        let keep = answer.respond(behavior, &mut reader, &mut writer, &state).await;
        if !keep {
            return;
        }
    }
}

/// What a request asked for, and the answer's events.
struct Answer {
    stream: bool,
    include_usage: bool,
    kind: Kind,
    model: String,
    tokens: u32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
    Embedding,
}

impl Answer {
    fn new(path: &str, body: &serde_json::Value, tokens: u32) -> Self {
        let kind = match path {
            "/v1/completions" => Kind::Completion,
            "/v1/embeddings" => Kind::Embedding,
            _ => Kind::Chat,
        };
        Answer {
            stream: body["stream"].as_bool().unwrap_or(false) && kind != Kind::Embedding,
            include_usage: body["stream_options"]["include_usage"].as_bool().unwrap_or(false),
            kind,
            model: body["model"].as_str().unwrap_or("?").to_owned(),
            tokens,
        }
    }

    fn usage(&self) -> serde_json::Value {
        match self.kind {
            Kind::Embedding => {
                serde_json::json!({"prompt_tokens": PROMPT_TOKENS, "total_tokens": PROMPT_TOKENS})
            }
            _ => {
                serde_json::json!({"prompt_tokens": PROMPT_TOKENS, "completion_tokens": self.tokens,
                "total_tokens": PROMPT_TOKENS + self.tokens})
            }
        }
    }

    fn full_body(&self) -> String {
        let text: String = (0..self.tokens).map(|i| format!("tok{i} ")).collect();
        let value = match self.kind {
            Kind::Chat => serde_json::json!({
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 1_700_000_000, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": self.usage(),
            }),
            Kind::Completion => serde_json::json!({
                "id": "cmpl-fake", "object": "text_completion", "created": 1_700_000_000, "model": self.model,
                "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
                "usage": self.usage(),
            }),
            Kind::Embedding => serde_json::json!({
                "object": "list", "model": self.model,
                "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5]}],
                "usage": self.usage(),
            }),
        };
        value.to_string()
    }

    fn chunk(&self, choice: serde_json::Value) -> String {
        let (id, object) = match self.kind {
            Kind::Completion => ("cmpl-fake", "text_completion"),
            _ => ("chatcmpl-fake", "chat.completion.chunk"),
        };
        let v = serde_json::json!({"id": id, "object": object, "created": 1_700_000_000, "model": self.model,
            "choices": [choice]});
        format!("data: {v}\n\n")
    }

    /// The token events (after the role event, for chat).
    fn token_event(&self, i: u32) -> String {
        match self.kind {
            Kind::Completion => self.chunk(serde_json::json!({"index": 0, "text": format!("tok{i} "), "finish_reason": null})),
            _ => self.chunk(serde_json::json!({"index": 0, "delta": {"content": format!("tok{i} ")}, "finish_reason": null})),
        }
    }

    fn first_events(&self) -> Vec<String> {
        match self.kind {
            Kind::Chat => vec![self.chunk(serde_json::json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}))],
            _ => vec![],
        }
    }

    fn last_events(&self) -> Vec<String> {
        let mut events = vec![match self.kind {
            Kind::Completion => {
                self.chunk(serde_json::json!({"index": 0, "text": "", "finish_reason": "stop"}))
            }
            _ => self.chunk(serde_json::json!({"index": 0, "delta": {}, "finish_reason": "stop"})),
        }];
        if self.include_usage {
            let (id, object) = match self.kind {
                Kind::Completion => ("cmpl-fake", "text_completion"),
                _ => ("chatcmpl-fake", "chat.completion.chunk"),
            };
            let v = serde_json::json!({"id": id, "object": object, "created": 1_700_000_000, "model": self.model,
                "choices": [], "usage": self.usage()});
            events.push(format!("data: {v}\n\n"));
        }
        events.push("data: [DONE]\n\n".to_owned());
        events
    }

    /// Answers per `behavior`; says whether the connection can take another request.
    async fn respond(
        &self,
        behavior: Behavior,
        reader: &mut OwnedReadHalf,
        writer: &mut OwnedWriteHalf,
        state: &State,
    ) -> bool {
        match behavior {
            Behavior::Ok => {
                self.answer(reader, writer, state, Duration::ZERO, Duration::ZERO, self.tokens)
                    .await
            }
            Behavior::Delay(d) => {
                if !wait_or_closed(reader, state, d).await {
                    return false;
                }
                self.answer(reader, writer, state, Duration::ZERO, Duration::ZERO, self.tokens)
                    .await
            }
            Behavior::FirstTokenAfter(d) => {
                self.answer(reader, writer, state, d, Duration::ZERO, self.tokens).await
            }
            Behavior::Slow { n, every } => {
                let slow = Answer { tokens: n, ..self.clone_shallow() };
                slow.answer(reader, writer, state, Duration::ZERO, every, n).await
            }
            Behavior::Status(status, retry_after) => {
                let body = serde_json::json!({"error": {"message": "fake failure", "type": "server_error", "param": null, "code": null}}).to_string();
                let extra =
                    retry_after.map(|r| format!("retry-after: {r}\r\n")).unwrap_or_default();
                let head = format!(
                    "HTTP/1.1 {status} Fake\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}\r\n",
                    body.len()
                );
                writer.write_all(format!("{head}{body}").as_bytes()).await.is_ok()
            }
            Behavior::Hang => {
                wait_or_closed(reader, state, Duration::from_secs(3600)).await;
                false
            }
            Behavior::Reset => {
                reset(writer);
                false
            }
            Behavior::HangAfterHead => {
                let head = if self.stream {
                    self.stream_head()
                } else {
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n".to_owned()
                };
                if writer.write_all(head.as_bytes()).await.is_err() {
                    return false;
                }
                wait_or_closed(reader, state, Duration::from_secs(3600)).await;
                false
            }
            Behavior::Malformed if !self.stream => {
                let body = "{\"id\": \"x\", \"choices\": [tru";
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                writer.write_all(format!("{head}{body}").as_bytes()).await.is_ok()
            }
            Behavior::Cut if !self.stream => {
                let body = self.full_body();
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                let _ =
                    writer.write_all(format!("{head}{}", &body[..body.len() / 2]).as_bytes()).await;
                let _ = writer.shutdown().await;
                false
            }
            Behavior::EndlessLine if !self.stream => {
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
                if writer.write_all(head.as_bytes()).await.is_err() {
                    return false;
                }
                endless(writer).await;
                false
            }
            // Two tokens, then the fault.
            fault => {
                if writer.write_all(self.stream_head().as_bytes()).await.is_err() {
                    return false;
                }
                let mut events = self.first_events();
                events.extend((0..2).map(|i| self.token_event(i)));
                for e in events {
                    if write_chunk(writer, e.as_bytes()).await.is_err() {
                        return false;
                    }
                }
                match fault {
                    Behavior::Malformed => {
                        let _ = write_chunk(writer, b"data: {\"choices\": [{\"delta\": nope}\n\n")
                            .await;
                        wait_or_closed(reader, state, Duration::from_secs(3600)).await;
                    }
                    Behavior::Cut => {
                        let _ = writer.shutdown().await;
                    }
                    Behavior::EndWithoutDone => {
                        let _ = writer.write_all(b"0\r\n\r\n").await;
                        wait_or_closed(reader, state, Duration::from_secs(3600)).await;
                    }
                    Behavior::HangMidStream => {
                        wait_or_closed(reader, state, Duration::from_secs(3600)).await;
                    }
                    Behavior::ResetMidStream => reset(writer),
                    Behavior::EndlessLine => {
                        let _ = write_chunk(
                            writer,
                            b"data: {\"choices\": [{\"delta\": {\"content\": \"",
                        )
                        .await;
                        endless(writer).await;
                    }
                    other => unreachable!("{other:?}"),
                }
                false
            }
        }
    }

    fn clone_shallow(&self) -> Answer {
        Answer {
            stream: self.stream,
            include_usage: self.include_usage,
            kind: self.kind,
            model: self.model.clone(),
            tokens: self.tokens,
        }
    }

    fn stream_head(&self) -> String {
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_owned()
    }

    async fn answer(
        &self,
        reader: &mut OwnedReadHalf,
        writer: &mut OwnedWriteHalf,
        state: &State,
        first_after: Duration,
        every: Duration,
        tokens: u32,
    ) -> bool {
        if !self.stream {
            let body = self.full_body();
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            return writer.write_all(format!("{head}{body}").as_bytes()).await.is_ok();
        }
        if writer.write_all(self.stream_head().as_bytes()).await.is_err() {
            return false;
        }
        if !first_after.is_zero() && !wait_or_closed(reader, state, first_after).await {
            return false;
        }
        let mut events = self.first_events();
        events.extend((0..tokens).map(|i| self.token_event(i)));
        events.extend(self.last_events());
        for (i, e) in events.iter().enumerate() {
            if i > 0 && !every.is_zero() && !wait_or_closed(reader, state, every).await {
                return false;
            }
            if write_chunk(writer, e.as_bytes()).await.is_err() {
                note_closed(state);
                return false;
            }
        }
        writer.write_all(b"0\r\n\r\n").await.is_ok()
    }
}

async fn write_chunk(writer: &mut OwnedWriteHalf, data: &[u8]) -> std::io::Result<()> {
    let mut frame = format!("{:x}\r\n", data.len()).into_bytes();
    frame.extend_from_slice(data);
    frame.extend_from_slice(b"\r\n");
    writer.write_all(&frame).await
}

async fn endless(writer: &mut OwnedWriteHalf) {
    let filler = vec![b'x'; 64 * 1024];
    while write_chunk(writer, &filler).await.is_ok() {}
}

fn reset(writer: &mut OwnedWriteHalf) {
    // SO_LINGER 0: closing sends RST instead of FIN.
    let _ = writer.as_ref().set_zero_linger();
    let _ = writer.as_ref().set_nodelay(true);
    // Dropping the write half alone does not close; the connection task returns and drops both.
}

/// Waits `d`, or until the client closes the connection (then notes it and returns false).
async fn wait_or_closed(reader: &mut OwnedReadHalf, state: &State, d: Duration) -> bool {
    let mut byte = [0u8; 1];
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        r = reader.read(&mut byte) => {
            match r {
                Ok(0) | Err(_) => {
                    note_closed(state);
                    false
                }
                // A pipelined byte: not expected from the gateway; treat as alive.
                Ok(_) => true,
            }
        }
    }
}

fn note_closed(state: &State) {
    state.closed.lock().unwrap().push(Instant::now());
    state.closed_notify.notify_waiters();
}
