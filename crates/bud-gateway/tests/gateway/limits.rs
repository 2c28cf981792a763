//! Requests and tokens per minute, per key and per route, with OpenAI's headers.

use crate::fake_upstream::FakeUpstream;
use crate::harness::{TestGateway, World, chat_body, config, replica, route};

#[tokio::test]
async fn a_spent_request_limit_is_a_429_with_retry_after_and_headers() {
    let upstream = FakeUpstream::start().await;
    let mut world = World::new(vec![route("chat", vec![replica(upstream.addr, "m")], vec![])]);
    world.key.rpm = Some(2);
    let gw = TestGateway::spawn(config(), world.snapshot()).await;

    for remaining in ["1", "0"] {
        let r = gw.chat(chat_body(false)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-ratelimit-limit-requests"], "2");
        assert_eq!(r.headers()["x-ratelimit-remaining-requests"], remaining);
        assert!(r.headers().contains_key("x-ratelimit-reset-requests"));
        assert!(!r.headers().contains_key("x-ratelimit-limit-tokens"));
    }
    let r = gw.chat(chat_body(true)).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let retry_after: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((29..=30).contains(&retry_after), "{retry_after}");
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
    let reset = r.headers()["x-ratelimit-reset-requests"].to_str().unwrap().to_owned();
    assert!(reset.ends_with('s'), "{reset}");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "requests");
    assert_eq!(upstream.requests(), 2);
    let records = gw.records_eventually(3).await;
    assert_eq!(records.iter().map(|r| r.status).collect::<Vec<_>>(), [200, 200, 429]);
}

#[tokio::test]
async fn a_route_limit_applies_to_every_key() {
    let upstream = FakeUpstream::start().await;
    let mut limited = route("chat", vec![replica(upstream.addr, "m")], vec![]);
    limited.rpm = Some(1);
    let world = World::new(vec![limited]);
    let gw = TestGateway::spawn(config(), world.snapshot()).await;
    assert_eq!(gw.chat(chat_body(false)).send().await.unwrap().status(), 200);
    let r = gw.chat(chat_body(false)).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-ratelimit-limit-requests"], "1");
}

#[tokio::test]
async fn a_key_over_its_token_budget_is_refused_until_it_recovers() {
    let upstream = FakeUpstream::start().await;
    let mut world = World::new(vec![route("chat", vec![replica(upstream.addr, "m")], vec![])]);
    // Each answer uses 7 + 3 = 10 tokens.
    world.key.tpm = Some(12);
    let gw = TestGateway::spawn(config(), world.snapshot()).await;
    let r = gw.chat(chat_body(false)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-limit-tokens"], "12");
    assert_eq!(r.headers()["x-ratelimit-remaining-tokens"], "12", "charged after the answer");
    let r = gw.chat(chat_body(true)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-remaining-tokens"], "2");
    r.text().await.unwrap();
    let r = gw.chat(chat_body(false)).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "tokens");
    assert_eq!(upstream.requests(), 2);
}
