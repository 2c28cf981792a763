//! When a failed attempt may be tried again: the retry budget that keeps retries from
//! multiplying the load on a failing upstream, and the upstream's `Retry-After`.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use http::HeaderMap;

/// A token bucket of retries: every request deposits `ratio` of a retry, time adds
/// `per_second`, and every attempt after a request's first withdraws one. So retries add at
/// most `ratio` to the requests plus `per_second`, however many targets fail.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    per_second: f64,
    /// Retries saved up at most: enough for a burst after a quiet spell, not for a storm.
    capacity: f64,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RetryBudget {
    pub fn new(ratio: f64, per_second: f64) -> Self {
        let ratio = if ratio.is_finite() { ratio.max(0.0) } else { 0.0 };
        let per_second = if per_second.is_finite() { per_second.max(0.0) } else { 0.0 };
        let capacity = (2.0 * per_second).max(10.0);
        Self {
            ratio,
            per_second,
            capacity,
            bucket: Mutex::new(Bucket { tokens: capacity, at: Instant::now() }),
        }
    }

    /// A request arrived.
    pub fn deposit(&self) {
        if self.ratio == 0.0 {
            return;
        }
        let mut b = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        b.tokens = (b.tokens + self.ratio).min(self.capacity);
    }

    /// Takes one retry from the budget, or says there is none left.
    pub fn withdraw(&self) -> bool {
        let mut b = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let refill = now.duration_since(b.at).as_secs_f64() * self.per_second;
        b.tokens = (b.tokens + refill).min(self.capacity);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// How long an upstream asked us to wait: `retry-after-ms` (OpenAI's), else `Retry-After` in
/// seconds or as an HTTP date.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
    {
        return duration_from_secs(ms / 1000.0);
    }
    let value = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return duration_from_secs(secs);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

fn duration_from_secs(secs: f64) -> Option<Duration> {
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn the_budget_allows_a_fraction_of_the_requests() {
        let budget = RetryBudget::new(0.2, 0.0);
        // The saved-up capacity first.
        let saved = (0..100).take_while(|_| budget.withdraw()).count();
        assert_eq!(saved, 10);
        let mut retries = 0;
        for _ in 0..1000 {
            budget.deposit();
            if budget.withdraw() {
                retries += 1;
            }
        }
        assert!((195..=200).contains(&retries), "{retries}");
    }

    #[test]
    fn reads_every_retry_after_form() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h, now), None);
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(2)));
        h.insert("retry-after", HeaderValue::from_static("0.5"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_millis(500)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(7));
        h.insert("retry-after", HeaderValue::from_str(&date).unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(7)));
        h.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_millis(250)));
        h.insert("retry-after-ms", HeaderValue::from_static("-1"));
        assert_eq!(retry_after(&h, now), None);
    }
}
