//! The gateway's metrics. Handles are registered once per route (and per target and status)
//! and kept, so that recording on the hot path formats no string and looks up no label set in
//! the recorder. Every label value comes from the snapshot (route and target labels) or is a
//! status code the gateway sent, never from raw client input, so cardinality stays bounded.

use std::sync::{PoisonError, RwLock};

use metrics::{Counter, Histogram};

/// The route label of requests that never reached a route (bad key, unknown model).
pub const NO_ROUTE: &str = "-";
/// The target label of requests no target answered.
pub const NO_TARGET: &str = "-";

/// The handles of one route's series.
#[derive(Debug)]
pub struct RouteMetrics {
    label: String,
    /// `gateway_request_duration_seconds{route}`: arrival to the end of the answer.
    pub duration: Histogram,
    /// `gateway_time_to_first_token_seconds{route}`: arrival to the first token relayed (for a
    /// non-streaming answer, to the answer).
    pub ttft: Histogram,
    pub prompt_tokens: Counter,
    pub completion_tokens: Counter,
    pub retries: Counter,
    pub fallbacks: Counter,
    /// `gateway_requests_total{route,target,status}`, by target label and status.
    requests: RwLock<Vec<(String, u16, Counter)>>,
}

impl RouteMetrics {
    pub fn new(label: &str) -> Self {
        let route = label.to_owned();
        Self {
            duration: metrics::histogram!("gateway_request_duration_seconds", "route" => route.clone()),
            ttft: metrics::histogram!("gateway_time_to_first_token_seconds", "route" => route.clone()),
            prompt_tokens: metrics::counter!("gateway_tokens_total", "route" => route.clone(), "kind" => "prompt"),
            completion_tokens: metrics::counter!("gateway_tokens_total", "route" => route.clone(), "kind" => "completion"),
            retries: metrics::counter!("gateway_retries_total", "route" => route.clone()),
            fallbacks: metrics::counter!("gateway_fallbacks_total", "route" => route),
            label: label.to_owned(),
            requests: RwLock::new(Vec::new()),
        }
    }

    /// Counts one answered request.
    pub fn request(&self, target: &str, status: u16) {
        {
            let known = self.requests.read().unwrap_or_else(PoisonError::into_inner);
            if let Some((_, _, c)) = known.iter().find(|(t, s, _)| *s == status && t == target) {
                c.increment(1);
                return;
            }
        }
        let counter = metrics::counter!(
            "gateway_requests_total",
            "route" => self.label.clone(),
            "target" => target.to_owned(),
            "status" => status.to_string(),
        );
        counter.increment(1);
        let mut known = self.requests.write().unwrap_or_else(PoisonError::into_inner);
        if !known.iter().any(|(t, s, _)| *s == status && t == target) {
            known.push((target.to_owned(), status, counter));
        }
    }
}
