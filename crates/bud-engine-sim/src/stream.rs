//! Streamed answers: server-sent events paced like a real decode loop.
//!
//! A stream waits for a batch slot, then after the time to first token sends (chat only) a role
//! chunk and the first token, then one token every inter-token latency, kept to a schedule so
//! delays do not accumulate; the last token is followed at once by the finish chunk, the usage
//! chunk if asked for, and `data: [DONE]`. Events due at the same instant go out as one body
//! frame. The stream owns the request's [`Running`] guard, so dropping the body (the client
//! went away) frees the slot at once.

use std::pin::Pin;

use axum::body::Bytes;
use futures::Stream;
use tokio::time::Instant;

use crate::engine::{Plan, PlanKind, Running, SimEngine, sleep};
use crate::error::SimError;
use crate::wire::{ChatChunk, ChunkChoice, Delta, TextChoice, TextCompletion};
use crate::{engine, text};

/// The body of a streamed answer. An `Err` item makes the server drop the connection without
/// finishing the chunked body, which is how a cut stream looks to the client.
pub type SseStream = Pin<Box<dyn Stream<Item = Result<Bytes, SimError>> + Send>>;

/// The events of `plan`'s answer, for a request that arrived at `started`.
pub(crate) fn events(
    engine: SimEngine,
    plan: Plan,
    started: Instant,
    cut_after: Option<u32>,
) -> SseStream {
    let generation = Generation {
        engine,
        plan,
        started,
        running: None,
        phase: Phase::Queued,
        next_token_at: started,
        emitted: 0,
        budget: EventBudget { written: 0, cut_after },
    };
    Box::pin(futures::stream::unfold(generation, |mut generation| async move {
        let frame = generation.step().await?;
        Some((frame, generation))
    }))
}

/// One streamed request's progress.
struct Generation {
    engine: SimEngine,
    plan: Plan,
    started: Instant,
    /// Held from admission until the last token.
    running: Option<Running>,
    phase: Phase,
    /// When the token last sent was due.
    next_token_at: Instant,
    /// Tokens sent so far, per choice.
    emitted: u32,
    budget: EventBudget,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a slot; nothing sent yet.
    Queued,
    /// Sending tokens.
    Decoding,
    /// The cut-stream-after fault fired: the next item is the error that drops the connection.
    Cut,
    /// Nothing more to send.
    Over,
}

/// Counts `data:` events (`[DONE]` included) against the cut-stream-after fault.
struct EventBudget {
    written: u32,
    cut_after: Option<u32>,
}

/// The kinds of event a stream sends.
#[derive(Clone, Copy)]
enum Event {
    /// Chat only: `delta: {role: "assistant", content: ""}`.
    Role,
    /// One token of one choice.
    Token { choice: u32, text: &'static str },
    /// The empty delta carrying `finish_reason`.
    Finish { choice: u32 },
    /// Empty `choices` and the request's `usage`.
    Usage,
}

impl Generation {
    /// The next body frame: every event due now.
    async fn step(&mut self) -> Option<Result<Bytes, SimError>> {
        let mut frame = Vec::with_capacity(512);
        match self.phase {
            Phase::Queued => {
                match self.engine.admit(self.started).await {
                    Ok(running) => self.running = Some(running),
                    Err(error) => {
                        self.phase = Phase::Over;
                        return Some(Err(error));
                    }
                }
                sleep(self.engine.ttft()).await;
                self.next_token_at = Instant::now();
                let ttft = self.next_token_at - self.started;
                self.engine.metrics().prefilled(self.plan.prompt_tokens, Some(ttft));
                self.phase = Phase::Decoding;
                if self.plan.kind == PlanKind::Chat && !self.push(&mut frame, Event::Role) {
                    return self.cut(frame);
                }
            }
            Phase::Decoding => {
                // Tokens keep to a schedule from the first one, so time spent writing frames
                // (or a busy core) does not stretch every later gap.
                self.next_token_at += self.engine.itl();
                tokio::time::sleep_until(self.next_token_at).await;
            }
            Phase::Cut => {
                self.phase = Phase::Over;
                return Some(Err(SimError::StreamCut));
            }
            Phase::Over => return None,
        }

        let total = self.plan.completion_tokens;
        let all_at_once = self.engine.itl().is_zero();
        loop {
            if self.emitted == total {
                return self.finish(frame);
            }
            for choice in 0..self.plan.choices.len() {
                let text = text::token(self.plan.choices[choice], self.emitted);
                let choice = choice as u32;
                if !self.push(&mut frame, Event::Token { choice, text }) {
                    return self.cut(frame);
                }
            }
            self.emitted += 1;
            self.engine.metrics().generated(self.plan.choices.len() as u32);
            if self.emitted < total && !all_at_once {
                return Some(Ok(Bytes::from(frame)));
            }
        }
    }

    /// The finish chunks, usage and `[DONE]`, after counting the request as completed.
    fn finish(&mut self, mut frame: Vec<u8>) -> Option<Result<Bytes, SimError>> {
        for choice in 0..self.plan.choices.len() as u32 {
            if !self.push(&mut frame, Event::Finish { choice }) {
                return self.cut(frame);
            }
        }
        if let Some(running) = self.running.take() {
            running.finish(self.plan.finish);
        }
        if self.plan.include_usage && !self.push(&mut frame, Event::Usage) {
            return self.cut(frame);
        }
        if !self.budget.push(&mut frame, |buffer| buffer.extend_from_slice(b"[DONE]")) {
            return self.cut(frame);
        }
        self.phase = Phase::Over;
        Some(Ok(Bytes::from(frame)))
    }

    /// Ends the stream abruptly: what was written so far goes out, then the error.
    fn cut(&mut self, frame: Vec<u8>) -> Option<Result<Bytes, SimError>> {
        // Dropping the guard counts an abort and frees the slot now, not when the body goes.
        self.running = None;
        if frame.is_empty() {
            self.phase = Phase::Over;
            Some(Err(SimError::StreamCut))
        } else {
            self.phase = Phase::Cut;
            Some(Ok(Bytes::from(frame)))
        }
    }

    /// Writes one event, unless the cut-stream-after fault ends the stream here.
    fn push(&mut self, frame: &mut Vec<u8>, event: Event) -> bool {
        let plan = &self.plan;
        let model = self.engine.model();
        self.budget.push(frame, |buffer| write_event(plan, model, event, buffer))
    }
}

impl EventBudget {
    /// Writes `data: <payload>\n\n` if the fault allows one more event.
    fn push(&mut self, frame: &mut Vec<u8>, payload: impl FnOnce(&mut Vec<u8>)) -> bool {
        if self.cut_after.is_some_and(|limit| self.written >= limit) {
            return false;
        }
        frame.extend_from_slice(b"data: ");
        payload(frame);
        frame.extend_from_slice(b"\n\n");
        self.written += 1;
        true
    }
}

/// Serialises one event's JSON chunk into `buffer`.
fn write_event(plan: &Plan, model: &str, event: Event, buffer: &mut Vec<u8>) {
    match plan.kind {
        PlanKind::Chat => {
            let (delta, finish_reason) = match event {
                Event::Role => (Delta { role: Some("assistant"), content: Some("") }, None),
                Event::Token { text, .. } => (Delta { role: None, content: Some(text) }, None),
                Event::Finish { .. } => (Delta::default(), Some(plan.finish.as_str())),
                Event::Usage => (Delta::default(), None),
            };
            let choice = [ChunkChoice { index: 0, delta, logprobs: None, finish_reason }];
            let usage = matches!(event, Event::Usage);
            engine::write_json(
                buffer,
                &ChatChunk {
                    id: &plan.id,
                    object: "chat.completion.chunk",
                    created: plan.created,
                    model,
                    choices: if usage { &[] } else { &choice },
                    usage: usage.then(|| plan.usage()),
                },
            );
        }
        PlanKind::Completion => {
            let (index, text, finish_reason) = match event {
                Event::Token { choice, text } => (choice, text, None),
                Event::Finish { choice } => (choice, "", Some(plan.finish.as_str())),
                Event::Role | Event::Usage => (0, "", None),
            };
            let choice =
                [TextChoice { index, text, logprobs: None, finish_reason, stop_reason: None }];
            let usage = matches!(event, Event::Usage);
            engine::write_json(
                buffer,
                &TextCompletion {
                    id: &plan.id,
                    object: "text_completion",
                    created: plan.created,
                    model,
                    choices: if usage { &[] } else { &choice },
                    usage: usage.then(|| plan.usage()),
                },
            );
        }
    }
}
