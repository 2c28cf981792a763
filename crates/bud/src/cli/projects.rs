//! `bud projects` (with their members) and `bud keys`, the API keys that belong to a project.

use bud_protocol::control::{
    AddMemberRequest, ApiKeyDto, ApiKeyList, CreateApiKeyRequest, CreateProjectRequest,
    CreatedApiKeyDto, MemberDto, MemberList, ProjectDto, ProjectList, UpdateProjectRequest,
};
use chrono::{DateTime, Utc};
use clap::{ArgGroup, Subcommand};
use uuid::Uuid;

use super::http::{Api, LIST_CAP};
use super::output::{self, Format};

#[derive(Debug, Subcommand)]
pub enum ProjectsCommand {
    /// List the projects you can see.
    List,
    /// Show one project.
    Show { id: Uuid },
    /// Create a project.
    Create {
        name: String,
        #[arg(long)]
        description: Option<String>,
    },
    /// Rename a project or change its description.
    #[command(group(ArgGroup::new("change").required(true).multiple(true)))]
    Update {
        id: Uuid,
        #[arg(long, group = "change")]
        name: Option<String>,
        #[arg(long, group = "change")]
        description: Option<String>,
    },
    /// Delete a project.
    Rm { id: Uuid },
    /// List a project's members.
    Members { id: Uuid },
    /// Add a user to a project, named by id or by email.
    #[command(group(ArgGroup::new("member").required(true)))]
    AddMember {
        id: Uuid,
        #[arg(long, value_name = "USER_ID", group = "member")]
        user: Option<Uuid>,
        #[arg(long, group = "member")]
        email: Option<String>,
    },
    /// Remove a user from a project.
    RemoveMember { id: Uuid, user_id: Uuid },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// List a project's API keys.
    List {
        #[arg(long, value_name = "PROJECT_ID")]
        project: Uuid,
    },
    /// Create an API key; its secret is printed once, now.
    Create {
        #[arg(long, value_name = "PROJECT_ID")]
        project: Uuid,
        name: String,
        /// When the key stops working, e.g. 2026-01-31T00:00:00Z; never without it.
        #[arg(long, value_name = "RFC3339")]
        expires_at: Option<DateTime<Utc>>,
        /// Requests per minute allowed to this key.
        #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
        rpm: Option<i64>,
        /// Tokens per minute allowed to this key.
        #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
        tpm: Option<i64>,
    },
    /// Show one API key (never its secret).
    Show { key_id: Uuid },
    /// Revoke an API key; it stops working at once.
    Revoke { key_id: Uuid },
}

pub async fn projects(
    command: ProjectsCommand,
    api: &mut Api,
    format: Format,
) -> anyhow::Result<String> {
    match command {
        ProjectsCommand::List => {
            format.list(&api.list::<ProjectList>("/projects", &[], LIST_CAP).await?)
        }
        ProjectsCommand::Show { id } => {
            format.one(&api.get::<ProjectDto>(&format!("/projects/{id}"), &[]).await?)
        }
        ProjectsCommand::Create { name, description } => {
            let request = CreateProjectRequest { name, description };
            format.one(&api.post::<ProjectDto>("/projects", &request).await?)
        }
        ProjectsCommand::Update { id, name, description } => {
            let request = UpdateProjectRequest { name, description };
            format.one(&api.patch::<ProjectDto>(&format!("/projects/{id}"), &request).await?)
        }
        ProjectsCommand::Rm { id } => {
            api.delete::<()>(&format!("/projects/{id}"), &[]).await?;
            format.done(format!("Deleted project {id}"))
        }
        ProjectsCommand::Members { id } => {
            let path = format!("/projects/{id}/members");
            format.list(&api.list::<MemberList>(&path, &[], LIST_CAP).await?)
        }
        ProjectsCommand::AddMember { id, user, email } => {
            let request = AddMemberRequest { user_id: user, email };
            let path = format!("/projects/{id}/members");
            format.one(&api.post::<MemberDto>(&path, &request).await?)
        }
        ProjectsCommand::RemoveMember { id, user_id } => {
            api.delete::<()>(&format!("/projects/{id}/members/{user_id}"), &[]).await?;
            format.done(format!("Removed user {user_id} from project {id}"))
        }
    }
}

pub async fn keys(command: KeysCommand, api: &mut Api, format: Format) -> anyhow::Result<String> {
    match command {
        KeysCommand::List { project } => {
            let path = format!("/projects/{project}/keys");
            format.list(&api.list::<ApiKeyList>(&path, &[], LIST_CAP).await?)
        }
        KeysCommand::Create { project, name, expires_at, rpm, tpm } => {
            let request = CreateApiKeyRequest { name, expires_at, rpm_limit: rpm, tpm_limit: tpm };
            let path = format!("/projects/{project}/keys");
            let created: CreatedApiKeyDto = api.post(&path, &request).await?;
            format.render(&created, created_key)
        }
        KeysCommand::Show { key_id } => {
            format.one(&api.get::<ApiKeyDto>(&format!("/keys/{key_id}"), &[]).await?)
        }
        KeysCommand::Revoke { key_id } => {
            format.one(&api.delete::<ApiKeyDto>(&format!("/keys/{key_id}"), &[]).await?)
        }
    }
}

/// The new key's details, then its secret on a line of its own (easy to copy, or to cut with
/// `grep '^secret:'`), then the warning that it cannot be shown again.
fn created_key(created: &CreatedApiKeyDto) -> String {
    format!(
        "{}\n\nsecret: {}\nThis secret is shown only once: store it now. Bud keeps only its hash.",
        output::details(&created.key),
        created.secret
    )
}
