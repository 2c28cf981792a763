//! The command-line client over budapp's REST API.

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum ClientCommand {}

pub async fn run(command: ClientCommand, _env: &[(String, String)]) -> anyhow::Result<()> {
    match command {}
}
