//! Every upstream failure, before the first byte reaches the client (retried or failed over)
//! and mid-stream (the stream ends with an error event and no `[DONE]`, nothing is retried).

use std::time::{Duration, Instant};

use crate::fake_upstream::{Behavior, FakeUpstream};
use crate::harness::{chat_body, config, gateway_for, gateway_with, read_stream, replica};

/// The primary fails with `fault`; the fallback answers. One attempt each.
async fn fails_over(fault: Behavior, stream: bool) {
    let primary = FakeUpstream::start().await;
    primary.always(fault);
    let fallback = FakeUpstream::start().await;
    let fallback_target = replica(fallback.addr, "m");
    let gw = gateway_for(vec![replica(primary.addr, "m")], vec![fallback_target.clone()]).await;

    let response = gw.chat(chat_body(stream)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    if stream {
        let t = read_stream(response).await;
        assert!(t.has_done(), "{}", t.text);
        assert!(t.error_events().is_empty(), "{}", t.text);
    } else {
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["usage"]["completion_tokens"], 3);
    }
    assert_eq!((primary.requests(), fallback.requests()), (1, 1));
    let records = gw.records_eventually(1).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].status, 200);
    assert_eq!(records[0].target, fallback_target.label);
    assert!(
        gw.metrics()
            .await
            .contains(&format!("gateway_fallbacks_total{{route=\"{}\"}} 1", records[0].route))
    );
}

/// The only target fails once with `fault`, then answers: two attempts.
async fn retries_the_only_target(fault: Behavior, stream: bool) {
    let upstream = FakeUpstream::start().await;
    upstream.script([fault]);
    let gw = gateway_for(vec![replica(upstream.addr, "m")], vec![]).await;
    let response = gw.chat(chat_body(stream)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    if stream {
        assert!(read_stream(response).await.has_done());
    }
    assert_eq!(upstream.requests(), 2);
}

#[tokio::test]
async fn refused_before_the_first_byte_fails_over() {
    for stream in [false, true] {
        let fallback = FakeUpstream::start().await;
        let closed = FakeUpstream::closed_port().await;
        let gw = gateway_for(vec![replica(closed, "m")], vec![replica(fallback.addr, "m")]).await;
        let response = gw.chat(chat_body(stream)).send().await.unwrap();
        assert_eq!(response.status(), 200);
        if stream {
            assert!(read_stream(response).await.has_done());
        }
        assert_eq!(fallback.requests(), 1);
    }
}

#[tokio::test]
async fn hang_before_the_head_times_out_and_fails_over() {
    let started = Instant::now();
    fails_over(Behavior::Hang, false).await;
    fails_over(Behavior::Hang, true).await;
    // Two per-try timeouts of 500 ms, not the overall one.
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn hang_after_the_head_of_an_answer_times_out_and_fails_over() {
    fails_over(Behavior::HangAfterHead, false).await;
}

#[tokio::test]
async fn reset_before_the_first_byte_fails_over() {
    fails_over(Behavior::Reset, false).await;
    fails_over(Behavior::Reset, true).await;
}

#[tokio::test]
async fn status_500_fails_over() {
    fails_over(Behavior::Status(500, None), false).await;
    fails_over(Behavior::Status(500, None), true).await;
}

#[tokio::test]
async fn status_429_fails_over_without_waiting() {
    let started = Instant::now();
    fails_over(Behavior::Status(429, Some("30")), false).await;
    fails_over(Behavior::Status(429, Some("30")), true).await;
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn malformed_answer_fails_over() {
    fails_over(Behavior::Malformed, false).await;
}

#[tokio::test]
async fn cut_answer_fails_over() {
    fails_over(Behavior::Cut, false).await;
}

#[tokio::test]
async fn endless_answer_fails_over() {
    let primary = FakeUpstream::start().await;
    primary.always(Behavior::EndlessLine);
    let fallback = FakeUpstream::start().await;
    let mut config = config();
    config.max_response_bytes = 1 << 20;
    let gw =
        gateway_with(config, vec![replica(primary.addr, "m")], vec![replica(fallback.addr, "m")])
            .await;
    let response = gw.chat(chat_body(false)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!((primary.requests(), fallback.requests()), (1, 1));
}

#[tokio::test]
async fn the_only_target_is_tried_twice() {
    retries_the_only_target(Behavior::Status(500, None), false).await;
    retries_the_only_target(Behavior::Reset, true).await;
    retries_the_only_target(Behavior::Hang, false).await;
}

#[tokio::test]
async fn retry_after_is_honoured_on_the_only_target() {
    let started = Instant::now();
    retries_the_only_target(Behavior::Status(429, Some("1")), false).await;
    assert!(started.elapsed() >= Duration::from_secs(1));
}

#[tokio::test]
async fn a_retry_after_past_the_deadline_is_passed_to_the_client() {
    let upstream = FakeUpstream::start().await;
    upstream.always(Behavior::Status(429, Some("60")));
    let gw = gateway_for(vec![replica(upstream.addr, "m")], vec![]).await;
    let started = Instant::now();
    let response = gw.chat(chat_body(false)).send().await.unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "60");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(upstream.requests(), 1);
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn a_4xx_is_passed_through_and_never_retried() {
    let upstream = FakeUpstream::start().await;
    upstream.always(Behavior::Status(400, None));
    let fallback = FakeUpstream::start().await;
    let gw =
        gateway_for(vec![replica(upstream.addr, "m")], vec![replica(fallback.addr, "m")]).await;
    let response = gw.chat(chat_body(true)).send().await.unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["message"], "fake failure");
    assert_eq!((upstream.requests(), fallback.requests()), (1, 0));
    assert_eq!(gw.records_eventually(1).await[0].status, 400);
}

#[tokio::test]
async fn every_target_failing_is_a_502_or_504_in_openai_shape() {
    let a = FakeUpstream::start().await;
    a.always(Behavior::Status(500, None));
    let b = FakeUpstream::start().await;
    b.always(Behavior::Reset);
    let gw = gateway_for(vec![replica(a.addr, "m")], vec![replica(b.addr, "m")]).await;
    let response = gw.chat(chat_body(false)).send().await.unwrap();
    assert_eq!(response.status(), 502);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "api_error");
    assert_eq!(body["error"]["code"], "bad_gateway");
    assert_eq!((a.requests(), b.requests()), (1, 1));

    let a = FakeUpstream::start().await;
    a.always(Behavior::Hang);
    let b = FakeUpstream::start().await;
    b.always(Behavior::Hang);
    let gw = gateway_for(vec![replica(a.addr, "m")], vec![replica(b.addr, "m")]).await;
    let response = gw.chat(chat_body(true)).send().await.unwrap();
    assert_eq!(response.status(), 504);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "timeout");
    assert_eq!(gw.records_eventually(1).await[0].status, 504);
}

/// The primary fails mid-stream: the client gets the events so far, one error event, and no
/// `[DONE]`; the fallback is never asked.
async fn ends_mid_stream(fault: Behavior, status: u16, code: &str) -> crate::harness::Transcript {
    let primary = FakeUpstream::start().await;
    primary.always(fault);
    let fallback = FakeUpstream::start().await;
    let mut config = config();
    config.overall_timeout = Duration::from_millis(1500);
    config.keepalive = Duration::from_millis(200);
    config.max_line_bytes = 64 * 1024;
    let gw =
        gateway_with(config, vec![replica(primary.addr, "m")], vec![replica(fallback.addr, "m")])
            .await;

    let response = gw.chat(chat_body(true)).send().await.unwrap();
    assert_eq!(response.status(), 200, "the head went out before the failure");
    let t = read_stream(response).await;
    assert!(!t.has_done(), "{}", t.text);
    let errors = t.error_events();
    assert_eq!(errors.len(), 1, "{}", t.text);
    assert_eq!(errors[0]["error"]["code"], code);
    assert!(t.text.ends_with("\n\n"));
    assert_eq!((primary.requests(), fallback.requests()), (1, 0), "no retry after the first byte");
    let records = gw.records_eventually(1).await;
    assert_eq!(records[0].status, status);
    t
}

#[tokio::test]
async fn reset_mid_stream_ends_with_an_error_event() {
    let t = ends_mid_stream(Behavior::ResetMidStream, 502, "bad_gateway").await;
    assert_eq!(t.data().iter().filter(|d| d.contains("tok")).count(), 2);
}

#[tokio::test]
async fn cut_mid_stream_ends_with_an_error_event() {
    ends_mid_stream(Behavior::Cut, 502, "bad_gateway").await;
}

#[tokio::test]
async fn an_end_without_done_is_an_error() {
    ends_mid_stream(Behavior::EndWithoutDone, 502, "bad_gateway").await;
}

#[tokio::test]
async fn malformed_event_mid_stream_ends_with_an_error_event() {
    let t = ends_mid_stream(Behavior::Malformed, 502, "bad_gateway").await;
    assert!(!t.text.contains("nope"), "the malformed event is not relayed");
}

#[tokio::test]
async fn an_endless_line_ends_with_an_error_event() {
    let t = ends_mid_stream(Behavior::EndlessLine, 502, "bad_gateway").await;
    assert!(t.text.len() < 64 * 1024, "the partial line is not relayed");
}

#[tokio::test]
async fn hang_mid_stream_ends_after_a_silence_of_the_try_timeout() {
    let started = Instant::now();
    let t = ends_mid_stream(Behavior::HangMidStream, 504, "timeout").await;
    assert!(!t.text.contains(": keepalive"), "no keepalive once tokens flow");
    // The try timeout (500 ms) of silence, well before the overall timeout (1.5 s).
    assert!(started.elapsed() < Duration::from_millis(1200), "{:?}", started.elapsed());
}

#[tokio::test]
async fn a_stream_that_keeps_producing_outlives_the_overall_timeout() {
    let upstream = FakeUpstream::start().await;
    upstream.always(Behavior::Slow { n: 30, every: Duration::from_millis(50) });
    let mut config = config();
    config.overall_timeout = Duration::from_millis(800);
    let gw = gateway_with(config, vec![replica(upstream.addr, "m")], vec![]).await;
    let t = read_stream(gw.chat(chat_body(true)).send().await.unwrap()).await;
    assert!(t.has_done(), "{}", t.text);
    assert_eq!(gw.records_eventually(1).await[0].completion_tokens, 30);
}

#[tokio::test]
async fn hang_after_the_head_of_a_stream_sends_keepalives_then_times_out() {
    let t = ends_mid_stream(Behavior::HangAfterHead, 504, "timeout").await;
    assert!(t.text.matches(": keepalive\n\n").count() >= 3, "{}", t.text);
}
