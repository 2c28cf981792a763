//! bud-engine-sim: a simulated inference engine that speaks vLLM's OpenAI-compatible HTTP API
//! (chat and text completions, streamed or not, embeddings, models, health and vLLM's
//! Prometheus metrics), so Bud can be run, demonstrated, tested and benchmarked without a GPU.
//!
//! It models what the platform can observe of an engine: continuous batching with
//! `max_num_seqs` slots and a FIFO queue, time to first token and inter-token latency, token
//! accounting, and deterministic content (the same prompt and seed give the same answer). Fault
//! switches make it fail to start, start slowly, crash, answer errors, hang, or cut streams.
//!
//! [`run`] takes a bound listener and a shutdown token from the caller; [`router`] serves the
//! same routes in-process.

pub mod config;
pub mod engine;
pub mod error;
pub mod wire;

mod api;
mod extract;
mod metrics;
mod scheduler;
mod server;
mod stream;
mod text;

use std::io;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use api::router;
pub use config::{Faults, SimConfig};
pub use engine::{Answer, SimEngine};
pub use error::SimError;
pub use stream::SseStream;

/// Serves the simulated engine on `listener` until `shutdown` is cancelled, then lets answers
/// in flight finish and returns `Ok`.
///
/// Returns an error (the process should exit non-zero) for the fail-start fault, before
/// serving anything, and for the crash-after fault, once it fires.
pub async fn run(
    config: SimConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> io::Result<()> {
    config.faults.validate().map_err(SimError::into_io)?;
    if config.fail_start {
        return Err(SimError::FailStart.into_io());
    }
    let listener = if config.start_delay_ms == 0 {
        listener
    } else {
        let delay = Duration::from_millis(config.start_delay_ms);
        match listen_after(listener, delay, &shutdown).await? {
            Some(listener) => listener,
            None => return Ok(()),
        }
    };
    tracing::info!(
        addr = %listener.local_addr()?,
        model = %config.model,
        max_num_seqs = config.max_num_seqs,
        "engine-sim serving"
    );
    server::serve(listener, SimEngine::new(config), shutdown).await
}

/// A slow cold start: closes the caller's listener so connections are refused, as they are
/// while vLLM loads weights, and listens on the same address again after `delay`. `None`
/// if shut down meanwhile.
async fn listen_after(
    listener: TcpListener,
    delay: Duration,
    shutdown: &CancellationToken,
) -> io::Result<Option<TcpListener>> {
    let addr = listener.local_addr()?;
    drop(listener);
    tracing::info!(%addr, ?delay, "engine-sim starting slowly");
    tokio::select! {
        () = shutdown.cancelled() => return Ok(None),
        () = tokio::time::sleep(delay) => {}
    }
    TcpListener::bind(addr)
        .await
        .map(Some)
        .map_err(|source| SimError::Relisten { addr, source }.into_io())
}
