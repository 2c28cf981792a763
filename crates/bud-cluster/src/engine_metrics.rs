//! An endpoint's load as its engines report it: vLLM's Prometheus metrics scraped from each
//! ready replica and combined (queue depth and running requests summed; latency percentiles
//! from the merged histograms; rates from the difference with the previous scrape).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bud_domain::EndpointId;
use bud_protocol::control::{EndpointMetricsDto, Percentiles};
use tokio::sync::Mutex;

/// Counters and histograms of one scrape, summed over replicas.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineSample {
    pub running: f64,
    pub waiting: f64,
    pub cache_usage: f64,
    pub requests_total: f64,
    pub generation_tokens_total: f64,
    /// `le` upper bound → cumulative count.
    pub e2e_buckets: Vec<(f64, f64)>,
    pub ttft_buckets: Vec<(f64, f64)>,
    pub replicas: usize,
}

/// Parses one replica's `/metrics` text. Unknown lines are ignored; only vLLM's names count.
pub fn parse(text: &str) -> EngineSample {
    let mut s = EngineSample { replicas: 1, ..EngineSample::default() };
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.trim().parse::<f64>() else { continue };
        let (name, labels) = series.split_once('{').map_or((series, ""), |(n, l)| (n, l));
        match name {
            "vllm:num_requests_running" => s.running += value,
            "vllm:num_requests_waiting" => s.waiting += value,
            "vllm:gpu_cache_usage_perc" => s.cache_usage = s.cache_usage.max(value),
            "vllm:request_success_total" => s.requests_total += value,
            "vllm:generation_tokens_total" => s.generation_tokens_total += value,
            "vllm:e2e_request_latency_seconds_bucket" => {
                add_bucket(&mut s.e2e_buckets, labels, value)
            }
            "vllm:time_to_first_token_seconds_bucket" => {
                add_bucket(&mut s.ttft_buckets, labels, value)
            }
            _ => {}
        }
    }
    s
}

fn add_bucket(buckets: &mut Vec<(f64, f64)>, labels: &str, count: f64) {
    let Some(le) = labels.split(',').find_map(|l| l.trim().strip_prefix("le=\"")) else { return };
    let le = le.trim_end_matches(['"', '}']);
    let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::NAN) };
    if bound.is_nan() {
        return;
    }
    match buckets.iter_mut().find(|(b, _)| *b == bound) {
        Some((_, c)) => *c += count,
        None => buckets.push((bound, count)),
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
}

impl EngineSample {
    /// Sums another replica's sample into this one.
    pub fn merge(&mut self, other: EngineSample) {
        self.running += other.running;
        self.waiting += other.waiting;
        self.cache_usage = self.cache_usage.max(other.cache_usage);
        self.requests_total += other.requests_total;
        self.generation_tokens_total += other.generation_tokens_total;
        for (le, c) in other.e2e_buckets {
            add_count(&mut self.e2e_buckets, le, c);
        }
        for (le, c) in other.ttft_buckets {
            add_count(&mut self.ttft_buckets, le, c);
        }
        self.replicas += other.replicas;
    }
}

fn add_count(buckets: &mut Vec<(f64, f64)>, le: f64, count: f64) {
    match buckets.iter_mut().find(|(b, _)| *b == le) {
        Some((_, c)) => *c += count,
        None => buckets.push((le, count)),
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
}

/// The `q` quantile of a cumulative histogram, interpolated linearly inside its bucket;
/// `None` when it holds no observations.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let width = count - prev.1;
            let into = if width > 0.0 { (rank - prev.1) / width } else { 1.0 };
            return Some(prev.0 + (le - prev.0) * into);
        }
        prev = (le, count);
    }
    Some(prev.0)
}

fn percentiles(buckets: &[(f64, f64)]) -> Option<Percentiles> {
    Some(Percentiles {
        p50: quantile(buckets, 0.5)?,
        p95: quantile(buckets, 0.95)?,
        p99: quantile(buckets, 0.99)?,
    })
}

/// Scrapes replicas and remembers each endpoint's previous sample for rates.
pub struct Scraper {
    http: reqwest::Client,
    previous: Mutex<HashMap<EndpointId, (Instant, EngineSample)>>,
}

impl Default for Scraper {
    fn default() -> Self {
        Self::new()
    }
}

impl Scraper {
    pub fn new() -> Self {
        let http =
            reqwest::Client::builder().timeout(Duration::from_secs(3)).build().unwrap_or_default();
        Self { http, previous: Mutex::new(HashMap::new()) }
    }

    async fn sample(&self, addresses: &[String]) -> EngineSample {
        let scrapes = addresses.iter().map(|a| async move {
            let text = self
                .http
                .get(format!("http://{a}/metrics"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            Some(parse(&text))
        });
        let mut total = EngineSample::default();
        for sample in futures::future::join_all(scrapes).await.into_iter().flatten() {
            total.merge(sample);
        }
        total
    }

    /// The endpoint's metrics now. Rates need two samples: the first call for an endpoint
    /// samples twice, half a second apart; later calls use the previous call's sample.
    pub async fn metrics(&self, id: EndpointId, addresses: &[String]) -> EndpointMetricsDto {
        let cached = self
            .previous
            .lock()
            .await
            .get(&id)
            .filter(|(at, _)| at.elapsed() < Duration::from_secs(300))
            .cloned();
        let (before_at, before) = match cached {
            Some(c) => c,
            None => {
                let at = Instant::now();
                let s = self.sample(addresses).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                (at, s)
            }
        };
        let now = Instant::now();
        let current = self.sample(addresses).await;
        self.previous.lock().await.insert(id, (now, current.clone()));
        let seconds = now.duration_since(before_at).as_secs_f64().max(0.001);
        let rate = |after: f64, before: f64| ((after - before).max(0.0)) / seconds;
        EndpointMetricsDto {
            endpoint_id: id.as_uuid(),
            replicas_scraped: current.replicas as i64,
            queue_depth: current.waiting,
            running: current.running,
            gpu_cache_usage: current.cache_usage,
            requests_per_second: rate(current.requests_total, before.requests_total),
            tokens_per_second: rate(
                current.generation_tokens_total,
                before.generation_tokens_total,
            ),
            latency_seconds: percentiles(&current.e2e_buckets),
            time_to_first_token_seconds: percentiles(&current.ttft_buckets),
            window_seconds: seconds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"# HELP vllm:num_requests_running Number of requests running.
vllm:num_requests_running{model_name="m"} 3
vllm:num_requests_waiting{model_name="m"} 7
vllm:gpu_cache_usage_perc{model_name="m"} 0.25
vllm:request_success_total{finished_reason="stop",model_name="m"} 10
vllm:request_success_total{finished_reason="length",model_name="m"} 5
vllm:generation_tokens_total{model_name="m"} 300
vllm:e2e_request_latency_seconds_bucket{le="0.1",model_name="m"} 5
vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="m"} 15
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="m"} 15
vllm:e2e_request_latency_seconds_count{model_name="m"} 15
"#;

    #[test]
    fn parses_vllm_metrics() {
        let s = parse(SAMPLE);
        assert_eq!(
            (s.running, s.waiting, s.requests_total, s.generation_tokens_total),
            (3.0, 7.0, 15.0, 300.0)
        );
        assert_eq!(s.e2e_buckets, vec![(0.1, 5.0), (1.0, 15.0), (f64::INFINITY, 15.0)]);
    }

    #[test]
    fn merging_sums_replicas() {
        let mut a = parse(SAMPLE);
        a.merge(parse(SAMPLE));
        assert_eq!((a.waiting, a.replicas), (14.0, 2));
        assert_eq!(a.e2e_buckets[1], (1.0, 30.0));
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let b = [(0.1, 5.0), (1.0, 15.0), (f64::INFINITY, 15.0)];
        let p50 = quantile(&b, 0.5).unwrap();
        assert!((p50 - 0.325).abs() < 1e-9, "{p50}");
        assert!(quantile(&b, 0.2).unwrap() <= 0.1);
        assert_eq!(quantile(&[(1.0, 0.0)], 0.5), None);
    }
}
