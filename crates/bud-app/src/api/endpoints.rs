//! `/endpoints`: model deployments on clusters, their lifecycle commands, logs and metrics
//! (the guide's §4.1 and §5.1). budapp records what should run; budcluster makes it so.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bud_domain::{
    Access, ClusterId, ClusterStatus, EndpointCommand, EndpointId, EndpointStatus, Engine, ModelId,
    Module, Name, Permission, ProjectId, Role, Target, ValidationError,
};
use bud_protocol::ErrorBody;
use bud_protocol::control::{
    CreateEndpointRequest, EndpointDto, EndpointList, EndpointMetricsDto, UpdateEndpointRequest,
};
use bud_store::{Endpoint, EndpointPatch, StatusChange};
use chrono::Utc;
use serde::Deserialize;
use uuid::Uuid;

use crate::convert;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiQuery, IdPath};
use crate::identity::Caller;
use crate::state::AppState;

const VIEW: Permission = Permission::new(Module::Endpoint, Access::View);
const MANAGE: Permission = Permission::new(Module::Endpoint, Access::Manage);
const MAX_REPLICAS: i64 = 64;

fn in_range(field: &str, value: i64, lo: i64, hi: i64) -> ApiResult<i64> {
    if (lo..=hi).contains(&value) {
        Ok(value)
    } else {
        Err(ValidationError::new(field, format!("must be between {lo} and {hi}")).into())
    }
}

fn engine_args(args: Vec<String>) -> ApiResult<Vec<String>> {
    if args.len() > 64 {
        return Err(ValidationError::new("engine_args", "must hold at most 64 arguments").into());
    }
    if args.iter().any(|a| a.len() > 1024 || a.chars().any(char::is_control)) {
        return Err(ValidationError::new(
            "engine_args",
            "arguments must be at most 1024 characters, without control characters",
        )
        .into());
    }
    Ok(args)
}

/// Loads an endpoint the caller may reach with `needed`; endpoints in unseen projects are
/// "not found".
async fn visible(
    state: &AppState,
    caller: &Caller,
    id: EndpointId,
    needed: Permission,
) -> ApiResult<Endpoint> {
    let endpoint = state.store.endpoint(id).await?.ok_or(ApiError::NotFound("endpoint"))?;
    caller.require(needed, Target::Project(endpoint.project_id), "endpoint")?;
    Ok(endpoint)
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EndpointQuery {
    /// Only this project's endpoints.
    pub project_id: Option<Uuid>,
    pub cursor: Option<String>,
    pub limit: Option<u32>,
}

/// Endpoints in the projects the caller can see.
#[utoipa::path(get, path = "/endpoints", tag = "endpoints", params(EndpointQuery), security(("bearer" = [])),
    responses((status = 200, body = EndpointList), (status = 404, body = ErrorBody)))]
pub async fn list_endpoints(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<EndpointQuery>,
) -> ApiResult<Json<EndpointList>> {
    let (cursor, limit) = crate::extract::PageQuery { cursor: q.cursor, limit: q.limit }.parse()?;
    let project = q.project_id.map(ProjectId::from_uuid);
    if let Some(p) = project {
        caller.require(VIEW, Target::Project(p), "project")?;
    }
    let visible_to = (caller.user.role != Role::Admin).then_some(caller.user.id);
    let page = state.store.list_endpoints(project, visible_to, cursor.as_ref(), limit).await?;
    let data = page
        .items
        .into_iter()
        .filter(|e| {
            caller.subject.decide(VIEW, Target::Project(e.project_id))
                == bud_domain::Decision::Allow
        })
        .map(|e| convert::endpoint(e, vec![]))
        .collect();
    Ok(Json(EndpointList { data, next_cursor: page.next_cursor.map(|c| c.as_str().to_owned()) }))
}

/// Deploy a model on a cluster. The endpoint starts PENDING; budcluster takes it to DEPLOYING
/// and RUNNING, or ERROR with a reason.
#[utoipa::path(post, path = "/endpoints", tag = "endpoints", request_body = CreateEndpointRequest, security(("bearer" = [])),
    responses((status = 201, body = EndpointDto), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_endpoint(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateEndpointRequest>,
) -> ApiResult<(StatusCode, Json<EndpointDto>)> {
    let project = ProjectId::from_uuid(req.project_id);
    caller.require(MANAGE, Target::Project(project), "project")?;
    state.store.project(project).await?.ok_or(ApiError::NotFound("project"))?;
    let model = state
        .store
        .model(ModelId::from_uuid(req.model_id))
        .await?
        .ok_or_else(|| ValidationError::new("model_id", "names no model"))?;
    let cluster = match req.cluster_id {
        Some(id) => state
            .store
            .cluster(ClusterId::from_uuid(id))
            .await?
            .ok_or_else(|| ValidationError::new("cluster_id", "names no cluster"))?,
        None => {
            state.store.cluster_by_name(bud_cluster::service::LOCAL_CLUSTER).await?.ok_or_else(
                || ValidationError::new("cluster_id", "is required: there is no local cluster"),
            )?
        }
    };
    if cluster.status == ClusterStatus::Deleting {
        return Err(ApiError::Conflict(format!("cluster {} is being deleted", cluster.name)));
    }
    let replicas = in_range("replicas", req.replicas.unwrap_or(1), 1, MAX_REPLICAS)?;
    let default_gpus = if model.engine == Engine::EngineSim { 0 } else { 1 };
    let now = Utc::now();
    let endpoint = Endpoint {
        id: EndpointId::new(),
        project_id: project,
        model_id: model.id,
        cluster_id: cluster.id,
        name: Name::parse("name", &req.name)?,
        replicas,
        min_replicas: in_range("min_replicas", req.min_replicas.unwrap_or(0), 0, replicas)?,
        engine_args: engine_args(req.engine_args)?,
        gpus_per_replica: in_range(
            "gpus_per_replica",
            req.gpus_per_replica.unwrap_or(default_gpus),
            0,
            16,
        )?,
        deployment_timeout_secs: in_range(
            "deployment_timeout_secs",
            req.deployment_timeout_secs.unwrap_or(600),
            5,
            86_400,
        )?,
        status: EndpointStatus::Pending,
        reason: None,
        reason_detail: String::new(),
        status_since: now,
        ready_replicas: 0,
        addresses: vec![],
        generation: 1,
        created_by: Some(caller.user.id),
        created_at: now,
        updated_at: now,
    };
    let details = serde_json::json!({"name": endpoint.name, "model": model.name, "cluster": cluster.name, "replicas": replicas});
    let audit = caller.audit("endpoint.create", "endpoint", endpoint.id, Some(project), details);
    state.store.create_endpoint(&endpoint, &audit).await?;
    state.wake_clusters().await;
    Ok((StatusCode::CREATED, Json(convert::endpoint(endpoint, vec![]))))
}

/// An endpoint: status, reason, replicas ready of desired, recent events.
#[utoipa::path(get, path = "/endpoints/{id}", tag = "endpoints", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses((status = 200, body = EndpointDto), (status = 404, body = ErrorBody)))]
pub async fn get_endpoint(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
) -> ApiResult<Json<EndpointDto>> {
    let endpoint = visible(&state, &caller, EndpointId::from_uuid(id), VIEW).await?;
    let events = state.store.endpoint_events(endpoint.id, 20).await?;
    Ok(Json(convert::endpoint(endpoint, events)))
}

/// Scale an endpoint (replicas, minimum replicas).
#[utoipa::path(patch, path = "/endpoints/{id}", tag = "endpoints", params(("id" = Uuid, Path)), request_body = UpdateEndpointRequest, security(("bearer" = [])),
    responses((status = 200, body = EndpointDto), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn update_endpoint(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
    ApiJson(req): ApiJson<UpdateEndpointRequest>,
) -> ApiResult<Json<EndpointDto>> {
    let endpoint = visible(&state, &caller, EndpointId::from_uuid(id), MANAGE).await?;
    if endpoint.status.after(EndpointCommand::Scale).is_none() {
        return Err(illegal(&endpoint, EndpointCommand::Scale));
    }
    let replicas = req.replicas.map(|r| in_range("replicas", r, 1, MAX_REPLICAS)).transpose()?;
    let min_replicas =
        req.min_replicas.map(|m| in_range("min_replicas", m, 0, MAX_REPLICAS)).transpose()?;
    if min_replicas.unwrap_or(endpoint.min_replicas) > replicas.unwrap_or(endpoint.replicas) {
        return Err(ValidationError::new("min_replicas", "must not exceed replicas").into());
    }
    let patch = EndpointPatch { replicas, min_replicas };
    let audit = caller.audit(
        "endpoint.scale",
        "endpoint",
        endpoint.id,
        Some(endpoint.project_id),
        serde_json::json!({"replicas": replicas, "min_replicas": min_replicas}),
    );
    let updated = state
        .store
        .update_endpoint(endpoint.id, &patch, Utc::now(), &audit)
        .await?
        .ok_or(ApiError::NotFound("endpoint"))?;
    state.wake_clusters().await;
    Ok(Json(convert::endpoint(updated, vec![])))
}

fn illegal(endpoint: &Endpoint, command: EndpointCommand) -> ApiError {
    let hint = match command {
        EndpointCommand::Start => "start applies to STOPPED endpoints",
        EndpointCommand::Retry => "retry applies to endpoints in ERROR",
        EndpointCommand::Stop => "stop applies to PENDING, DEPLOYING, RUNNING or ERROR endpoints",
        EndpointCommand::Delete => "stop it first: delete applies to STOPPED or ERROR endpoints",
        EndpointCommand::Scale => "wait until it is stopped or running",
    };
    ApiError::Conflict(format!("the endpoint is {}; {hint}", endpoint.status))
}

async fn command(
    state: &AppState,
    caller: &Caller,
    id: Uuid,
    command: EndpointCommand,
) -> ApiResult<Json<EndpointDto>> {
    let endpoint = visible(state, caller, EndpointId::from_uuid(id), MANAGE).await?;
    let to = endpoint.status.after(command).ok_or_else(|| illegal(&endpoint, command))?;
    let change = StatusChange {
        from: endpoint.status,
        to,
        reason: None,
        reason_detail: String::new(),
        at: Utc::now(),
        message: format!("{command} requested by {}", caller.user.email),
    };
    let audit = caller.audit(
        &format!("endpoint.{command}"),
        "endpoint",
        endpoint.id,
        Some(endpoint.project_id),
        serde_json::json!({"from": endpoint.status, "to": to}),
    );
    if !state.store.transition_endpoint(endpoint.id, &change, None, Some(&audit)).await? {
        return Err(ApiError::Conflict(
            "the endpoint changed meanwhile; look at it again and retry".into(),
        ));
    }
    state.wake_clusters().await;
    let updated = state.store.endpoint(endpoint.id).await?.ok_or(ApiError::NotFound("endpoint"))?;
    Ok(Json(convert::endpoint(updated, vec![])))
}

/// Stop an endpoint: STOPPING, then STOPPED once its replicas are gone.
#[utoipa::path(post, path = "/endpoints/{id}/stop", tag = "endpoints", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses((status = 200, body = EndpointDto), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn stop_endpoint(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
) -> ApiResult<Json<EndpointDto>> {
    command(&state, &caller, id, EndpointCommand::Stop).await
}

/// Start a stopped endpoint again.
#[utoipa::path(post, path = "/endpoints/{id}/start", tag = "endpoints", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses((status = 200, body = EndpointDto), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn start_endpoint(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
) -> ApiResult<Json<EndpointDto>> {
    command(&state, &caller, id, EndpointCommand::Start).await
}

/// Deploy an endpoint in ERROR again.
#[utoipa::path(post, path = "/endpoints/{id}/retry", tag = "endpoints", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses((status = 200, body = EndpointDto), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn retry_endpoint(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
) -> ApiResult<Json<EndpointDto>> {
    command(&state, &caller, id, EndpointCommand::Retry).await
}

/// Delete a STOPPED or ERROR endpoint.
#[utoipa::path(delete, path = "/endpoints/{id}", tag = "endpoints", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete_endpoint(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
) -> ApiResult<StatusCode> {
    let endpoint = visible(&state, &caller, EndpointId::from_uuid(id), MANAGE).await?;
    if endpoint.status.after(EndpointCommand::Delete).is_none() {
        return Err(illegal(&endpoint, EndpointCommand::Delete));
    }
    let audit = caller.audit(
        "endpoint.delete",
        "endpoint",
        endpoint.id,
        Some(endpoint.project_id),
        serde_json::json!({"name": endpoint.name}),
    );
    if !state.store.delete_endpoint(endpoint.id, &audit).await? {
        return Err(ApiError::NotFound("endpoint"));
    }
    state.wake_clusters().await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Lines per replica, 1 to 10000 (default 200).
    pub tail: Option<usize>,
}

/// The engines' output, the last lines of each replica.
#[utoipa::path(get, path = "/endpoints/{id}/logs", tag = "endpoints", params(("id" = Uuid, Path), LogsQuery), security(("bearer" = [])),
    responses((status = 200, body = String, content_type = "text/plain"), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn endpoint_logs(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
    ApiQuery(q): ApiQuery<LogsQuery>,
) -> ApiResult<Response> {
    let endpoint = visible(&state, &caller, EndpointId::from_uuid(id), VIEW).await?;
    let tail = q.tail.unwrap_or(200);
    if !(1..=10_000).contains(&tail) {
        return Err(ValidationError::new("tail", "must be between 1 and 10000").into());
    }
    let text = state.clusters()?.logs(endpoint.id, tail).await.map_err(cluster_error)?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

/// Queue depth, running requests, requests/s, tokens/s and latency percentiles, read from the
/// endpoint's engines.
#[utoipa::path(get, path = "/endpoints/{id}/metrics", tag = "endpoints", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses((status = 200, body = EndpointMetricsDto), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn endpoint_metrics(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
) -> ApiResult<Json<EndpointMetricsDto>> {
    let endpoint = visible(&state, &caller, EndpointId::from_uuid(id), VIEW).await?;
    state.clusters()?.metrics(endpoint.id).await.map(Json).map_err(cluster_error)
}

fn cluster_error(e: bud_cluster::ClusterError) -> ApiError {
    match e {
        bud_cluster::ClusterError::NotFound(what) => ApiError::NotFound(what),
        bud_cluster::ClusterError::Store(s) => s.into(),
        other => ApiError::Unavailable(other.to_string()),
    }
}
