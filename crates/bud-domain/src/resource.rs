//! Enumerations that describe registered models.

use serde::{Deserialize, Serialize};

/// The inference engine that serves a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    Vllm,
    Sglang,
    Tgi,
    /// Bud's simulated engine, for development and tests.
    EngineSim,
}

impl Engine {
    pub const ALL: [Engine; 4] = [Engine::Vllm, Engine::Sglang, Engine::Tgi, Engine::EngineSim];

    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Vllm => "vllm",
            Engine::Sglang => "sglang",
            Engine::Tgi => "tgi",
            Engine::EngineSim => "engine-sim",
        }
    }
}

/// What a model takes in and gives out; decides which OpenAI routes may reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Modality {
    /// Chat and text completions.
    Text,
    /// Embeddings.
    Embedding,
    /// Chat with image input.
    Vision,
}

impl Modality {
    pub const ALL: [Modality; 3] = [Modality::Text, Modality::Embedding, Modality::Vision];

    pub fn as_str(self) -> &'static str {
        match self {
            Modality::Text => "text",
            Modality::Embedding => "embedding",
            Modality::Vision => "vision",
        }
    }
}

str_enum!(Engine, "engine");
str_enum!(Modality, "modality");
