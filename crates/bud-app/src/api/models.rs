//! `/models` (registered models) and `/providers` (external OpenAI-compatible services). Both
//! are governed by the `model` permissions: a provider is another place a model is served from.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use bud_domain::{
    Access, Engine, Modality, ModelId, Module, Name, Permission, ProviderId, SourceUri, Target,
    ValidationError,
};
use bud_protocol::ErrorBody;
use bud_protocol::control::{
    CreateModelRequest, CreateProviderRequest, ModelDto, ModelList, ProviderDto, ProviderList,
    UpdateModelRequest, UpdateProviderRequest,
};
use bud_store::{Model, ModelPatch, Provider, ProviderPatch};
use chrono::Utc;
use uuid::Uuid;

use crate::convert;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiQuery, IdPath, PageQuery};
use crate::identity::Caller;
use crate::ssrf::check_provider_url;
use crate::state::AppState;

const VIEW: Permission = Permission::new(Module::Model, Access::View);
const MANAGE: Permission = Permission::new(Module::Model, Access::Manage);

fn text(field: &str, value: Option<String>) -> ApiResult<String> {
    let value = value.unwrap_or_default();
    if value.chars().count() > 2000 {
        return Err(ValidationError::new(field, "must be at most 2000 characters").into());
    }
    Ok(value)
}

/// Registered models.
#[utoipa::path(get, path = "/models", tag = "models", params(PageQuery), security(("bearer" = [])),
    responses((status = 200, body = ModelList), (status = 403, body = ErrorBody)))]
pub async fn list_models(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<ModelList>> {
    caller.require(VIEW, Target::Platform, "model")?;
    let (cursor, limit) = q.parse()?;
    let page = state.store.list_models(cursor.as_ref(), limit).await?;
    Ok(Json(ModelList {
        data: page.items.into_iter().map(convert::model).collect(),
        next_cursor: page.next_cursor.map(|c| c.as_str().to_owned()),
    }))
}

/// Register a model. `engine` defaults to `vllm`, `modality` to `text`.
#[utoipa::path(post, path = "/models", tag = "models", request_body = CreateModelRequest, security(("bearer" = [])),
    responses((status = 201, body = ModelDto), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_model(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateModelRequest>,
) -> ApiResult<(StatusCode, Json<ModelDto>)> {
    caller.require(MANAGE, Target::Platform, "model")?;
    let now = Utc::now();
    let model = Model {
        id: ModelId::new(),
        name: Name::parse("name", &req.name)?,
        source_uri: SourceUri::parse("source_uri", &req.source_uri)?,
        engine: req.engine.as_deref().map(str::parse).transpose()?.unwrap_or(Engine::Vllm),
        modality: req.modality.as_deref().map(str::parse).transpose()?.unwrap_or(Modality::Text),
        description: text("description", req.description)?,
        created_by: Some(caller.user.id),
        created_at: now,
        updated_at: now,
    };
    let audit = caller.audit(
        "model.create",
        "model",
        model.id,
        None,
        serde_json::json!({"name": model.name, "source_uri": model.source_uri}),
    );
    state.store.create_model(&model, &audit).await?;
    Ok((StatusCode::CREATED, Json(convert::model(model))))
}

/// One model.
#[utoipa::path(get, path = "/models/{id}", tag = "models", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses((status = 200, body = ModelDto), (status = 404, body = ErrorBody)))]
pub async fn get_model(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
) -> ApiResult<Json<ModelDto>> {
    caller.require(VIEW, Target::Platform, "model")?;
    let model =
        state.store.model(ModelId::from_uuid(id)).await?.ok_or(ApiError::NotFound("model"))?;
    Ok(Json(convert::model(model)))
}

/// Change a model's registration.
#[utoipa::path(patch, path = "/models/{id}", tag = "models", params(("id" = Uuid, Path)), request_body = UpdateModelRequest, security(("bearer" = [])),
    responses((status = 200, body = ModelDto), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn update_model(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
    ApiJson(req): ApiJson<UpdateModelRequest>,
) -> ApiResult<Json<ModelDto>> {
    caller.require(MANAGE, Target::Platform, "model")?;
    let id = ModelId::from_uuid(id);
    let patch = ModelPatch {
        name: req.name.as_deref().map(|n| Name::parse("name", n)).transpose()?,
        source_uri: req
            .source_uri
            .as_deref()
            .map(|s| SourceUri::parse("source_uri", s))
            .transpose()?,
        engine: req.engine.as_deref().map(str::parse).transpose()?,
        modality: req.modality.as_deref().map(str::parse).transpose()?,
        description: req.description.map(|d| text("description", Some(d))).transpose()?,
    };
    let audit = caller.audit(
        "model.update",
        "model",
        id,
        None,
        serde_json::json!({"name": patch.name, "source_uri": patch.source_uri}),
    );
    let model = state
        .store
        .update_model(id, &patch, Utc::now(), &audit)
        .await?
        .ok_or(ApiError::NotFound("model"))?;
    Ok(Json(convert::model(model)))
}

/// Remove a model's registration.
#[utoipa::path(delete, path = "/models/{id}", tag = "models", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_model(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
) -> ApiResult<StatusCode> {
    caller.require(MANAGE, Target::Platform, "model")?;
    let id = ModelId::from_uuid(id);
    let audit = caller.audit("model.delete", "model", id, None, serde_json::Value::Null);
    if state.store.delete_model(id, &audit).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound("model"))
    }
}

/// Provider API keys are sealed to their row, so a ciphertext copied onto another row fails.
fn seal_provider_key(state: &AppState, id: ProviderId, key: Option<&str>) -> ApiResult<String> {
    match key.map(str::trim) {
        None => Ok(String::new()),
        Some("") => Err(ValidationError::new(
            "api_key",
            "must not be empty; omit it for providers without a key",
        )
        .into()),
        Some(k) if k.len() > 4096 => {
            Err(ValidationError::new("api_key", "must be at most 4096 characters").into())
        }
        Some(k) => {
            Ok(state.keyring.encrypt(k.as_bytes(), bud_auth::secrets::aad::provider(id).as_bytes()))
        }
    }
}

/// External providers.
#[utoipa::path(get, path = "/providers", tag = "providers", params(PageQuery), security(("bearer" = [])),
    responses((status = 200, body = ProviderList), (status = 403, body = ErrorBody)))]
pub async fn list_providers(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<ProviderList>> {
    caller.require(VIEW, Target::Platform, "provider")?;
    let (cursor, limit) = q.parse()?;
    let page = state.store.list_providers(cursor.as_ref(), limit).await?;
    Ok(Json(ProviderList {
        data: page.items.into_iter().map(convert::provider).collect(),
        next_cursor: page.next_cursor.map(|c| c.as_str().to_owned()),
    }))
}

/// Register an external provider. The base URL must not point into private networks unless
/// configuration allows it; the API key is stored encrypted and never returned.
#[utoipa::path(post, path = "/providers", tag = "providers", request_body = CreateProviderRequest, security(("bearer" = [])),
    responses((status = 201, body = ProviderDto), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_provider(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateProviderRequest>,
) -> ApiResult<(StatusCode, Json<ProviderDto>)> {
    caller.require(MANAGE, Target::Platform, "provider")?;
    let now = Utc::now();
    let id = ProviderId::new();
    let provider = Provider {
        id,
        name: Name::parse("name", &req.name)?,
        base_url: check_provider_url(&req.base_url, &state.config.providers).await?,
        api_key_ciphertext: seal_provider_key(&state, id, req.api_key.as_deref())?,
        created_by: Some(caller.user.id),
        created_at: now,
        updated_at: now,
    };
    let audit = caller.audit(
        "provider.create",
        "provider",
        id,
        None,
        serde_json::json!({"name": provider.name, "base_url": provider.base_url}),
    );
    state.store.create_provider(&provider, &audit).await?;
    Ok((StatusCode::CREATED, Json(convert::provider(provider))))
}

/// One provider.
#[utoipa::path(get, path = "/providers/{id}", tag = "providers", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses((status = 200, body = ProviderDto), (status = 404, body = ErrorBody)))]
pub async fn get_provider(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
) -> ApiResult<Json<ProviderDto>> {
    caller.require(VIEW, Target::Platform, "provider")?;
    let p = state
        .store
        .provider(ProviderId::from_uuid(id))
        .await?
        .ok_or(ApiError::NotFound("provider"))?;
    Ok(Json(convert::provider(p)))
}

/// Change a provider's name, base URL or API key.
#[utoipa::path(patch, path = "/providers/{id}", tag = "providers", params(("id" = Uuid, Path)), request_body = UpdateProviderRequest, security(("bearer" = [])),
    responses((status = 200, body = ProviderDto), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn update_provider(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
    ApiJson(req): ApiJson<UpdateProviderRequest>,
) -> ApiResult<Json<ProviderDto>> {
    caller.require(MANAGE, Target::Platform, "provider")?;
    let id = ProviderId::from_uuid(id);
    let base_url = match req.base_url {
        Some(u) => Some(check_provider_url(&u, &state.config.providers).await?),
        None => None,
    };
    let patch = ProviderPatch {
        name: req.name.as_deref().map(|n| Name::parse("name", n)).transpose()?,
        base_url,
        api_key_ciphertext: req
            .api_key
            .as_deref()
            .map(|k| seal_provider_key(&state, id, Some(k)))
            .transpose()?,
    };
    let details = serde_json::json!({"name": patch.name, "base_url": patch.base_url, "api_key_changed": patch.api_key_ciphertext.is_some()});
    let audit = caller.audit("provider.update", "provider", id, None, details);
    let p = state
        .store
        .update_provider(id, &patch, Utc::now(), &audit)
        .await?
        .ok_or(ApiError::NotFound("provider"))?;
    Ok(Json(convert::provider(p)))
}

/// Remove a provider.
#[utoipa::path(delete, path = "/providers/{id}", tag = "providers", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_provider(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
) -> ApiResult<StatusCode> {
    caller.require(MANAGE, Target::Platform, "provider")?;
    let id = ProviderId::from_uuid(id);
    let audit = caller.audit("provider.delete", "provider", id, None, serde_json::Value::Null);
    if state.store.delete_provider(id, &audit).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound("provider"))
    }
}
