//! `/projects/{id}/routes` and `/routes/{id}`: the public model names a project's API keys can
//! ask the gateway for, and the endpoints and providers behind each. Governed by the `endpoint`
//! permissions of the route's project, as a route is how the project's endpoints are reached.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use bud_domain::{
    Access, EndpointId, Module, Name, Permission, ProjectId, ProviderId, RouteId, Target,
    ValidationError,
};
use bud_protocol::ErrorBody;
use bud_protocol::control::{
    CreateRouteRequest, RouteDto, RouteList, RouteTargetDto, UpdateRouteRequest,
};
use bud_store::{Route, RoutePatch, RouteTarget, RouteUpstream};
use chrono::Utc;
use uuid::Uuid;

use crate::convert;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiQuery, IdPath, PageQuery};
use crate::identity::Caller;
use crate::state::AppState;

const VIEW: Permission = Permission::new(Module::Endpoint, Access::View);
const MANAGE: Permission = Permission::new(Module::Endpoint, Access::Manage);
/// Targets (or fallbacks) one route may list.
const MAX_TARGETS: usize = 64;
const MAX_WEIGHT: i64 = 1000;
/// Longest provider model name accepted.
const MAX_MODEL_CHARS: usize = 256;

/// Routes of a project.
#[utoipa::path(get, path = "/projects/{id}/routes", tag = "routes", params(("id" = Uuid, Path), PageQuery), security(("bearer" = [])),
    responses((status = 200, body = RouteList), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn list_routes(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<RouteList>> {
    let project = ProjectId::from_uuid(id);
    caller.require(VIEW, Target::Project(project), "project")?;
    let (cursor, limit) = q.parse()?;
    state.store.project(project).await?.ok_or(ApiError::NotFound("project"))?;
    let page = state.store.list_routes(project, cursor.as_ref(), limit).await?;
    Ok(Json(RouteList {
        data: page.items.into_iter().map(convert::route).collect(),
        next_cursor: page.next_cursor.map(|c| c.as_str().to_owned()),
    }))
}

/// Create a route: a public model name served by weighted targets (endpoints of the project or
/// providers), with fallbacks tried in order. A route named like a model replaces the implicit
/// route of the project's endpoints of that model.
#[utoipa::path(post, path = "/projects/{id}/routes", tag = "routes", params(("id" = Uuid, Path)), request_body = CreateRouteRequest, security(("bearer" = [])),
    responses((status = 201, body = RouteDto), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_route(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
    ApiJson(req): ApiJson<CreateRouteRequest>,
) -> ApiResult<(StatusCode, Json<RouteDto>)> {
    let project = ProjectId::from_uuid(id);
    caller.require(MANAGE, Target::Project(project), "project")?;
    state.store.project(project).await?.ok_or(ApiError::NotFound("project"))?;
    let now = Utc::now();
    let route = Route {
        id: RouteId::new(),
        project_id: project,
        name: Name::parse("name", &req.name)?,
        targets: targets(&state, project, "targets", req.targets).await?,
        fallbacks: targets(&state, project, "fallbacks", req.fallbacks).await?,
        rpm_limit: limit("rpm_limit", req.rpm_limit)?,
        tpm_limit: limit("tpm_limit", req.tpm_limit)?,
        created_by: Some(caller.user.id),
        created_at: now,
        updated_at: now,
    };
    let details = serde_json::json!({"name": route.name, "targets": route.targets.len(), "fallbacks": route.fallbacks.len()});
    let audit = caller.audit("route.create", "route", route.id, Some(project), details);
    state.store.create_route(&route, &audit).await?;
    Ok((StatusCode::CREATED, Json(convert::route(route))))
}

/// Loads a route the caller may reach with `needed`; routes in unseen projects are "not found".
async fn visible(
    state: &AppState,
    caller: &Caller,
    id: RouteId,
    needed: Permission,
) -> ApiResult<Route> {
    let route = state.store.route(id).await?.ok_or(ApiError::NotFound("gateway route"))?;
    caller.require(needed, Target::Project(route.project_id), "gateway route")?;
    Ok(route)
}

/// A route.
#[utoipa::path(get, path = "/routes/{id}", tag = "routes", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses((status = 200, body = RouteDto), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_route(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
) -> ApiResult<Json<RouteDto>> {
    let route = visible(&state, &caller, RouteId::from_uuid(id), VIEW).await?;
    Ok(Json(convert::route(route)))
}

/// Change a route: rename it, replace its targets or fallbacks, set or clear (`null`) limits.
#[utoipa::path(patch, path = "/routes/{id}", tag = "routes", params(("id" = Uuid, Path)), request_body = UpdateRouteRequest, security(("bearer" = [])),
    responses((status = 200, body = RouteDto), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn update_route(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
    ApiJson(req): ApiJson<UpdateRouteRequest>,
) -> ApiResult<Json<RouteDto>> {
    let route = visible(&state, &caller, RouteId::from_uuid(id), MANAGE).await?;
    let project = route.project_id;
    let patch = RoutePatch {
        name: req.name.as_deref().map(|n| Name::parse("name", n)).transpose()?,
        targets: match req.targets {
            Some(t) => Some(targets(&state, project, "targets", t).await?),
            None => None,
        },
        fallbacks: match req.fallbacks {
            Some(f) => Some(targets(&state, project, "fallbacks", f).await?),
            None => None,
        },
        rpm_limit: req.rpm_limit.map(|l| limit("rpm_limit", l)).transpose()?,
        tpm_limit: req.tpm_limit.map(|l| limit("tpm_limit", l)).transpose()?,
    };
    let details = serde_json::json!({
        "name": patch.name,
        "targets": patch.targets.as_ref().map(Vec::len),
        "fallbacks": patch.fallbacks.as_ref().map(Vec::len),
        "rpm_limit": patch.rpm_limit,
        "tpm_limit": patch.tpm_limit,
    });
    let audit = caller.audit("route.update", "route", route.id, Some(project), details);
    let updated = state
        .store
        .update_route(route.id, &patch, Utc::now(), &audit)
        .await?
        .ok_or(ApiError::NotFound("gateway route"))?;
    Ok(Json(convert::route(updated)))
}

/// Delete a route; a RUNNING endpoint of the same model name is reachable again by its implicit
/// route.
#[utoipa::path(delete, path = "/routes/{id}", tag = "routes", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_route(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
) -> ApiResult<StatusCode> {
    let route = visible(&state, &caller, RouteId::from_uuid(id), MANAGE).await?;
    let details = serde_json::json!({"name": route.name});
    let audit = caller.audit("route.delete", "route", route.id, Some(route.project_id), details);
    if !state.store.delete_route(route.id, &audit).await? {
        return Err(ApiError::NotFound("gateway route"));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Checks a list of targets; errors name the field as `targets[2].weight`. Targets are
/// required, fallbacks may be empty. Endpoints must belong to the route's project (any status:
/// the gateway routes to them while they run); providers must exist, and be asked for a model.
async fn targets(
    state: &AppState,
    project: ProjectId,
    field: &str,
    list: Vec<RouteTargetDto>,
) -> ApiResult<Vec<RouteTarget>> {
    if field == "targets" && list.is_empty() {
        return Err(ValidationError::new(field, "must name at least one target").into());
    }
    if list.len() > MAX_TARGETS {
        return Err(ValidationError::new(
            field,
            format!("must hold at most {MAX_TARGETS} targets"),
        )
        .into());
    }
    let mut checked = Vec::with_capacity(list.len());
    for (i, t) in list.into_iter().enumerate() {
        let at = |sub: &str| format!("{field}[{i}]{sub}");
        if !(1..=MAX_WEIGHT).contains(&t.weight) {
            let message = format!("must be between 1 and {MAX_WEIGHT}");
            return Err(ValidationError::new(at(".weight"), message).into());
        }
        let weight = u32::try_from(t.weight).unwrap_or(1);
        let upstream = match (t.endpoint_id, t.provider_id) {
            (Some(id), None) => {
                if t.model.is_some() {
                    return Err(ValidationError::new(
                        at(".model"),
                        "must be absent for an endpoint target: the endpoint serves its own model",
                    )
                    .into());
                }
                let id = EndpointId::from_uuid(id);
                let endpoint = state.store.endpoint(id).await?;
                if endpoint.is_none_or(|e| e.project_id != project) {
                    let message = "names no endpoint of this project";
                    return Err(ValidationError::new(at(".endpoint_id"), message).into());
                }
                RouteUpstream::Endpoint(id)
            }
            (None, Some(id)) => {
                let id = ProviderId::from_uuid(id);
                if state.store.provider(id).await?.is_none() {
                    return Err(
                        ValidationError::new(at(".provider_id"), "names no provider").into()
                    );
                }
                let model = t.model.as_deref().map(str::trim).unwrap_or_default();
                if model.is_empty() {
                    return Err(ValidationError::new(
                        at(".model"),
                        "is required for a provider target: the provider's name for the model",
                    )
                    .into());
                }
                if model.chars().count() > MAX_MODEL_CHARS || model.chars().any(char::is_control) {
                    let message = format!(
                        "must be at most {MAX_MODEL_CHARS} characters, without control characters"
                    );
                    return Err(ValidationError::new(at(".model"), message).into());
                }
                RouteUpstream::Provider { id, model: model.to_owned() }
            }
            _ => {
                return Err(ValidationError::new(
                    at(""),
                    "must name exactly one of endpoint_id and provider_id",
                )
                .into());
            }
        };
        checked.push(RouteTarget { upstream, weight });
    }
    Ok(checked)
}

fn limit(field: &str, value: Option<i64>) -> ApiResult<Option<i64>> {
    match value {
        Some(n) if !(1..=1_000_000_000).contains(&n) => Err(ValidationError::new(
            field,
            "must be between 1 and 1000000000, or absent for no limit",
        )
        .into()),
        other => Ok(other),
    }
}
