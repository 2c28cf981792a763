//! Continuous batching in-process: at most `max_num_seqs` generate, the rest wait in order,
//! and a request that goes away leaves the counts.

use std::time::Duration;

use axum::http::StatusCode;
use tokio::time::Instant;

use crate::support::{app, chat, eventually, gauge, get, instant, post};

#[tokio::test]
async fn requests_beyond_max_num_seqs_wait_their_turn() {
    let mut config = instant();
    config.max_num_seqs = 2;
    config.ttft_ms = 200;
    let app = app(config);

    let start = Instant::now();
    let requests: Vec<_> = (0..4)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move {
                let reply = post(&app, "/v1/chat/completions", chat(&format!("request {i}"))).await;
                (reply.status, start.elapsed())
            })
        })
        .collect();

    eventually(Duration::from_secs(2), "running 2, waiting 2", || async {
        let page = get(&app, "/metrics").await.body;
        gauge(&page, "vllm:num_requests_running") == 2.0
            && gauge(&page, "vllm:num_requests_waiting") == 2.0
    })
    .await;
    let page = get(&app, "/metrics").await.body;
    assert_eq!(gauge(&page, "vllm:gpu_cache_usage_perc"), 1.0);

    let mut latencies = Vec::new();
    for request in requests {
        let (status, latency) = request.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        latencies.push(latency);
    }
    latencies.sort();
    // Two ran in the first batch; the other two waited for it.
    assert!(latencies[1] < Duration::from_millis(390), "{latencies:?}");
    assert!(latencies[2] >= Duration::from_millis(400), "{latencies:?}");

    let page = get(&app, "/metrics").await.body;
    assert_eq!(gauge(&page, "vllm:num_requests_running"), 0.0);
    assert_eq!(gauge(&page, "vllm:num_requests_waiting"), 0.0);
    assert_eq!(crate::support::finished(&page, "stop"), 4.0);
}

#[tokio::test]
async fn a_dropped_request_leaves_the_batch_and_the_queue() {
    let mut config = instant();
    config.max_num_seqs = 1;
    config.ttft_ms = 60_000;
    let app = app(config);

    let running = tokio::spawn({
        let app = app.clone();
        async move { post(&app, "/v1/chat/completions", chat("first")).await }
    });
    let waiting = tokio::spawn({
        let app = app.clone();
        async move { post(&app, "/v1/chat/completions", chat("second")).await }
    });
    eventually(Duration::from_secs(2), "running 1, waiting 1", || async {
        let page = get(&app, "/metrics").await.body;
        gauge(&page, "vllm:num_requests_running") == 1.0
            && gauge(&page, "vllm:num_requests_waiting") == 1.0
    })
    .await;

    waiting.abort();
    eventually(Duration::from_secs(1), "waiting back to 0", || async {
        gauge(&get(&app, "/metrics").await.body, "vllm:num_requests_waiting") == 0.0
    })
    .await;
    running.abort();
    eventually(Duration::from_secs(1), "running back to 0", || async {
        gauge(&get(&app, "/metrics").await.body, "vllm:num_requests_running") == 0.0
    })
    .await;
    let page = get(&app, "/metrics").await.body;
    assert_eq!(crate::support::finished(&page, "abort"), 1.0);
}
