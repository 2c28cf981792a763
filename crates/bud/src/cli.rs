//! The command-line client over budapp's REST API: `bud login`, `bud projects list`, ...
//!
//! Each resource's verbs live in a file beside this one and share one HTTP client (`http`),
//! one saved session (`credentials`) and one way of printing (`output`). Nothing here reads
//! the process environment: `run` is handed it by `main`.

mod audit;
mod catalog;
mod clusters;
mod credentials;
mod endpoints;
mod http;
mod identity;
mod input;
mod output;
mod projects;

use clap::{Args, Subcommand};

use self::credentials::CredentialsFile;
use self::http::Api;
use self::output::Format;

/// The client's verbs, flattened into `bud`'s top-level commands.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Log in to budapp and keep the session for the other commands.
    Login {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(flatten)]
        args: identity::LoginArgs,
    },
    /// End the session and forget its tokens.
    Logout {
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Show who you are logged in as.
    Whoami {
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Manage user accounts.
    Users {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        command: identity::UsersCommand,
    },
    /// Show, grant and revoke permissions.
    Permissions {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        command: identity::PermissionsCommand,
    },
    /// Manage projects and their members.
    Projects {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        command: projects::ProjectsCommand,
    },
    /// Manage the model catalogue.
    Models {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        command: catalog::ModelsCommand,
    },
    /// Manage external OpenAI-compatible providers.
    Providers {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        command: catalog::ProvidersCommand,
    },
    /// Register clusters and see their status, GPUs and history.
    Clusters {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        command: clusters::ClustersCommand,
    },
    /// Deploy models on clusters and run them: create, scale, stop, start, logs, metrics.
    Endpoints {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        command: endpoints::EndpointsCommand,
    },
    /// Manage a project's API keys.
    Keys {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        command: projects::KeysCommand,
    },
    /// Read and verify the audit log.
    Audit {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
}

/// Flags every client verb takes, before or after its subcommand.
#[derive(Debug, Clone, Default, Args)]
pub struct ClientOpts {
    /// Print the response as JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// budapp's URL, instead of the one saved by `bud login` (for `login`: instead of
    /// $BUD_URL, else http://127.0.0.1:9081).
    #[arg(long, global = true, value_name = "URL")]
    pub url: Option<String>,
}

pub async fn run(command: ClientCommand, env: &[(String, String)]) -> anyhow::Result<()> {
    let file = CredentialsFile::locate(env)?;
    let rendered = match command {
        ClientCommand::Login { opts, args } => identity::login(args, &opts, &file, env).await?,
        ClientCommand::Logout { opts } => identity::logout(&opts, &file).await?,
        ClientCommand::Whoami { opts } => {
            let (mut api, format) = opts.session(&file)?;
            identity::whoami(&mut api, format).await?
        }
        ClientCommand::Users { opts, command } => {
            let (mut api, format) = opts.session(&file)?;
            identity::users(command, &mut api, format).await?
        }
        ClientCommand::Permissions { opts, command } => {
            let (mut api, format) = opts.session(&file)?;
            identity::permissions(command, &mut api, format).await?
        }
        ClientCommand::Projects { opts, command } => {
            let (mut api, format) = opts.session(&file)?;
            projects::projects(command, &mut api, format).await?
        }
        ClientCommand::Models { opts, command } => {
            let (mut api, format) = opts.session(&file)?;
            catalog::models(command, &mut api, format).await?
        }
        ClientCommand::Providers { opts, command } => {
            let (mut api, format) = opts.session(&file)?;
            catalog::providers(command, &mut api, format).await?
        }
        ClientCommand::Clusters { opts, command } => {
            let (mut api, format) = opts.session(&file)?;
            clusters::clusters(command, &mut api, format).await?
        }
        ClientCommand::Endpoints { opts, command } => {
            let (mut api, format) = opts.session(&file)?;
            endpoints::endpoints(command, &mut api, format).await?
        }
        ClientCommand::Keys { opts, command } => {
            let (mut api, format) = opts.session(&file)?;
            projects::keys(command, &mut api, format).await?
        }
        ClientCommand::Audit { opts, command } => {
            let (mut api, format) = opts.session(&file)?;
            audit::audit(command, &mut api, format).await?
        }
    };
    output::print(&rendered);
    Ok(())
}

impl ClientOpts {
    /// A client for the saved session, and how to print what it returns.
    fn session(&self, file: &CredentialsFile) -> anyhow::Result<(Api, Format)> {
        Ok((Api::logged_in(file, self.url.as_deref())?, Format::new(self.json)))
    }
}

/// The value of `key` in the environment `main` passed in.
fn env_var<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
    env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};
    use uuid::Uuid;

    use super::*;

    /// `ClientCommand` as `main` flattens it.
    #[derive(Debug, Parser)]
    #[command(name = "bud")]
    struct Bud {
        #[command(subcommand)]
        command: ClientCommand,
    }

    fn parse(args: &str) -> Result<ClientCommand, clap::Error> {
        Bud::try_parse_from(std::iter::once("bud").chain(args.split_whitespace()))
            .map(|b| b.command)
    }

    const PROJECT: &str = "0196a1b2-0000-7000-8000-000000000001";

    #[test]
    fn the_command_tree_is_consistent() {
        Bud::command().debug_assert();
    }

    #[test]
    fn keys_create_takes_its_limits_and_global_flags_after_the_verb() {
        let command =
            parse(&format!("keys create --project {PROJECT} ci-bot --rpm 60 --tpm 1000 --json"))
                .unwrap();
        let ClientCommand::Keys { opts, command } = command else { panic!("{command:?}") };
        assert!(opts.json);
        let projects::KeysCommand::Create { project, name, rpm, tpm, expires_at } = command else {
            panic!("{command:?}")
        };
        assert_eq!(project, Uuid::parse_str(PROJECT).unwrap());
        assert_eq!(name, "ci-bot");
        assert_eq!((rpm, tpm, expires_at), (Some(60), Some(1000), None));
    }

    #[test]
    fn global_flags_also_come_before_the_verb() {
        let command = parse("projects --url http://bud.internal:9081 list").unwrap();
        let ClientCommand::Projects { opts, command } = command else { panic!("{command:?}") };
        assert_eq!(opts.url.as_deref(), Some("http://bud.internal:9081"));
        assert!(!opts.json);
        assert!(matches!(command, projects::ProjectsCommand::List));
    }

    #[test]
    fn login_reads_the_password_from_stdin_only_with_an_email() {
        let command = parse("login --email admin@bud.local --password-stdin").unwrap();
        let ClientCommand::Login { args, .. } = command else { panic!("{command:?}") };
        assert_eq!(args.email.as_deref(), Some("admin@bud.local"));
        assert!(args.password_stdin);
        assert!(parse("login --password-stdin").is_err());
    }

    #[test]
    fn add_member_names_the_user_by_exactly_one_of_id_or_email() {
        assert!(parse(&format!("projects add-member {PROJECT} --email dev@bud.local")).is_ok());
        assert!(parse(&format!("projects add-member {PROJECT} --user {PROJECT}")).is_ok());
        assert!(parse(&format!("projects add-member {PROJECT}")).is_err());
        let both = format!("projects add-member {PROJECT} --user {PROJECT} --email dev@bud.local");
        assert!(parse(&both).is_err());
    }

    #[test]
    fn updates_need_something_to_change() {
        assert!(parse(&format!("projects update {PROJECT}")).is_err());
        assert!(parse(&format!("projects update {PROJECT} --name search")).is_ok());
        assert!(parse(&format!("models update {PROJECT}")).is_err());
        assert!(parse(&format!("providers update {PROJECT} --api-key-stdin")).is_ok());
        assert!(parse(&format!("providers update {PROJECT}")).is_err());
    }

    #[test]
    fn ids_and_times_are_checked_before_any_request() {
        let error = parse("projects show not-a-uuid").unwrap_err();
        assert_eq!(error.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(
            parse(&format!("keys create --project {PROJECT} k --expires-at tomorrow")).is_err()
        );
        let dated =
            parse(&format!("keys create --project {PROJECT} k --expires-at 2030-01-01T00:00:00Z"));
        assert!(dated.is_ok());
        assert!(
            parse("audit list --since 2025-01-01T00:00:00Z --limit 10 --action key.revoke").is_ok()
        );
        assert!(parse("audit list --limit 0").is_err());
    }

    #[test]
    fn permissions_and_users_verbs_parse() {
        let command =
            parse(&format!("permissions grant --user {PROJECT} key:manage --project {PROJECT}"))
                .unwrap();
        let ClientCommand::Permissions { command, .. } = command else { panic!("{command:?}") };
        assert!(
            matches!(command, identity::PermissionsCommand::Grant { ref permission, project: Some(_), .. } if permission == "key:manage")
        );
        assert!(parse(&format!("users set-role {PROJECT} devops")).is_ok());
        assert!(parse(&format!("users set-role {PROJECT} overlord")).is_err());
        assert!(
            parse("users create --email a@b.c --name A --role tester --password-stdin").is_ok()
        );
    }

    #[test]
    fn endpoints_create_takes_repeated_engine_args_that_look_like_flags() {
        let command = parse(&format!(
            "endpoints create --project {PROJECT} --model {PROJECT} chat --replicas 2 \
             --engine-arg --dtype --engine-arg=half --engine-arg=--max-model-len=4096 --no-wait --json"
        ))
        .unwrap();
        let ClientCommand::Endpoints { opts, command } = command else { panic!("{command:?}") };
        assert!(opts.json);
        let endpoints::EndpointsCommand::Create {
            name,
            replicas,
            cluster,
            engine_args,
            no_wait,
            timeout,
            ..
        } = command
        else {
            panic!("{command:?}")
        };
        assert_eq!((name.as_str(), replicas, cluster, timeout), ("chat", Some(2), None, None));
        assert_eq!(engine_args, ["--dtype", "half", "--max-model-len=4096"]);
        assert!(no_wait);
        assert!(
            parse(&format!(
                "endpoints create --project {PROJECT} --model {PROJECT} chat --replicas 0"
            ))
            .is_err()
        );
    }

    #[test]
    fn endpoint_and_cluster_verbs_parse() {
        assert!(parse(&format!("endpoints scale {PROJECT} --replicas 3")).is_ok());
        assert!(parse(&format!("endpoints scale {PROJECT} --min-replicas 1")).is_ok());
        assert!(parse(&format!("endpoints scale {PROJECT}")).is_err());
        assert!(parse(&format!("endpoints stop {PROJECT} --no-wait")).is_ok());
        assert!(parse(&format!("endpoints logs {PROJECT} --tail 50")).is_ok());
        assert!(parse(&format!("endpoints logs {PROJECT} --tail 0")).is_err());
        assert!(parse(&format!("endpoints list --project {PROJECT}")).is_ok());
        assert!(parse("clusters add gpu-east --kubeconfig - --namespace llm").is_ok());
        assert!(parse("clusters add gpu-east").is_err());
        let command = parse(&format!("clusters rm {PROJECT} --force")).unwrap();
        let ClientCommand::Clusters { command, .. } = command else { panic!("{command:?}") };
        assert!(matches!(command, clusters::ClustersCommand::Rm { force: true, .. }));
    }

    #[test]
    fn empty_environment_values_count_as_unset() {
        let env = vec![("BUD_URL".to_owned(), String::new()), ("X".to_owned(), "1".to_owned())];
        assert_eq!(env_var(&env, "BUD_URL"), None);
        assert_eq!(env_var(&env, "X"), Some("1"));
    }
}
