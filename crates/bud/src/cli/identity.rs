//! `bud login`, `logout`, `whoami`, `users` and `permissions`.

use bud_protocol::control::{
    CreateUserRequest, GrantDto, GrantRequest, LoginRequest, PermissionsDto, RefreshRequest,
    TokenResponse, UpdateUserRequest, UserDto, UserList,
};
use clap::builder::PossibleValuesParser;
use clap::{Args, Subcommand};
use uuid::Uuid;

use super::credentials::{Credentials, CredentialsFile};
use super::http::{Api, LIST_CAP};
use super::output::{self, Format};
use super::{ClientOpts, env_var, input};

/// Where `bud login` goes without `--url` or `$BUD_URL`: `bud serve`'s default address.
const DEFAULT_URL: &str = "http://127.0.0.1:9081";

const ROLES: [&str; 4] = ["admin", "developer", "devops", "tester"];

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// Your account's email; asked for when absent.
    #[arg(long)]
    pub email: Option<String>,
    /// Read the password from the first line of standard input instead of asking for it.
    #[arg(long, requires = "email")]
    pub password_stdin: bool,
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// List every user.
    List,
    /// Show one user.
    Show { id: Uuid },
    /// Create a local account; asks for its password unless --password-stdin.
    Create {
        #[arg(long)]
        email: String,
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = PossibleValuesParser::new(ROLES))]
        role: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Change a user's role.
    SetRole {
        id: Uuid,
        #[arg(value_parser = PossibleValuesParser::new(ROLES))]
        role: String,
    },
    /// Stop a user from logging in or using their tokens.
    Disable { id: Uuid },
    /// Let a disabled user in again.
    Enable { id: Uuid },
}

#[derive(Debug, Subcommand)]
pub enum PermissionsCommand {
    /// A user's role, grants and effective permissions (yours without --user).
    Show {
        #[arg(long, value_name = "USER_ID")]
        user: Option<Uuid>,
    },
    /// Grant a permission such as `model:manage`; project-scoped ones (`endpoint:*`, `key:*`)
    /// name the project.
    Grant {
        #[arg(long, value_name = "USER_ID")]
        user: Uuid,
        permission: String,
        #[arg(long, value_name = "PROJECT_ID")]
        project: Option<Uuid>,
    },
    /// Revoke a granted permission (permissions that come with a role cannot be revoked).
    Revoke {
        #[arg(long, value_name = "USER_ID")]
        user: Uuid,
        permission: String,
        #[arg(long, value_name = "PROJECT_ID")]
        project: Option<Uuid>,
    },
}

pub async fn login(
    args: LoginArgs,
    opts: &ClientOpts,
    file: &CredentialsFile,
    env: &[(String, String)],
) -> anyhow::Result<String> {
    let url = opts.url.as_deref().or_else(|| env_var(env, "BUD_URL")).unwrap_or(DEFAULT_URL);
    let mut api = Api::anonymous(url)?;
    let email = match args.email {
        Some(email) => email,
        None => input::prompt_line("Email: ")?,
    };
    let password = if args.password_stdin {
        input::secret_from_stdin("password")?
    } else {
        input::password("Password: ")?
    };
    let tokens: TokenResponse =
        api.post("/auth/login", &LoginRequest { email: email.clone(), password }).await?;
    let credentials = Credentials {
        url: api.base_url().to_owned(),
        access_token: tokens.access_token,
        refresh_token: tokens.refresh_token,
        email,
    };
    file.save(&credentials)?;
    let summary = serde_json::json!({ "url": credentials.url, "email": credentials.email });
    Format::new(opts.json)
        .render(&summary, |_| format!("Logged in to {} as {}", credentials.url, credentials.email))
}

/// Ends the session on the server and forgets it here; the local file goes even when the
/// server cannot be told, so `logout` always leaves no tokens behind.
pub async fn logout(opts: &ClientOpts, file: &CredentialsFile) -> anyhow::Result<String> {
    let format = Format::new(opts.json);
    let Some(credentials) = file.load()? else {
        return format.done("Not logged in".to_owned());
    };
    let url = opts.url.as_deref().unwrap_or(&credentials.url);
    let ended = match Api::anonymous(url) {
        Ok(mut api) => {
            let body = RefreshRequest { refresh_token: credentials.refresh_token.clone() };
            api.post::<()>("/auth/logout", &body).await
        }
        Err(e) => Err(e),
    };
    file.remove()?;
    if let Err(e) = ended {
        eprintln!("warning: the server did not end the session ({e:#}); forgot it here anyway");
    }
    format.done(format!("Logged out of {url}"))
}

pub async fn whoami(api: &mut Api, format: Format) -> anyhow::Result<String> {
    format.one(&api.get::<UserDto>("/me", &[]).await?)
}

pub async fn users(command: UsersCommand, api: &mut Api, format: Format) -> anyhow::Result<String> {
    match command {
        UsersCommand::List => format.list(&api.list::<UserList>("/users", &[], LIST_CAP).await?),
        UsersCommand::Show { id } => {
            format.one(&api.get::<UserDto>(&format!("/users/{id}"), &[]).await?)
        }
        UsersCommand::Create { email, name, role, password_stdin } => {
            let password = if password_stdin {
                input::secret_from_stdin("password")?
            } else {
                input::new_password()?
            };
            let request = CreateUserRequest { email, name, role, password };
            format.one(&api.post::<UserDto>("/users", &request).await?)
        }
        UsersCommand::SetRole { id, role } => {
            update_user(
                api,
                format,
                id,
                UpdateUserRequest { role: Some(role), ..Default::default() },
            )
            .await
        }
        UsersCommand::Disable { id } => {
            update_user(
                api,
                format,
                id,
                UpdateUserRequest { disabled: Some(true), ..Default::default() },
            )
            .await
        }
        UsersCommand::Enable { id } => {
            update_user(
                api,
                format,
                id,
                UpdateUserRequest { disabled: Some(false), ..Default::default() },
            )
            .await
        }
    }
}

async fn update_user(
    api: &mut Api,
    format: Format,
    id: Uuid,
    change: UpdateUserRequest,
) -> anyhow::Result<String> {
    format.one(&api.patch::<UserDto>(&format!("/users/{id}"), &change).await?)
}

pub async fn permissions(
    command: PermissionsCommand,
    api: &mut Api,
    format: Format,
) -> anyhow::Result<String> {
    match command {
        PermissionsCommand::Show { user } => {
            let query: Vec<_> = user.map(|u| ("user_id", u.to_string())).into_iter().collect();
            let permissions: PermissionsDto = api.get("/permissions", &query).await?;
            format.render(&permissions, output::permissions)
        }
        PermissionsCommand::Grant { user, permission, project } => {
            let request = GrantRequest { user_id: user, permission, project_id: project };
            format.one(&api.post::<GrantDto>("/permissions", &request).await?)
        }
        PermissionsCommand::Revoke { user, permission, project } => {
            let mut query = vec![("user_id", user.to_string()), ("permission", permission.clone())];
            query.extend(project.map(|p| ("project_id", p.to_string())));
            api.delete::<()>("/permissions", &query).await?;
            format.done(format!("Revoked {permission} from user {user}"))
        }
    }
}
