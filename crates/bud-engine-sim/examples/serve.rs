//! Runs the simulated engine on a loopback port until Ctrl-C, the way `bud engine-sim` will:
//!
//! ```text
//! cargo run --release -p bud-engine-sim --example serve -- 8000 --model demo --ttft-ms 0 --itl-ms 0
//! ```
//!
//! Benchmark it pinned to one core (`taskset -c 0 target/release/examples/serve …`) with `wrk`
//! on another; `examples/chat.lua` is a `wrk` script posting a short chat completion.

use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// `serve PORT --model NAME [sim options]`.
#[derive(Parser)]
struct Args {
    /// Loopback port to listen on.
    port: u16,
    #[command(flatten)]
    sim: bud_engine_sim::SimConfig,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let listener = TcpListener::bind(("127.0.0.1", args.port)).await?;
    let shutdown = CancellationToken::new();
    let on_ctrl_c = shutdown.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_ctrl_c.cancel();
        }
    });
    bud_engine_sim::run(args.sim, listener, shutdown).await
}
