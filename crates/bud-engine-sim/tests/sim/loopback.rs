//! The engine served by `run` on a loopback port: pacing of streams, clients that go away, and
//! graceful shutdown.

use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::support::{MODEL, Served, chat, eventually, finished, gauge, instant, sse_events};

fn streaming(content: &str, max_tokens: u32) -> serde_json::Value {
    let mut request = chat(content);
    request["stream"] = json!(true);
    request["max_tokens"] = json!(max_tokens);
    request["stream_options"] = json!({"include_usage": true});
    request
}

#[tokio::test]
async fn streams_are_paced_by_ttft_and_itl_and_end_with_usage_then_done() {
    let mut config = instant();
    config.ttft_ms = 100;
    config.itl_ms = 30;
    let engine = Served::start(config).await;

    let start = Instant::now();
    let mut response =
        engine.post("/v1/chat/completions", &streaming("pace me", 4)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = String::new();
    let mut first_at = None;
    while let Some(chunk) = response.chunk().await.unwrap() {
        first_at.get_or_insert(start.elapsed());
        body.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let total = start.elapsed();
    let first_at = first_at.unwrap();
    assert!(first_at >= Duration::from_millis(100), "first token after {first_at:?}");
    assert!(total >= Duration::from_millis(100 + 3 * 30), "whole stream in {total:?}");

    let events = sse_events(&body);
    // Role, four tokens, finish, usage, [DONE].
    assert_eq!(events.len(), 8, "{events:#?}");
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(events[5]["choices"][0]["finish_reason"], "length");
    assert_eq!(events[6]["choices"], json!([]));
    assert_eq!(events[6]["usage"]["completion_tokens"], 4);
    assert_eq!(events[7], "[DONE]");
    engine.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_frees_its_slot_within_100ms() {
    let mut config = instant();
    config.itl_ms = 20;
    config.output_tokens = 5000;
    let engine = Served::start(config).await;

    let mut request = chat("a long answer");
    request["stream"] = json!(true);
    let mut response = engine.post("/v1/chat/completions", &request).send().await.unwrap();
    let first = response.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    assert_eq!(gauge(&engine.metrics().await, "vllm:num_requests_running"), 1.0);

    drop(response);
    let took = eventually(Duration::from_millis(100), "running back to 0", || async {
        gauge(&engine.metrics().await, "vllm:num_requests_running") == 0.0
    })
    .await;
    eprintln!("slot freed {took:?} after the disconnect");
    let page = engine.metrics().await;
    assert_eq!(finished(&page, "abort"), 1.0);
    let generated = gauge(&page, "vllm:generation_tokens_total");
    assert!(generated < 100.0, "generation went on: {generated} tokens");
    engine.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_that_times_out_on_a_plain_request_frees_its_slot() {
    let mut config = instant();
    config.ttft_ms = 60_000;
    let engine = Served::start(config).await;

    let error = engine
        .post("/v1/chat/completions", &chat("slow"))
        .timeout(Duration::from_millis(200))
        .send()
        .await
        .unwrap_err();
    assert!(error.is_timeout(), "{error}");
    eventually(Duration::from_secs(1), "running back to 0", || async {
        gauge(&engine.metrics().await, "vllm:num_requests_running") == 0.0
    })
    .await;
    engine.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_lets_streams_in_flight_finish() {
    let mut config = instant();
    config.itl_ms = 20;
    let engine = Served::start(config).await;

    let mut response =
        engine.post("/v1/chat/completions", &streaming("finish me", 10)).send().await.unwrap();
    let mut body = String::from_utf8(response.chunk().await.unwrap().unwrap().to_vec()).unwrap();
    engine.shutdown.cancel();
    while let Some(chunk) = response.chunk().await.unwrap() {
        body.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    engine.stop().await.unwrap();
}

#[tokio::test]
async fn models_and_health_over_http() {
    let engine = Served::start(instant()).await;
    let models: serde_json::Value = engine
        .client
        .get(format!("{}/v1/models", engine.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
    let health = engine.client.get(format!("{}/health", engine.url)).send().await.unwrap();
    assert_eq!(health.status(), 200);
    engine.stop().await.unwrap();
}
