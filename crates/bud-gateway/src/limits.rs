//! Requests and tokens per minute, per key and per route, kept in this process with GCRA
//! (the generic cell rate algorithm: one timestamp per limit, no timers, no background task).
//!
//! Requests are admitted (and counted) by [`Limiter::check`]; tokens are only known once the
//! answer is complete, so they are charged afterwards by [`Limiter::charge_tokens`], and a key
//! or route whose charges overshoot its budget is refused until it has recovered. Sharing the
//! counts between gateways (Redis) can come later behind the same two calls.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bud_domain::ApiKeyId;

use crate::snapshot::{KeyEntry, Route};

/// The window every limit is expressed over.
pub const PERIOD: Duration = Duration::from_secs(60);
const PERIOD_NS: u64 = 60_000_000_000;

/// What [`Limiter::check`] decided, with what the `x-ratelimit-*` headers report.
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

/// The local limiter: shared by every request of this process.
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
        let key_limited = key.rpm.is_some() || key.tpm.is_some();
        let route_limited = route.rpm.is_some() || route.tpm.is_some();
        if !key_limited && !route_limited {
            return Decision::default();
        }
        let now = self.now();
        let mut key_table = key_limited.then(|| self.key_shard(key.id));
        let mut route_table = route_limited.then(|| lock(&self.routes));
        let key_cell = key_table.as_mut().map(|t| t.cell(&key.id, now));
        let route_cell = route_table.as_mut().map(|t| t.cell_by_label(&route.label, now));

        let key_requests =
            key_cell.as_ref().zip(key.rpm).map(|(c, l)| c.requests.evaluate(now, l, 1));
        let route_requests =
            route_cell.as_ref().zip(route.rpm).map(|(c, l)| c.requests.evaluate(now, l, 1));
        let key_tokens = key_cell.as_ref().zip(key.tpm).map(|(c, l)| c.tokens.evaluate(now, l, 0));
        let route_tokens =
            route_cell.as_ref().zip(route.tpm).map(|(c, l)| c.tokens.evaluate(now, l, 0));

        let requests_ok = [key_requests, route_requests].iter().flatten().all(|v| v.allowed);
        let tokens_ok = [key_tokens, route_tokens].iter().flatten().all(|v| v.allowed);
        let retry_after = [key_requests, route_requests, key_tokens, route_tokens]
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
        if refusal.is_none() {
            if let (Some(cell), Some(v)) = (key_cell, key_requests) {
                cell.requests.tat = v.tat;
            }
            if let (Some(cell), Some(v)) = (route_cell, route_requests) {
                cell.requests.tat = v.tat;
            }
        }
        Decision {
            refusal,
            retry_after: Duration::from_nanos(retry_after),
            requests: tighter(key_requests.zip(key.rpm), route_requests.zip(route.rpm)),
            tokens: tighter(key_tokens.zip(key.tpm), route_tokens.zip(route.tpm)),
        }
    }

    /// Charges what an answered request used against the key's and route's token budgets.
    pub fn charge_tokens(&self, key: &KeyEntry, route: &Route, tokens: u32) {
        if tokens == 0 || (key.tpm.is_none() && route.tpm.is_none()) {
            return;
        }
        let now = self.now();
        if let Some(limit) = key.tpm {
            self.key_shard(key.id).cell(&key.id, now).tokens.charge(now, limit, tokens);
        }
        if let Some(limit) = route.tpm {
            lock(&self.routes).cell_by_label(&route.label, now).tokens.charge(now, limit, tokens);
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
        if limit == 0 {
            return Verdict {
                allowed: false,
                remaining: 0,
                reset: 0,
                retry_after: PERIOD_NS,
                tat: self.tat,
            };
        }
        let unit = unit(limit);
        let horizon = now.saturating_add(capacity(limit));
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
        if limit == 0 {
            return;
        }
        self.tat = self.tat.max(now).saturating_add(unit(limit).saturating_mul(u64::from(cost)));
    }
}

/// Nanoseconds one unit takes to refill, rounded up so the limit is never exceeded.
fn unit(limit: u32) -> u64 {
    PERIOD_NS.div_ceil(u64::from(limit))
}

/// Nanoseconds of credit a full bucket holds: `limit` whole units (a hair over [`PERIOD`] when
/// the period does not divide evenly), so that a burst of exactly `limit` fits.
fn capacity(limit: u32) -> u64 {
    unit(limit) * u64::from(limit)
}

fn units(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use bud_domain::ProjectId;
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
            let capacity = i128::from(unit(limit)) * i128::from(limit);
            Self { credit: capacity, capacity, at }
        }
        fn refill(&mut self, now: u64) {
            self.credit = (self.credit + i128::from(now - self.at)).min(self.capacity);
            self.at = now;
        }
        fn admit(&mut self, now: u64, limit: u32, cost: u32) -> (bool, u32) {
            self.refill(now);
            let price = i128::from(unit(limit)) * i128::from(cost);
            if self.credit >= price {
                self.credit -= price;
                (true, (self.credit / i128::from(unit(limit))) as u32)
            } else {
                (false, (self.credit.max(0) / i128::from(unit(limit))) as u32)
            }
        }
        fn charge(&mut self, now: u64, limit: u32, cost: u32) {
            self.refill(now);
            self.credit -= i128::from(unit(limit)) * i128::from(cost);
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
}
