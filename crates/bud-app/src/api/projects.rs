//! `/projects` and their members.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use bud_domain::{
    Access, Email, Module, Name, Permission, ProjectId, Role, Target, UserId, ValidationError,
};
use bud_protocol::ErrorBody;
use bud_protocol::control::{
    AddMemberRequest, CreateProjectRequest, MemberDto, MemberList, ProjectDto, ProjectList,
    UpdateProjectRequest,
};
use bud_store::{Project, ProjectPatch};
use chrono::Utc;
use uuid::Uuid;

use crate::convert;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiQuery, IdPath, PageQuery};
use crate::identity::Caller;
use crate::state::AppState;

const VIEW: Permission = Permission::new(Module::Project, Access::View);
const MANAGE: Permission = Permission::new(Module::Project, Access::Manage);

/// Descriptions are free text, bounded so a list stays small.
fn description(field: &str, text: Option<String>) -> ApiResult<String> {
    let text = text.unwrap_or_default();
    if text.chars().count() > 2000 {
        return Err(ValidationError::new(field, "must be at most 2000 characters").into());
    }
    Ok(text)
}

/// Projects the caller can see (all of them for admins).
#[utoipa::path(get, path = "/projects", tag = "projects", params(PageQuery), security(("bearer" = [])),
    responses((status = 200, body = ProjectList), (status = 401, body = ErrorBody)))]
pub async fn list_projects(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<ProjectList>> {
    caller.require(VIEW, Target::Platform, "project")?;
    let (cursor, limit) = q.parse()?;
    let visible_to = (caller.user.role != Role::Admin).then_some(caller.user.id);
    let page = state.store.list_projects(visible_to, cursor.as_ref(), limit).await?;
    Ok(Json(ProjectList {
        data: page.items.into_iter().map(convert::project).collect(),
        next_cursor: page.next_cursor.map(|c| c.as_str().to_owned()),
    }))
}

/// Create a project; its creator becomes a member.
#[utoipa::path(post, path = "/projects", tag = "projects", request_body = CreateProjectRequest, security(("bearer" = [])),
    responses((status = 201, body = ProjectDto), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_project(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateProjectRequest>,
) -> ApiResult<(StatusCode, Json<ProjectDto>)> {
    caller.require(MANAGE, Target::Platform, "project")?;
    let now = Utc::now();
    let project = Project {
        id: ProjectId::new(),
        name: Name::parse("name", &req.name)?,
        description: description("description", req.description)?,
        created_by: Some(caller.user.id),
        created_at: now,
        updated_at: now,
    };
    let audit = caller.audit(
        "project.create",
        "project",
        project.id,
        Some(project.id),
        serde_json::json!({"name": project.name}),
    );
    state.store.create_project(&project, Some((caller.user.id, now)), &audit).await?;
    Ok((StatusCode::CREATED, Json(convert::project(project))))
}

/// One project.
#[utoipa::path(get, path = "/projects/{id}", tag = "projects", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses((status = 200, body = ProjectDto), (status = 404, body = ErrorBody)))]
pub async fn get_project(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
) -> ApiResult<Json<ProjectDto>> {
    let id = ProjectId::from_uuid(id);
    caller.require(VIEW, Target::Project(id), "project")?;
    let project = state.store.project(id).await?.ok_or(ApiError::NotFound("project"))?;
    Ok(Json(convert::project(project)))
}

/// Rename or describe a project.
#[utoipa::path(patch, path = "/projects/{id}", tag = "projects", params(("id" = Uuid, Path)), request_body = UpdateProjectRequest, security(("bearer" = [])),
    responses((status = 200, body = ProjectDto), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn update_project(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
    ApiJson(req): ApiJson<UpdateProjectRequest>,
) -> ApiResult<Json<ProjectDto>> {
    let id = ProjectId::from_uuid(id);
    caller.require(MANAGE, Target::Project(id), "project")?;
    let patch = ProjectPatch {
        name: req.name.as_deref().map(|n| Name::parse("name", n)).transpose()?,
        description: req.description.map(|d| description("description", Some(d))).transpose()?,
    };
    let audit = caller.audit(
        "project.update",
        "project",
        id,
        Some(id),
        serde_json::json!({"name": patch.name, "description": patch.description}),
    );
    let project = state
        .store
        .update_project(id, &patch, Utc::now(), &audit)
        .await?
        .ok_or(ApiError::NotFound("project"))?;
    Ok(Json(convert::project(project)))
}

/// Delete a project with its memberships and API keys.
#[utoipa::path(delete, path = "/projects/{id}", tag = "projects", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_project(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
) -> ApiResult<StatusCode> {
    let id = ProjectId::from_uuid(id);
    caller.require(MANAGE, Target::Project(id), "project")?;
    let audit = caller.audit("project.delete", "project", id, Some(id), serde_json::Value::Null);
    if state.store.delete_project(id, &audit).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound("project"))
    }
}

/// Members of a project.
#[utoipa::path(get, path = "/projects/{id}/members", tag = "projects", params(("id" = Uuid, Path), PageQuery), security(("bearer" = [])),
    responses((status = 200, body = MemberList), (status = 404, body = ErrorBody)))]
pub async fn list_members(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<MemberList>> {
    let id = ProjectId::from_uuid(id);
    caller.require(VIEW, Target::Project(id), "project")?;
    let (cursor, limit) = q.parse()?;
    state.store.project(id).await?.ok_or(ApiError::NotFound("project"))?;
    let page = state.store.members(id, cursor.as_ref(), limit).await?;
    Ok(Json(MemberList {
        data: page.items.into_iter().map(convert::member).collect(),
        next_cursor: page.next_cursor.map(|c| c.as_str().to_owned()),
    }))
}

/// Add a user to a project, by id or by email.
#[utoipa::path(post, path = "/projects/{id}/members", tag = "projects", params(("id" = Uuid, Path)), request_body = AddMemberRequest, security(("bearer" = [])),
    responses((status = 201, body = MemberDto), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn add_member(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath<Uuid>,
    ApiJson(req): ApiJson<AddMemberRequest>,
) -> ApiResult<(StatusCode, Json<MemberDto>)> {
    let project = ProjectId::from_uuid(id);
    caller.require(MANAGE, Target::Project(project), "project")?;
    state.store.project(project).await?.ok_or(ApiError::NotFound("project"))?;
    let user = match (req.user_id, req.email) {
        (Some(id), None) => state
            .store
            .user(UserId::from_uuid(id))
            .await?
            .ok_or_else(|| ValidationError::new("user_id", "names no user"))?,
        (None, Some(email)) => {
            let email = Email::parse("email", &email)?;
            state
                .store
                .user_by_email(&email)
                .await?
                .ok_or_else(|| ValidationError::new("email", "names no user"))?
        }
        _ => {
            return Err(
                ValidationError::new("user_id", "give exactly one of user_id or email").into()
            );
        }
    };
    let now = Utc::now();
    let audit = caller.audit(
        "project.member_add",
        "project",
        project,
        Some(project),
        serde_json::json!({"user_id": user.id}),
    );
    state.store.add_member(project, user.id, now, &audit).await?;
    Ok((
        StatusCode::CREATED,
        Json(MemberDto {
            user_id: user.id.as_uuid(),
            email: user.email.to_string(),
            name: user.name.to_string(),
            added_at: now,
        }),
    ))
}

/// Remove a user from a project.
#[utoipa::path(delete, path = "/projects/{id}/members/{user_id}", tag = "projects", params(("id" = Uuid, Path), ("user_id" = Uuid, Path)), security(("bearer" = [])),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn remove_member(
    State(state): State<AppState>,
    caller: Caller,
    IdPath((id, user_id)): IdPath<(Uuid, Uuid)>,
) -> ApiResult<StatusCode> {
    let project = ProjectId::from_uuid(id);
    caller.require(MANAGE, Target::Project(project), "project")?;
    let user_id = UserId::from_uuid(user_id);
    let audit = caller.audit(
        "project.member_remove",
        "project",
        project,
        Some(project),
        serde_json::json!({"user_id": user_id}),
    );
    if state.store.remove_member(project, user_id, &audit).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound("member"))
    }
}
