//! The route table and thin handlers: extract, call one [`SimEngine`] function, write the
//! response.

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::config::Faults;
use crate::engine::{Answer, SimEngine};
use crate::error::SimError;
use crate::extract::SimJson;
use crate::wire::{ChatCompletionRequest, CompletionRequest, EmbeddingRequest};

/// vLLM's routes (the OpenAI-compatible API, health, metrics) and the simulator's own
/// `/sim/faults`, over `engine`.
pub fn router(engine: SimEngine) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/ping", get(health).post(health))
        .route("/version", get(version))
        .route("/metrics", get(metrics))
        .route("/sim/faults", get(faults).post(set_faults))
        .fallback(not_found)
        .with_state(engine)
}

async fn chat_completions(
    State(engine): State<SimEngine>,
    SimJson(request): SimJson<ChatCompletionRequest>,
) -> Result<Response, SimError> {
    engine.chat(request).await.map(answer)
}

async fn completions(
    State(engine): State<SimEngine>,
    SimJson(request): SimJson<CompletionRequest>,
) -> Result<Response, SimError> {
    engine.completion(request).await.map(answer)
}

async fn embeddings(
    State(engine): State<SimEngine>,
    SimJson(request): SimJson<EmbeddingRequest>,
) -> Result<Response, SimError> {
    engine.embed(request).await.map(json)
}

async fn models(State(engine): State<SimEngine>) -> Response {
    json(engine.models())
}

/// vLLM answers 200 with an empty body while it serves.
async fn health() -> StatusCode {
    StatusCode::OK
}

async fn version() -> Response {
    json(format!("{{\"version\":\"bud-engine-sim {}\"}}", env!("CARGO_PKG_VERSION")).into_bytes())
}

async fn metrics(State(engine): State<SimEngine>) -> Response {
    let content_type = HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");
    ([(header::CONTENT_TYPE, content_type)], engine.metrics_page()).into_response()
}

async fn faults(State(engine): State<SimEngine>) -> axum::Json<Faults> {
    axum::Json(engine.faults())
}

async fn set_faults(
    State(engine): State<SimEngine>,
    SimJson(faults): SimJson<Faults>,
) -> Result<axum::Json<Faults>, SimError> {
    engine.set_faults(faults).map(axum::Json)
}

/// FastAPI's answer to an unknown route, which is what vLLM sends.
async fn not_found() -> Response {
    let body = b"{\"detail\":\"Not Found\"}".to_vec();
    (StatusCode::NOT_FOUND, json(body)).into_response()
}

fn answer(answer: Answer) -> Response {
    match answer {
        Answer::Complete(body) => json(body),
        Answer::Stream(events) => {
            let content_type = HeaderValue::from_static("text/event-stream; charset=utf-8");
            ([(header::CONTENT_TYPE, content_type)], Body::from_stream(events)).into_response()
        }
    }
}

fn json(body: Vec<u8>) -> Response {
    let content_type = HeaderValue::from_static("application/json");
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}
