//! The gateway's tunables. The binary fills them from its configuration; the library reads no
//! environment variable (proxies included: they are passed in here, never taken from `*_proxy`).

use std::fmt;
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
    /// Where the rate limits are counted when several gateways must share them; `None` keeps
    /// them in this process (each replica then allows the whole limit on its own).
    pub redis: Option<RedisLimits>,
}

/// Rate limits counted in Redis, so that every gateway replica draws on the same budget.
#[derive(Clone)]
pub struct RedisLimits {
    /// `redis://[user:password@]host[:port][/db]`: one Redis (or a primary), not Redis Cluster
    /// (a request's cells are updated by one script, so they must live on one node); no TLS.
    pub url: String,
    /// What the gateway does while Redis does not answer within `timeout`.
    pub on_unreachable: OnUnreachable,
    /// How long a request's limit check may wait for Redis; it is added to the request's
    /// latency, so it is short: a Redis that is slower than this counts as unreachable.
    pub timeout: Duration,
    /// While Redis is unreachable, one request per interval tries it again (the others go
    /// straight to the fallback, paying no timeout).
    pub probe_interval: Duration,
    /// First part of every Redis key (`<prefix>:gcra:<kind>:<id>`), so that installations or
    /// tests sharing one Redis do not share counts.
    pub key_prefix: String,
}

impl RedisLimits {
    /// The defaults for a Redis at `url`.
    pub fn new(url: impl Into<String>, on_unreachable: OnUnreachable) -> Self {
        Self {
            url: url.into(),
            on_unreachable,
            timeout: Duration::from_millis(50),
            probe_interval: Duration::from_secs(1),
            key_prefix: "bud".to_owned(),
        }
    }
}

/// The URL's credentials stay out of logs.
impl fmt::Debug for RedisLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = match self.url.rsplit_once('@') {
            Some((_, host)) => format!("redis://…@{host}"),
            None => self.url.clone(),
        };
        f.debug_struct("RedisLimits")
            .field("url", &url)
            .field("on_unreachable", &self.on_unreachable)
            .field("timeout", &self.timeout)
            .field("probe_interval", &self.probe_interval)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

/// The rate limits' behaviour while Redis is unreachable. Never "each replica allows the whole
/// limit": with N replicas that would multiply every limit by N.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OnUnreachable {
    /// Count in this process, each limit multiplied by `local_share` (1/replicas, so that the
    /// replicas together still allow at most the limit; a limit is never scaled below 1).
    /// Clamped to (0, 1].
    FailOpen { local_share: f64 },
    /// Refuse limited requests with 503 `rate_limiter_unavailable` (unlimited keys and routes
    /// are served).
    FailClosed,
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
            redis: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_redis_password_stays_out_of_debug_output() {
        let config =
            RedisLimits::new("redis://bud:s3cret@redis.internal:6379/1", OnUnreachable::FailClosed);
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("redis.internal:6379/1"), "{shown}");
    }
}
