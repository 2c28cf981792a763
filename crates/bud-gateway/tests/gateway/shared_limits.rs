//! Rate limits shared through Redis by two gateways (two listeners, one snapshot, one Redis),
//! and what each gateway does while Redis is unreachable: its share of every limit, or 503.
//!
//! The tests that need a Redis read it from `BUD_TEST_REDIS_URL` (`.ci/run` sets it) and say
//! they are skipped without it; those that need an unreachable one point at a closed port.
//! Every test counts under a key prefix of its own.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bud_gateway::GatewayConfig;
use bud_gateway::config::{OnUnreachable, RedisLimits};
use futures::future::join_all;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::fake_upstream::FakeUpstream;
use crate::harness::{TestGateway, World, chat_body, config, replica, route};

/// The Redis of the tests; `None` (and a line saying the test is skipped) when unset.
fn redis_url(test: &str) -> Option<String> {
    let url = std::env::var("BUD_TEST_REDIS_URL").ok().filter(|u| !u.is_empty());
    if url.is_none() {
        eprintln!("{test}: skipped, BUD_TEST_REDIS_URL is not set");
    }
    url
}

fn prefix() -> String {
    format!("bud-test-{}", uuid::Uuid::new_v4())
}

/// Limits counted in the Redis at `url` under `prefix`.
fn shared(url: &str, prefix: &str, on_unreachable: OnUnreachable) -> GatewayConfig {
    let mut redis = RedisLimits::new(url, on_unreachable);
    redis.key_prefix = prefix.to_owned();
    // A loaded test machine is not an outage; with fail-closed, a slow Redis would show as a
    // 503, never as extra admissions.
    redis.timeout = Duration::from_secs(2);
    redis.probe_interval = Duration::from_millis(100);
    GatewayConfig { redis: Some(redis), ..config() }
}

async fn closed_port_url() -> String {
    format!("redis://{}", FakeUpstream::closed_port().await)
}

#[tokio::test]
async fn two_gateways_share_one_request_limit() {
    let Some(url) = redis_url("two_gateways_share_one_request_limit") else { return };
    let upstream = FakeUpstream::start().await;
    let mut world = World::new(vec![route("chat", vec![replica(upstream.addr, "m")], vec![])]);
    world.key.rpm = Some(10);
    let config = shared(&url, &prefix(), OnUnreachable::FailClosed);
    let a = TestGateway::spawn(config.clone(), world.snapshot()).await;
    let b = TestGateway::spawn(config, world.snapshot()).await;

    // Concurrently, alternating between the two gateways.
    let sent = (0..24).map(|i| if i % 2 == 0 { &a } else { &b }.chat(chat_body(false)).send());
    let responses: Vec<reqwest::Response> =
        join_all(sent).await.into_iter().map(Result::unwrap).collect();
    let codes: Vec<u16> = responses.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(codes.iter().filter(|&&s| s == 200).count(), 10, "{codes:?}");
    assert_eq!(codes.iter().filter(|&&s| s == 429).count(), 14, "{codes:?}");
    for r in &responses {
        assert_eq!(r.headers()["x-ratelimit-limit-requests"], "10");
        if r.status() == 429 {
            let retry_after: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
            // One request refills every 6 s.
            assert!((1..=6).contains(&retry_after), "{retry_after}");
            assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
        }
    }
    assert_eq!(upstream.requests(), 10);
    let (ra, rb) = (a.records_eventually(12).await, b.records_eventually(12).await);
    assert_eq!(ra.len() + rb.len(), 24);
    let body: serde_json::Value =
        responses.into_iter().find(|r| r.status() == 429).unwrap().json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "requests");
}

#[tokio::test]
async fn two_gateways_share_one_token_budget() {
    let Some(url) = redis_url("two_gateways_share_one_token_budget") else { return };
    let upstream = FakeUpstream::start().await;
    let mut world = World::new(vec![route("chat", vec![replica(upstream.addr, "m")], vec![])]);
    // Each answer uses 7 + 3 = 10 tokens: three fit under 25 (the third overdraws it).
    world.key.tpm = Some(25);
    let prefix = prefix();
    let config = shared(&url, &prefix, OnUnreachable::FailClosed);
    let a = TestGateway::spawn(config.clone(), world.snapshot()).await;
    let b = TestGateway::spawn(config, world.snapshot()).await;
    let tokens_cell = format!("{prefix}:gcra:key-tpm:{}", world.key.id);
    let redis = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let charged = move || {
        let cell = tokens_cell.clone();
        let mut redis = redis.clone();
        async move { redis::cmd("GET").arg(&cell).query_async::<Option<i64>>(&mut redis).await.unwrap() }
    };

    let mut remaining = Vec::new();
    for gw in [&a, &b, &a] {
        let before = charged().await;
        let r = gw.chat(chat_body(false)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        remaining.push(r.headers()["x-ratelimit-remaining-tokens"].to_str().unwrap().to_owned());
        // Charges go to Redis off the request's path: wait for this one to land.
        let deadline = Instant::now() + Duration::from_secs(3);
        while charged().await == before {
            assert!(Instant::now() < deadline, "the charge never reached redis");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(remaining, ["25", "15", "5"], "each gateway sees the other's charges");
    for gw in [&b, &a] {
        let r = gw.chat(chat_body(false)).send().await.unwrap();
        assert_eq!(r.status(), 429);
        assert!(r.headers().contains_key("retry-after"));
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["type"], "tokens");
    }
    assert_eq!(upstream.requests(), 3);
}

#[tokio::test]
async fn failing_open_each_gateway_allows_its_share_of_the_limit() {
    let upstream = FakeUpstream::start().await;
    let mut world = World::new(vec![route("chat", vec![replica(upstream.addr, "m")], vec![])]);
    world.key.rpm = Some(10);
    let url = closed_port_url().await;
    let config = shared(&url, &prefix(), OnUnreachable::FailOpen { local_share: 0.5 });
    let a = TestGateway::spawn(config.clone(), world.snapshot()).await;
    let b = TestGateway::spawn(config, world.snapshot()).await;

    for gw in [&a, &b] {
        let mut codes = Vec::new();
        for _ in 0..8 {
            let r = gw.chat(chat_body(false)).send().await.unwrap();
            if r.status() == 200 {
                assert_eq!(r.headers()["x-ratelimit-limit-requests"], "5", "the local share");
            }
            codes.push(r.status().as_u16());
        }
        assert_eq!(codes, [200, 200, 200, 200, 200, 429, 429, 429]);
    }
    // Together the limit, not twice it.
    assert_eq!(upstream.requests(), 10);
    assert!(a.metrics().await.contains(r#"gateway_ratelimit_backend{state="local"}"#));
}

#[tokio::test]
async fn failing_closed_answers_503_while_redis_is_unreachable() {
    let upstream = FakeUpstream::start().await;
    let mut world = World::new(vec![route("chat", vec![replica(upstream.addr, "m")], vec![])]);
    world.key.rpm = Some(10);
    let url = closed_port_url().await;
    let gw =
        TestGateway::spawn(shared(&url, &prefix(), OnUnreachable::FailClosed), world.snapshot())
            .await;
    for _ in 0..3 {
        let r = gw.chat(chat_body(false)).send().await.unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "1");
        assert!(r.headers().contains_key("x-request-id"));
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "rate_limiter_unavailable");
        assert_eq!(body["error"]["type"], "server_error");
    }
    assert_eq!(upstream.requests(), 0);
    let records = gw.records_eventually(3).await;
    assert_eq!(records.iter().map(|r| r.status).collect::<Vec<_>>(), [503, 503, 503]);
    assert!(gw.metrics().await.contains(r#"gateway_ratelimit_backend{state="closed"}"#));
}

#[tokio::test]
async fn failing_closed_still_serves_keys_and_routes_without_limits() {
    let upstream = FakeUpstream::start().await;
    let world = World::new(vec![route("chat", vec![replica(upstream.addr, "m")], vec![])]);
    let url = closed_port_url().await;
    let gw =
        TestGateway::spawn(shared(&url, &prefix(), OnUnreachable::FailClosed), world.snapshot())
            .await;
    assert_eq!(gw.chat(chat_body(false)).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn shared_limits_come_back_with_redis() {
    let Some(url) = redis_url("shared_limits_come_back_with_redis") else { return };
    let redis = Forwarder::start(redis_address(&url)).await;
    let upstream = FakeUpstream::start().await;
    let mut world = World::new(vec![route("chat", vec![replica(upstream.addr, "m")], vec![])]);
    world.key.rpm = Some(1000);
    let config = shared(&format!("redis://{}", redis.addr), &prefix(), OnUnreachable::FailClosed);
    let gw = TestGateway::spawn(config, world.snapshot()).await;
    let status = || async { gw.chat(chat_body(false)).send().await.unwrap().status().as_u16() };

    assert_eq!(status().await, 200);
    redis.set_reachable(false);
    let until = |want: u16| async move {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = status().await;
            if got == want {
                return;
            }
            assert!(Instant::now() < deadline, "still {got}, never {want}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    until(503).await;
    redis.set_reachable(true);
    until(200).await;
    let r = gw.chat(chat_body(false)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-limit-requests"], "1000", "the whole limit again");
}

/// `host:port` of a `redis://[auth@]host:port[/db]` URL (auth and database are not carried).
fn redis_address(url: &str) -> String {
    let rest = url.trim_start_matches("redis://");
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split('/').next().unwrap().to_owned()
}

/// A TCP relay to Redis that can be cut: while unreachable it drops every connection, open or
/// new, as a Redis that went away would.
struct Forwarder {
    addr: SocketAddr,
    reachable: Arc<AtomicBool>,
    /// Cancelled to cut the connections relayed so far.
    cut: Arc<Mutex<CancellationToken>>,
}

impl Forwarder {
    async fn start(to: String) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reachable = Arc::new(AtomicBool::new(true));
        let cut = Arc::new(Mutex::new(CancellationToken::new()));
        let (up, token) = (reachable.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up.load(Ordering::SeqCst) {
                    continue;
                }
                let token = token.lock().unwrap().clone();
                let to = to.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&to).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = token.cancelled() => {}
                    }
                });
            }
        });
        Forwarder { addr, reachable, cut }
    }

    fn set_reachable(&self, reachable: bool) {
        self.reachable.store(reachable, Ordering::SeqCst);
        if !reachable {
            let mut cut = self.cut.lock().unwrap();
            cut.cancel();
            *cut = CancellationToken::new();
        }
    }
}
