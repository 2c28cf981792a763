//! Relaying a streamed answer: each upstream frame is passed on as soon as the events in it are
//! complete, while a parser watches the events for `usage`, `[DONE]`, malformed JSON and lines
//! or events over the size bound.
//!
//! Framing is by event, not by byte: an event split across upstream frames is held (up to the
//! bound) until its blank line arrives, so that the relay can drop the usage-only event the
//! client did not ask for, and end the stream on a clean event boundary when the upstream
//! fails. A frame made of whole events (what engines send) is passed on as the same bytes.
//!
//! A stream ends in one of three ways: `data: [DONE]` relayed (success); an upstream failure
//! (reset, cut, end without `[DONE]`, malformed event, oversized line, overall timeout) relayed
//! as one `data: {"error":…}` event and the end of the body, never `[DONE]`; or the client going
//! away, which drops this body: the upstream body (and its connection) is dropped with it, and
//! the ledger records status 499 with the tokens relayed so far.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::ledger::Ledger;
use crate::openai::{ApiError, ErrorCode, StreamChunk, Usage};
use crate::proxy::UpstreamBody;
use crate::state::Attempt;

/// Sent while the upstream is silent before its first token.
pub const KEEPALIVE: &[u8] = b": keepalive\n\n";

/// Why the framing of an upstream stream is unacceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramingError {
    LineTooLong,
    EventTooLarge,
}

/// Splits a byte stream into SSE events (each with its terminating blank line), bounded in
/// line and event length. Lines end in `\n` or `\r\n`; a lone `\r` is not a line end here
/// (no engine or provider sends one).
#[derive(Debug)]
pub struct SseScanner {
    /// An incomplete event carried over from earlier frames.
    pending: BytesMut,
    /// Where the incomplete line starts in `pending`.
    line_start: usize,
    max_line: usize,
    max_event: usize,
}

impl SseScanner {
    pub fn new(max_line: usize, max_event: usize) -> Self {
        Self { pending: BytesMut::new(), line_start: 0, max_line, max_event }
    }

    /// Appends the complete events `chunk` finishes to `events`. Returns whether `chunk` was
    /// exactly a run of whole events (so it can be passed on as it is).
    pub fn feed(&mut self, chunk: Bytes, events: &mut Vec<Bytes>) -> Result<bool, FramingError> {
        if self.pending.is_empty() {
            let (event_start, line_start) =
                self.scan(&chunk, 0, 0, |s, e| events.push(chunk.slice(s..e)))?;
            if event_start == chunk.len() {
                return Ok(true);
            }
            self.pending.extend_from_slice(&chunk[event_start..]);
            self.line_start = line_start - event_start;
            return Ok(false);
        }
        let scan_from = self.pending.len();
        self.pending.extend_from_slice(&chunk);
        let mut ends: Vec<usize> = Vec::new();
        let buffer = std::mem::take(&mut self.pending);
        let result = self.scan_from(&buffer, scan_from, self.line_start, &mut ends);
        self.pending = buffer;
        let mut consumed = 0;
        for end in ends {
            events.push(self.pending.split_to(end - consumed).freeze());
            consumed = end;
        }
        let (event_start, line_start) = result?;
        self.line_start = line_start - event_start;
        Ok(false)
    }

    fn scan_from(
        &self,
        buffer: &[u8],
        from: usize,
        line_start: usize,
        ends: &mut Vec<usize>,
    ) -> Result<(usize, usize), FramingError> {
        self.scan_range(buffer, from, 0, line_start, |_, e| ends.push(e))
    }

    fn scan(
        &self,
        buffer: &[u8],
        event_start: usize,
        line_start: usize,
        on_event: impl FnMut(usize, usize),
    ) -> Result<(usize, usize), FramingError> {
        self.scan_range(buffer, 0, event_start, line_start, on_event)
    }

    /// Looks for line ends in `buffer[from..]`; returns where the incomplete event and line
    /// start.
    fn scan_range(
        &self,
        buffer: &[u8],
        from: usize,
        mut event_start: usize,
        mut line_start: usize,
        mut on_event: impl FnMut(usize, usize),
    ) -> Result<(usize, usize), FramingError> {
        for nl in memchr::memchr_iter(b'\n', &buffer[from..]).map(|i| i + from) {
            let mut line = &buffer[line_start..nl];
            if let [rest @ .., b'\r'] = line {
                line = rest;
            }
            if line.len() > self.max_line {
                return Err(FramingError::LineTooLong);
            }
            if line.is_empty() {
                if nl + 1 - event_start > self.max_event {
                    return Err(FramingError::EventTooLarge);
                }
                on_event(event_start, nl + 1);
                event_start = nl + 1;
            }
            line_start = nl + 1;
        }
        if buffer.len() - line_start > self.max_line {
            return Err(FramingError::LineTooLong);
        }
        if buffer.len() - event_start > self.max_event {
            return Err(FramingError::EventTooLarge);
        }
        Ok((event_start, line_start))
    }

    /// Whether an incomplete event is held.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

/// The data of an event: its `data:` lines joined by `\n` (borrowed when there is one).
pub fn event_data(event: &[u8]) -> Option<std::borrow::Cow<'_, [u8]>> {
    let mut data: Option<std::borrow::Cow<'_, [u8]>> = None;
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(value) = line.strip_prefix(b"data") else { continue };
        let value = match value {
            [] => value,
            [b':', b' ', rest @ ..] => rest,
            [b':', rest @ ..] => rest,
            // Another field whose name starts with "data".
            _ => continue,
        };
        data = Some(match data {
            None => std::borrow::Cow::Borrowed(value),
            Some(prev) => {
                let mut joined = prev.into_owned();
                joined.push(b'\n');
                joined.extend_from_slice(value);
                std::borrow::Cow::Owned(joined)
            }
        });
    }
    data
}

/// Everything the relay needs besides the upstream body.
pub(crate) struct RelaySettings {
    pub keepalive: Duration,
    pub max_line_bytes: usize,
    /// The overall deadline of the request, which bounds the wait for the first token.
    pub deadline: Instant,
    /// Once tokens flow, the longest silence tolerated: a stream that is still producing is
    /// never cut for being long, one that stalled is ended.
    pub idle_timeout: Duration,
    /// Drop the usage-only event: the gateway asked for it, the client did not.
    pub strip_usage: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Relaying,
    Done,
}

/// How long the end of an upstream body is awaited after `[DONE]`, off the client's path, so
/// that its connection goes back to the pool instead of being closed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// The client's response body for a stream.
pub(crate) struct SseRelay {
    /// Dropped (closing or returning its connection) as soon as the stream is decided.
    upstream: Option<UpstreamBody>,
    scanner: SseScanner,
    out: VecDeque<Bytes>,
    events: Vec<Bytes>,
    phase: Phase,
    timer: Pin<Box<Sleep>>,
    deadline: Instant,
    keepalive: Duration,
    idle_timeout: Duration,
    /// When the upstream last sent something (checked when the timer fires, so that frames do
    /// not each re-arm it).
    last_data: Instant,
    strip_usage: bool,
    usage: Option<Usage>,
    /// Choices relayed: about one token each, the estimate when no usage arrives.
    choices: u32,
    first_token: bool,
    attempt: Option<Attempt>,
    ledger: Ledger,
}

impl SseRelay {
    pub fn new(
        upstream: UpstreamBody,
        attempt: Attempt,
        ledger: Ledger,
        settings: RelaySettings,
    ) -> Self {
        let now = Instant::now();
        let first_wake = (now + settings.keepalive).min(settings.deadline);
        Self {
            upstream: Some(upstream),
            scanner: SseScanner::new(settings.max_line_bytes, settings.max_line_bytes),
            out: VecDeque::new(),
            events: Vec::new(),
            phase: Phase::Relaying,
            timer: Box::pin(tokio::time::sleep_until(first_wake)),
            deadline: settings.deadline,
            keepalive: settings.keepalive,
            idle_timeout: settings.idle_timeout,
            last_data: now,
            strip_usage: settings.strip_usage,
            usage: None,
            choices: 0,
            first_token: false,
            attempt: Some(attempt),
            ledger,
        }
    }

    fn used(&self) -> Usage {
        self.usage.unwrap_or(Usage { prompt_tokens: 0, completion_tokens: self.choices })
    }

    fn on_data(&mut self, chunk: Bytes) {
        self.last_data = Instant::now();
        if !self.first_token {
            // Silence is counted from the last frame.
            let next = (self.last_data + self.keepalive).min(self.deadline);
            self.timer.as_mut().reset(next);
        }
        let mut events = std::mem::take(&mut self.events);
        // The events completed before a framing error are still relayed.
        let framing = self.scanner.feed(chunk.clone(), &mut events);
        let before = self.out.len();
        let mut whole = framing == Ok(true);
        for event in events.drain(..) {
            match self.inspect(&event) {
                Verdict::Forward => self.out.push_back(event),
                Verdict::Drop => whole = false,
                Verdict::Done => {
                    self.out.push_back(event);
                    self.end_ok();
                    whole = false;
                    break;
                }
                Verdict::UpstreamError => {
                    // Relayed as the upstream sent it; the stream ends there.
                    self.out.push_back(event);
                    self.end_failed(502);
                    whole = false;
                    break;
                }
                Verdict::Malformed => {
                    self.fail(ErrorCode::BadGateway, "the model sent a malformed event");
                    whole = false;
                    break;
                }
            }
        }
        events.clear();
        self.events = events;
        if let Err(e) = framing
            && self.phase == Phase::Relaying
        {
            let message = match e {
                FramingError::LineTooLong => "the model sent an over-long line",
                FramingError::EventTooLarge => "the model sent an over-large event",
            };
            return self.fail(ErrorCode::BadGateway, message);
        }
        if whole && self.out.len() - before > 1 {
            self.out.truncate(before);
            self.out.push_back(chunk);
        }
        self.ledger.set_partial(self.used());
    }

    fn inspect(&mut self, event: &[u8]) -> Verdict {
        let Some(data) = event_data(event) else { return Verdict::Forward };
        if data.as_ref() == b"[DONE]" {
            return Verdict::Done;
        }
        let Ok(chunk) = serde_json::from_slice::<StreamChunk>(&data) else {
            return Verdict::Malformed;
        };
        if chunk.error.is_some() {
            return Verdict::UpstreamError;
        }
        let choices = chunk.choices.as_ref().map_or(0, Vec::len);
        if let Some(usage) = chunk.usage {
            self.usage = Some(usage);
            if choices == 0 && self.strip_usage {
                return Verdict::Drop;
            }
        }
        if choices > 0 {
            self.choices = self.choices.saturating_add(u32::try_from(choices).unwrap_or(u32::MAX));
            if !self.first_token {
                self.first_token = true;
                self.ledger.first_token();
                self.timer.as_mut().reset(self.last_data + self.idle_timeout);
            }
        }
        Verdict::Forward
    }

    /// Before the first token: a keepalive, or the end at the deadline. After: the end if the
    /// upstream has been silent for the idle timeout.
    fn on_timer(&mut self) {
        let now = Instant::now();
        if !self.first_token {
            if now >= self.deadline {
                self.fail(ErrorCode::Timeout, "the model did not start answering in time");
            } else {
                self.out.push_back(Bytes::from_static(KEEPALIVE));
                self.timer.as_mut().reset((now + self.keepalive).min(self.deadline));
            }
            return;
        }
        let due = self.last_data + self.idle_timeout;
        if now >= due {
            self.fail(ErrorCode::Timeout, "the model stopped sending");
        } else {
            self.timer.as_mut().reset(due);
        }
    }

    /// Ends the stream with an error event, blaming the upstream.
    fn fail(&mut self, code: ErrorCode, message: &str) {
        tracing::warn!(request_id = %self.ledger.id, message, "stream ended by an upstream failure");
        self.out.push_back(ApiError::new(code, message).sse_event());
        self.end_failed(code.status().as_u16());
    }

    fn end_failed(&mut self, status: u16) {
        self.phase = Phase::Done;
        self.upstream = None;
        if let Some(mut attempt) = self.attempt.take() {
            attempt.failed();
        }
        let used = self.used();
        self.ledger.close(status, used);
    }

    fn end_ok(&mut self) {
        self.phase = Phase::Done;
        if let (Some(mut upstream), Ok(runtime)) =
            (self.upstream.take(), tokio::runtime::Handle::try_current())
            && !upstream.is_end_stream()
        {
            runtime.spawn(async move {
                let drained = async { while let Some(Ok(_)) = upstream.frame().await {} };
                let _ = tokio::time::timeout(DRAIN_TIMEOUT, drained).await;
            });
        }
        if let Some(mut attempt) = self.attempt.take() {
            attempt.succeeded();
        }
        let used = self.used();
        self.ledger.close(200, used);
    }
}

enum Verdict {
    Forward,
    Drop,
    Done,
    UpstreamError,
    Malformed,
}

impl Body for SseRelay {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        loop {
            if let Some(bytes) = this.out.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            let Some(upstream) = this.upstream.as_mut() else {
                return Poll::Ready(None);
            };
            match this.phase {
                Phase::Done => return Poll::Ready(None),
                Phase::Relaying => match Pin::new(upstream).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data() {
                            this.on_data(data);
                        }
                    }
                    Poll::Ready(Some(Err(e))) => {
                        tracing::debug!(error = %crate::proxy::error_chain(&*e), "upstream stream broke");
                        this.fail(ErrorCode::BadGateway, "the model's stream broke off");
                    }
                    Poll::Ready(None) => {
                        this.fail(ErrorCode::BadGateway, "the model's stream ended early")
                    }
                    Poll::Pending => match this.timer.as_mut().poll(cx) {
                        Poll::Ready(()) => this.on_timer(),
                        Poll::Pending => return Poll::Pending,
                    },
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.out.is_empty() && (self.phase == Phase::Done || self.upstream.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl Drop for SseRelay {
    fn drop(&mut self) {
        if !self.ledger.is_closed() {
            // The client went away mid-stream: the upstream is dropped with us.
            self.ledger.set_partial(self.used());
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn scan_all(chunks: &[&[u8]], max: usize) -> Result<Vec<Bytes>, FramingError> {
        let mut scanner = SseScanner::new(max, max);
        let mut events = Vec::new();
        for c in chunks {
            scanner.feed(Bytes::copy_from_slice(c), &mut events)?;
        }
        Ok(events)
    }

    #[test]
    fn whole_events_pass_as_they_are() {
        let mut scanner = SseScanner::new(100, 100);
        let mut events = Vec::new();
        let chunk = Bytes::from_static(b"data: 1\n\ndata: 2\r\n\r\n");
        assert!(scanner.feed(chunk.clone(), &mut events).unwrap());
        assert_eq!(events, [&b"data: 1\n\n"[..], b"data: 2\r\n\r\n"]);
        assert_eq!(events[0].as_ptr(), chunk.as_ptr(), "no copy");
    }

    #[test]
    fn split_events_are_joined() {
        let events =
            scan_all(&[b"data: {\"a\"", b":1}\n", b"\ndata: x\n\nda", b"ta: y\n\n"], 100).unwrap();
        assert_eq!(events, [&b"data: {\"a\":1}\n\n"[..], b"data: x\n\n", b"data: y\n\n"]);
    }

    #[test]
    fn long_lines_and_events_are_refused() {
        assert_eq!(scan_all(&[b"data: 0123456789"], 10), Err(FramingError::LineTooLong));
        assert_eq!(scan_all(&[b"data: 01234", b"56789\n"], 10), Err(FramingError::LineTooLong));
        assert_eq!(
            scan_all(&[b"data: 1\ndata: 2\ndata: 3\n"], 10),
            Err(FramingError::EventTooLarge)
        );
    }

    #[test]
    fn reads_data_lines() {
        assert_eq!(event_data(b"data: [DONE]\n\n").unwrap().as_ref(), b"[DONE]");
        assert_eq!(event_data(b"event: x\ndata:a\r\ndata: b\n\n").unwrap().as_ref(), b"a\nb");
        assert_eq!(event_data(b": keepalive\n\n"), None);
        assert_eq!(event_data(b"datax: 1\n\n"), None);
    }

    proptest! {
        /// Events survive any split of the byte stream into frames.
        #[test]
        fn framing_round_trip(
            payloads in proptest::collection::vec("[a-z{}\":, ]{0,40}", 1..20),
            crlf in any::<bool>(),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            let eol = if crlf { "\r\n" } else { "\n" };
            let events: Vec<String> = payloads.iter().map(|p| format!("data: {p}{eol}{eol}")).collect();
            let stream = events.concat().into_bytes();
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            points.sort_unstable();
            let mut chunks = Vec::new();
            let mut at = 0;
            for p in points.into_iter().chain([stream.len()]) {
                chunks.push(&stream[at..p]);
                at = p;
            }
            let got = scan_all(&chunks, 1000).unwrap();
            let got: Vec<String> = got.iter().map(|b| String::from_utf8(b.to_vec()).unwrap()).collect();
            prop_assert_eq!(&got, &events);
            for (event, payload) in got.iter().zip(&payloads) {
                let data = event_data(event.as_bytes()).unwrap();
                prop_assert_eq!(data.as_ref(), payload.as_bytes());
            }
        }
    }
}
