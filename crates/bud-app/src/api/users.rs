//! `/users` and `/permissions`: accounts, roles and explicit grants (the guide's §2.2).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use bud_auth::password;
use bud_domain::{
    Access, Email, Grant, GrantId, Module, Name, Permission, ProjectId, Role, Target, UserId,
    ValidationError,
};
use bud_protocol::ErrorBody;
use bud_protocol::control::{
    CreateUserRequest, GrantDto, GrantRequest, PermissionsDto, UpdateUserRequest, UserDto, UserList,
};
use bud_store::{GrantRecord, User, UserPatch};
use chrono::Utc;
use serde::Deserialize;
use uuid::Uuid;

use crate::config::IdentityMode;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiQuery, IdPath, PageQuery};
use crate::identity::Caller;
use crate::state::AppState;
use crate::{convert, permissions_view};

const USER_VIEW: Permission = Permission::new(Module::User, Access::View);
const USER_MANAGE: Permission = Permission::new(Module::User, Access::Manage);

/// List users.
#[utoipa::path(get, path = "/users", tag = "users", params(PageQuery), security(("bearer" = [])),
    responses((status = 200, body = UserList), (status = 403, body = ErrorBody)))]
pub async fn list_users(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<UserList>> {
    caller.require(USER_VIEW, Target::Platform, "user")?;
    let (cursor, limit) = q.parse()?;
    let page = state.store.list_users(cursor.as_ref(), limit).await?;
    Ok(Json(UserList {
        data: page.items.into_iter().map(convert::user).collect(),
        next_cursor: page.next_cursor.map(|c| c.as_str().to_owned()),
    }))
}

/// Create a local account (built-in identity only).
#[utoipa::path(post, path = "/users", tag = "users", request_body = CreateUserRequest, security(("bearer" = [])),
    responses((status = 201, body = UserDto), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_user(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateUserRequest>,
) -> ApiResult<(StatusCode, Json<UserDto>)> {
    caller.require(USER_MANAGE, Target::Platform, "user")?;
    let user = create_local_user(&state, &caller, req).await?;
    Ok((StatusCode::CREATED, Json(convert::user(user))))
}

async fn create_local_user(
    state: &AppState,
    caller: &Caller,
    req: CreateUserRequest,
) -> ApiResult<User> {
    if !matches!(state.config.identity, IdentityMode::Builtin) {
        return Err(ApiError::Refused(
            "users come from the external identity provider; create them there".into(),
        ));
    }
    let email = Email::parse("email", &req.email)?;
    let name = Name::parse("name", &req.name)?;
    let role: Role = req.role.parse()?;
    let hash = hash_new_password(req.password).await?;
    let now = Utc::now();
    let user = User {
        id: UserId::new(),
        email,
        name,
        role,
        password_hash: Some(hash),
        issuer: None,
        subject: None,
        created_at: now,
        updated_at: now,
        disabled_at: None,
    };
    let audit = caller.audit(
        "user.create",
        "user",
        user.id,
        None,
        serde_json::json!({"email": user.email, "role": role}),
    );
    state.store.create_user(&user, &audit).await?;
    Ok(user)
}

/// Passwords: at least 12 characters, at most 1024 (argon2 cost grows with length).
async fn hash_new_password(plain: String) -> ApiResult<String> {
    let chars = plain.chars().count();
    if !(12..=1024).contains(&chars) {
        return Err(ValidationError::new("password", "must be 12 to 1024 characters").into());
    }
    tokio::task::spawn_blocking(move || password::hash_password(&plain))
        .await
        .map_err(|e| ApiError::Internal(e.into()))?
        .map_err(|e| ApiError::Internal(e.into()))
}

/// A user, with their role. Everyone may read their own record.
#[utoipa::path(get, path = "/users/{id}", tag = "users", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses((status = 200, body = UserDto), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_user(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
) -> ApiResult<Json<UserDto>> {
    let id = UserId::from_uuid(id);
    if id != caller.user.id {
        caller.require(USER_VIEW, Target::Platform, "user")?;
    }
    let user = state.store.user(id).await?.ok_or(ApiError::NotFound("user"))?;
    Ok(Json(convert::user(user)))
}

/// Change a user's name, password, role or disabled flag. Users may change their own name and
/// password; role and disabled need `user:manage` and cannot be changed on oneself.
#[utoipa::path(patch, path = "/users/{id}", tag = "users", params(("id" = Uuid, Path)), request_body = UpdateUserRequest, security(("bearer" = [])),
    responses((status = 200, body = UserDto), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn update_user(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
    ApiJson(req): ApiJson<UpdateUserRequest>,
) -> ApiResult<Json<UserDto>> {
    let user = patch_user(&state, &caller, UserId::from_uuid(id), req).await?;
    Ok(Json(convert::user(user)))
}

async fn patch_user(
    state: &AppState,
    caller: &Caller,
    id: UserId,
    req: UpdateUserRequest,
) -> ApiResult<User> {
    let own = id == caller.user.id;
    let privileged = req.role.is_some() || req.disabled.is_some();
    if !own || privileged {
        caller.require(USER_MANAGE, Target::Platform, "user")?;
    }
    if own && privileged {
        return Err(ApiError::Refused(
            "you cannot change your own role or disable yourself; ask another admin".into(),
        ));
    }
    let patch = UserPatch {
        name: req.name.as_deref().map(|n| Name::parse("name", n)).transpose()?,
        role: req.role.as_deref().map(str::parse::<Role>).transpose()?,
        password_hash: match req.password {
            Some(p) => Some(hash_new_password(p).await?),
            None => None,
        },
        disabled: req.disabled,
    };
    let details = serde_json::json!({
        "name": patch.name, "role": patch.role, "password_changed": patch.password_hash.is_some(), "disabled": patch.disabled,
    });
    let audit = caller.audit("user.update", "user", id, None, details);
    let user = state
        .store
        .update_user(id, &patch, Utc::now(), &audit)
        .await?
        .ok_or(ApiError::NotFound("user"))?;
    if patch.password_hash.is_some() || patch.disabled == Some(true) {
        state.store.revoke_refresh_tokens_of_user(id, Utc::now()).await?;
    }
    Ok(user)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PermissionsQuery {
    /// Whose permissions; the caller's own when absent.
    pub user_id: Option<Uuid>,
}

/// A user's permissions: role, grants and effective permissions per project.
#[utoipa::path(get, path = "/permissions", tag = "users", params(PermissionsQuery), security(("bearer" = [])),
    responses((status = 200, body = PermissionsDto), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_permissions(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<PermissionsQuery>,
) -> ApiResult<Json<PermissionsDto>> {
    let id = q.user_id.map(UserId::from_uuid).unwrap_or(caller.user.id);
    let user = if id == caller.user.id {
        caller.user.clone()
    } else {
        caller.require(USER_VIEW, Target::Platform, "user")?;
        state.store.user(id).await?.ok_or(ApiError::NotFound("user"))?
    };
    permissions_view::of_user(&state, &user).await.map(Json)
}

/// Grant a permission to a user (project-scoped modules name the project).
#[utoipa::path(post, path = "/permissions", tag = "users", request_body = GrantRequest, security(("bearer" = [])),
    responses((status = 201, body = GrantDto), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn grant_permission(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<GrantRequest>,
) -> ApiResult<(StatusCode, Json<GrantDto>)> {
    caller.require(USER_MANAGE, Target::Platform, "user")?;
    let permission = Permission::parse("permission", &req.permission)?;
    let grant = Grant::new(permission, req.project_id.map(ProjectId::from_uuid))?;
    let user_id = UserId::from_uuid(req.user_id);
    state
        .store
        .user(user_id)
        .await?
        .ok_or_else(|| ValidationError::new("user_id", "names no user"))?;
    if let Some(p) = grant.project_id() {
        state
            .store
            .project(p)
            .await?
            .ok_or_else(|| ValidationError::new("project_id", "names no project"))?;
    }
    let record = GrantRecord {
        id: GrantId::new(),
        user_id,
        grant,
        granted_by: Some(caller.user.id),
        created_at: Utc::now(),
    };
    let audit = caller.audit(
        "permission.grant",
        "user",
        user_id,
        grant.project_id(),
        serde_json::json!({"permission": permission}),
    );
    state.store.grant(&record, &audit).await?;
    Ok((StatusCode::CREATED, Json(convert::grant(record))))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RevokeQuery {
    pub user_id: Uuid,
    /// `<module>:<view|manage>`.
    pub permission: String,
    pub project_id: Option<Uuid>,
}

/// Revoke a granted permission. Permissions that come with the role cannot be revoked: change
/// the role instead.
#[utoipa::path(delete, path = "/permissions", tag = "users", params(RevokeQuery), security(("bearer" = [])),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn revoke_permission(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<RevokeQuery>,
) -> ApiResult<StatusCode> {
    caller.require(USER_MANAGE, Target::Platform, "user")?;
    let permission = Permission::parse("permission", &q.permission)?;
    let project = q.project_id.map(ProjectId::from_uuid);
    let user_id = UserId::from_uuid(q.user_id);
    let audit = caller.audit(
        "permission.revoke",
        "user",
        user_id,
        project,
        serde_json::json!({"permission": permission}),
    );
    if state.store.revoke_grant(user_id, permission, project, &audit).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound("grant"))
    }
}
