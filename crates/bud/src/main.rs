//! `bud`: one binary for every Bud component and its command-line client.

mod cli;
mod config;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "bud",
    version,
    about = "Bud: serve large language models on your own GPU clusters"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run Bud's services (all of them on one machine by default).
    Serve {
        /// A bud.toml; `BUD_*` environment variables override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Run one service only (production: each on its own replicas).
        #[arg(long, value_enum)]
        only: Option<serve::Only>,
    },
    /// A simulated vLLM-compatible engine, for development, demos, tests and benchmarks.
    EngineSim {
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long)]
        port: u16,
        #[command(flatten)]
        sim: bud_engine_sim::SimConfig,
    },
    /// Apply database migrations and exit.
    Migrate {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print budapp's OpenAPI document.
    Openapi,
    /// Master keys for secrets at rest.
    #[command(subcommand)]
    Secrets(SecretsCommand),
    #[command(flatten)]
    Client(cli::ClientCommand),
}

#[derive(Debug, Subcommand)]
enum SecretsCommand {
    /// Print a new master key entry `<kid>:<base64>` for secrets.master_keys.
    GenerateKey {
        /// Key id: letters, digits, `-` and `_`, at most 32.
        kid: String,
    },
    /// Reseal every stored secret under secrets.active_key. List the old key too until this
    /// has run; then it can be removed.
    Rotate {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let env: Vec<(String, String)> = std::env::vars().collect();
    let result = runtime.block_on(async move {
        match args.command {
            Command::Serve { config, only } => serve::serve(config.as_deref(), &env, only).await,
            Command::EngineSim { host, port, sim } => serve::engine_sim(&host, port, sim).await,
            Command::Migrate { config } => serve::migrate(config.as_deref(), &env).await,
            Command::Openapi => {
                println!("{}", serde_json::to_string_pretty(&bud_app::api::openapi())?);
                Ok(())
            }
            Command::Secrets(SecretsCommand::GenerateKey { kid }) => serve::generate_key(&kid),
            Command::Secrets(SecretsCommand::Rotate { config }) => {
                serve::rotate_secrets(config.as_deref(), &env).await
            }
            Command::Client(c) => cli::run(c, &env).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
