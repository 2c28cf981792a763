//! What the gateway knows, as one immutable value: API keys (by hash) with their project and
//! limits, and routes (public model name → targets) per project. The hot path reads the current
//! snapshot through one atomic load; a refresh builds a new one and swaps it in.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bud_domain::{ApiKeyId, EndpointId, ProjectId, ProviderId};

/// The gateway's whole configuration at one version.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Increases with every change the control plane makes.
    pub version: u64,
    /// When this gateway built it; with `stale_window`, how long it may serve without a fresh one.
    pub built_at: Option<Instant>,
    /// Active keys by the SHA-256 of the key (revoked keys are absent).
    pub keys: HashMap<[u8; 32], KeyEntry>,
    /// Routes each project may use, by public model name.
    pub routes: HashMap<ProjectId, HashMap<String, Arc<Route>>>,
}

/// An API key as the gateway needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    pub id: ApiKeyId,
    pub project_id: ProjectId,
    /// Unix milliseconds after which the key no longer works.
    pub expires_at_ms: Option<i64>,
    /// Requests per minute, if limited.
    pub rpm: Option<u32>,
    /// Tokens per minute, if limited.
    pub tpm: Option<u32>,
}

/// A public model name and where its requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The name clients put in `model`.
    pub name: String,
    /// Stable label for metrics and limits: a route id, or `endpoint:<id>` for implicit routes.
    pub label: String,
    /// Tried first, balanced by weight and load.
    pub targets: Vec<Target>,
    /// Tried in order when every primary target failed before the first byte.
    pub fallbacks: Vec<Target>,
    pub rpm: Option<u32>,
    pub tpm: Option<u32>,
}

/// One place a request can be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Stable label for metrics, breakers and balancing state: `replica:<endpoint>/<address>` or
    /// `provider:<id>`.
    pub label: String,
    pub weight: u32,
    pub upstream: Upstream,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// An endpoint replica: plain HTTP on the cluster network.
    Replica {
        endpoint_id: EndpointId,
        /// `host:port`.
        address: String,
        /// The model name the engine serves.
        served_model: String,
    },
    /// An external OpenAI-compatible provider.
    Provider {
        provider_id: ProviderId,
        /// E.g. `https://api.openai.com/v1`; request paths are appended after `/v1`.
        base_url: String,
        /// Decrypted only in the gateway, sent only to this provider.
        api_key: Option<String>,
        /// The provider's model name for this route.
        model: String,
    },
}

impl Snapshot {
    /// The key presented as `Authorization: Bearer <key>`, if active at `now_ms`.
    pub fn key(&self, hash: &[u8; 32], now_ms: i64) -> Option<&KeyEntry> {
        self.keys.get(hash).filter(|k| k.expires_at_ms.is_none_or(|e| e > now_ms))
    }

    /// The route `model` names for `project`, if the project may use it.
    pub fn route(&self, project: ProjectId, model: &str) -> Option<&Arc<Route>> {
        self.routes.get(&project)?.get(model)
    }

    /// Every route `project` may use, for `GET /v1/models`.
    pub fn routes_of(&self, project: ProjectId) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.get(&project).into_iter().flat_map(|r| r.values())
    }
}
