//! Health, readiness, metrics, kept-alive connections, and graceful shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bud_gateway::snapshot::Snapshot;

use crate::fake_upstream::{Behavior, FakeUpstream};
use crate::harness::{
    TestGateway, World, chat_body, config, gateway_for, read_stream, replica, route,
};

#[tokio::test]
async fn health_and_readiness_follow_the_snapshot() {
    let mut config = config();
    config.stale_window = Duration::from_millis(300);
    let gw = TestGateway::spawn(config, Snapshot::default()).await;
    assert_eq!(gw.get("/healthz").send().await.unwrap().status(), 200);
    assert_eq!(gw.get("/readyz").send().await.unwrap().status(), 503, "no snapshot yet");
    let world = World::new(vec![]);
    gw.gateway.snapshot_handle().store(Arc::new(world.snapshot()));
    assert_eq!(gw.get("/readyz").send().await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(gw.get("/readyz").send().await.unwrap().status(), 503, "stale");
}

#[tokio::test]
async fn metrics_are_served_with_bounded_labels() {
    let upstream = FakeUpstream::start().await;
    let target = replica(upstream.addr, "m");
    let gw = gateway_for(vec![target.clone()], vec![]).await;
    gw.chat(chat_body(false)).send().await.unwrap();
    // An unknown model and a bad key are counted without their names.
    gw.chat(serde_json::json!({"model": "no-such-model-xyz"})).send().await.unwrap();
    let response = gw.get("/metrics").send().await.unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let route = &gw.records_eventually(1).await[0].route;
    assert!(text.contains(&format!(
        "gateway_requests_total{{route=\"{route}\",target=\"{}\",status=\"200\"}} 1",
        target.label
    )));
    assert!(
        text.contains(&format!("gateway_request_duration_seconds_count{{route=\"{route}\"}} 1"))
    );
    assert!(text.contains("gateway_requests_total{route=\"-\",target=\"-\",status=\"404\"}"));
    assert!(!text.contains("no-such-model-xyz"));
}

#[tokio::test]
async fn kept_alive_connections_do_not_stall_on_delayed_acks() {
    let upstream = FakeUpstream::start().await;
    let gw = gateway_for(vec![replica(upstream.addr, "m")], vec![]).await;
    let client = reqwest::Client::builder().pool_max_idle_per_host(1).build().unwrap();
    let url = format!("{}/v1/chat/completions", gw.url);
    let mut latencies = Vec::new();
    for _ in 0..200 {
        let started = Instant::now();
        let r = client
            .post(&url)
            .bearer_auth(crate::harness::KEY)
            .json(&chat_body(false))
            .send()
            .await
            .unwrap();
        r.bytes().await.unwrap();
        latencies.push(started.elapsed());
    }
    latencies.sort();
    let (p50, p99) = (latencies[100], latencies[198]);
    // A Nagle / delayed-ACK stall costs about 40 ms on every request.
    assert!(p50 < Duration::from_millis(10), "p50 {p50:?}");
    assert!(p99 < Duration::from_millis(25), "p99 {p99:?}");
    // One connection to the gateway, and the gateway's pool kept one to the upstream.
    assert_eq!(upstream.requests(), 200);
}

#[tokio::test]
async fn shutdown_stops_accepting_and_finishes_streams_in_flight() {
    let upstream = FakeUpstream::start().await;
    upstream.always(Behavior::Slow { n: 10, every: Duration::from_millis(30) });
    let world = World::new(vec![route("chat", vec![replica(upstream.addr, "m")], vec![])]);
    let gw = TestGateway::spawn(config(), world.snapshot()).await;
    let response = gw.chat(chat_body(true)).send().await.unwrap();
    gw.shutdown.cancel();
    let t = read_stream(response).await;
    assert!(t.has_done(), "{}", t.text);
    tokio::time::timeout(Duration::from_secs(2), gw.serving).await.unwrap().unwrap().unwrap();
    assert!(tokio::net::TcpStream::connect(gw.addr).await.is_err());
}
