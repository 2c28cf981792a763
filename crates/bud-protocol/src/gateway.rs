//! budgateway's internal wire types: its configuration as budapp serves it on
//! `GET /internal/gateway/config` when the gateway runs apart from the control plane. Not part
//! of the public API or its OpenAPI document.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::control::RouteTargetDto;

/// Everything the gateway's snapshot is built from, at one version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayConfigDto {
    /// Pass back as `since`; the answer is 304 while it has not changed.
    pub version: u64,
    /// Keys not revoked, expired ones included.
    pub keys: Vec<GatewayKeyDto>,
    pub routes: Vec<GatewayRouteDto>,
    /// RUNNING endpoints only.
    pub endpoints: Vec<GatewayEndpointDto>,
    pub providers: Vec<GatewayProviderDto>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayKeyDto {
    pub id: Uuid,
    pub project_id: Uuid,
    /// Lowercase hex SHA-256 of the key.
    pub hash: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub rpm_limit: Option<i64>,
    pub tpm_limit: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayRouteDto {
    pub id: Uuid,
    pub project_id: Uuid,
    pub name: String,
    pub targets: Vec<RouteTargetDto>,
    pub fallbacks: Vec<RouteTargetDto>,
    pub rpm_limit: Option<i64>,
    pub tpm_limit: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayEndpointDto {
    pub id: Uuid,
    pub project_id: Uuid,
    /// The model's name: what the engine serves, and the endpoint's implicit route.
    pub model_name: String,
    /// `host:port` of each ready replica.
    pub addresses: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayProviderDto {
    pub id: Uuid,
    pub base_url: String,
    /// Still sealed: only the gateway opens it, with the keyring it shares with budapp.
    pub api_key_ciphertext: String,
}
