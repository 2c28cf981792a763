//! State that outlives snapshots, kept by route and target label: in-flight counters and queue
//! depth for balancing, circuit breakers, retry budgets and metric handles. A snapshot swap
//! changes which routes and targets exist; the counters of those that remain carry on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::Instant;

use metrics::Gauge;

use crate::breaker::{Breaker, BreakerPolicy, Permit, Transition};
use crate::retry::RetryBudget;
use crate::snapshot::{Route, Target};
use crate::telemetry::RouteMetrics;

/// Runtime state of one target (by label).
#[derive(Debug)]
pub struct TargetState {
    pub label: String,
    /// Requests this gateway has sent it that are not finished.
    in_flight: AtomicU32,
    /// `vllm:num_requests_waiting` at the last scrape (0 for providers and unknown).
    waiting: AtomicU32,
    pub breaker: Breaker,
    in_flight_gauge: Gauge,
    breaker_gauge: Gauge,
}

impl TargetState {
    fn new(label: &str) -> Self {
        Self {
            label: label.to_owned(),
            in_flight: AtomicU32::new(0),
            waiting: AtomicU32::new(0),
            breaker: Breaker::default(),
            in_flight_gauge: metrics::gauge!("gateway_in_flight", "target" => label.to_owned()),
            breaker_gauge: metrics::gauge!("gateway_breaker_open", "target" => label.to_owned()),
        }
    }

    /// In flight plus queued at the engine: the balancer's measure of load.
    pub fn load(&self) -> u64 {
        u64::from(self.in_flight.load(Ordering::Relaxed))
            + u64::from(self.waiting.load(Ordering::Relaxed))
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn set_waiting(&self, waiting: u32) {
        self.waiting.store(waiting, Ordering::Relaxed);
    }

    fn transition(&self, t: Option<Transition>) {
        match t {
            Some(Transition::Opened) => {
                tracing::warn!(target_label = %self.label, "circuit breaker opened");
                self.breaker_gauge.set(1.0);
            }
            Some(Transition::Closed) => {
                tracing::info!(target_label = %self.label, "circuit breaker closed");
                self.breaker_gauge.set(0.0);
            }
            None => {}
        }
    }
}

/// Runtime state of one route (by label).
#[derive(Debug)]
pub struct RouteState {
    pub budget: RetryBudget,
    pub metrics: RouteMetrics,
}

/// One attempt on a target: counted in flight from creation to drop, and holding the breaker's
/// permit until the outcome is known. Dropped without an outcome (the client went away), it
/// frees a half-open probe's slot for the next request.
#[derive(Debug)]
pub struct Attempt {
    pub target: Arc<TargetState>,
    permit: Permit,
    policy: BreakerPolicy,
    settled: bool,
}

impl Attempt {
    /// Starts an attempt if the target's breaker lets one through.
    pub fn start(target: &Arc<TargetState>, policy: BreakerPolicy) -> Option<Attempt> {
        let permit = target.breaker.acquire(&policy, monotonic_ms())?;
        target.in_flight.fetch_add(1, Ordering::Relaxed);
        target.in_flight_gauge.increment(1.0);
        Some(Attempt { target: target.clone(), permit, policy, settled: false })
    }

    pub fn succeeded(&mut self) {
        if !self.settled {
            self.settled = true;
            self.target.transition(self.target.breaker.success(self.permit));
        }
    }

    pub fn failed(&mut self) {
        if !self.settled {
            self.settled = true;
            let t = self.target.breaker.failure(&self.policy, self.permit, monotonic_ms());
            self.target.transition(t);
        }
    }

    /// Ends the attempt without judging the target (a 429: it is alive but busy).
    pub fn neutral(&mut self) {
        if !self.settled {
            self.settled = true;
            self.target.breaker.release(self.permit);
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.neutral();
        self.target.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.target.in_flight_gauge.decrement(1.0);
    }
}

/// Every route's and target's runtime state.
#[derive(Debug, Default)]
pub struct Registry {
    targets: RwLock<HashMap<String, Arc<TargetState>>>,
    routes: RwLock<HashMap<String, Arc<RouteState>>>,
}

impl Registry {
    /// The state of each of `targets`, in order, created on first sight.
    pub fn targets(&self, targets: &[Target]) -> Vec<Arc<TargetState>> {
        {
            let map = self.targets.read().unwrap_or_else(PoisonError::into_inner);
            let found: Vec<_> = targets.iter().filter_map(|t| map.get(&t.label).cloned()).collect();
            if found.len() == targets.len() {
                return found;
            }
        }
        let mut map = self.targets.write().unwrap_or_else(PoisonError::into_inner);
        targets
            .iter()
            .map(|t| {
                map.entry(t.label.clone())
                    .or_insert_with(|| Arc::new(TargetState::new(&t.label)))
                    .clone()
            })
            .collect()
    }

    /// The state of the target labelled `label`, created on first sight.
    pub fn target(&self, label: &str) -> Arc<TargetState> {
        if let Some(t) = self.targets.read().unwrap_or_else(PoisonError::into_inner).get(label) {
            return t.clone();
        }
        let mut map = self.targets.write().unwrap_or_else(PoisonError::into_inner);
        map.entry(label.to_owned()).or_insert_with(|| Arc::new(TargetState::new(label))).clone()
    }

    pub fn route(&self, route: &Route, budget: impl FnOnce() -> RetryBudget) -> Arc<RouteState> {
        self.route_by_label(&route.label, budget)
    }

    pub fn route_by_label(
        &self,
        label: &str,
        budget: impl FnOnce() -> RetryBudget,
    ) -> Arc<RouteState> {
        if let Some(r) = self.routes.read().unwrap_or_else(PoisonError::into_inner).get(label) {
            return r.clone();
        }
        let mut map = self.routes.write().unwrap_or_else(PoisonError::into_inner);
        map.entry(label.to_owned())
            .or_insert_with(|| {
                Arc::new(RouteState { budget: budget(), metrics: RouteMetrics::new(label) })
            })
            .clone()
    }

    /// Forgets targets no longer in the snapshot once nothing is in flight to them.
    pub fn retain_targets(&self, keep: impl Fn(&str) -> bool) {
        let mut map = self.targets.write().unwrap_or_else(PoisonError::into_inner);
        map.retain(|label, t| keep(label) || t.in_flight() > 0 || Arc::strong_count(t) > 1);
    }
}

/// Milliseconds on a process-wide monotonic clock (the breakers' clock).
pub fn monotonic_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}
