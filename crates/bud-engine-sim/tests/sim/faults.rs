//! Each fault switch, from the command-line configuration and at run time through
//! `/sim/faults`.

use std::time::Duration;

use axum::http::StatusCode;
use bud_engine_sim::{Faults, SimConfig};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::support::{Served, app, chat, eventually, finished, gauge, get, instant, post};

#[tokio::test]
async fn error_rate_one_answers_every_request_with_vllms_500() {
    let mut config = instant();
    config.faults.error_rate = 1.0;
    let app = app(config);
    for uri in ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"] {
        let body = json!({"messages": [], "prompt": "x", "input": "x"});
        let reply = post(&app, uri, body).await;
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR, "{uri}");
        assert!(reply.headers.get("retry-after").is_none());
        insta::allow_duplicates! {
            insta::assert_json_snapshot!(reply.json(), @r#"
            {
              "code": 500,
              "message": "simulated engine error (error-rate fault)",
              "object": "error",
              "param": null,
              "type": "InternalServerError"
            }
            "#);
        }
    }
    // Health and metrics still answer: the fault is in the engine, not the server.
    assert_eq!(get(&app, "/health").await.status, StatusCode::OK);
}

#[tokio::test]
async fn error_rate_half_fails_about_half() {
    let mut config = instant();
    config.faults.error_rate = 0.5;
    let app = app(config);
    let mut failed = 0;
    for _ in 0..200 {
        if post(&app, "/v1/chat/completions", chat("x")).await.status != StatusCode::OK {
            failed += 1;
        }
    }
    assert!((70..=130).contains(&failed), "{failed} of 200 failed");
}

#[tokio::test]
async fn error_status_429_says_retry_after() {
    let mut config = instant();
    config.faults.error_rate = 1.0;
    config.faults.error_status = 429;
    let reply = post(&app(config), "/v1/chat/completions", chat("x")).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.headers["retry-after"], "1");
    assert_eq!(reply.json()["type"], "RateLimitError");
    assert_eq!(reply.json()["code"], 429);
}

#[tokio::test]
async fn faults_are_read_and_replaced_at_run_time() {
    let app = app(instant());
    assert_eq!(
        get(&app, "/sim/faults").await.json(),
        serde_json::to_value(Faults::default()).unwrap()
    );

    let set = post(&app, "/sim/faults", json!({"error_rate": 1.0, "error_status": 503})).await;
    assert_eq!(set.status, StatusCode::OK);
    assert_eq!(set.json()["error_status"], 503);
    assert_eq!(get(&app, "/sim/faults").await.json()["error_rate"], 1.0);
    let reply = post(&app, "/v1/chat/completions", chat("x")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);

    // An empty body clears every fault.
    assert_eq!(post(&app, "/sim/faults", json!({})).await.status, StatusCode::OK);
    assert_eq!(post(&app, "/v1/chat/completions", chat("x")).await.status, StatusCode::OK);

    for bad in [json!({"error_rate": 2.0}), json!({"error_status": 200}), json!({"hnag": true})] {
        let reply = post(&app, "/sim/faults", bad.clone()).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(reply.json()["type"], "BadRequestError");
    }
}

#[tokio::test]
async fn hang_accepts_requests_but_never_answers() {
    let mut config = instant();
    config.faults.hang = true;
    let engine = Served::start(config).await;

    let error = engine
        .post("/v1/chat/completions", &chat("anyone?"))
        .timeout(Duration::from_millis(300))
        .send()
        .await
        .unwrap_err();
    assert!(error.is_timeout(), "{error}");
    // A hung request holds no slot and is not queued.
    let page = engine.metrics().await;
    assert_eq!(gauge(&page, "vllm:num_requests_running"), 0.0);
    assert_eq!(gauge(&page, "vllm:num_requests_waiting"), 0.0);

    // A request hung when the engine stops is let go, and the stop is not held up.
    let hung = tokio::spawn(engine.post("/v1/chat/completions", &chat("still there?")).send());
    tokio::time::sleep(Duration::from_millis(100)).await;

    let cleared =
        engine.client.post(format!("{}/sim/faults", engine.url)).json(&json!({})).send().await;
    assert_eq!(cleared.unwrap().status(), 200);
    let answered = engine.post("/v1/chat/completions", &chat("now?")).send().await.unwrap();
    assert_eq!(answered.status(), 200);

    engine.stop().await.unwrap();
    let hung = hung.await.unwrap().unwrap();
    assert_eq!(hung.status(), 503);
}

#[tokio::test]
async fn cut_stream_after_ends_streams_abruptly_without_done() {
    let mut config = instant();
    config.itl_ms = 10;
    config.faults.cut_stream_after = Some(3);
    let engine = Served::start(config).await;

    let mut request = chat("cut me");
    request["stream"] = json!(true);
    let mut response = engine.post("/v1/chat/completions", &request).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = String::new();
    let ending = loop {
        match response.chunk().await {
            Ok(Some(chunk)) => body.push_str(std::str::from_utf8(&chunk).unwrap()),
            Ok(None) => break Ok(()),
            Err(error) => break Err(error),
        }
    };
    assert!(ending.is_err(), "the stream ended cleanly: {body}");
    assert!(!body.contains("[DONE]"), "{body}");
    assert_eq!(body.matches("data: ").count(), 3, "{body}");

    eventually(Duration::from_secs(1), "running back to 0", || async {
        gauge(&engine.metrics().await, "vllm:num_requests_running") == 0.0
    })
    .await;
    assert_eq!(finished(&engine.metrics().await, "abort"), 1.0);

    // Non-streaming answers are not affected.
    let plain = engine.post("/v1/chat/completions", &chat("whole")).send().await.unwrap();
    assert_eq!(plain.status(), 200);
    engine.stop().await.unwrap();
}

#[tokio::test]
async fn crash_after_n_completed_requests_makes_run_fail() {
    let mut config = instant();
    config.faults.crash_after = Some(2);
    let mut engine = Served::start(config).await;

    for i in 0..2 {
        let response =
            engine.post("/v1/chat/completions", &chat(&format!("{i}"))).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.json::<serde_json::Value>().await.is_ok());
    }
    let result = tokio::time::timeout(Duration::from_secs(2), &mut engine.task)
        .await
        .expect("run did not return after the crash")
        .unwrap();
    let error = result.unwrap_err();
    assert!(error.to_string().contains("crash"), "{error}");

    // Gone for pooled connections and new ones alike.
    let after = engine.post("/v1/chat/completions", &chat("anyone?")).send().await;
    assert!(after.is_err(), "the crashed engine answered: {after:?}");
    let fresh = reqwest::Client::new().get(format!("{}/health", engine.url)).send().await;
    assert!(fresh.unwrap_err().is_connect());
}

#[tokio::test]
async fn fail_start_returns_an_error_before_listening() {
    let mut config = SimConfig::new("m");
    config.fail_start = true;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(1),
        bud_engine_sim::run(config, listener, CancellationToken::new()),
    )
    .await
    .expect("fail-start did not fail at once");
    assert!(result.unwrap_err().to_string().contains("fail-start"));
}

#[tokio::test]
async fn invalid_faults_on_the_command_line_fail_the_start() {
    let mut config = SimConfig::new("m");
    config.faults.error_rate = 1.5;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let result = bud_engine_sim::run(config, listener, CancellationToken::new()).await;
    assert!(result.unwrap_err().to_string().contains("error_rate"));
}

#[tokio::test]
async fn start_delay_refuses_connections_until_it_listens() {
    let mut config = instant();
    config.start_delay_ms = 400;
    let start = Instant::now();
    let engine = Served::start(config).await;
    let health = format!("{}/health", engine.url);

    let early = engine.client.get(&health).send().await;
    assert!(early.unwrap_err().is_connect(), "answered during the start delay");
    eventually(Duration::from_secs(3), "listening after the delay", || async {
        engine.client.get(&health).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(start.elapsed() >= Duration::from_millis(400));
    engine.stop().await.unwrap();
}
