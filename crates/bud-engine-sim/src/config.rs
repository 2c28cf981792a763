//! What the simulated engine serves and how fast, and the faults it injects.
//!
//! [`SimConfig`] is a set of clap arguments so the `bud` binary can flatten it into `bud
//! engine-sim`; the flags mirror vLLM's where vLLM has one (`--max-num-seqs`).

use serde::{Deserialize, Serialize};

use crate::error::SimError;

/// Everything `bud engine-sim` takes besides `--port`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimConfig {
    /// Served model name: requests naming another model get vLLM's 404.
    #[arg(long)]
    pub model: String,

    /// Requests generating at once; the rest wait in FIFO order, as in vLLM's continuous
    /// batching scheduler.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_num_seqs: u32,

    /// Time from a request getting its slot to its first token, in milliseconds.
    #[arg(long, default_value_t = 20)]
    pub ttft_ms: u64,

    /// Time between two tokens of one request, in milliseconds; 0 sends them all at once.
    #[arg(long, default_value_t = 5)]
    pub itl_ms: u64,

    /// Tokens an answer has when the request does not cap it lower (the simulated model emits
    /// its end-of-sequence token after this many).
    #[arg(long, default_value_t = 16)]
    pub output_tokens: u32,

    /// Length of the vectors `/v1/embeddings` returns.
    #[arg(long, default_value_t = 384, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub embedding_dim: u32,

    /// Context window, reported by `/v1/models`; longer requests get vLLM's 400.
    #[arg(long, default_value_t = 8192)]
    pub max_model_len: u32,

    /// Mixed into every generated text and vector, so two engines can answer differently.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Fail at once, before listening: `run` returns an error and the process exits non-zero.
    #[arg(long)]
    pub fail_start: bool,

    /// Wait this long before listening, as a cold start loading weights does.
    #[arg(long, default_value_t = 0)]
    pub start_delay_ms: u64,

    /// Faults that can also be changed while running, through `POST /sim/faults`.
    #[command(flatten)]
    pub faults: Faults,
}

impl SimConfig {
    /// A configuration with vLLM-like defaults serving `model`, for tests and embedding.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            max_num_seqs: 256,
            ttft_ms: 20,
            itl_ms: 5,
            output_tokens: 16,
            embedding_dim: 384,
            max_model_len: 8192,
            seed: 0,
            fail_start: false,
            start_delay_ms: 0,
            faults: Faults::default(),
        }
    }
}

/// Faults injected into requests. `POST /sim/faults` replaces the whole set: a field left out
/// is off, so `{}` clears every fault.
#[derive(Debug, Clone, Copy, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Fraction of inference requests (0.0 to 1.0) answered with an error instead.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,

    /// Status of the injected errors; 429 also sends `Retry-After: 1`.
    #[arg(long, default_value_t = 500)]
    pub error_status: u16,

    /// Accept inference requests but never answer them (nor take a batch slot).
    #[arg(long)]
    pub hang: bool,

    /// End every stream abruptly after this many `data:` events, without `[DONE]`.
    #[arg(long)]
    pub cut_stream_after: Option<u32>,

    /// Exit once this many requests (counted since start) have completed successfully.
    #[arg(long)]
    pub crash_after: Option<u64>,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            error_rate: 0.0,
            error_status: 500,
            hang: false,
            cut_stream_after: None,
            crash_after: None,
        }
    }
}

impl Faults {
    /// Checks what serde cannot: the rate is a fraction and the status an error status.
    pub fn validate(self) -> Result<Self, SimError> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err(SimError::InvalidFaults(format!(
                "error_rate must be between 0.0 and 1.0, got {}",
                self.error_rate
            )));
        }
        if !(400..=599).contains(&self.error_status) {
            return Err(SimError::InvalidFaults(format!(
                "error_status must be between 400 and 599, got {}",
                self.error_status
            )));
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    /// How the binary uses it: flattened beside its own `--port`.
    #[derive(Parser)]
    struct Cli {
        #[arg(long)]
        port: u16,
        #[command(flatten)]
        sim: SimConfig,
    }

    #[test]
    fn flags_parse_with_vllm_like_defaults() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["bud", "--port", "1", "--model", "m"]).unwrap();
        let defaults = SimConfig::new("m");
        assert_eq!(cli.sim.max_num_seqs, defaults.max_num_seqs);
        assert_eq!((cli.sim.ttft_ms, cli.sim.itl_ms), (20, 5));
        assert_eq!((cli.sim.output_tokens, cli.sim.embedding_dim), (16, 384));
        assert_eq!(cli.sim.faults, Faults::default());

        let cli = Cli::try_parse_from([
            "bud",
            "--port=1",
            "--model=m",
            "--max-num-seqs=2",
            "--error-rate=0.5",
            "--error-status=429",
            "--hang",
            "--cut-stream-after=3",
            "--crash-after=7",
            "--fail-start",
            "--start-delay-ms=10",
        ])
        .unwrap();
        assert_eq!(cli.sim.max_num_seqs, 2);
        assert!(cli.sim.fail_start);
        let expected = Faults {
            error_rate: 0.5,
            error_status: 429,
            hang: true,
            cut_stream_after: Some(3),
            crash_after: Some(7),
        };
        assert_eq!(cli.sim.faults, expected);
        assert!(Cli::try_parse_from(["bud", "--port=1"]).is_err(), "--model is required");
        assert!(Cli::try_parse_from(["bud", "--port=1", "--model=m", "--max-num-seqs=0"]).is_err());
    }
}
