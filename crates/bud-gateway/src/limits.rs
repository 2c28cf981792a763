//! Requests and tokens per minute, per key and per route, with GCRA (the generic cell rate
//! algorithm: one timestamp per limit, no timers, no background task).
//!
//! The request path calls [`RateLimiter`]. Requests are admitted (and counted) by
//! [`RateLimiter::check`]; tokens are only known once the answer is complete, so they are
//! charged afterwards by [`RateLimiter::charge_tokens`], and a key or route whose charges
//! overshoot its budget is refused until it has recovered.
//!
//! The counts live in this process ([`Limiter`]) or, with Redis configured, in Redis
//! ([`redis`]), where every gateway replica draws on the same budget. While Redis is
//! unreachable a replica either counts its share of every limit in process (fail-open) or
//! refuses limited requests with 503 (fail-closed): never the whole limit on each replica, which
//! would multiply it by the number of replicas.

mod redis;

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bud_domain::ApiKeyId;
use metrics::Gauge;

use self::redis::RedisLimiter;
use crate::config::{OnUnreachable, RedisLimits};
use crate::error::Error;
use crate::snapshot::{KeyEntry, Route};

/// The window every limit is expressed over.
pub const PERIOD: Duration = Duration::from_secs(60);
const PERIOD_NS: u64 = 60_000_000_000;

/// What [`RateLimiter::check`] decided, with what the `x-ratelimit-*` headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Decision {
    /// Why the request is refused; `None` when it is admitted.
    pub refusal: Option<Refusal>,
    /// When a refused request could be admitted.
    pub retry_after: Duration,
    /// The tighter of the key's and the route's request limits, if either has one.
    pub requests: Option<Quota>,
    /// The tighter of the key's and the route's token limits, if either has one.
    pub tokens: Option<Quota>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Requests,
    Tokens,
}

/// One limit as the `x-ratelimit-*-requests` or `-tokens` headers describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub limit: u32,
    pub remaining: u32,
    /// Until the limit is whole again.
    pub reset: Duration,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.refusal.is_none()
    }

    /// Whether the key or route has limits, so the response carries the headers.
    pub fn is_limited(&self) -> bool {
        self.requests.is_some() || self.tokens.is_some()
    }
}

/// A limited request could not be checked: Redis is unreachable and the gateway fails closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable;

/// Where the last request's limits were counted: the `state` label of
/// `gateway_ratelimit_backend`, whose series for the current state is 1 and the others 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Shared by every replica, in Redis.
    Redis,
    /// In this process: no Redis is configured, or it is unreachable and the gateway fails open
    /// (with its share of each limit).
    Local,
    /// Redis is unreachable and the gateway fails closed: limited requests get 503.
    Closed,
}

impl Backend {
    const ALL: [Backend; 3] = [Backend::Redis, Backend::Local, Backend::Closed];

    fn label(self) -> &'static str {
        match self {
            Backend::Redis => "redis",
            Backend::Local => "local",
            Backend::Closed => "closed",
        }
    }
}

/// The gateway's rate limits, shared by every request of this process: counted here, or in
/// Redis when one is configured.
pub struct RateLimiter {
    local: Limiter,
    shared: Option<SharedCounts>,
    backend: BackendGauge,
}

/// Counts kept in Redis, and what to do without them.
struct SharedCounts {
    /// `None` when the configured URL does not parse (see [`RateLimiter::lenient`]): Redis is
    /// then never reachable and the fallback always applies.
    redis: Option<RedisLimiter>,
    on_unreachable: OnUnreachable,
}

impl RateLimiter {
    /// Counts in Redis when `redis` is given (connecting on first use), else in this process.
    pub fn new(redis: Option<&RedisLimits>) -> Result<Self, Error> {
        let shared = match redis {
            Some(config) => Some(SharedCounts {
                redis: Some(RedisLimiter::new(config).map_err(Error::RedisUrl)?),
                on_unreachable: clamp_share(config.on_unreachable),
            }),
            None => None,
        };
        Ok(Self::with(shared))
    }

    /// Like [`RateLimiter::new`], but a Redis URL that does not parse is logged and Redis taken
    /// as unreachable: the configured fallback applies, never unshared whole limits.
    pub fn lenient(redis: Option<&RedisLimits>) -> Self {
        Self::new(redis).unwrap_or_else(|e| {
            tracing::error!(error = %e, "rate limits fall back as if redis were unreachable");
            Self::with(redis.map(|config| SharedCounts {
                redis: None,
                on_unreachable: clamp_share(config.on_unreachable),
            }))
        })
    }

    fn with(shared: Option<SharedCounts>) -> Self {
        let initial = if shared.is_some() { Backend::Redis } else { Backend::Local };
        Self { local: Limiter::new(), shared, backend: BackendGauge::new(initial) }
    }

    /// Admits one request of `key` on `route`, counting it against both request limits, or
    /// refuses it (counting nothing) when a request limit is spent or a token budget overdrawn.
    /// With Redis this is one round trip (none for a key and route without limits).
    pub async fn check(&self, key: &KeyEntry, route: &Route) -> Result<Decision, Unavailable> {
        let subject = Subject::of(key, route);
        if !subject.is_limited() {
            return Ok(Decision::default());
        }
        let Some(shared) = &self.shared else {
            return Ok(self.local.check_subject(&subject));
        };
        if let Some(redis) = &shared.redis
            && let Ok(verdicts) = redis.check(&subject).await
        {
            self.backend.report(Backend::Redis);
            return Ok(decide(&subject, &verdicts));
        }
        match shared.on_unreachable {
            OnUnreachable::FailOpen { local_share } => {
                self.backend.report(Backend::Local);
                Ok(self.local.check_subject(&subject.scaled(local_share)))
            }
            OnUnreachable::FailClosed => {
                self.backend.report(Backend::Closed);
                Err(Unavailable)
            }
        }
    }

    /// Charges what an answered request used against the key's and route's token budgets.
    /// With Redis the charge is sent off the request's path (a task of its own); one that does
    /// not reach Redis is charged to this replica's local share instead.
    pub fn charge_tokens(self: &Arc<Self>, key: &KeyEntry, route: &Arc<Route>, tokens: u32) {
        let subject = Subject::of(key, route);
        if tokens == 0 || !subject.has_token_limits() {
            return;
        }
        let Some(shared) = &self.shared else {
            self.local.charge_subject(&subject, tokens);
            return;
        };
        let local_share = match shared.on_unreachable {
            OnUnreachable::FailOpen { local_share } => Some(local_share),
            // Local counts are never consulted when failing closed.
            OnUnreachable::FailClosed => None,
        };
        let charge_locally = move |limiter: &RateLimiter, subject: &Subject<'_>| {
            if let Some(share) = local_share {
                limiter.local.charge_subject(&subject.scaled(share), tokens);
            }
        };
        let (Some(redis), Ok(runtime)) = (&shared.redis, tokio::runtime::Handle::try_current())
        else {
            charge_locally(self, &subject);
            return;
        };
        let (limiter, redis, key, route) =
            (self.clone(), redis.clone(), key.clone(), route.clone());
        runtime.spawn(async move {
            let subject = Subject::of(&key, &route);
            if redis.charge(&subject, tokens).await.is_err() {
                charge_locally(&limiter, &subject);
            }
        });
    }

    /// Opens the Redis connection ahead of the first request, and says in the log whether it
    /// answers. Without Redis, does nothing.
    pub async fn warm_up(&self) {
        if let Some(redis) = self.shared.as_ref().and_then(|s| s.redis.as_ref()) {
            redis.warm_up().await;
        }
    }
}

/// `local_share` within (0, 1]: more than the whole limit per replica is what the share exists
/// to prevent, and none at all would be failing closed in disguise.
fn clamp_share(on_unreachable: OnUnreachable) -> OnUnreachable {
    match on_unreachable {
        OnUnreachable::FailOpen { local_share } => OnUnreachable::FailOpen {
            local_share: if local_share > 0.0 { local_share.min(1.0) } else { 1.0 },
        },
        OnUnreachable::FailClosed => OnUnreachable::FailClosed,
    }
}

/// `gateway_ratelimit_backend{state}`, set on each change of state.
struct BackendGauge {
    current: AtomicU8,
    /// Held while the gauges change, so that two racing changes leave them consistent.
    changing: Mutex<()>,
    gauges: [Gauge; 3],
}

impl BackendGauge {
    fn new(initial: Backend) -> Self {
        let gauges = Backend::ALL
            .map(|b| metrics::gauge!("gateway_ratelimit_backend", "state" => b.label()));
        let gauge = Self { current: AtomicU8::new(u8::MAX), changing: Mutex::new(()), gauges };
        gauge.report(initial);
        gauge
    }

    fn report(&self, backend: Backend) {
        if self.current.load(Ordering::Relaxed) == backend as u8 {
            return;
        }
        let _changing = lock(&self.changing);
        self.current.store(backend as u8, Ordering::Relaxed);
        for (b, gauge) in Backend::ALL.iter().zip(&self.gauges) {
            gauge.set(if *b == backend { 1.0 } else { 0.0 });
        }
    }
}

/// The limits one request is held to: its key's and its route's.
#[derive(Debug, Clone, Copy)]
struct Subject<'a> {
    key: ApiKeyId,
    /// The route's label (stable across snapshots and replicas).
    route: &'a str,
    key_rpm: Option<u32>,
    key_tpm: Option<u32>,
    route_rpm: Option<u32>,
    route_tpm: Option<u32>,
}

impl<'a> Subject<'a> {
    fn of(key: &KeyEntry, route: &'a Route) -> Self {
        Self {
            key: key.id,
            route: &route.label,
            key_rpm: key.rpm,
            key_tpm: key.tpm,
            route_rpm: route.rpm,
            route_tpm: route.tpm,
        }
    }

    fn is_limited(&self) -> bool {
        self.key_rpm.is_some() || self.route_rpm.is_some() || self.has_token_limits()
    }

    fn has_token_limits(&self) -> bool {
        self.key_tpm.is_some() || self.route_tpm.is_some()
    }

    /// Every limit multiplied by `share`, rounded down but never below 1: N replicas with
    /// share 1/N allow at most `max(limit, N)` together.
    fn scaled(self, share: f64) -> Self {
        let scale = |limit: Option<u32>| {
            limit.map(|l| if l == 0 { 0 } else { ((f64::from(l) * share) as u32).max(1) })
        };
        Self {
            key_rpm: scale(self.key_rpm),
            key_tpm: scale(self.key_tpm),
            route_rpm: scale(self.route_rpm),
            route_tpm: scale(self.route_tpm),
            ..self
        }
    }
}

/// One request's four limits as evaluated (`None` where there is no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Verdicts {
    key_requests: Option<Verdict>,
    route_requests: Option<Verdict>,
    /// Whether the key's token budget is overdrawn (cost 0).
    key_tokens: Option<Verdict>,
    route_tokens: Option<Verdict>,
}

/// The decision for a request whose limits were evaluated as `v`: refused when any is.
fn decide(s: &Subject<'_>, v: &Verdicts) -> Decision {
    let requests_ok = [v.key_requests, v.route_requests].iter().flatten().all(|v| v.allowed);
    let tokens_ok = [v.key_tokens, v.route_tokens].iter().flatten().all(|v| v.allowed);
    let retry_after = [v.key_requests, v.route_requests, v.key_tokens, v.route_tokens]
        .iter()
        .flatten()
        .filter(|v| !v.allowed)
        .map(|v| v.retry_after)
        .max()
        .unwrap_or(0);
    let refusal = if !requests_ok {
        Some(Refusal::Requests)
    } else if !tokens_ok {
        Some(Refusal::Tokens)
    } else {
        None
    };
    Decision {
        refusal,
        retry_after: Duration::from_nanos(retry_after),
        requests: tighter(v.key_requests.zip(s.key_rpm), v.route_requests.zip(s.route_rpm)),
        tokens: tighter(v.key_tokens.zip(s.key_tpm), v.route_tokens.zip(s.route_tpm)),
    }
}

/// The in-process limiter: the counts of this replica alone.
pub struct Limiter {
    epoch: Instant,
    /// Keys are many, so their cells are spread over shards to keep locks uncontended.
    keys: Vec<Mutex<Table<ApiKeyId>>>,
    routes: Mutex<Table<String>>,
}

const KEY_SHARDS: usize = 16;

impl Default for Limiter {
    fn default() -> Self {
        Self::new()
    }
}

impl Limiter {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            keys: (0..KEY_SHARDS).map(|_| Mutex::new(Table::default())).collect(),
            routes: Mutex::new(Table::default()),
        }
    }

    /// Admits one request of `key` on `route`, counting it against both request limits, or
    /// refuses it (counting nothing) when a request limit is spent or a token budget overdrawn.
    pub fn check(&self, key: &KeyEntry, route: &Route) -> Decision {
        self.check_subject(&Subject::of(key, route))
    }

    /// Charges what an answered request used against the key's and route's token budgets.
    pub fn charge_tokens(&self, key: &KeyEntry, route: &Route, tokens: u32) {
        self.charge_subject(&Subject::of(key, route), tokens);
    }

    fn check_subject(&self, s: &Subject<'_>) -> Decision {
        let key_limited = s.key_rpm.is_some() || s.key_tpm.is_some();
        let route_limited = s.route_rpm.is_some() || s.route_tpm.is_some();
        if !key_limited && !route_limited {
            return Decision::default();
        }
        let now = self.now();
        let mut key_table = key_limited.then(|| self.key_shard(s.key));
        let mut route_table = route_limited.then(|| lock(&self.routes));
        let key_cell = key_table.as_mut().map(|t| t.cell(&s.key, now));
        let route_cell = route_table.as_mut().map(|t| t.cell_by_label(s.route, now));
        let verdicts = Verdicts {
            key_requests: key_cell
                .as_ref()
                .zip(s.key_rpm)
                .map(|(c, l)| c.requests.evaluate(now, l, 1)),
            route_requests: route_cell
                .as_ref()
                .zip(s.route_rpm)
                .map(|(c, l)| c.requests.evaluate(now, l, 1)),
            key_tokens: key_cell.as_ref().zip(s.key_tpm).map(|(c, l)| c.tokens.evaluate(now, l, 0)),
            route_tokens: route_cell
                .as_ref()
                .zip(s.route_tpm)
                .map(|(c, l)| c.tokens.evaluate(now, l, 0)),
        };
        let decision = decide(s, &verdicts);
        if decision.allowed() {
            if let (Some(cell), Some(v)) = (key_cell, verdicts.key_requests) {
                cell.requests.tat = v.tat;
            }
            if let (Some(cell), Some(v)) = (route_cell, verdicts.route_requests) {
                cell.requests.tat = v.tat;
            }
        }
        decision
    }

    fn charge_subject(&self, s: &Subject<'_>, tokens: u32) {
        if tokens == 0 || !s.has_token_limits() {
            return;
        }
        let now = self.now();
        if let Some(limit) = s.key_tpm {
            self.key_shard(s.key).cell(&s.key, now).tokens.charge(now, limit, tokens);
        }
        if let Some(limit) = s.route_tpm {
            lock(&self.routes).cell_by_label(s.route, now).tokens.charge(now, limit, tokens);
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn key_shard(&self, id: ApiKeyId) -> MutexGuard<'_, Table<ApiKeyId>> {
        // Ids are UUIDv7: the low bits are random.
        let shard = (id.as_uuid().as_u128() % KEY_SHARDS as u128) as usize;
        lock(&self.keys[shard])
    }
}

/// A poisoned limiter table holds plain numbers that are still consistent: keep using it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn tighter(a: Option<(Verdict, u32)>, b: Option<(Verdict, u32)>) -> Option<Quota> {
    let quota = |(v, limit): (Verdict, u32)| Quota {
        limit,
        remaining: v.remaining,
        reset: Duration::from_nanos(v.reset),
    };
    match (a.map(quota), b.map(quota)) {
        (Some(a), Some(b)) => Some(if b.remaining < a.remaining { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// The limit state of one key or route.
#[derive(Debug, Clone, Copy, Default)]
struct Cell {
    requests: Gcra,
    tokens: Gcra,
}

struct Table<K> {
    cells: HashMap<K, Cell>,
    /// Size at which idle cells (fully recovered, so equal to a fresh one) are dropped.
    prune_at: usize,
}

impl<K> Default for Table<K> {
    fn default() -> Self {
        Self { cells: HashMap::new(), prune_at: 1024 }
    }
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn cell(&mut self, key: &K, now: u64) -> &mut Cell {
        if !self.cells.contains_key(key) {
            self.make_room(now);
        }
        self.cells.entry(key.clone()).or_default()
    }

    fn make_room(&mut self, now: u64) {
        if self.cells.len() >= self.prune_at {
            self.cells.retain(|_, c| c.requests.tat > now || c.tokens.tat > now);
            self.prune_at = (self.cells.len() * 2).max(1024);
        }
    }
}

impl Table<String> {
    fn cell_by_label(&mut self, label: &str, now: u64) -> &mut Cell {
        if !self.cells.contains_key(label) {
            self.make_room(now);
            self.cells.insert(label.to_owned(), Cell::default());
        }
        // Just inserted if it was missing.
        self.cells.entry(label.to_owned()).or_default()
    }
}

/// GCRA state of one limit: the theoretical arrival time, in nanoseconds since the limiter's
/// epoch. The limit itself is passed in on every call, so a snapshot that changes it takes
/// effect at once. Equivalent to a token bucket holding `limit` units that refills at `limit`
/// per [`PERIOD`]: the bucket is full when `tat <= now`, and holds
/// `(now + capacity - tat) / unit` units otherwise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gcra {
    tat: u64,
}

/// The outcome of [`Gcra::evaluate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// Units left after this one (if allowed) or now (if not).
    pub remaining: u32,
    /// Nanoseconds until the bucket is full again.
    pub reset: u64,
    /// Nanoseconds until the refused units would fit; 0 when allowed.
    pub retry_after: u64,
    /// The state to store if the caller commits.
    tat: u64,
}

impl Gcra {
    /// Whether `cost` units fit at `now` under `limit` per period. `cost` 0 asks whether the
    /// budget is overdrawn. Changes nothing: store `Verdict::tat` to commit.
    pub fn evaluate(&self, now: u64, limit: u32, cost: u32) -> Verdict {
        self.evaluate_over(PERIOD_NS, now, limit, cost)
    }

    /// Admits `cost` units if they fit, and says whether they did.
    pub fn admit(&mut self, now: u64, limit: u32, cost: u32) -> Verdict {
        let v = self.evaluate(now, limit, cost);
        if v.allowed {
            self.tat = v.tat;
        }
        v
    }

    /// Charges `cost` units already spent, overdrawing the budget if they do not fit.
    pub fn charge(&mut self, now: u64, limit: u32, cost: u32) {
        self.charge_over(PERIOD_NS, now, limit, cost);
    }

    /// [`Gcra::evaluate`] with time counted in ticks of which `period` make a [`PERIOD`]
    /// (Redis's script counts microseconds: see [`redis`]).
    fn evaluate_over(&self, period: u64, now: u64, limit: u32, cost: u32) -> Verdict {
        if limit == 0 {
            return Verdict {
                allowed: false,
                remaining: 0,
                reset: 0,
                retry_after: period,
                tat: self.tat,
            };
        }
        let unit = unit(period, limit);
        let horizon = now.saturating_add(capacity(period, limit));
        let tat0 = self.tat.max(now);
        let new_tat = tat0.saturating_add(unit.saturating_mul(u64::from(cost)));
        if new_tat <= horizon {
            Verdict {
                allowed: true,
                remaining: units((horizon - new_tat) / unit),
                reset: new_tat - now,
                retry_after: 0,
                tat: new_tat,
            }
        } else {
            Verdict {
                allowed: false,
                remaining: units(horizon.saturating_sub(tat0) / unit),
                reset: tat0 - now,
                retry_after: new_tat - horizon,
                tat: self.tat,
            }
        }
    }

    fn charge_over(&mut self, period: u64, now: u64, limit: u32, cost: u32) {
        if limit == 0 {
            return;
        }
        let cost = unit(period, limit).saturating_mul(u64::from(cost));
        self.tat = self.tat.max(now).saturating_add(cost);
    }
}

/// Ticks one unit takes to refill, rounded up so the limit is never exceeded.
fn unit(period: u64, limit: u32) -> u64 {
    period.div_ceil(u64::from(limit))
}

/// Ticks of credit a full bucket holds: `limit` whole units (a hair over the period when it
/// does not divide evenly), so that a burst of exactly `limit` fits.
fn capacity(period: u64, limit: u32) -> u64 {
    unit(period, limit) * u64::from(limit)
}

fn units(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use bud_domain::ProjectId;
    use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
    use proptest::prelude::*;

    use super::*;

    const S: u64 = 1_000_000_000;

    /// The reference model: a token bucket of `limit` units' worth of nanoseconds of credit
    /// that refills one per nanosecond; a unit costs `unit(limit)`. Admission needs the whole
    /// cost; charges may overdraw; an overdrawn bucket refuses everything.
    struct Bucket {
        credit: i128,
        capacity: i128,
        at: u64,
    }

    impl Bucket {
        fn full(limit: u32, at: u64) -> Self {
            let capacity = i128::from(unit(PERIOD_NS, limit)) * i128::from(limit);
            Self { credit: capacity, capacity, at }
        }
        fn refill(&mut self, now: u64) {
            self.credit = (self.credit + i128::from(now - self.at)).min(self.capacity);
            self.at = now;
        }
        fn admit(&mut self, now: u64, limit: u32, cost: u32) -> (bool, u32) {
            self.refill(now);
            let price = i128::from(unit(PERIOD_NS, limit)) * i128::from(cost);
            if self.credit >= price {
                self.credit -= price;
                (true, (self.credit / i128::from(unit(PERIOD_NS, limit))) as u32)
            } else {
                (false, (self.credit.max(0) / i128::from(unit(PERIOD_NS, limit))) as u32)
            }
        }
        fn charge(&mut self, now: u64, limit: u32, cost: u32) {
            self.refill(now);
            self.credit -= i128::from(unit(PERIOD_NS, limit)) * i128::from(cost);
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Wait(u64),
        Admit(u32),
        Charge(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..3 * S).prop_map(Op::Wait),
            (0..50u64).prop_map(Op::Wait),
            (0..5u32).prop_map(Op::Admit),
            (0..200u32).prop_map(Op::Charge),
        ]
    }

    proptest! {
        #[test]
        fn gcra_matches_a_token_bucket(limit in 1..120u32, ops in proptest::collection::vec(op(), 1..200)) {
            let mut gcra = Gcra::default();
            // Start later than the epoch, as a limiter that has run for a while.
            let mut now = 1_000 * S;
            let mut bucket = Bucket::full(limit, now);
            for op in ops {
                match op {
                    Op::Wait(d) => now += d,
                    Op::Admit(cost) => {
                        let v = gcra.admit(now, limit, cost);
                        let (allowed, remaining) = bucket.admit(now, limit, cost);
                        prop_assert_eq!(v.allowed, allowed);
                        prop_assert_eq!(v.remaining, remaining);
                        if !v.allowed && cost <= limit {
                            // Waiting as long as told is enough, and not a nanosecond too long.
                            prop_assert!(gcra.evaluate(now + v.retry_after, limit, cost).allowed);
                            prop_assert!(!gcra.evaluate(now + v.retry_after - 1, limit, cost).allowed);
                        }
                    }
                    Op::Charge(cost) => {
                        gcra.charge(now, limit, cost);
                        bucket.charge(now, limit, cost);
                    }
                }
            }
        }

        #[test]
        fn never_more_than_the_limit_in_a_minute(limit in 1..50u32, gaps in proptest::collection::vec(0..2 * S, 1..300)) {
            let mut gcra = Gcra::default();
            let mut now = 0;
            let mut burst = gcra;
            prop_assert_eq!((0..limit + 1).filter(|_| burst.admit(now, limit, 1).allowed).count(), limit as usize);
            let mut admitted = Vec::new();
            for gap in gaps {
                now += gap;
                if gcra.admit(now, limit, 1).allowed {
                    admitted.push(now);
                }
            }
            // A full bucket plus what refills in the window: at most 2 × limit in any minute,
            // never more than `limit` at one instant, and all `limit` at once from a full one.
            for (i, &t) in admitted.iter().enumerate() {
                let in_window = admitted[i..].iter().take_while(|&&u| u < t + PERIOD_NS).count();
                prop_assert!(in_window <= 2 * limit as usize);
                let same_instant = admitted[i..].iter().take_while(|&&u| u == t).count();
                prop_assert!(same_instant <= limit as usize);
            }
        }
    }

    fn key(rpm: Option<u32>, tpm: Option<u32>) -> KeyEntry {
        KeyEntry {
            id: ApiKeyId::new(),
            project_id: ProjectId::new(),
            expires_at_ms: None,
            rpm,
            tpm,
        }
    }

    fn route(rpm: Option<u32>, tpm: Option<u32>) -> Route {
        Route {
            name: "m".into(),
            label: "route:m".into(),
            targets: vec![],
            fallbacks: vec![],
            rpm,
            tpm,
        }
    }

    #[test]
    fn unlimited_keys_and_routes_carry_no_headers() {
        let d = Limiter::new().check(&key(None, None), &route(None, None));
        assert!(d.allowed());
        assert!(!d.is_limited());
    }

    #[test]
    fn a_spent_minute_refuses_with_a_retry_after() {
        let limiter = Limiter::new();
        let (k, r) = (key(Some(3), None), route(None, None));
        let remaining: Vec<u32> =
            (0..3).map(|_| limiter.check(&k, &r).requests.unwrap().remaining).collect();
        assert_eq!(remaining, [2, 1, 0]);
        let d = limiter.check(&k, &r);
        assert_eq!(d.refusal, Some(Refusal::Requests));
        assert!(
            d.retry_after > Duration::from_secs(19) && d.retry_after <= Duration::from_secs(20)
        );
        assert_eq!(d.requests.unwrap().limit, 3);
    }

    #[test]
    fn a_refusal_by_the_route_does_not_spend_the_key() {
        let limiter = Limiter::new();
        let (k, r) = (key(Some(10), None), route(Some(1), None));
        assert!(limiter.check(&k, &r).allowed());
        assert!(!limiter.check(&k, &r).allowed());
        // The key's count only moved once; the tighter limit (the route's) is reported.
        let other = route(None, None);
        assert_eq!(limiter.check(&k, &other).requests.unwrap().remaining, 8);
        assert_eq!(limiter.check(&k, &r).requests.unwrap().limit, 1);
    }

    #[test]
    fn an_overdrawn_token_budget_refuses_until_it_recovers() {
        let limiter = Limiter::new();
        let (k, r) = (key(None, Some(100)), route(None, None));
        assert!(limiter.check(&k, &r).allowed());
        limiter.charge_tokens(&k, &r, 100);
        let d = limiter.check(&k, &r);
        assert!(d.allowed(), "exactly the budget is still within it");
        assert_eq!(d.tokens.unwrap().remaining, 0);
        limiter.charge_tokens(&k, &r, 50);
        let d = limiter.check(&k, &r);
        assert_eq!(d.refusal, Some(Refusal::Tokens));
        assert!(
            d.retry_after > Duration::from_secs(29) && d.retry_after <= Duration::from_secs(30)
        );
    }

    /// A Redis URL nothing answers at: a port that was free a moment ago.
    fn closed_port_url() -> String {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        format!("redis://127.0.0.1:{port}")
    }

    fn unreachable_redis(on_unreachable: OnUnreachable) -> (RateLimiter, PrometheusHandle) {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let config = RedisLimits::new(closed_port_url(), on_unreachable);
        let limiter =
            metrics::with_local_recorder(&recorder, || RateLimiter::new(Some(&config)).unwrap());
        (limiter, handle)
    }

    fn backend_gauge(metrics: &PrometheusHandle) -> Vec<String> {
        let rendered = metrics.render();
        let mut lines: Vec<String> = rendered
            .lines()
            .filter(|l| l.starts_with("gateway_ratelimit_backend{"))
            .map(str::to_owned)
            .collect();
        lines.sort();
        lines
    }

    #[tokio::test]
    async fn without_redis_the_counts_are_local_and_whole() {
        let limiter = RateLimiter::new(None).unwrap();
        let (k, r) = (key(Some(3), None), route(None, None));
        for _ in 0..3 {
            assert!(limiter.check(&k, &r).await.unwrap().allowed());
        }
        assert!(!limiter.check(&k, &r).await.unwrap().allowed());
    }

    #[tokio::test]
    async fn failing_open_allows_the_local_share_of_each_limit() {
        let (limiter, metrics) = unreachable_redis(OnUnreachable::FailOpen { local_share: 0.25 });
        let (k, r) = (key(Some(10), None), route(None, Some(1000)));
        let admitted: Vec<Decision> = {
            let mut v = Vec::new();
            for _ in 0..4 {
                v.push(limiter.check(&k, &r).await.unwrap());
            }
            v
        };
        // 10 × 0.25 = 2.5: two here, so that four replicas stay within the limit.
        assert_eq!(admitted.iter().filter(|d| d.allowed()).count(), 2);
        assert_eq!(admitted[0].requests.unwrap().limit, 2);
        assert_eq!(admitted[0].tokens.unwrap().limit, 250);
        assert_eq!(admitted[3].refusal, Some(Refusal::Requests));
        assert_eq!(
            backend_gauge(&metrics),
            [
                r#"gateway_ratelimit_backend{state="closed"} 0"#,
                r#"gateway_ratelimit_backend{state="local"} 1"#,
                r#"gateway_ratelimit_backend{state="redis"} 0"#,
            ]
        );
    }

    #[tokio::test]
    async fn failing_open_charges_tokens_to_the_local_share() {
        let (limiter, _) = unreachable_redis(OnUnreachable::FailOpen { local_share: 0.5 });
        let limiter = Arc::new(limiter);
        let (k, r) = (key(None, Some(100)), Arc::new(route(None, None)));
        assert!(limiter.check(&k, &r).await.unwrap().allowed());
        // 60 tokens overdraw a local budget of 50 (though not the whole 100).
        limiter.charge_tokens(&k, &r, 60);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let d = limiter.check(&k, &r).await.unwrap();
            if d.refusal == Some(Refusal::Tokens) {
                break;
            }
            assert!(Instant::now() < deadline, "the charge never landed: {d:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn failing_closed_refuses_limited_requests_only() {
        let (limiter, metrics) = unreachable_redis(OnUnreachable::FailClosed);
        let limited = key(Some(10), None);
        assert_eq!(limiter.check(&limited, &route(None, None)).await, Err(Unavailable));
        // Nothing to count, nothing to ask Redis.
        let unlimited = key(None, None);
        assert!(limiter.check(&unlimited, &route(None, None)).await.unwrap().allowed());
        assert_eq!(
            backend_gauge(&metrics),
            [
                r#"gateway_ratelimit_backend{state="closed"} 1"#,
                r#"gateway_ratelimit_backend{state="local"} 0"#,
                r#"gateway_ratelimit_backend{state="redis"} 0"#,
            ]
        );
    }

    #[test]
    fn a_share_never_scales_a_limit_to_nothing_nor_above_itself() {
        let k = key(Some(1), Some(7));
        let r = route(Some(0), None);
        let s = Subject::of(&k, &r).scaled(0.5);
        assert_eq!(
            (s.key_rpm, s.key_tpm, s.route_rpm, s.route_tpm),
            (Some(1), Some(3), Some(0), None)
        );
        let clamped = clamp_share(OnUnreachable::FailOpen { local_share: 4.0 });
        assert_eq!(clamped, OnUnreachable::FailOpen { local_share: 1.0 });
        let clamped = clamp_share(OnUnreachable::FailOpen { local_share: f64::NAN });
        assert_eq!(clamped, OnUnreachable::FailOpen { local_share: 1.0 });
    }
}
