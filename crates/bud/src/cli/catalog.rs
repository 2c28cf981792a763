//! `bud models` (the catalogue of deployable models) and `bud providers` (external
//! OpenAI-compatible services).

use bud_protocol::control::{
    CreateModelRequest, CreateProviderRequest, ModelDto, ModelList, ProviderDto, ProviderList,
    UpdateModelRequest, UpdateProviderRequest,
};
use clap::{ArgGroup, Subcommand};
use uuid::Uuid;

use super::http::{Api, LIST_CAP};
use super::input;
use super::output::Format;

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// List the model catalogue.
    List,
    /// Show one model.
    Show { id: Uuid },
    /// Add a model to the catalogue.
    Add {
        name: String,
        /// `hf://org/name`, `s3://bucket/path`, `gs://…`, `https://…` or an absolute path.
        #[arg(long, value_name = "URI")]
        source: String,
        /// `vllm`, `sglang`, `tgi` or `engine-sim`.
        #[arg(long)]
        engine: Option<String>,
        /// `text`, `embedding` or `vision`.
        #[arg(long)]
        modality: Option<String>,
        #[arg(long)]
        description: Option<String>,
    },
    /// Change a model's name, source, engine, modality or description.
    #[command(group(ArgGroup::new("change").required(true).multiple(true)))]
    Update {
        id: Uuid,
        #[arg(long, group = "change")]
        name: Option<String>,
        #[arg(long, value_name = "URI", group = "change")]
        source: Option<String>,
        #[arg(long, group = "change")]
        engine: Option<String>,
        #[arg(long, group = "change")]
        modality: Option<String>,
        #[arg(long, group = "change")]
        description: Option<String>,
    },
    /// Remove a model from the catalogue.
    Rm { id: Uuid },
}

#[derive(Debug, Subcommand)]
pub enum ProvidersCommand {
    /// List the external providers.
    List,
    /// Show one provider (never its API key).
    Show { id: Uuid },
    /// Add an external OpenAI-compatible provider.
    Add {
        name: String,
        #[arg(long, value_name = "URL")]
        base_url: String,
        /// Read the provider's API key from the first line of standard input.
        #[arg(long)]
        api_key_stdin: bool,
    },
    /// Change a provider's name, base URL or API key.
    #[command(group(ArgGroup::new("change").required(true).multiple(true)))]
    Update {
        id: Uuid,
        #[arg(long, group = "change")]
        name: Option<String>,
        #[arg(long, value_name = "URL", group = "change")]
        base_url: Option<String>,
        /// Read the new API key from the first line of standard input.
        #[arg(long, group = "change")]
        api_key_stdin: bool,
    },
    /// Remove a provider.
    Rm { id: Uuid },
}

pub async fn models(
    command: ModelsCommand,
    api: &mut Api,
    format: Format,
) -> anyhow::Result<String> {
    match command {
        ModelsCommand::List => format.list(&api.list::<ModelList>("/models", &[], LIST_CAP).await?),
        ModelsCommand::Show { id } => {
            format.one(&api.get::<ModelDto>(&format!("/models/{id}"), &[]).await?)
        }
        ModelsCommand::Add { name, source, engine, modality, description } => {
            let request =
                CreateModelRequest { name, source_uri: source, engine, modality, description };
            format.one(&api.post::<ModelDto>("/models", &request).await?)
        }
        ModelsCommand::Update { id, name, source, engine, modality, description } => {
            let request =
                UpdateModelRequest { name, source_uri: source, engine, modality, description };
            format.one(&api.patch::<ModelDto>(&format!("/models/{id}"), &request).await?)
        }
        ModelsCommand::Rm { id } => {
            api.delete::<()>(&format!("/models/{id}"), &[]).await?;
            format.done(format!("Removed model {id}"))
        }
    }
}

pub async fn providers(
    command: ProvidersCommand,
    api: &mut Api,
    format: Format,
) -> anyhow::Result<String> {
    match command {
        ProvidersCommand::List => {
            format.list(&api.list::<ProviderList>("/providers", &[], LIST_CAP).await?)
        }
        ProvidersCommand::Show { id } => {
            format.one(&api.get::<ProviderDto>(&format!("/providers/{id}"), &[]).await?)
        }
        ProvidersCommand::Add { name, base_url, api_key_stdin } => {
            let api_key = api_key_stdin.then(|| input::secret_from_stdin("API key")).transpose()?;
            let request = CreateProviderRequest { name, base_url, api_key };
            format.one(&api.post::<ProviderDto>("/providers", &request).await?)
        }
        ProvidersCommand::Update { id, name, base_url, api_key_stdin } => {
            let api_key = api_key_stdin.then(|| input::secret_from_stdin("API key")).transpose()?;
            let request = UpdateProviderRequest { name, base_url, api_key };
            format.one(&api.patch::<ProviderDto>(&format!("/providers/{id}"), &request).await?)
        }
        ProvidersCommand::Rm { id } => {
            api.delete::<()>(&format!("/providers/{id}"), &[]).await?;
            format.done(format!("Removed provider {id}"))
        }
    }
}
