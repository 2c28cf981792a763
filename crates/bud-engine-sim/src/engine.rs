//! The simulated engine: one service function per route, from a parsed request to response
//! bytes or an event stream. It checks the model and the token budget, applies the faults,
//! takes a batch slot, waits out the simulated latency and writes deterministic content.
//!
//! A request's life: model and budget checks → faults → `Scheduler::admit` (a batch slot) →
//! time to first token → one token every inter-token latency → `Running::finish`, which counts
//! it and may trigger the crash-after fault.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::{Faults, SimConfig};
use crate::error::SimError;
use crate::metrics::{EngineMetrics, FinishReason};
use crate::scheduler::{Scheduler, Slot};
use crate::stream::{self, SseStream};
use crate::text::{self, Fingerprint};
use crate::wire::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest, CompletionRequest,
    Embedding, EmbeddingList, EmbeddingRequest, EmbeddingVector, EncodingFormat, MessageContent,
    ModelCard, ModelList, Prompt, TextChoice, TextCompletion, Usage,
};

/// The engine's state, shared by every request. Cheap to clone.
#[derive(Clone)]
pub struct SimEngine {
    inner: Arc<Inner>,
}

/// What a generation route answers: a whole JSON body, or server-sent events.
pub enum Answer {
    /// `application/json` bytes.
    Complete(Vec<u8>),
    /// `text/event-stream`; dropping it aborts the request and frees its slot.
    Stream(SseStream),
}

struct Inner {
    config: SimConfig,
    /// Read by every inference request, written by `POST /sim/faults`.
    faults: RwLock<Faults>,
    scheduler: Scheduler,
    metrics: EngineMetrics,
    /// Inference requests seen, the sequence the error-rate fault samples from.
    arrivals: AtomicU64,
    /// Requests completed successfully, what the crash-after fault counts.
    completed: AtomicU64,
    /// Cancelled when the crash-after fault fires; the server then stops.
    crashed: CancellationToken,
    /// Cancelled when the server stops, letting hung requests go.
    stopping: CancellationToken,
}

/// What a validated generation request will produce.
pub(crate) struct Plan {
    pub(crate) kind: PlanKind,
    /// `chatcmpl-…` or `cmpl-…`, the same in every chunk of a stream.
    pub(crate) id: String,
    pub(crate) created: u64,
    /// One content fingerprint per choice.
    pub(crate) choices: Vec<u64>,
    /// Over all choices.
    pub(crate) prompt_tokens: u32,
    /// Per choice.
    pub(crate) completion_tokens: u32,
    pub(crate) finish: FinishReason,
    pub(crate) include_usage: bool,
}

/// Which response shape a plan is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PlanKind {
    Chat,
    Completion,
}

impl Plan {
    /// Tokens generated over all choices.
    pub(crate) fn generated_tokens(&self) -> u32 {
        self.completion_tokens.saturating_mul(self.choices.len() as u32)
    }

    pub(crate) fn usage(&self) -> Usage {
        Usage::new(self.prompt_tokens, self.generated_tokens())
    }
}

/// A request holding a batch slot. Dropped before [`Running::finish`] — the client went away,
/// or a fault cut its stream — it counts as aborted.
pub(crate) struct Running {
    engine: SimEngine,
    started: Instant,
    finished: bool,
    _slot: Slot,
}

impl SimEngine {
    /// An idle engine.
    pub fn new(config: SimConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                faults: RwLock::new(config.faults),
                scheduler: Scheduler::new(config.max_num_seqs),
                metrics: EngineMetrics::new(),
                arrivals: AtomicU64::new(0),
                completed: AtomicU64::new(0),
                crashed: CancellationToken::new(),
                stopping: CancellationToken::new(),
                config,
            }),
        }
    }

    /// The configuration the engine was started with (its faults may since have changed).
    pub fn config(&self) -> &SimConfig {
        &self.inner.config
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        *self.inner.faults.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the faults in force.
    pub fn set_faults(&self, faults: Faults) -> Result<Faults, SimError> {
        let faults = faults.validate()?;
        *self.inner.faults.write().unwrap_or_else(PoisonError::into_inner) = faults;
        tracing::info!(?faults, "faults changed");
        Ok(faults)
    }

    /// Requests completed successfully since start.
    pub fn completed(&self) -> u64 {
        self.inner.completed.load(Ordering::Relaxed)
    }

    /// `POST /v1/chat/completions`.
    pub async fn chat(&self, request: ChatCompletionRequest) -> Result<Answer, SimError> {
        self.check_model(request.model.as_deref())?;
        let mut fingerprint = Fingerprint::new();
        let mut prompt_tokens = 0u32;
        for message in &request.messages {
            fingerprint.write(message.role.as_bytes());
            fingerprint.separate();
            // One token of role framing per message, as chat templates add.
            prompt_tokens = prompt_tokens.saturating_add(1);
            match &message.content {
                Some(MessageContent::Text(text)) => {
                    fingerprint.write(text.as_bytes());
                    prompt_tokens = prompt_tokens.saturating_add(text::word_count(text));
                }
                Some(MessageContent::Parts(parts)) => {
                    for text in parts.iter().filter_map(|part| part.text.as_deref()) {
                        fingerprint.write(text.as_bytes());
                        prompt_tokens = prompt_tokens.saturating_add(text::word_count(text));
                    }
                }
                None => {}
            }
            fingerprint.separate();
        }
        let cap = request.max_completion_tokens.or(request.max_tokens);
        let (completion_tokens, finish) = self.budget(
            prompt_tokens,
            cap,
            request.min_tokens,
            request.ignore_eos.unwrap_or(false),
        )?;
        let plan = Plan {
            kind: PlanKind::Chat,
            id: format!("chatcmpl-{}", Uuid::new_v4().simple()),
            created: unix_now(),
            choices: vec![fingerprint.finish(self.inner.config.seed)],
            prompt_tokens,
            completion_tokens,
            finish,
            include_usage: request.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
        };
        self.generate(plan, request.stream.unwrap_or(false)).await
    }

    /// `POST /v1/completions`.
    pub async fn completion(&self, request: CompletionRequest) -> Result<Answer, SimError> {
        self.check_model(request.model.as_deref())?;
        let prompts = self.prompts(&request.prompt)?;
        let longest = prompts.iter().map(|&(_, tokens)| tokens).max().unwrap_or(0);
        let (completion_tokens, finish) = self.budget(
            longest,
            request.max_tokens,
            request.min_tokens,
            request.ignore_eos.unwrap_or(false),
        )?;
        let plan = Plan {
            kind: PlanKind::Completion,
            id: format!("cmpl-{}", Uuid::new_v4().simple()),
            created: unix_now(),
            choices: prompts.iter().map(|&(fingerprint, _)| fingerprint).collect(),
            prompt_tokens: prompts.iter().fold(0u32, |sum, &(_, t)| sum.saturating_add(t)),
            completion_tokens,
            finish,
            include_usage: request.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
        };
        self.generate(plan, request.stream.unwrap_or(false)).await
    }

    /// `POST /v1/embeddings`: a prefill only, so it takes a slot for the time to first token.
    pub async fn embed(&self, request: EmbeddingRequest) -> Result<Vec<u8>, SimError> {
        let model = self.check_model(request.model.as_deref())?;
        let inputs = self.prompts(&request.input)?;
        let max_dim = self.inner.config.embedding_dim;
        let dim = match request.dimensions {
            None => max_dim,
            Some(d) if (1..=max_dim).contains(&d) => d,
            Some(d) => {
                return Err(SimError::BadRequest(format!(
                    "dimensions must be between 1 and {max_dim}, got {d}"
                )));
            }
        };
        let max_len = self.inner.config.max_model_len;
        if let Some(&(_, tokens)) = inputs.iter().find(|&&(_, tokens)| tokens > max_len) {
            return Err(SimError::BadRequest(format!(
                "This model's maximum context length is {max_len} tokens. However, you \
                 requested {tokens} tokens in the input for embedding generation. Please reduce \
                 the length of the input."
            )));
        }
        let prompt_tokens = inputs.iter().fold(0u32, |sum, &(_, t)| sum.saturating_add(t));
        self.inject_faults().await?;

        let started = Instant::now();
        let running = self.admit(started).await?;
        sleep(self.ttft()).await;
        self.inner.metrics.prefilled(prompt_tokens, None);

        let base64 = request.encoding_format == Some(EncodingFormat::Base64);
        let data = inputs
            .iter()
            .zip(0u32..)
            .map(|(&(fingerprint, _), index)| {
                let vector = text::embedding(fingerprint, dim as usize);
                let embedding = if base64 {
                    EmbeddingVector::Base64(text::embedding_base64(&vector))
                } else {
                    EmbeddingVector::Float(vector)
                };
                Embedding { index, object: "embedding", embedding }
            })
            .collect();
        let id = format!("embd-{}", Uuid::new_v4().simple());
        let body = EmbeddingList {
            id: &id,
            object: "list",
            created: unix_now(),
            model,
            data,
            usage: Usage::new(prompt_tokens, 0),
        };
        let json = to_json(&body, 64 + inputs.len() * dim as usize * 12);
        running.finish(FinishReason::Stop);
        Ok(json)
    }

    /// `GET /v1/models`.
    pub fn models(&self) -> Vec<u8> {
        let config = &self.inner.config;
        let list = ModelList {
            object: "list",
            data: [ModelCard {
                id: &config.model,
                object: "model",
                created: unix_now(),
                owned_by: "bud-engine-sim",
                root: &config.model,
                parent: None,
                max_model_len: config.max_model_len,
            }],
        };
        to_json(&list, 256)
    }

    /// `GET /metrics`.
    pub fn metrics_page(&self) -> String {
        self.inner.metrics.render(&self.inner.config.model, self.inner.scheduler.gauges())
    }

    /// Cancelled once the crash-after fault fires.
    pub(crate) fn crashed(&self) -> &CancellationToken {
        &self.inner.crashed
    }

    /// Lets hung requests go, with a 503; called when the server stops.
    pub(crate) fn stop(&self) {
        self.inner.stopping.cancel();
    }

    pub(crate) fn ttft(&self) -> Duration {
        Duration::from_millis(self.inner.config.ttft_ms)
    }

    pub(crate) fn itl(&self) -> Duration {
        Duration::from_millis(self.inner.config.itl_ms)
    }

    pub(crate) fn model(&self) -> &str {
        &self.inner.config.model
    }

    pub(crate) fn metrics(&self) -> &EngineMetrics {
        &self.inner.metrics
    }

    /// Takes a batch slot for a request that arrived at `started`.
    pub(crate) async fn admit(&self, started: Instant) -> Result<Running, SimError> {
        let slot = self.inner.scheduler.admit().await?;
        Ok(Running { engine: self.clone(), started, finished: false, _slot: slot })
    }

    /// The served name, or vLLM's 404 for another; no name means the served model.
    fn check_model(&self, requested: Option<&str>) -> Result<&str, SimError> {
        let served = self.inner.config.model.as_str();
        match requested {
            Some(name) if name != served => Err(SimError::ModelNotFound(name.to_owned())),
            _ => Ok(served),
        }
    }

    /// Each prompt's fingerprint and estimated tokens.
    fn prompts(&self, prompt: &Prompt) -> Result<Vec<(u64, u32)>, SimError> {
        let seed = self.inner.config.seed;
        let text = |t: &str| {
            let mut f = Fingerprint::new();
            f.write(t.as_bytes());
            // A real tokenizer adds a BOS token, so even an empty prompt has one.
            (f.finish(seed), text::word_count(t).max(1))
        };
        let ids = |ids: &[u32]| {
            let mut f = Fingerprint::new();
            ids.iter().for_each(|&id| f.write_token(id));
            (f.finish(seed), u32::try_from(ids.len()).unwrap_or(u32::MAX))
        };
        let prompts: Vec<(u64, u32)> = match prompt {
            Prompt::Text(t) => vec![text(t)],
            Prompt::Texts(ts) => ts.iter().map(|t| text(t)).collect(),
            Prompt::Tokens(t) => vec![ids(t)],
            Prompt::TokenBatches(ts) => ts.iter().map(|t| ids(t)).collect(),
        };
        if prompts.is_empty() || prompts.iter().any(|&(_, tokens)| tokens == 0) {
            return Err(SimError::BadRequest("the prompt must not be empty".into()));
        }
        Ok(prompts)
    }

    /// How many tokens to generate and why generation ends, or vLLM's 400 for a request that
    /// does not fit the context window.
    fn budget(
        &self,
        prompt_tokens: u32,
        max_tokens: Option<u32>,
        min_tokens: Option<u32>,
        ignore_eos: bool,
    ) -> Result<(u32, FinishReason), SimError> {
        let max_len = self.inner.config.max_model_len;
        if max_tokens == Some(0) {
            return Err(SimError::BadRequest("max_tokens must be at least 1, got 0.".into()));
        }
        if prompt_tokens > max_len {
            return Err(SimError::BadRequest(format!(
                "This model's maximum context length is {max_len} tokens. However, your request \
                 has {prompt_tokens} input tokens. Please reduce the length of the input messages."
            )));
        }
        if let Some(max) = max_tokens
            && prompt_tokens.saturating_add(max) > max_len
        {
            return Err(SimError::BadRequest(format!(
                "This model's maximum context length is {max_len} tokens. However, you requested \
                 {} tokens ({prompt_tokens} in the messages, {max} in the completion). Please \
                 reduce the length of the messages or completion.",
                prompt_tokens.saturating_add(max)
            )));
        }
        // Without a cap vLLM lets the answer run to the end of the context window.
        let cap = max_tokens.unwrap_or(max_len - prompt_tokens);
        // Where the simulated model would emit its end-of-sequence token.
        let natural = if ignore_eos {
            cap
        } else {
            self.inner.config.output_tokens.max(min_tokens.unwrap_or(0))
        };
        Ok(if natural < cap { (natural, FinishReason::Stop) } else { (cap, FinishReason::Length) })
    }

    /// Hangs or fails the request if a fault says so.
    async fn inject_faults(&self) -> Result<(), SimError> {
        let faults = self.faults();
        if faults.hang {
            self.inner.stopping.cancelled().await;
            return Err(SimError::ShuttingDown);
        }
        let fail = if faults.error_rate >= 1.0 {
            true
        } else if faults.error_rate <= 0.0 {
            false
        } else {
            let arrival = self.inner.arrivals.fetch_add(1, Ordering::Relaxed);
            text::unit_interval(arrival ^ self.inner.config.seed.rotate_left(32))
                < faults.error_rate
        };
        if fail {
            let status = StatusCode::from_u16(faults.error_status)
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            tracing::debug!(%status, "injecting an error");
            return Err(SimError::Injected { status });
        }
        Ok(())
    }

    async fn generate(&self, plan: Plan, streaming: bool) -> Result<Answer, SimError> {
        self.inject_faults().await?;
        let started = Instant::now();
        if streaming {
            let cut_after = self.faults().cut_stream_after;
            return Ok(Answer::Stream(stream::events(self.clone(), plan, started, cut_after)));
        }

        let running = self.admit(started).await?;
        let admitted = started.elapsed();
        let decode = self.itl().saturating_mul(plan.completion_tokens.saturating_sub(1));
        sleep(self.ttft() + decode).await;
        let metrics = &self.inner.metrics;
        metrics.prefilled(plan.prompt_tokens, Some(admitted + self.ttft()));
        metrics.generated(plan.generated_tokens());

        let model = self.model();
        let answers: Vec<String> =
            plan.choices.iter().map(|&f| text::answer(f, plan.completion_tokens)).collect();
        let capacity = 320 + answers.iter().map(String::len).sum::<usize>();
        let json = match plan.kind {
            PlanKind::Chat => to_json(
                &ChatCompletion {
                    id: &plan.id,
                    object: "chat.completion",
                    created: plan.created,
                    model,
                    choices: [ChatChoice {
                        index: 0,
                        message: AssistantMessage {
                            role: "assistant",
                            content: answers.first().map_or("", String::as_str),
                            tool_calls: [],
                        },
                        logprobs: None,
                        finish_reason: plan.finish.as_str(),
                        stop_reason: None,
                    }],
                    usage: plan.usage(),
                },
                capacity,
            ),
            PlanKind::Completion => {
                let choices: Vec<TextChoice<'_>> = answers
                    .iter()
                    .zip(0u32..)
                    .map(|(text, index)| TextChoice {
                        index,
                        text,
                        logprobs: None,
                        finish_reason: Some(plan.finish.as_str()),
                        stop_reason: None,
                    })
                    .collect();
                to_json(
                    &TextCompletion {
                        id: &plan.id,
                        object: "text_completion",
                        created: plan.created,
                        model,
                        choices: &choices,
                        usage: Some(plan.usage()),
                    },
                    capacity + choices.len() * 96,
                )
            }
        };
        running.finish(plan.finish);
        Ok(Answer::Complete(json))
    }

    /// Counts a success and fires the crash-after fault when it is due.
    fn count_completed(&self) {
        let completed = self.inner.completed.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(limit) = self.faults().crash_after
            && completed >= limit
            && !self.inner.crashed.is_cancelled()
        {
            tracing::warn!(completed, "crash-after fault: the engine stops");
            self.inner.crashed.cancel();
        }
    }
}

impl Running {
    /// The request completed: count it (which may fire the crash-after fault) and free its
    /// slot.
    pub(crate) fn finish(mut self, reason: FinishReason) {
        self.finished = true;
        self.engine.inner.metrics.finished(reason, self.started.elapsed());
        self.engine.count_completed();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.finished {
            self.engine.inner.metrics.finished(FinishReason::Abort, self.started.elapsed());
        }
    }
}

/// Sleeps unless there is nothing to wait for: a zero-latency engine registers no timer.
pub(crate) async fn sleep(duration: Duration) {
    if !duration.is_zero() {
        tokio::time::sleep(duration).await;
    }
}

/// Serialises into a buffer sized for the body up front.
pub(crate) fn to_json<T: serde::Serialize>(value: &T, capacity: usize) -> Vec<u8> {
    let mut buffer = Vec::with_capacity(capacity);
    write_json(&mut buffer, value);
    buffer
}

/// Appends `value`'s JSON to `buffer`.
pub(crate) fn write_json<T: serde::Serialize>(buffer: &mut Vec<u8>, value: &T) {
    if let Err(error) = serde_json::to_writer(&mut *buffer, value) {
        // Writing our own types to memory cannot fail; say so loudly if it ever does.
        tracing::error!(%error, "could not serialise a response");
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
