//! Control-plane (budapp) REST DTOs.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// A list of `$item` with the cursor of the next page (absent on the last page).
macro_rules! list {
    ($(#[$doc:meta])* $name:ident, $item:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
        pub struct $name {
            pub data: Vec<$item>,
            /// Pass as `cursor` to get the next page; absent when this is the last page.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub next_cursor: Option<String>,
        }
    };
}

// ---- health -----------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HealthDto {
    /// `ok`/`ready` when healthy, `not_ready` otherwise.
    pub status: String,
    /// Per-dependency result, e.g. `{"database": "ok"}`.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    #[schema(value_type = Object)]
    pub checks: serde_json::Map<String, serde_json::Value>,
}

// ---- identity ---------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    pub refresh_token: String,
}

/// Tokens from the built-in issuer. The refresh token is single-use: each refresh returns a new
/// one, and presenting a used one again revokes the whole session.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: i64,
    pub refresh_token: String,
}

// ---- users and permissions ---------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UserDto {
    pub id: Uuid,
    pub email: String,
    pub name: String,
    /// `admin`, `developer`, `devops` or `tester`.
    pub role: String,
    /// Provisioned from an external identity provider (no local password).
    pub external: bool,
    pub disabled: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

list!(UserList, UserDto);

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUserRequest {
    pub email: String,
    pub name: String,
    pub role: String,
    /// At least 12 characters.
    pub password: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUserRequest {
    pub name: Option<String>,
    pub role: Option<String>,
    pub password: Option<String>,
    pub disabled: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GrantDto {
    pub id: Uuid,
    /// `<module>:<view|manage>`.
    pub permission: String,
    /// Set for project-scoped permissions (`endpoint:*`, `key:*`).
    pub project_id: Option<Uuid>,
    pub granted_by: Option<Uuid>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProjectPermissionsDto {
    pub project_id: Uuid,
    pub permissions: Vec<String>,
}

/// Everything a user may do: from the role, from explicit grants, and the result per project.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PermissionsDto {
    pub user_id: Uuid,
    pub role: String,
    pub role_permissions: Vec<String>,
    pub grants: Vec<GrantDto>,
    /// Platform-wide permissions (role and platform grants).
    pub platform: Vec<String>,
    /// Effective project-scoped permissions in each project the user can see.
    pub projects: Vec<ProjectPermissionsDto>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    pub user_id: Uuid,
    pub permission: String,
    #[serde(default)]
    pub project_id: Option<Uuid>,
}

// ---- projects -----------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProjectDto {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub created_by: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

list!(ProjectList, ProjectDto);

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProjectRequest {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateProjectRequest {
    pub name: Option<String>,
    pub description: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MemberDto {
    pub user_id: Uuid,
    pub email: String,
    pub name: String,
    pub added_at: DateTime<Utc>,
}

list!(MemberList, MemberDto);

/// Names the user to add by id or by email (exactly one).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddMemberRequest {
    #[serde(default)]
    pub user_id: Option<Uuid>,
    #[serde(default)]
    pub email: Option<String>,
}

// ---- models ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelDto {
    pub id: Uuid,
    pub name: String,
    /// `hf://org/name`, `s3://bucket/path`, `gs://…`, `https://…` or an absolute path.
    pub source_uri: String,
    /// `vllm`, `sglang`, `tgi` or `engine-sim`.
    pub engine: String,
    /// `text`, `embedding` or `vision`.
    pub modality: String,
    pub description: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

list!(ModelList, ModelDto);

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateModelRequest {
    pub name: String,
    pub source_uri: String,
    #[serde(default)]
    pub engine: Option<String>,
    #[serde(default)]
    pub modality: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateModelRequest {
    pub name: Option<String>,
    pub source_uri: Option<String>,
    pub engine: Option<String>,
    pub modality: Option<String>,
    pub description: Option<String>,
}

// ---- providers --------------------------------------------------------------------------------------

/// An external OpenAI-compatible service. Its API key is never returned.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProviderDto {
    pub id: Uuid,
    pub name: String,
    pub base_url: String,
    pub api_key_set: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

list!(ProviderList, ProviderDto);

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProviderRequest {
    pub name: String,
    pub base_url: String,
    #[serde(default)]
    pub api_key: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateProviderRequest {
    pub name: Option<String>,
    pub base_url: Option<String>,
    pub api_key: Option<String>,
}

// ---- API keys -------------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiKeyDto {
    pub id: Uuid,
    pub project_id: Uuid,
    pub name: String,
    /// The first characters of the key, to recognise it; the key itself is shown once.
    pub prefix: String,
    /// `active`, `expired` or `revoked`.
    pub status: String,
    pub created_by: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// Requests per minute allowed to this key, if limited.
    pub rpm_limit: Option<i64>,
    /// Tokens per minute allowed to this key, if limited.
    pub tpm_limit: Option<i64>,
}

list!(ApiKeyList, ApiKeyDto);

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKeyRequest {
    pub name: String,
    /// When the key stops working; absent for no expiry.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub rpm_limit: Option<i64>,
    #[serde(default)]
    pub tpm_limit: Option<i64>,
}

/// The new key. `secret` is shown only in this response; Bud stores only its hash.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedApiKeyDto {
    pub key: ApiKeyDto,
    pub secret: String,
}

// ---- audit ------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditRecordDto {
    pub seq: i64,
    pub at: DateTime<Utc>,
    pub actor_id: Option<Uuid>,
    pub actor: String,
    pub action: String,
    pub resource_type: String,
    pub resource_id: String,
    pub project_id: Option<Uuid>,
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
    pub request_id: Option<String>,
    pub prev_hash: String,
    pub hash: String,
}

list!(AuditList, AuditRecordDto);

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditVerificationDto {
    /// True when every record's hash and link to its predecessor check out.
    pub ok: bool,
    pub records_checked: i64,
    pub first_broken_seq: Option<i64>,
    pub reason: Option<String>,
}

// ---- clusters -----------------------------------------------------------------------------------

/// What a cluster has: nodes, GPUs (`nvidia.com/gpu`), whether the NVIDIA device plugin runs.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InventoryDto {
    pub nodes: i64,
    pub gpus_total: i64,
    pub gpus_allocatable: i64,
    pub device_plugin_running: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClusterEventDto {
    pub at: DateTime<Utc>,
    pub from_status: Option<String>,
    pub to_status: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClusterDto {
    pub id: Uuid,
    pub name: String,
    /// `local` or `kubernetes`.
    pub kind: String,
    /// `REGISTERING`, `AVAILABLE`, `NOT_AVAILABLE`, `ERROR` or `DELETING`.
    pub status: String,
    /// Why the cluster is in its status (empty when available).
    pub reason: String,
    /// Workloads namespace (Kubernetes).
    pub namespace: String,
    pub last_checked_at: Option<DateTime<Utc>>,
    pub consecutive_failures: i64,
    pub inventory: Option<InventoryDto>,
    /// Recent status changes, newest first (on `GET /clusters/{id}`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<ClusterEventDto>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

list!(ClusterList, ClusterDto);

/// Register a Kubernetes cluster by kubeconfig (the text of the file).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateClusterRequest {
    pub name: String,
    pub kubeconfig: String,
    /// Workloads namespace; `bud-workloads` by default.
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateKubeconfigRequest {
    pub kubeconfig: String,
}

// ---- endpoints -----------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EndpointEventDto {
    pub at: DateTime<Utc>,
    /// `status`, `warning` or `info`.
    pub kind: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EndpointDto {
    pub id: Uuid,
    pub project_id: Uuid,
    pub model_id: Uuid,
    pub cluster_id: Uuid,
    pub name: String,
    /// `PENDING`, `DEPLOYING`, `RUNNING`, `ERROR`, `STOPPING` or `STOPPED`.
    pub status: String,
    /// For `ERROR`: `image_pull_failure`, `insufficient_gpus`, `volume_claim_pending`,
    /// `crash_loop`, `start_failure`, `cluster_unreachable` or `timeout`.
    pub reason: Option<String>,
    /// What the cluster said, and what to do about it.
    pub reason_detail: String,
    pub replicas_desired: i64,
    pub replicas_ready: i64,
    pub min_replicas: i64,
    pub gpus_per_replica: i64,
    pub engine_args: Vec<String>,
    pub deployment_timeout_secs: i64,
    pub status_since: DateTime<Utc>,
    /// Recent events, newest first (on `GET /endpoints/{id}`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<EndpointEventDto>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

list!(EndpointList, EndpointDto);

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEndpointRequest {
    pub project_id: Uuid,
    pub model_id: Uuid,
    /// The cluster to deploy on; the `local` cluster when absent and one exists.
    #[serde(default)]
    pub cluster_id: Option<Uuid>,
    pub name: String,
    /// 1 by default.
    #[serde(default)]
    pub replicas: Option<i64>,
    #[serde(default)]
    pub min_replicas: Option<i64>,
    /// GPUs each replica needs: 0 for engine-sim, 1 by default for real engines.
    #[serde(default)]
    pub gpus_per_replica: Option<i64>,
    /// Appended to the engine command.
    #[serde(default)]
    pub engine_args: Vec<String>,
    /// Seconds to reach RUNNING before ERROR `timeout`; 600 by default.
    #[serde(default)]
    pub deployment_timeout_secs: Option<i64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateEndpointRequest {
    pub replicas: Option<i64>,
    pub min_replicas: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

/// An endpoint's load, read from its engines (the guide's §4.1 "queue depth").
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EndpointMetricsDto {
    pub endpoint_id: Uuid,
    /// Replicas whose metrics were read.
    pub replicas_scraped: i64,
    /// Requests waiting for a slot in the engines: the queue depth.
    pub queue_depth: f64,
    /// Requests being generated.
    pub running: f64,
    /// Highest KV-cache usage among replicas, 0 to 1.
    pub gpu_cache_usage: f64,
    pub requests_per_second: f64,
    pub tokens_per_second: f64,
    /// End-to-end request latency since the engines started; absent before any request.
    pub latency_seconds: Option<Percentiles>,
    pub time_to_first_token_seconds: Option<Percentiles>,
    /// The interval the rates were measured over.
    pub window_seconds: f64,
}

// ---- routes -----------------------------------------------------------------------------------

/// One place a route sends requests: an endpoint of the route's project (`endpoint_id`), or an
/// external provider (`provider_id`) and the provider's name for the model (`model`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteTargetDto {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<Uuid>,
    /// Required for a provider target; absent for an endpoint, which serves its own model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Share of traffic among the targets, 1 to 1000; 1 when absent.
    #[serde(default = "default_weight")]
    pub weight: i64,
}

fn default_weight() -> i64 {
    1
}

/// A public model name in a project and where its requests go. Every RUNNING endpoint is also
/// routable under its model's name; a route of that name replaces that implicit route.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RouteDto {
    pub id: Uuid,
    pub project_id: Uuid,
    /// What clients put in `model`.
    pub name: String,
    /// Balanced by weight.
    pub targets: Vec<RouteTargetDto>,
    /// Tried in order when every target failed before answering.
    pub fallbacks: Vec<RouteTargetDto>,
    /// Requests per minute to this route, the project's keys together, if limited.
    pub rpm_limit: Option<i64>,
    /// Tokens per minute to this route, the project's keys together, if limited.
    pub tpm_limit: Option<i64>,
    pub created_by: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

list!(RouteList, RouteDto);

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRouteRequest {
    pub name: String,
    pub targets: Vec<RouteTargetDto>,
    #[serde(default)]
    pub fallbacks: Vec<RouteTargetDto>,
    #[serde(default)]
    pub rpm_limit: Option<i64>,
    #[serde(default)]
    pub tpm_limit: Option<i64>,
}

/// Absent fields stay as they are; `null` clears a limit.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateRouteRequest {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub targets: Option<Vec<RouteTargetDto>>,
    #[serde(default)]
    pub fallbacks: Option<Vec<RouteTargetDto>>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<i64>)]
    pub rpm_limit: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<i64>)]
    pub tpm_limit: Option<Option<i64>>,
}

/// A field that is present, `null` or not: absent fields take the default (`None`) instead.
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

// ---- usage ------------------------------------------------------------------------------------

/// Usage the gateway metered over a time range, one row per group.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsageSummaryDto {
    /// Inclusive.
    pub since: DateTime<Utc>,
    /// Exclusive.
    pub until: DateTime<Utc>,
    /// `project`, `key` or `model`.
    pub group_by: String,
    pub data: Vec<UsageRowDto>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsageRowDto {
    /// The project id, key id or model name, as `group_by` says.
    pub group: String,
    pub requests: i64,
    /// Requests answered with a status of 400 or more.
    pub errors: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub avg_latency_ms: f64,
}
