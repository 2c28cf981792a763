//! API keys for the gateway, per project: shown once, stored as a hash.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use bud_auth::api_key;
use bud_domain::{Access, ApiKeyId, Module, Name, Permission, ProjectId, Target, ValidationError};
use bud_protocol::ErrorBody;
use bud_protocol::control::{ApiKeyDto, ApiKeyList, CreateApiKeyRequest, CreatedApiKeyDto};
use bud_store::ApiKey;
use chrono::Utc;
use uuid::Uuid;

use crate::convert;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiQuery, IdPath, PageQuery};
use crate::identity::Caller;
use crate::state::AppState;

const VIEW: Permission = Permission::new(Module::Key, Access::View);
const MANAGE: Permission = Permission::new(Module::Key, Access::Manage);

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

/// API keys of a project.
#[utoipa::path(get, path = "/projects/{id}/keys", tag = "keys", params(("id" = Uuid, Path), PageQuery), security(("bearer" = [])),
    responses((status = 200, body = ApiKeyList), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn list_keys(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<ApiKeyList>> {
    let project = ProjectId::from_uuid(id);
    caller.require(VIEW, Target::Project(project), "project")?;
    let (cursor, page_limit) = q.parse()?;
    state.store.project(project).await?.ok_or(ApiError::NotFound("project"))?;
    let page = state.store.list_api_keys(project, cursor.as_ref(), page_limit).await?;
    Ok(Json(ApiKeyList {
        data: page.items.into_iter().map(convert::api_key).collect(),
        next_cursor: page.next_cursor.map(|c| c.as_str().to_owned()),
    }))
}

/// Create an API key. The secret is in this response only.
#[utoipa::path(post, path = "/projects/{id}/keys", tag = "keys", params(("id" = Uuid, Path)), request_body = CreateApiKeyRequest, security(("bearer" = [])),
    responses((status = 201, body = CreatedApiKeyDto), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_key(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
    ApiJson(req): ApiJson<CreateApiKeyRequest>,
) -> ApiResult<(StatusCode, Json<CreatedApiKeyDto>)> {
    let project = ProjectId::from_uuid(id);
    caller.require(MANAGE, Target::Project(project), "project")?;
    state.store.project(project).await?.ok_or(ApiError::NotFound("project"))?;
    let now = Utc::now();
    if req.expires_at.is_some_and(|e| e <= now) {
        return Err(ValidationError::new("expires_at", "must be in the future").into());
    }
    let generated = api_key::generate_api_key();
    let key = ApiKey {
        id: ApiKeyId::new(),
        project_id: project,
        name: Name::parse("name", &req.name)?,
        prefix: generated.prefix,
        hash: generated.hash,
        created_by: Some(caller.user.id),
        created_at: now,
        expires_at: req.expires_at,
        revoked_at: None,
        rpm_limit: limit("rpm_limit", req.rpm_limit)?,
        tpm_limit: limit("tpm_limit", req.tpm_limit)?,
    };
    let audit = caller.audit(
        "key.create",
        "api_key",
        key.id,
        Some(project),
        serde_json::json!({"name": key.name, "prefix": key.prefix}),
    );
    state.store.create_api_key(&key, &audit).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedApiKeyDto { key: convert::api_key(key), secret: generated.plaintext }),
    ))
}

/// Loads a key the caller may see with `needed`; keys in unseen projects are "not found".
async fn visible_key(
    state: &AppState,
    caller: &Caller,
    id: ApiKeyId,
    needed: Permission,
) -> ApiResult<ApiKey> {
    let key = state.store.api_key(id).await?.ok_or(ApiError::NotFound("api key"))?;
    caller.require(needed, Target::Project(key.project_id), "api key")?;
    Ok(key)
}

/// One API key (never its secret).
#[utoipa::path(get, path = "/keys/{id}", tag = "keys", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses((status = 200, body = ApiKeyDto), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_key(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
) -> ApiResult<Json<ApiKeyDto>> {
    let key = visible_key(&state, &caller, ApiKeyId::from_uuid(id), VIEW).await?;
    Ok(Json(convert::api_key(key)))
}

/// Revoke an API key. Revoking twice is not an error; the first revocation time stays.
#[utoipa::path(delete, path = "/keys/{id}", tag = "keys", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses((status = 200, body = ApiKeyDto), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn revoke_key(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
) -> ApiResult<Json<ApiKeyDto>> {
    let key = visible_key(&state, &caller, ApiKeyId::from_uuid(id), MANAGE).await?;
    let audit = caller.audit(
        "key.revoke",
        "api_key",
        key.id,
        Some(key.project_id),
        serde_json::json!({"prefix": key.prefix}),
    );
    let key = state
        .store
        .revoke_api_key(key.id, Utc::now(), &audit)
        .await?
        .ok_or(ApiError::NotFound("api key"))?;
    Ok(Json(convert::api_key(key)))
}
