//! Streams relayed end to end: the transcript, usage, keepalives, and clients that go away.

use std::time::{Duration, Instant};

use crate::fake_upstream::{Behavior, FakeUpstream, PROMPT_TOKENS};
use crate::harness::{chat_body, config, gateway_for, gateway_with, read_stream, replica};

#[tokio::test]
async fn an_sse_transcript_is_relayed_as_sent() {
    let upstream = FakeUpstream::start().await;
    upstream.set_tokens(2);
    let gw = gateway_for(vec![replica(upstream.addr, "served")], vec![]).await;
    let mut body = chat_body(true);
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let response = gw.chat(body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["cache-control"], "no-cache");
    assert!(response.headers().contains_key("x-request-id"));
    let t = read_stream(response).await;
    insta::assert_snapshot!(t.text, @r#"
    data: {"choices":[{"delta":{"content":"","role":"assistant"},"finish_reason":null,"index":0}],"created":1700000000,"id":"chatcmpl-fake","model":"served","object":"chat.completion.chunk"}

    data: {"choices":[{"delta":{"content":"tok0 "},"finish_reason":null,"index":0}],"created":1700000000,"id":"chatcmpl-fake","model":"served","object":"chat.completion.chunk"}

    data: {"choices":[{"delta":{"content":"tok1 "},"finish_reason":null,"index":0}],"created":1700000000,"id":"chatcmpl-fake","model":"served","object":"chat.completion.chunk"}

    data: {"choices":[{"delta":{},"finish_reason":"stop","index":0}],"created":1700000000,"id":"chatcmpl-fake","model":"served","object":"chat.completion.chunk"}

    data: {"choices":[],"created":1700000000,"id":"chatcmpl-fake","model":"served","object":"chat.completion.chunk","usage":{"completion_tokens":2,"prompt_tokens":7,"total_tokens":9}}

    data: [DONE]
    "#);
}

#[tokio::test]
async fn the_usage_chunk_the_client_did_not_ask_for_is_dropped_but_metered() {
    let upstream = FakeUpstream::start().await;
    upstream.set_tokens(5);
    let gw = gateway_for(vec![replica(upstream.addr, "m")], vec![]).await;
    let t = read_stream(gw.chat(chat_body(true)).send().await.unwrap()).await;
    assert!(t.has_done());
    assert!(!t.text.contains("usage"), "{}", t.text);
    assert_eq!(t.data().len(), 1 + 5 + 1 + 1, "role, tokens, finish, [DONE]");

    let response = gw.chat(chat_body(false)).send().await.unwrap();
    let v: serde_json::Value = response.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 5);

    let records = gw.records_eventually(2).await;
    for r in &records {
        assert_eq!((r.status, r.prompt_tokens, r.completion_tokens), (200, PROMPT_TOKENS, 5));
        assert_eq!(r.model, "chat");
    }
    assert_ne!(records[0].id, records[1].id);
    let metrics = gw.metrics().await;
    let route = &records[0].route;
    assert!(
        metrics
            .contains(&format!("gateway_tokens_total{{route=\"{route}\",kind=\"completion\"}} 10")),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("gateway_tokens_total{{route=\"{route}\",kind=\"prompt\"}} 14"))
    );
    assert!(
        metrics
            .contains(&format!("gateway_time_to_first_token_seconds_count{{route=\"{route}\"}} 2"))
    );
}

#[tokio::test]
async fn keepalives_are_sent_while_the_first_token_is_awaited() {
    let upstream = FakeUpstream::start().await;
    upstream.always(Behavior::FirstTokenAfter(Duration::from_millis(450)));
    let mut config = config();
    config.keepalive = Duration::from_millis(100);
    let gw = gateway_with(config, vec![replica(upstream.addr, "m")], vec![]).await;
    let t = read_stream(gw.chat(chat_body(true)).send().await.unwrap()).await;
    assert!(t.has_done());
    let keepalives = t.text.matches(": keepalive\n\n").count();
    assert!((3..=5).contains(&keepalives), "{keepalives}: {}", t.text);
    let first_token = t.text.find("tok0").unwrap();
    assert!(t.text.rfind(": keepalive").unwrap() < first_token, "none after the first token");
}

#[tokio::test]
async fn a_client_that_goes_away_mid_stream_cancels_the_upstream_at_once() {
    let upstream = FakeUpstream::start().await;
    upstream.always(Behavior::Slow { n: 1000, every: Duration::from_millis(20) });
    let target = replica(upstream.addr, "m");
    let gw = gateway_for(vec![target.clone()], vec![]).await;
    let mut response = gw.chat(chat_body(true)).send().await.unwrap();
    let mut received = String::new();
    while received.matches("tok").count() < 5 {
        received.push_str(std::str::from_utf8(&response.chunk().await.unwrap().unwrap()).unwrap());
    }
    let dropped = Instant::now();
    drop(response);

    let closed = upstream
        .wait_closed(Duration::from_secs(2))
        .await
        .expect("the upstream connection was closed");
    assert!(
        closed.duration_since(dropped) < Duration::from_millis(100),
        "{:?}",
        closed.duration_since(dropped)
    );
    let records = gw.records_eventually(1).await;
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r.status, 499);
    assert_eq!(r.target, target.label);
    // The role chunk and the tokens relayed so far (a few more may have been in flight).
    assert!((6..=12).contains(&r.completion_tokens), "{}", r.completion_tokens);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(&format!("gateway_in_flight{{target=\"{}\"}} 0", target.label)),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_client_that_goes_away_while_waiting_cancels_the_upstream_at_once() {
    let upstream = FakeUpstream::start().await;
    upstream.always(Behavior::Hang);
    let mut config = config();
    config.try_timeout = Duration::from_secs(10);
    let target = replica(upstream.addr, "m");
    let gw = gateway_with(config, vec![target.clone()], vec![]).await;
    let request = gw.chat(chat_body(false)).timeout(Duration::from_millis(300)).send();
    assert!(request.await.unwrap_err().is_timeout());
    let gave_up = Instant::now();
    let closed = upstream
        .wait_closed(Duration::from_secs(2))
        .await
        .expect("the upstream connection was closed");
    assert!(closed.duration_since(gave_up) < Duration::from_millis(100));
    let records = gw.records_eventually(1).await;
    assert_eq!((records[0].status, records[0].completion_tokens), (499, 0));
    assert_eq!(upstream.requests(), 1);
}
