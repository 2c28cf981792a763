//! The routes called in-process: response shapes (snapshotted), token accounting,
//! determinism and vLLM's errors.

use axum::http::StatusCode;
use base64::Engine as _;
use serde_json::json;

use crate::support::{self, MODEL, app, chat, get, instant, post, sse_events};

#[tokio::test]
async fn chat_completion_shape() {
    let app = app(instant());
    let reply = post(&app, "/v1/chat/completions", chat("Say hello to the platform")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["content-type"], "application/json");
    let body = reply.json();
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    insta::assert_json_snapshot!(body, {".id" => "[id]", ".created" => "[created]"});
}

#[tokio::test]
async fn text_completion_shape_with_a_batch_of_prompts() {
    let app = app(instant());
    let request = json!({"model": MODEL, "prompt": ["Once upon a time", "In the beginning"],
        "max_tokens": 4});
    let body = post(&app, "/v1/completions", request).await.json();
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    insta::assert_json_snapshot!(body, {".id" => "[id]", ".created" => "[created]"});
}

#[tokio::test]
async fn completion_prompts_as_token_ids() {
    let app = app(instant());
    let request = json!({"prompt": [1, 2, 3, 4, 5], "max_tokens": 2});
    let body = post(&app, "/v1/completions", request).await.json();
    assert_eq!(body["usage"]["prompt_tokens"], 5);
    assert_eq!(body["choices"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn embeddings_shape_and_unit_vectors() {
    let app = app(instant());
    let request = json!({"model": MODEL, "input": ["a cat", "a dog"], "dimensions": 4});
    let body = post(&app, "/v1/embeddings", request).await.json();
    insta::assert_json_snapshot!(body, {".id" => "[id]", ".created" => "[created]"});

    let full = post(&app, "/v1/embeddings", json!({"input": "a cat"})).await.json();
    let vector: Vec<f64> = full["data"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(vector.len(), 384);
    let norm = vector.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
}

#[tokio::test]
async fn embeddings_in_base64_decode_to_the_same_floats() {
    let app = app(instant());
    let floats = post(&app, "/v1/embeddings", json!({"input": "x", "dimensions": 8})).await.json();
    let encoded = post(
        &app,
        "/v1/embeddings",
        json!({"input": "x", "dimensions": 8, "encoding_format": "base64"}),
    )
    .await
    .json();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> =
        bytes.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let expected: Vec<f32> = floats["data"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(decoded, expected);
}

#[tokio::test]
async fn models_lists_the_served_model() {
    let body = get(&app(instant()), "/v1/models").await.json();
    insta::assert_json_snapshot!(body, {".data[].created" => "[created]"});
}

#[tokio::test]
async fn health_and_ping_answer_200_with_an_empty_body() {
    let app = app(instant());
    for path in ["/health", "/ping"] {
        let reply = get(&app, path).await;
        assert_eq!((reply.status, reply.body.as_str()), (StatusCode::OK, ""), "{path}");
    }
}

#[tokio::test]
async fn unknown_routes_get_fastapis_404() {
    let reply = get(&app(instant()), "/v2/nothing").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.json(), json!({"detail": "Not Found"}));
}

#[tokio::test]
async fn unknown_model_is_vllms_404() {
    let mut request = chat("hi");
    request["model"] = json!("gpt-17");
    let reply = post(&app(instant()), "/v1/chat/completions", request).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    insta::assert_json_snapshot!(reply.json(), @r#"
    {
      "code": 404,
      "message": "The model `gpt-17` does not exist.",
      "object": "error",
      "param": null,
      "type": "NotFoundError"
    }
    "#);
}

#[tokio::test]
async fn a_missing_model_means_the_served_one() {
    let reply = post(&app(instant()), "/v1/chat/completions", json!({"messages": []})).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["model"], MODEL);
}

#[tokio::test]
async fn malformed_bodies_are_vllms_400() {
    let app = app(instant());
    for (uri, body) in [
        ("/v1/chat/completions", "{not json"),
        ("/v1/chat/completions", r#"{"model":"sim-model"}"#),
        ("/v1/chat/completions", r#"{"messages":[],"max_tokens":-1}"#),
        ("/v1/completions", r#"{"prompt":{}}"#),
        ("/v1/embeddings", r#"{"input":[]}"#),
    ] {
        let request = axum::http::Request::post(uri).body(axum::body::Body::from(body)).unwrap();
        let response = tower::ServiceExt::oneshot(app.clone(), request).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{uri} {body}");
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let error: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(error["object"], "error");
        assert_eq!(error["type"], "BadRequestError");
        assert_eq!(error["code"], 400);
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
}

#[tokio::test]
async fn requests_beyond_the_context_window_are_400() {
    let mut config = instant();
    config.max_model_len = 10;
    let app = app(config);
    let mut request = chat("one two three four");
    request["max_tokens"] = json!(8);
    let reply = post(&app, "/v1/chat/completions", request).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        reply.json()["message"],
        "This model's maximum context length is 10 tokens. However, you requested 13 tokens \
         (5 in the messages, 8 in the completion). Please reduce the length of the messages or \
         completion."
    );
    let reply = post(&app, "/v1/chat/completions", json!({"messages": [], "max_tokens": 0})).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn token_caps_and_finish_reasons() {
    let app = app(instant());
    let usage_of = |body: &serde_json::Value| {
        let choice = &body["choices"][0];
        let text = choice["message"]["content"].as_str().or(choice["text"].as_str()).unwrap();
        assert_eq!(
            text.split(' ').count() as u64,
            body["usage"]["completion_tokens"].as_u64().unwrap()
        );
        (body["usage"]["completion_tokens"].as_u64().unwrap(), choice["finish_reason"].clone())
    };

    // No cap: the simulated model stops by itself after --output-tokens.
    let body = post(&app, "/v1/chat/completions", chat("hi")).await.json();
    assert_eq!(usage_of(&body), (16, json!("stop")));

    let mut capped = chat("hi");
    capped["max_tokens"] = json!(3);
    let body = post(&app, "/v1/chat/completions", capped.clone()).await.json();
    assert_eq!(usage_of(&body), (3, json!("length")));

    // max_completion_tokens wins over max_tokens, as in vLLM.
    capped["max_completion_tokens"] = json!(5);
    let body = post(&app, "/v1/chat/completions", capped).await.json();
    assert_eq!(usage_of(&body), (5, json!("length")));

    // ignore_eos runs to the cap; min_tokens lengthens the natural answer.
    let mut long = chat("hi");
    long["max_tokens"] = json!(40);
    long["ignore_eos"] = json!(true);
    let body = post(&app, "/v1/chat/completions", long).await.json();
    assert_eq!(usage_of(&body), (40, json!("length")));
    let request = json!({"prompt": "hi", "min_tokens": 20, "max_tokens": 100});
    let body = post(&app, "/v1/completions", request).await.json();
    assert_eq!(usage_of(&body), (20, json!("stop")));
}

#[tokio::test]
async fn prompt_tokens_are_words_plus_one_per_message() {
    let request = json!({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "three short words"},
                                     {"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "assistant", "content": null},
    ]});
    let body = post(&app(instant()), "/v1/chat/completions", request).await.json();
    assert_eq!(body["usage"]["prompt_tokens"], 2 + 3 + 3);
    assert_eq!(body["usage"]["total_tokens"], 8 + 16);
}

#[tokio::test]
async fn text_is_deterministic_per_prompt_and_seed() {
    let content = |body: serde_json::Value| body["choices"][0]["message"]["content"].clone();
    let app = app(instant());
    let first = content(post(&app, "/v1/chat/completions", chat("same prompt")).await.json());
    let again = content(post(&app, "/v1/chat/completions", chat("same prompt")).await.json());
    let other = content(post(&app, "/v1/chat/completions", chat("other prompt")).await.json());
    assert_eq!(first, again);
    assert_ne!(first, other);

    let restarted = support::app(instant());
    let body = post(&restarted, "/v1/chat/completions", chat("same prompt")).await.json();
    assert_eq!(content(body), first);

    let mut seeded = instant();
    seeded.seed = 42;
    let body = post(&support::app(seeded), "/v1/chat/completions", chat("same prompt")).await;
    assert_ne!(content(body.json()), first);
}

#[tokio::test]
async fn streamed_chat_transcript_ends_with_usage_then_done() {
    let mut request = chat("Stream me four words");
    request["stream"] = json!(true);
    request["max_tokens"] = json!(4);
    request["stream_options"] = json!({"include_usage": true});
    let reply = post(&app(instant()), "/v1/chat/completions", request).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["content-type"], "text/event-stream; charset=utf-8");
    let events = sse_events(&reply.body);
    insta::assert_json_snapshot!(events, {"[].id" => "[id]", "[].created" => "[created]"});

    let ids: Vec<_> = events.iter().filter_map(|e| e["id"].as_str()).collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "one id per stream");
}

#[tokio::test]
async fn streamed_text_equals_the_non_streamed_answer() {
    let app = app(instant());
    let full = post(&app, "/v1/chat/completions", chat("compare me")).await.json();
    let mut request = chat("compare me");
    request["stream"] = json!(true);
    let events = sse_events(&post(&app, "/v1/chat/completions", request).await.body);
    let streamed: String =
        events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, full["choices"][0]["message"]["content"].as_str().unwrap());
    // Without include_usage: finish chunk, then [DONE], and no usage anywhere.
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(events[events.len() - 2]["choices"][0]["finish_reason"], "stop");
    assert!(events.iter().all(|e| e.get("usage").is_none()));
}

#[tokio::test]
async fn streamed_completion_transcript() {
    let request = json!({"prompt": "Stream", "max_tokens": 2, "stream": true,
        "stream_options": {"include_usage": true}});
    let reply = post(&app(instant()), "/v1/completions", request).await;
    let events = sse_events(&reply.body);
    insta::assert_json_snapshot!(events, {"[].id" => "[id]", "[].created" => "[created]"});
}

#[tokio::test]
async fn metrics_count_tokens_and_outcomes() {
    let app = app(instant());
    let mut capped = chat("four words of prompt");
    capped["max_tokens"] = json!(2);
    post(&app, "/v1/chat/completions", capped).await;
    post(&app, "/v1/chat/completions", chat("hi")).await;

    let reply = get(&app, "/metrics").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.headers["content-type"].to_str().unwrap().starts_with("text/plain"));
    let page = reply.body;
    let counter = |name: &str| support::gauge(&page, name);
    assert_eq!(counter("vllm:prompt_tokens_total"), (5 + 2) as f64);
    assert_eq!(counter("vllm:generation_tokens_total"), (2 + 16) as f64);
    assert_eq!(counter("vllm:num_requests_running"), 0.0);
    assert_eq!(counter("vllm:num_requests_waiting"), 0.0);
    assert_eq!(counter("vllm:gpu_cache_usage_perc"), 0.0);
    assert_eq!(support::finished(&page, "length"), 1.0);
    assert_eq!(support::finished(&page, "stop"), 1.0);
    assert_eq!(counter("vllm:time_to_first_token_seconds_count"), 2.0);
    assert_eq!(counter("vllm:e2e_request_latency_seconds_count"), 2.0);
    let bucket =
        format!("vllm:e2e_request_latency_seconds_bucket{{le=\"+Inf\",model_name=\"{MODEL}\"}}");
    assert_eq!(support::sample(&page, &bucket), 2.0);
}
