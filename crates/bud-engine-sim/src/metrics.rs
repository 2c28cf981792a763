//! The engine's Prometheus metrics under vLLM's names, kept in atomics owned by one engine (not
//! a process-global recorder: several engines share a test process) and rendered as
//! Prometheus text by hand.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Why a request stopped generating, as vLLM's `finished_reason` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model emitted its end-of-sequence token.
    Stop,
    /// The request's token cap was reached first.
    Length,
    /// The client went away, or a fault cut the stream, before the end.
    Abort,
}

impl FinishReason {
    /// The label value, which is also the `finish_reason` field of a response.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Abort => "abort",
        }
    }
}

/// The instantaneous numbers that come from the scheduler rather than from counters.
#[derive(Debug, Clone, Copy)]
pub struct Gauges {
    /// Requests holding a batch slot.
    pub running: u64,
    /// Requests queued for a slot.
    pub waiting: u64,
    /// Batch slots in all; cache usage is `running / max_num_seqs`.
    pub max_num_seqs: u32,
}

/// Counters and histograms of one engine.
pub struct EngineMetrics {
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    /// Indexed by [`FinishReason`] in declaration order.
    finished: [AtomicU64; 3],
    time_to_first_token: Histogram,
    e2e_latency: Histogram,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl EngineMetrics {
    /// Zeroed metrics.
    pub fn new() -> Self {
        Self {
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            finished: Default::default(),
            time_to_first_token: Histogram::new(TTFT_BUCKETS),
            e2e_latency: Histogram::new(E2E_BUCKETS),
        }
    }

    /// Counts a prompt admitted to the batch.
    pub fn prefilled(&self, prompt_tokens: u32, time_to_first_token: Option<Duration>) {
        self.prompt_tokens.fetch_add(u64::from(prompt_tokens), Ordering::Relaxed);
        if let Some(ttft) = time_to_first_token {
            self.time_to_first_token.observe(ttft);
        }
    }

    /// Counts generated tokens.
    pub fn generated(&self, tokens: u32) {
        self.generation_tokens.fetch_add(u64::from(tokens), Ordering::Relaxed);
    }

    /// Counts a request leaving the engine.
    pub fn finished(&self, reason: FinishReason, e2e: Duration) {
        self.finished[reason as usize].fetch_add(1, Ordering::Relaxed);
        self.e2e_latency.observe(e2e);
    }

    /// The metrics page, labelled with `model_name`.
    pub fn render(&self, model_name: &str, gauges: Gauges) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let label = escape_label(model_name);
        let usage = gauges.running as f64 / f64::from(gauges.max_num_seqs.max(1));

        gauge(
            &mut out,
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            &label,
            gauges.running as f64,
        );
        gauge(
            &mut out,
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            &label,
            gauges.waiting as f64,
        );
        gauge(
            &mut out,
            "vllm:gpu_cache_usage_perc",
            "GPU KV-cache usage. 1 means 100 percent usage.",
            &label,
            usage,
        );
        // vLLM's V1 engine renamed the gauge above; serve both so either dashboard works.
        gauge(
            &mut out,
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            &label,
            usage,
        );
        counter(
            &mut out,
            "vllm:prompt_tokens_total",
            "Number of prefill tokens processed.",
            &label,
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "vllm:generation_tokens_total",
            "Number of generation tokens processed.",
            &label,
            self.generation_tokens.load(Ordering::Relaxed),
        );

        header(
            &mut out,
            "vllm:request_success_total",
            "Count of successfully processed requests.",
            "counter",
        );
        for reason in [FinishReason::Stop, FinishReason::Length, FinishReason::Abort] {
            let _ = writeln!(
                out,
                "vllm:request_success_total{{finished_reason=\"{}\",model_name=\"{label}\"}} {}",
                reason.as_str(),
                self.finished[reason as usize].load(Ordering::Relaxed),
            );
        }

        self.time_to_first_token.render(
            &mut out,
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            &label,
        );
        self.e2e_latency.render(
            &mut out,
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            &label,
        );
        out
    }
}

/// vLLM's bucket bounds for time to first token, in seconds.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// vLLM's bucket bounds for end-to-end latency, in seconds.
const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// A Prometheus histogram over fixed bounds. Buckets hold their own counts (made cumulative
/// when rendered), and the sum is kept in nanoseconds so it can be an atomic integer.
struct Histogram {
    bounds: &'static [f64],
    /// One per bound, then the `+Inf` overflow.
    buckets: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        let at = self.bounds.partition_point(|&bound| bound < seconds);
        if let Some(bucket) = self.buckets.get(at) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(value.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str, label: &str) {
        header(out, name, help, "histogram");
        let mut cumulative = 0u64;
        for (bound, bucket) in self.bounds.iter().zip(self.buckets.iter()) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound:?}\",model_name=\"{label}\"}} {cumulative}"
            );
        }
        // `_count` is the `+Inf` bucket, so the two agree even while requests land mid-render.
        if let Some(overflow) = self.buckets.last() {
            cumulative += overflow.load(Ordering::Relaxed);
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\",model_name=\"{label}\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum{{model_name=\"{label}\"}} {sum:?}");
        let _ = writeln!(out, "{name}_count{{model_name=\"{label}\"}} {cumulative}");
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn gauge(out: &mut String, name: &str, help: &str, label: &str, value: f64) {
    header(out, name, help, "gauge");
    let _ = writeln!(out, "{name}{{model_name=\"{label}\"}} {value:?}");
}

fn counter(out: &mut String, name: &str, help: &str, label: &str, value: u64) {
    header(out, name, help, "counter");
    let _ = writeln!(out, "{name}{{model_name=\"{label}\"}} {value}");
}

/// A label value with the three characters the text format escapes.
fn escape_label(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample<'a>(page: &'a str, series: &str) -> &'a str {
        page.lines()
            .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no {series} in\n{page}"))
    }

    #[test]
    fn renders_gauges_counters_and_cumulative_buckets() {
        let metrics = EngineMetrics::new();
        metrics.prefilled(7, Some(Duration::from_millis(30)));
        metrics.generated(16);
        metrics.finished(FinishReason::Length, Duration::from_millis(400));
        metrics.finished(FinishReason::Stop, Duration::from_secs(9000));
        let page = metrics.render("m", Gauges { running: 1, waiting: 3, max_num_seqs: 4 });

        assert_eq!(sample(&page, "vllm:num_requests_running{model_name=\"m\"}"), "1.0");
        assert_eq!(sample(&page, "vllm:num_requests_waiting{model_name=\"m\"}"), "3.0");
        assert_eq!(sample(&page, "vllm:gpu_cache_usage_perc{model_name=\"m\"}"), "0.25");
        assert_eq!(sample(&page, "vllm:prompt_tokens_total{model_name=\"m\"}"), "7");
        assert_eq!(sample(&page, "vllm:generation_tokens_total{model_name=\"m\"}"), "16");
        let success = "vllm:request_success_total{finished_reason=\"length\",model_name=\"m\"}";
        assert_eq!(sample(&page, success), "1");

        let ttft = "vllm:time_to_first_token_seconds";
        assert_eq!(sample(&page, &format!("{ttft}_bucket{{le=\"0.02\",model_name=\"m\"}}")), "0");
        assert_eq!(sample(&page, &format!("{ttft}_bucket{{le=\"0.04\",model_name=\"m\"}}")), "1");
        assert_eq!(sample(&page, &format!("{ttft}_count{{model_name=\"m\"}}")), "1");
        assert_eq!(sample(&page, &format!("{ttft}_sum{{model_name=\"m\"}}")), "0.03");

        let e2e = "vllm:e2e_request_latency_seconds";
        assert_eq!(sample(&page, &format!("{e2e}_bucket{{le=\"0.5\",model_name=\"m\"}}")), "1");
        assert_eq!(sample(&page, &format!("{e2e}_bucket{{le=\"7680.0\",model_name=\"m\"}}")), "1");
        assert_eq!(sample(&page, &format!("{e2e}_bucket{{le=\"+Inf\",model_name=\"m\"}}")), "2");
        assert_eq!(sample(&page, &format!("{e2e}_count{{model_name=\"m\"}}")), "2");
        assert!(page.contains("# TYPE vllm:e2e_request_latency_seconds histogram\n"));
    }

    #[test]
    fn bucket_bounds_are_inclusive() {
        let metrics = EngineMetrics::new();
        metrics.prefilled(1, Some(Duration::from_millis(100)));
        let page = metrics.render("m", Gauges { running: 0, waiting: 0, max_num_seqs: 1 });
        let series = "vllm:time_to_first_token_seconds_bucket{le=\"0.1\",model_name=\"m\"}";
        assert_eq!(sample(&page, series), "1");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
