//! `/audit`: the append-only, hash-chained record of every change.

use axum::Json;
use axum::extract::State;
use bud_domain::{Access, Module, Permission, ProjectId, Target, UserId};
use bud_protocol::ErrorBody;
use bud_protocol::control::{AuditList, AuditVerificationDto};
use bud_store::AuditFilter;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use uuid::Uuid;

use crate::convert;
use crate::error::ApiResult;
use crate::extract::{ApiQuery, PageQuery};
use crate::identity::Caller;
use crate::state::AppState;

/// The audit log spans every project, so reading it takes `user:manage`.
const AUDIT: Permission = Permission::new(Module::User, Access::Manage);

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    pub actor_id: Option<Uuid>,
    /// E.g. `project.create`, `key.revoke`, `auth.login`.
    pub action: Option<String>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub project_id: Option<Uuid>,
    /// RFC 3339; records at or after.
    pub since: Option<DateTime<Utc>>,
    /// RFC 3339; records before.
    pub until: Option<DateTime<Utc>>,
    pub cursor: Option<String>,
    pub limit: Option<u32>,
}

/// Audit records, oldest first, filtered.
#[utoipa::path(get, path = "/audit", tag = "audit", params(AuditQuery), security(("bearer" = [])),
    responses((status = 200, body = AuditList), (status = 403, body = ErrorBody)))]
pub async fn list_audit(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<Json<AuditList>> {
    caller.require(AUDIT, Target::Platform, "audit log")?;
    let (cursor, limit) = PageQuery { cursor: q.cursor, limit: q.limit }.parse()?;
    let filter = AuditFilter {
        actor_id: q.actor_id.map(UserId::from_uuid),
        action: q.action,
        resource_type: q.resource_type,
        resource_id: q.resource_id,
        project_id: q.project_id.map(ProjectId::from_uuid),
        since: q.since,
        until: q.until,
    };
    let page = state.store.list_audit(&filter, cursor.as_ref(), limit).await?;
    Ok(Json(AuditList {
        data: page.items.into_iter().map(convert::audit).collect(),
        next_cursor: page.next_cursor.map(|c| c.as_str().to_owned()),
    }))
}

/// Recompute the hash chain and report the first record that does not check out.
#[utoipa::path(get, path = "/audit/verify", tag = "audit", security(("bearer" = [])),
    responses((status = 200, body = AuditVerificationDto), (status = 403, body = ErrorBody)))]
pub async fn verify_audit(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<AuditVerificationDto>> {
    caller.require(AUDIT, Target::Platform, "audit log")?;
    let v = state.store.verify_audit().await?;
    Ok(Json(AuditVerificationDto {
        ok: v.first_broken_seq.is_none(),
        records_checked: v.records_checked,
        first_broken_seq: v.first_broken_seq,
        reason: v.reason,
    }))
}
