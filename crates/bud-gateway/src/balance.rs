//! Load balancing: a request goes to the primary target with the least outstanding work per
//! unit of weight, where outstanding work is what this gateway has in flight there plus what
//! the engine reports queued (`vllm:num_requests_waiting`, scraped every couple of seconds).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use tokio_util::sync::CancellationToken;

use crate::breaker::BreakerPolicy;
use crate::snapshot::{Snapshot, Target, Upstream};
use crate::state::{Registry, TargetState};

/// The primary target to try next: among those not in `tried` (a bit per index) whose breaker
/// would let a request through and whose weight is not 0, the one with the lowest
/// `load / weight`; ties are broken at random so that idle targets share the work.
pub fn pick(
    targets: &[Target],
    states: &[Arc<TargetState>],
    tried: u64,
    policy: &BreakerPolicy,
    now_ms: u64,
) -> Option<usize> {
    let mut best: Option<(usize, u64, u64)> = None;
    let mut ties = 0u32;
    for (i, (target, state)) in targets.iter().zip(states).enumerate().take(64) {
        if tried & (1 << i) != 0 || target.weight == 0 || !state.breaker.available(policy, now_ms) {
            continue;
        }
        let (load, weight) = (state.load(), u64::from(target.weight));
        match best {
            None => {
                best = Some((i, load, weight));
                ties = 1;
            }
            Some((_, best_load, best_weight)) => {
                // load / weight < best_load / best_weight, without division.
                let (lhs, rhs) = (
                    u128::from(load) * u128::from(best_weight),
                    u128::from(best_load) * u128::from(weight),
                );
                if lhs < rhs {
                    best = Some((i, load, weight));
                    ties = 1;
                } else if lhs == rhs {
                    // Reservoir sampling: each of the tied targets is kept with equal chance.
                    ties += 1;
                    if fastrand::u32(0..ties) == 0 {
                        best = Some((i, load, weight));
                    }
                }
            }
        }
    }
    best.map(|(i, _, _)| i)
}

/// Reads each replica target's queue depth every `interval` until `shutdown`, and forgets the
/// state of targets that left the snapshot.
pub async fn scrape_queues(
    snapshot: Arc<ArcSwap<Snapshot>>,
    registry: Arc<Registry>,
    client: crate::proxy::ReplicaClient,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let current = snapshot.load_full();
        let mut labels: HashSet<&str> = HashSet::new();
        let mut replicas: Vec<(&str, &str)> = Vec::new();
        for target in current
            .routes
            .values()
            .flat_map(|r| r.values())
            .flat_map(|r| r.targets.iter().chain(&r.fallbacks))
        {
            if labels.insert(&target.label)
                && let Upstream::Replica { address, .. } = &target.upstream
            {
                replicas.push((&target.label, address));
            }
        }
        registry.retain_targets(|label| labels.contains(label));
        let scrapes = replicas.iter().map(|(label, address)| {
            let client = client.clone();
            let state = registry.target(label);
            async move {
                let waiting = tokio::time::timeout(interval, queue_depth(&client, address)).await;
                // Unknown counts as empty: the in-flight counts and the breaker still apply.
                state.set_waiting(waiting.ok().flatten().unwrap_or(0));
            }
        });
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = futures::future::join_all(scrapes) => {}
        }
    }
}

async fn queue_depth(client: &crate::proxy::ReplicaClient, address: &str) -> Option<u32> {
    let uri: http::Uri = format!("http://{address}/metrics").parse().ok()?;
    let request = http::Request::get(uri).body(Full::new(Bytes::new())).ok()?;
    let response = client.request(request).await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    let body: Bytes = Limited::new(response.into_body(), 8 << 20).collect().await.ok()?.to_bytes();
    parse_waiting(std::str::from_utf8(&body).ok()?)
}

/// Sums `vllm:num_requests_waiting` over its label sets in a Prometheus text exposition.
pub fn parse_waiting(text: &str) -> Option<u32> {
    const NAME: &str = "vllm:num_requests_waiting";
    let mut total: Option<f64> = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(NAME) else { continue };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        // The value follows the label set (which may hold spaces inside quotes).
        let after_labels = match rest.strip_prefix('{') {
            Some(labels) => labels.rsplit_once('}').map(|(_, v)| v)?,
            None => rest,
        };
        let value: f64 = after_labels.split_whitespace().next()?.parse().ok()?;
        if value.is_finite() && value >= 0.0 {
            *total.get_or_insert(0.0) += value;
        }
    }
    total.map(|t| t.min(f64::from(u32::MAX)) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Upstream;
    use bud_domain::EndpointId;

    fn target(label: &str, weight: u32) -> Target {
        Target {
            label: label.into(),
            weight,
            upstream: Upstream::Replica {
                endpoint_id: EndpointId::new(),
                address: "127.0.0.1:1".into(),
                served_model: "m".into(),
            },
        }
    }

    const POLICY: BreakerPolicy = BreakerPolicy { failures: 5, open_for: Duration::from_secs(10) };

    #[test]
    fn picks_the_least_loaded_per_weight() {
        let registry = Registry::default();
        let targets = vec![target("a", 1), target("b", 3), target("c", 0)];
        let states = registry.targets(&targets);
        states[0].set_waiting(2);
        states[1].set_waiting(5);
        // a: 2 / 1, b: 5 / 3 → b.
        assert_eq!(pick(&targets, &states, 0, &POLICY, 0), Some(1));
        assert_eq!(pick(&targets, &states, 0b10, &POLICY, 0), Some(0));
        assert_eq!(pick(&targets, &states, 0b11, &POLICY, 0), None, "weight 0 is drained");
    }

    #[test]
    fn ties_are_shared() {
        let registry = Registry::default();
        let targets = vec![target("a", 1), target("b", 1), target("c", 1)];
        let states = registry.targets(&targets);
        let mut seen = [0; 3];
        for _ in 0..300 {
            seen[pick(&targets, &states, 0, &POLICY, 0).unwrap()] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }

    #[test]
    fn reads_the_queue_depth_of_vllm() {
        let text = "# HELP vllm:num_requests_waiting Number of requests waiting.\n\
            # TYPE vllm:num_requests_waiting gauge\n\
            vllm:num_requests_waiting{engine=\"0\",model_name=\"a b}\"} 3.0\n\
            vllm:num_requests_waiting{engine=\"1\"} 4\n\
            vllm:num_requests_waiting_total 100\n\
            vllm:num_requests_running{engine=\"0\"} 9.0\n";
        assert_eq!(parse_waiting(text), Some(7));
        assert_eq!(parse_waiting("vllm:num_requests_waiting 2\n"), Some(2));
        assert_eq!(parse_waiting("other 1\n"), None);
    }
}
