//! `bud-bench`: benchmarks of Bud's services. Each subcommand starts what it measures
//! in-process on loopback, drives it with the load generator of [`load`] and prints a report.
//!
//! Exit status: 0 when every scenario ran with at most 1% errors, 1 when one had more, 2 when
//! the benchmark could not run at all (e.g. PostgreSQL unreachable).

mod app;
mod gateway;
mod load;
mod reconcile;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "bud-bench", about = "Benchmarks of Bud's services")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// budapp's REST API on SQLite and PostgreSQL: throughput and latency of reads and writes
    /// against an unauthenticated baseline, and the read latency target.
    App(app::AppArgs),
    /// budcluster's reconciler: endpoints across simulated clusters converged to RUNNING, and
    /// the store writes of passes that find nothing to change.
    Reconcile(reconcile::ReconcileArgs),
    /// budgateway as a proxy hop: a mock upstream directly and through the gateway (key auth,
    /// rate limits, metering on), with the gateway pinned to a CPU of its own; requests/s,
    /// added latency, CPU time per request and memory, optionally a memory soak.
    Gateway(gateway::GatewayArgs),
    /// The gateway's process that `gateway` starts (internal).
    #[command(hide = true)]
    GatewayServer(gateway::server::ServerArgs),
}

/// How a benchmark that ran to the end went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every scenario's error rate was within [`load::MAX_ERROR_RATE`].
    Clean,
    /// At least one scenario failed more often: its figures describe failures.
    TooManyErrors,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::App(args) => app::run(&args),
        Command::Reconcile(args) => reconcile::run(&args),
        Command::Gateway(args) => gateway::run(&args),
        Command::GatewayServer(args) => gateway::server::serve(&args),
    };
    match result {
        Ok(Verdict::Clean) => ExitCode::SUCCESS,
        Ok(Verdict::TooManyErrors) => {
            eprintln!("error: more than 1% of the requests of a scenario failed");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
