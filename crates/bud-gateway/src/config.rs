//! The gateway's tunables. The binary fills them from its configuration; the library reads no
//! environment variable (proxies included: they are passed in here, never taken from `*_proxy`).

use std::time::Duration;

/// How the data plane behaves under slow, failing or overloaded upstreams.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// How long one attempt may take to produce what the client would see first: the response
    /// head of a stream, the whole answer of a non-streaming request (which an engine sends only
    /// once it is complete). A slower target is abandoned for the next one. Also the longest
    /// silence tolerated in a stream once its tokens flow.
    pub try_timeout: Duration,
    /// What a request may take up to its answer (non-streaming) or its first token (streaming),
    /// retries and waits for `Retry-After` included. A stream that keeps producing tokens is
    /// not cut by it.
    pub overall_timeout: Duration,
    /// Interval of the `: keepalive` comments sent while a stream waits for its first token, so
    /// that proxies between the client and us do not close an idle connection.
    pub keepalive: Duration,
    /// Longest SSE line, and longest event, relayed; a longer one ends the stream with an error
    /// event instead of growing a buffer without bound.
    pub max_line_bytes: usize,
    /// How old the snapshot may get before `/readyz` reports the gateway unready.
    pub stale_window: Duration,
    /// Proxy for provider requests over `http://`.
    pub http_proxy: Option<String>,
    /// Proxy for provider requests over `https://`.
    pub https_proxy: Option<String>,
    /// Hosts reached without a proxy, in the usual `NO_PROXY` syntax.
    pub no_proxy: Option<String>,
    /// Retries may add at most this fraction to the requests (plus `retry_budget_per_second`),
    /// so that retries cannot multiply the load on an upstream that is already failing.
    pub retry_budget_ratio: f64,
    /// Retries always allowed per second per route, so that a quiet route can still retry.
    pub retry_budget_per_second: f64,
    /// Consecutive failures that open a target's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker keeps its target out before one probe request may try it.
    pub breaker_open: Duration,
    /// Largest request body accepted (413 beyond).
    pub max_request_bytes: usize,
    /// Largest non-streaming answer read from an upstream (a larger one is a failed attempt).
    pub max_response_bytes: usize,
    /// How often the engines' `/metrics` are read for their queue depth.
    pub scrape_interval: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            try_timeout: Duration::from_secs(30),
            overall_timeout: Duration::from_secs(120),
            keepalive: Duration::from_secs(10),
            max_line_bytes: 1 << 20,
            stale_window: Duration::from_secs(300),
            http_proxy: None,
            https_proxy: None,
            no_proxy: None,
            retry_budget_ratio: 0.2,
            retry_budget_per_second: 5.0,
            breaker_failures: 5,
            breaker_open: Duration::from_secs(10),
            max_request_bytes: 32 << 20,
            max_response_bytes: 256 << 20,
            scrape_interval: Duration::from_secs(2),
        }
    }
}
