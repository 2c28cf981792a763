//! `/clusters`: registering clusters by kubeconfig (stored sealed), their status, inventory and
//! history (the guide's §5.2 and §9.1).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use bud_cluster::kubeconfig::validate_kubeconfig;
use bud_domain::{
    Access, ClusterId, ClusterStatus, Module, Name, Permission, Target, ValidationError,
};
use bud_protocol::ErrorBody;
use bud_protocol::control::{
    ClusterDto, ClusterList, CreateClusterRequest, UpdateKubeconfigRequest,
};
use bud_store::{Cluster, ClusterKind};
use chrono::Utc;
use serde::Deserialize;
use uuid::Uuid;

use crate::convert;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiQuery, IdPath, PageQuery};
use crate::identity::Caller;
use crate::state::AppState;

const VIEW: Permission = Permission::new(Module::Cluster, Access::View);
const MANAGE: Permission = Permission::new(Module::Cluster, Access::Manage);

/// Kubernetes namespace names: DNS labels.
fn namespace(value: Option<String>) -> ApiResult<String> {
    let ns = value.unwrap_or_else(|| "bud-workloads".into());
    let ok = !ns.is_empty()
        && ns.len() <= 63
        && ns.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !ns.starts_with('-')
        && !ns.ends_with('-');
    if ok {
        Ok(ns)
    } else {
        Err(ValidationError::new(
            "namespace",
            "must be a DNS label: lowercase letters, digits and '-', at most 63",
        )
        .into())
    }
}

fn seal(state: &AppState, id: ClusterId, kubeconfig: &str) -> ApiResult<String> {
    validate_kubeconfig(kubeconfig, state.config.allow_exec_kubeconfig)?;
    Ok(state
        .keyring
        .encrypt(kubeconfig.as_bytes(), bud_auth::secrets::aad::kubeconfig(id).as_bytes()))
}

/// Registered clusters.
#[utoipa::path(get, path = "/clusters", tag = "clusters", params(PageQuery), security(("bearer" = [])),
    responses((status = 200, body = ClusterList), (status = 403, body = ErrorBody)))]
pub async fn list_clusters(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<ClusterList>> {
    caller.require(VIEW, Target::Platform, "cluster")?;
    let (cursor, limit) = q.parse()?;
    let page = state.store.list_clusters(cursor.as_ref(), limit).await?;
    Ok(Json(ClusterList {
        data: page.items.into_iter().map(|c| convert::cluster(c, vec![])).collect(),
        next_cursor: page.next_cursor.map(|c| c.as_str().to_owned()),
    }))
}

/// Register a Kubernetes cluster. Kubeconfigs whose users run commands (`exec`,
/// `auth-provider`) are refused unless `clusters.allow_exec_kubeconfig` is set.
#[utoipa::path(post, path = "/clusters", tag = "clusters", request_body = CreateClusterRequest, security(("bearer" = [])),
    responses((status = 201, body = ClusterDto), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_cluster(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateClusterRequest>,
) -> ApiResult<(StatusCode, Json<ClusterDto>)> {
    caller.require(MANAGE, Target::Platform, "cluster")?;
    let id = ClusterId::new();
    let now = Utc::now();
    let cluster = Cluster {
        id,
        name: Name::parse("name", &req.name)?,
        kind: ClusterKind::Kubernetes,
        kubeconfig_ciphertext: seal(&state, id, &req.kubeconfig)?,
        namespace: namespace(req.namespace)?,
        status: ClusterStatus::Registering,
        reason: String::new(),
        consecutive_failures: 0,
        last_checked_at: None,
        inventory: None,
        created_by: Some(caller.user.id),
        created_at: now,
        updated_at: now,
    };
    let audit = caller.audit(
        "cluster.create",
        "cluster",
        id,
        None,
        serde_json::json!({"name": cluster.name, "namespace": cluster.namespace}),
    );
    state.store.create_cluster(&cluster, &audit).await?;
    state.wake_clusters().await;
    Ok((StatusCode::CREATED, Json(convert::cluster(cluster, vec![]))))
}

/// A cluster: status and why, last check, nodes and GPUs, device plugin, recent history.
#[utoipa::path(get, path = "/clusters/{id}", tag = "clusters", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses((status = 200, body = ClusterDto), (status = 404, body = ErrorBody)))]
pub async fn get_cluster(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
) -> ApiResult<Json<ClusterDto>> {
    caller.require(VIEW, Target::Platform, "cluster")?;
    let id = ClusterId::from_uuid(id);
    let cluster = state.store.cluster(id).await?.ok_or(ApiError::NotFound("cluster"))?;
    let events = state.store.cluster_events(id, 20).await?;
    Ok(Json(convert::cluster(cluster, events)))
}

async fn set_status(
    state: &AppState,
    caller: &Caller,
    id: ClusterId,
    to: ClusterStatus,
    action: &str,
) -> ApiResult<Cluster> {
    let cluster = state.store.cluster(id).await?.ok_or(ApiError::NotFound("cluster"))?;
    if !cluster.status.can_become(to) {
        return Err(ApiError::Conflict(format!(
            "the cluster is {}; it cannot go to {to}",
            cluster.status
        )));
    }
    let audit = caller.audit(
        action,
        "cluster",
        id,
        None,
        serde_json::json!({"from": cluster.status, "to": to}),
    );
    if !state.store.set_cluster_status(id, cluster.status, to, "", Utc::now(), &audit).await? {
        return Err(ApiError::Conflict("the cluster changed meanwhile; try again".into()));
    }
    state.wake_clusters().await;
    state.store.cluster(id).await?.ok_or(ApiError::NotFound("cluster"))
}

/// Check the cluster again now: back to REGISTERING, then AVAILABLE once it answers.
#[utoipa::path(post, path = "/clusters/{id}/refresh", tag = "clusters", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses((status = 200, body = ClusterDto), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn refresh_cluster(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
) -> ApiResult<Json<ClusterDto>> {
    caller.require(MANAGE, Target::Platform, "cluster")?;
    let cluster = set_status(
        &state,
        &caller,
        ClusterId::from_uuid(id),
        ClusterStatus::Registering,
        "cluster.refresh",
    )
    .await?;
    Ok(Json(convert::cluster(cluster, vec![])))
}

/// Re-register with a new kubeconfig (an expired one, revoked credentials).
#[utoipa::path(put, path = "/clusters/{id}/kubeconfig", tag = "clusters", params(("id" = Uuid, Path)), request_body = UpdateKubeconfigRequest, security(("bearer" = [])),
    responses((status = 200, body = ClusterDto), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn update_kubeconfig(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
    ApiJson(req): ApiJson<UpdateKubeconfigRequest>,
) -> ApiResult<Json<ClusterDto>> {
    caller.require(MANAGE, Target::Platform, "cluster")?;
    let id = ClusterId::from_uuid(id);
    let cluster = state.store.cluster(id).await?.ok_or(ApiError::NotFound("cluster"))?;
    if cluster.kind == ClusterKind::Local {
        return Err(ApiError::Conflict("the local cluster has no kubeconfig".into()));
    }
    if cluster.status == ClusterStatus::Deleting {
        return Err(ApiError::Conflict("the cluster is being deleted".into()));
    }
    let sealed = seal(&state, id, &req.kubeconfig)?;
    let audit = caller.audit("cluster.kubeconfig", "cluster", id, None, serde_json::Value::Null);
    let cluster = state
        .store
        .set_cluster_kubeconfig(id, &sealed, Utc::now(), &audit)
        .await?
        .ok_or(ApiError::NotFound("cluster"))?;
    state.wake_clusters().await;
    Ok(Json(convert::cluster(cluster, vec![])))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteClusterQuery {
    /// Delete even while endpoints run on it: they are removed from the cluster and deleted.
    #[serde(default)]
    pub force: bool,
}

/// Delete a cluster. Refused while endpoints exist on it, unless `force=true`, which tears
/// them down first (the cluster shows DELETING until done).
#[utoipa::path(delete, path = "/clusters/{id}", tag = "clusters", params(("id" = Uuid, Path), DeleteClusterQuery), security(("bearer" = [])),
    responses((status = 204), (status = 202, body = ClusterDto), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete_cluster(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
    ApiQuery(q): ApiQuery<DeleteClusterQuery>,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    caller.require(MANAGE, Target::Platform, "cluster")?;
    let id = ClusterId::from_uuid(id);
    let endpoints = state.store.count_endpoints_on_cluster(id).await?;
    if endpoints == 0 {
        let audit = caller.audit("cluster.delete", "cluster", id, None, serde_json::Value::Null);
        return if state.store.delete_cluster(id, &audit).await? {
            Ok(StatusCode::NO_CONTENT.into_response())
        } else {
            Err(ApiError::NotFound("cluster"))
        };
    }
    if !q.force {
        return Err(ApiError::Conflict(format!(
            "{endpoints} endpoint(s) exist on this cluster; stop and delete them first, or delete with force=true"
        )));
    }
    let cluster =
        set_status(&state, &caller, id, ClusterStatus::Deleting, "cluster.delete_forced").await?;
    Ok((StatusCode::ACCEPTED, Json(convert::cluster(cluster, vec![]))).into_response())
}
