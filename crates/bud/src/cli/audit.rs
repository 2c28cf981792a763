//! `bud audit`: read the hash-chained record of every change, and check the chain.

use anyhow::bail;
use bud_protocol::control::{AuditList, AuditVerificationDto};
use chrono::{DateTime, Utc};
use clap::Subcommand;
use uuid::Uuid;

use super::http::{Api, LIST_CAP};
use super::output::Format;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Audit records, oldest first, filtered.
    List {
        /// E.g. `project.create`, `key.revoke`, `auth.login`.
        #[arg(long)]
        action: Option<String>,
        /// Records of this user's actions.
        #[arg(long, value_name = "USER_ID")]
        actor: Option<Uuid>,
        #[arg(long, value_name = "PROJECT_ID")]
        project: Option<Uuid>,
        /// Records at or after this time.
        #[arg(long, value_name = "RFC3339")]
        since: Option<DateTime<Utc>>,
        /// Records before this time.
        #[arg(long, value_name = "RFC3339")]
        until: Option<DateTime<Utc>>,
        /// The most records to show.
        #[arg(long, default_value_t = LIST_CAP as u32, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
    /// Check every record's hash and its link to the one before; fails when the chain is broken.
    Verify,
}

pub async fn audit(command: AuditCommand, api: &mut Api, format: Format) -> anyhow::Result<String> {
    match command {
        AuditCommand::List { action, actor, project, since, until, limit } => {
            let filters: Vec<(&str, String)> = [
                ("action", action),
                ("actor_id", actor.map(|a| a.to_string())),
                ("project_id", project.map(|p| p.to_string())),
                ("since", since.map(|t| t.to_rfc3339())),
                ("until", until.map(|t| t.to_rfc3339())),
            ]
            .into_iter()
            .filter_map(|(key, value)| Some((key, value?)))
            .collect();
            format.list(&api.list::<AuditList>("/audit", &filters, limit as usize).await?)
        }
        AuditCommand::Verify => {
            let verification: AuditVerificationDto = api.get("/audit/verify", &[]).await?;
            let rendered = format.render(&verification, |v| {
                format!("Audit chain intact: {} records checked", v.records_checked)
            })?;
            if verification.ok {
                return Ok(rendered);
            }
            // Scripts see the JSON and a failing exit status; people see the reason.
            if format == Format::Json {
                println!("{rendered}");
            }
            let seq =
                verification.first_broken_seq.map_or_else(|| "?".to_owned(), |s| s.to_string());
            let reason = verification.reason.as_deref().unwrap_or("no reason given");
            bail!(
                "the audit chain is broken at record {seq}: {reason} ({} records checked)",
                verification.records_checked
            )
        }
    }
}
