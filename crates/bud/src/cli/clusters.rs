//! `bud clusters`: register Kubernetes clusters by kubeconfig, and see what each one has and
//! how it has been.

use std::path::PathBuf;

use bud_protocol::control::{
    ClusterDto, ClusterList, CreateClusterRequest, UpdateKubeconfigRequest,
};
use clap::Subcommand;
use uuid::Uuid;

use super::http::{Api, LIST_CAP};
use super::input;
use super::output::{self, Format};

#[derive(Debug, Subcommand)]
pub enum ClustersCommand {
    /// Register a Kubernetes cluster by its kubeconfig.
    Add {
        name: String,
        /// The kubeconfig file; `-` reads it from standard input.
        #[arg(long, value_name = "PATH")]
        kubeconfig: PathBuf,
        /// Where endpoints' workloads go; `bud-workloads` by default.
        #[arg(long, value_name = "NS")]
        namespace: Option<String>,
    },
    /// List the clusters, with their status and GPUs.
    List,
    /// Show a cluster: status and why, last check, nodes, GPUs, device plugin, recent events.
    Show { id: Uuid },
    /// Check a cluster again now.
    Refresh { id: Uuid },
    /// Register a cluster again with a new kubeconfig (expired or revoked credentials).
    SetKubeconfig {
        id: Uuid,
        /// The kubeconfig file; `-` reads it from standard input.
        #[arg(long, value_name = "PATH")]
        kubeconfig: PathBuf,
    },
    /// Delete a cluster.
    Rm {
        id: Uuid,
        /// Delete it even while endpoints exist on it: they are torn down and deleted first.
        #[arg(long)]
        force: bool,
    },
}

pub async fn clusters(
    command: ClustersCommand,
    api: &mut Api,
    format: Format,
) -> anyhow::Result<String> {
    match command {
        ClustersCommand::Add { name, kubeconfig, namespace } => {
            let kubeconfig = input::text_from(&kubeconfig, "kubeconfig")?;
            let request = CreateClusterRequest { name, kubeconfig, namespace };
            format.one(&api.post::<ClusterDto>("/clusters", &request).await?)
        }
        ClustersCommand::List => {
            format.list(&api.list::<ClusterList>("/clusters", &[], LIST_CAP).await?)
        }
        ClustersCommand::Show { id } => {
            let cluster: ClusterDto = api.get(&format!("/clusters/{id}"), &[]).await?;
            format.render(&cluster, |c| output::details_with_events(c, &c.events))
        }
        ClustersCommand::Refresh { id } => format.one(
            &api.post::<ClusterDto>(&format!("/clusters/{id}/refresh"), &serde_json::json!({}))
                .await?,
        ),
        ClustersCommand::SetKubeconfig { id, kubeconfig } => {
            let request = UpdateKubeconfigRequest {
                kubeconfig: input::text_from(&kubeconfig, "kubeconfig")?,
            };
            format
                .one(&api.put::<ClusterDto>(&format!("/clusters/{id}/kubeconfig"), &request).await?)
        }
        ClustersCommand::Rm { id, force } => {
            let query: Vec<(&str, String)> =
                if force { vec![("force", "true".to_owned())] } else { vec![] };
            // 204 when it is gone; 202 with the cluster when forced past its endpoints.
            let deleting: Option<ClusterDto> =
                api.delete(&format!("/clusters/{id}"), &query).await?;
            match deleting {
                None => format.done(format!("Deleted cluster {id}")),
                Some(cluster) => format.render(&cluster, |c| {
                    format!(
                        "Cluster {} is {}: its endpoints are being torn down; it is deleted once they are gone",
                        c.name, c.status
                    )
                }),
            }
        }
    }
}
