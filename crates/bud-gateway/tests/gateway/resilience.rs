//! Circuit breakers, the retry budget, and load balancing.

use std::time::{Duration, Instant};

use futures::future::join_all;

use crate::fake_upstream::{Behavior, FakeUpstream};
use crate::harness::{TestGateway, chat_body, config, gateway_with, replica};

async fn concurrently(gw: &TestGateway, n: usize) -> Vec<u16> {
    join_all(
        (0..n).map(|_| async { gw.chat(chat_body(false)).send().await.unwrap().status().as_u16() }),
    )
    .await
}

#[tokio::test]
async fn a_breaker_opens_after_consecutive_failures_and_half_opens_for_one_probe() {
    let a = FakeUpstream::start().await;
    a.always(Behavior::Status(500, None));
    let b = FakeUpstream::start().await;
    let mut config = config();
    config.breaker_failures = 3;
    config.breaker_open = Duration::from_millis(300);
    let primary = replica(a.addr, "m");
    let gw = gateway_with(config, vec![primary.clone()], vec![replica(b.addr, "m")]).await;
    let open_gauge = format!("gateway_breaker_open{{target=\"{}\"}}", primary.label);

    for _ in 0..3 {
        assert_eq!(gw.chat(chat_body(false)).send().await.unwrap().status(), 200);
    }
    assert_eq!(a.requests(), 3);
    assert!(gw.metrics().await.contains(&format!("{open_gauge} 1")));
    // Open: the primary is left out, the fallback answers at once.
    for _ in 0..3 {
        assert_eq!(gw.chat(chat_body(false)).send().await.unwrap().status(), 200);
    }
    assert_eq!((a.requests(), b.requests()), (3, 6));

    // Half-open: of four concurrent requests, exactly one probes the primary.
    tokio::time::sleep(Duration::from_millis(350)).await;
    a.always(Behavior::Delay(Duration::from_millis(200)));
    assert_eq!(concurrently(&gw, 4).await, [200; 4]);
    assert_eq!((a.requests(), b.requests()), (4, 9));
    // The probe succeeded: closed again, the primary takes the traffic.
    assert!(gw.metrics().await.contains(&format!("{open_gauge} 0")));
    a.always(Behavior::Ok);
    for _ in 0..2 {
        assert_eq!(gw.chat(chat_body(false)).send().await.unwrap().status(), 200);
    }
    assert_eq!((a.requests(), b.requests()), (6, 9));
}

#[tokio::test]
async fn a_failed_probe_opens_the_breaker_again() {
    let a = FakeUpstream::start().await;
    a.always(Behavior::Reset);
    let b = FakeUpstream::start().await;
    let mut config = config();
    config.breaker_failures = 2;
    config.breaker_open = Duration::from_millis(200);
    let gw = gateway_with(config, vec![replica(a.addr, "m")], vec![replica(b.addr, "m")]).await;
    for _ in 0..2 {
        gw.chat(chat_body(false)).send().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    gw.chat(chat_body(false)).send().await.unwrap();
    assert_eq!(a.requests(), 3, "one probe");
    gw.chat(chat_body(false)).send().await.unwrap();
    assert_eq!(a.requests(), 3, "open again");
}

#[tokio::test]
async fn the_retry_budget_keeps_retries_from_amplifying_an_outage() {
    let fakes =
        [FakeUpstream::start().await, FakeUpstream::start().await, FakeUpstream::start().await];
    for f in &fakes {
        f.always(Behavior::Status(500, None));
    }
    let mut config = config();
    // Keep the breakers out of it: this is about the budget alone.
    config.breaker_failures = 1_000_000;
    let targets = fakes.iter().map(|f| replica(f.addr, "m")).collect();
    let gw = gateway_with(config, targets, vec![]).await;

    let requests = 100;
    let started = Instant::now();
    for _ in 0..requests {
        assert_eq!(gw.chat(chat_body(false)).send().await.unwrap().status(), 502);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let attempts: usize = fakes.iter().map(FakeUpstream::requests).sum();
    // 20% of the requests, 5 per second, and the 10 saved up at the start.
    let bound = requests as f64 * 1.2 + 5.0 * elapsed + 10.0 + 1.0;
    assert!(
        attempts as f64 <= bound,
        "{attempts} attempts for {requests} requests in {elapsed:.2}s"
    );
    assert!(attempts >= requests);
    let metrics = gw.metrics().await;
    let route = &gw.records_eventually(requests).await[0].route;
    let retries_line = metrics
        .lines()
        .find(|l| l.starts_with(&format!("gateway_retries_total{{route=\"{route}\"}}")))
        .unwrap();
    let retries: usize = retries_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(retries, attempts - requests);
}

#[tokio::test]
async fn least_outstanding_spreads_concurrent_requests() {
    let a = FakeUpstream::start().await;
    let b = FakeUpstream::start().await;
    for f in [&a, &b] {
        f.always(Behavior::Delay(Duration::from_millis(300)));
    }
    let gw = gateway_with(config(), vec![replica(a.addr, "m"), replica(b.addr, "m")], vec![]).await;
    assert_eq!(concurrently(&gw, 10).await, [200; 10]);
    assert_eq!((a.requests(), b.requests()), (5, 5));
    assert_eq!((a.max_in_flight(), b.max_in_flight()), (5, 5));
}

#[tokio::test]
async fn weights_share_the_load() {
    let a = FakeUpstream::start().await;
    let b = FakeUpstream::start().await;
    for f in [&a, &b] {
        f.always(Behavior::Delay(Duration::from_millis(300)));
    }
    let mut heavy = replica(a.addr, "m");
    heavy.weight = 3;
    let gw = gateway_with(config(), vec![heavy, replica(b.addr, "m")], vec![]).await;
    concurrently(&gw, 8).await;
    assert!((5..=7).contains(&a.requests()), "{} / {}", a.requests(), b.requests());
    assert_eq!(a.requests() + b.requests(), 8);
}

#[tokio::test]
async fn the_engines_queue_depth_steers_requests() {
    let a = FakeUpstream::start().await;
    let b = FakeUpstream::start().await;
    a.set_waiting(50);
    let mut config = config();
    config.scrape_interval = Duration::from_millis(50);
    let gw = gateway_with(config, vec![replica(a.addr, "m"), replica(b.addr, "m")], vec![]).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    for _ in 0..6 {
        gw.chat(chat_body(false)).send().await.unwrap();
    }
    assert_eq!((a.requests(), b.requests()), (0, 6));
    a.set_waiting(0);
    tokio::time::sleep(Duration::from_millis(250)).await;
    for f in [&a, &b] {
        f.always(Behavior::Delay(Duration::from_millis(200)));
    }
    concurrently(&gw, 4).await;
    assert_eq!((a.requests(), b.requests()), (2, 8));
}
