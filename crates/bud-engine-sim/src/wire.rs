//! The OpenAI-compatible wire types, shaped as vLLM sends and accepts them. Requests keep only
//! the fields the simulator acts on and ignore the rest (temperature, stop, logit_bias…), as
//! a real engine ignores what does not change its timing. Responses borrow their strings so a
//! response is serialised without copying the answer.

use serde::{Deserialize, Serialize};

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    /// Served model name; vLLM falls back to its first served model when absent.
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation so far.
    pub messages: Vec<ChatMessage>,
    /// Answer as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options; `include_usage` adds a usage chunk before `[DONE]`.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Token cap (deprecated by OpenAI in favour of `max_completion_tokens`).
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Token cap; wins over `max_tokens`, as in vLLM.
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    /// vLLM extension: generate at least this many tokens.
    #[serde(default)]
    pub min_tokens: Option<u32>,
    /// vLLM extension: never stop early, generate up to the cap (benchmarks use it).
    #[serde(default)]
    pub ignore_eos: Option<bool>,
}

/// One message of a conversation.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool`…
    pub role: String,
    /// Null for an assistant message that only calls tools.
    #[serde(default)]
    pub content: Option<MessageContent>,
}

/// A message's content: a string, or a list of parts of which the text ones count.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Typed parts (`text`, `image_url`…).
    Parts(Vec<ContentPart>),
}

/// One typed content part; parts without text (images, audio) add no tokens.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// The text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
}

/// `stream_options`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with empty `choices` and the request's `usage`.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// Served model name; vLLM falls back to its first served model when absent.
    #[serde(default)]
    pub model: Option<String>,
    /// One prompt or a batch; each prompt gets its own choice.
    pub prompt: Prompt,
    /// Answer as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options; `include_usage` adds a usage chunk before `[DONE]`.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Token cap.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// vLLM extension: generate at least this many tokens.
    #[serde(default)]
    pub min_tokens: Option<u32>,
    /// vLLM extension: never stop early, generate up to the cap.
    #[serde(default)]
    pub ignore_eos: Option<bool>,
}

/// A prompt as OpenAI accepts it: text or token ids, alone or batched.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// One text prompt.
    Text(String),
    /// A batch of text prompts.
    Texts(Vec<String>),
    /// One prompt as token ids.
    Tokens(Vec<u32>),
    /// A batch of prompts as token ids.
    TokenBatches(Vec<Vec<u32>>),
}

/// `POST /v1/embeddings`.
#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingRequest {
    /// Served model name; vLLM falls back to its first served model when absent.
    #[serde(default)]
    pub model: Option<String>,
    /// What to embed: the same shapes as a completion prompt.
    pub input: Prompt,
    /// `float` (the default) or `base64`, which OpenAI's Python SDK asks for by default.
    #[serde(default)]
    pub encoding_format: Option<EncodingFormat>,
    /// Truncate vectors to this many components (at most the configured dimension).
    #[serde(default)]
    pub dimensions: Option<u32>,
}

/// How embedding vectors are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    /// A JSON array of numbers.
    Float,
    /// Base64 of the little-endian f32s.
    Base64,
}

/// Token accounting of a response.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    /// Estimated prompt tokens (see `text`'s module docs).
    pub prompt_tokens: u32,
    /// Prompt plus completion.
    pub total_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// vLLM sends null unless prefix caching details are asked for.
    pub prompt_tokens_details: Option<()>,
}

impl Usage {
    /// Usage of a prompt and its completion.
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            completion_tokens,
            prompt_tokens_details: None,
        }
    }
}

/// A non-streaming chat completion.
#[derive(Debug, Serialize)]
pub struct ChatCompletion<'a> {
    /// `chatcmpl-<uuid>`.
    pub id: &'a str,
    /// Always `chat.completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The served model name.
    pub model: &'a str,
    /// The one answer (`n` is not simulated).
    pub choices: [ChatChoice<'a>; 1],
    /// Token accounting.
    pub usage: Usage,
}

/// The answer of a chat completion.
#[derive(Debug, Serialize)]
pub struct ChatChoice<'a> {
    /// Position among the choices.
    pub index: u32,
    /// The assistant's message.
    pub message: AssistantMessage<'a>,
    /// Log probabilities are not simulated.
    pub logprobs: Option<()>,
    /// `stop` or `length`.
    pub finish_reason: &'static str,
    /// vLLM's stop string or token that ended generation; none here.
    pub stop_reason: Option<()>,
}

/// The assistant's message in a chat completion.
#[derive(Debug, Serialize)]
pub struct AssistantMessage<'a> {
    /// Always `assistant`.
    pub role: &'static str,
    /// The generated text.
    pub content: &'a str,
    /// vLLM sends an empty list when no tool was called.
    pub tool_calls: [(); 0],
}

/// One server-sent event of a streamed chat completion.
#[derive(Debug, Serialize)]
pub struct ChatChunk<'a> {
    /// The same `chatcmpl-<uuid>` in every chunk of a stream.
    pub id: &'a str,
    /// Always `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds, the same in every chunk.
    pub created: u64,
    /// The served model name.
    pub model: &'a str,
    /// One delta, or none in the usage chunk.
    pub choices: &'a [ChunkChoice<'a>],
    /// Only in the usage chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// A choice's increment in a chat chunk.
#[derive(Debug, Serialize)]
pub struct ChunkChoice<'a> {
    /// Position among the choices.
    pub index: u32,
    /// What was added.
    pub delta: Delta<'a>,
    /// Log probabilities are not simulated.
    pub logprobs: Option<()>,
    /// Set in the last chunk of the choice.
    pub finish_reason: Option<&'static str>,
}

/// What a chat chunk adds: the role first, then content, then nothing (with the finish
/// reason).
#[derive(Debug, Default, Serialize)]
pub struct Delta<'a> {
    /// `assistant`, in the first chunk only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// Text added.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
}

/// A text completion, and also each event of a streamed one (the shapes are the same).
#[derive(Debug, Serialize)]
pub struct TextCompletion<'a> {
    /// `cmpl-<uuid>`.
    pub id: &'a str,
    /// Always `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The served model name.
    pub model: &'a str,
    /// One per prompt; none in a stream's usage chunk.
    pub choices: &'a [TextChoice<'a>],
    /// Always in a full response; in a stream only in the usage chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One prompt's completion, or its increment in a stream.
#[derive(Debug, Serialize)]
pub struct TextChoice<'a> {
    /// Position of the prompt in the batch.
    pub index: u32,
    /// Generated text (in a stream: the text added).
    pub text: &'a str,
    /// Log probabilities are not simulated.
    pub logprobs: Option<()>,
    /// `stop` or `length` when done; null in a stream's intermediate chunks.
    pub finish_reason: Option<&'static str>,
    /// vLLM's stop string or token that ended generation; none here.
    pub stop_reason: Option<()>,
}

/// `POST /v1/embeddings`' answer.
#[derive(Debug, Serialize)]
pub struct EmbeddingList<'a> {
    /// `embd-<uuid>`.
    pub id: &'a str,
    /// Always `list`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The served model name.
    pub model: &'a str,
    /// One per input, in input order.
    pub data: Vec<Embedding>,
    /// Prompt tokens only.
    pub usage: Usage,
}

/// One input's vector.
#[derive(Debug, Serialize)]
pub struct Embedding {
    /// Position of the input.
    pub index: u32,
    /// Always `embedding`.
    pub object: &'static str,
    /// The vector, in the requested encoding.
    pub embedding: EmbeddingVector,
}

/// A vector as numbers or as base64.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum EmbeddingVector {
    /// `encoding_format: "float"`.
    Float(Vec<f32>),
    /// `encoding_format: "base64"`.
    Base64(String),
}

/// `GET /v1/models`' answer.
#[derive(Debug, Serialize)]
pub struct ModelList<'a> {
    /// Always `list`.
    pub object: &'static str,
    /// The one served model.
    pub data: [ModelCard<'a>; 1],
}

/// A served model.
#[derive(Debug, Serialize)]
pub struct ModelCard<'a> {
    /// The served model name.
    pub id: &'a str,
    /// Always `model`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Always `bud-engine-sim`.
    pub owned_by: &'static str,
    /// The model the name serves; the same name here.
    pub root: &'a str,
    /// Set for LoRA adapters; never here.
    pub parent: Option<()>,
    /// Context window.
    pub max_model_len: u32,
}
