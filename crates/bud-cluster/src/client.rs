//! How budapp reaches budcluster: a direct call in the embedded setup, HTTP when the services
//! run apart (`clusters.url`, which may be a Dapr sidecar's invoke URL such as
//! `http://localhost:3500/v1.0/invoke/budcluster/method`).

use std::sync::Arc;
use std::time::Duration;

use bud_domain::EndpointId;
use bud_protocol::control::EndpointMetricsDto;

use crate::service::{ClusterError, ClusterService};

#[derive(Clone)]
pub enum ClusterClient {
    InProcess(Arc<ClusterService>),
    Http { base: String, token: Option<String>, http: reqwest::Client },
}

impl std::fmt::Debug for ClusterClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClusterClient::InProcess(_) => f.write_str("ClusterClient::InProcess"),
            ClusterClient::Http { base, .. } => write!(f, "ClusterClient::Http({base})"),
        }
    }
}

impl ClusterClient {
    pub fn http(base: &str, token: Option<String>) -> Result<Self, ClusterError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        Ok(Self::Http { base: base.trim_end_matches('/').to_owned(), token, http })
    }

    /// Asks for a reconcile pass now. Best effort: the loops run on their interval anyway.
    pub async fn wake(&self) {
        match self {
            ClusterClient::InProcess(s) => s.wake(),
            ClusterClient::Http { .. } => {
                if let Err(e) = self.send(reqwest::Method::POST, "/internal/wake").await {
                    tracing::debug!(error = %e, "waking budcluster failed; it reconciles on its interval");
                }
            }
        }
    }

    pub async fn logs(&self, id: EndpointId, tail: usize) -> Result<String, ClusterError> {
        match self {
            ClusterClient::InProcess(s) => s.logs(id, tail).await,
            ClusterClient::Http { .. } => self
                .send(reqwest::Method::GET, &format!("/internal/endpoints/{id}/logs?tail={tail}"))
                .await?
                .text()
                .await
                .map_err(unavailable),
        }
    }

    pub async fn metrics(&self, id: EndpointId) -> Result<EndpointMetricsDto, ClusterError> {
        match self {
            ClusterClient::InProcess(s) => s.metrics(id).await,
            ClusterClient::Http { .. } => self
                .send(reqwest::Method::GET, &format!("/internal/endpoints/{id}/metrics"))
                .await?
                .json()
                .await
                .map_err(unavailable),
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> Result<reqwest::Response, ClusterError> {
        let ClusterClient::Http { base, token, http } = self else {
            return Err(ClusterError::Unavailable("not an HTTP client".into()));
        };
        let mut request = http.request(method, format!("{base}{path}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(unavailable)?;
        match response.status() {
            s if s.is_success() => Ok(response),
            reqwest::StatusCode::NOT_FOUND => Err(ClusterError::NotFound("endpoint")),
            s => Err(ClusterError::Unavailable(format!("budcluster answered {s}"))),
        }
    }
}

fn unavailable(e: reqwest::Error) -> ClusterError {
    ClusterError::Unavailable(format!("budcluster cannot be reached: {e}"))
}
