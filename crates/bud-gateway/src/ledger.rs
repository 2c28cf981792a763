//! One request's bookkeeping from the moment it has a key and a route to its end: its usage
//! record, token charges and metrics, written exactly once, however the request ends (answer,
//! error, stream cut, or the client going away: then the ledger is dropped unclosed and records
//! status 499 with what was used so far).

use std::sync::Arc;
use std::time::Instant;

use bud_domain::Timestamp;
use chrono::Utc;

use crate::limits::RateLimiter;
use crate::metering::{Meter, UsageRecord};
use crate::openai::Usage;
use crate::snapshot::{KeyEntry, Route};
use crate::state::{RouteState, TargetState};
use crate::telemetry::NO_TARGET;

/// Status recorded for a client that went away before its answer was complete.
pub const CLIENT_CLOSED: u16 = 499;

pub struct Ledger {
    /// Unique per request; also the response's `x-request-id`.
    pub id: uuid::Uuid,
    at: Timestamp,
    started: Instant,
    meter: Meter,
    limiter: Arc<RateLimiter>,
    key: KeyEntry,
    route: Arc<Route>,
    route_state: Arc<RouteState>,
    /// The target that answered (or was tried last).
    target: Option<Arc<TargetState>>,
    first_token: bool,
    /// Usage known so far, recorded if the client goes away.
    partial: Usage,
    closed: bool,
}

impl Ledger {
    pub fn open(
        meter: Meter,
        limiter: Arc<RateLimiter>,
        key: KeyEntry,
        route: Arc<Route>,
        route_state: Arc<RouteState>,
        started: Instant,
        at: Timestamp,
    ) -> Self {
        let millis = u64::try_from(at.timestamp_millis()).unwrap_or(0);
        let random: [u8; 10] = std::array::from_fn(|_| fastrand::u8(..));
        let id = uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid();
        Self {
            id,
            at,
            started,
            meter,
            limiter,
            key,
            route,
            route_state,
            target: None,
            first_token: false,
            partial: Usage::default(),
            closed: false,
        }
    }

    pub fn set_target(&mut self, target: Option<Arc<TargetState>>) {
        self.target = target;
    }

    /// Records the time to first token, once.
    pub fn first_token(&mut self) {
        if !self.first_token {
            self.first_token = true;
            self.route_state.metrics.ttft.record(self.started.elapsed().as_secs_f64());
        }
    }

    /// What has been used so far, recorded if the client goes away.
    pub fn set_partial(&mut self, usage: Usage) {
        self.partial = usage;
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Records the request's end: the status the client got and the tokens used. Only the
    /// first call counts.
    pub fn close(&mut self, status: u16, usage: Usage) {
        if std::mem::replace(&mut self.closed, true) {
            return;
        }
        let elapsed = self.started.elapsed();
        let target = self.target.as_ref().map_or(NO_TARGET, |t| t.label.as_str());
        let metrics = &self.route_state.metrics;
        metrics.request(target, status);
        metrics.duration.record(elapsed.as_secs_f64());
        if usage.prompt_tokens > 0 {
            metrics.prompt_tokens.increment(u64::from(usage.prompt_tokens));
        }
        if usage.completion_tokens > 0 {
            metrics.completion_tokens.increment(u64::from(usage.completion_tokens));
        }
        self.limiter.charge_tokens(&self.key, &self.route, usage.total());
        self.meter.record(UsageRecord {
            id: self.id,
            at: self.at,
            key_id: self.key.id,
            project_id: self.key.project_id,
            model: self.route.name.clone(),
            route: self.route.label.clone(),
            target: target.to_owned(),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            latency_ms: u32::try_from(elapsed.as_millis()).unwrap_or(u32::MAX),
            status,
        });
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        if !self.closed {
            self.close(CLIENT_CLOSED, self.partial);
        }
    }
}

/// Wall-clock now, as records carry it.
pub fn now() -> Timestamp {
    Utc::now()
}
