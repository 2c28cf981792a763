//! `/usage`: what the gateway metered, summed per project, key or model over a time range.
//! Within a project it needs `key:view` there (usage is what the project's keys spent); across
//! projects it is for administrators (`user:manage`), as the audit log is.

use axum::Json;
use axum::extract::State;
use bud_domain::{Access, ApiKeyId, Module, Permission, ProjectId, Target, ValidationError};
use bud_protocol::ErrorBody;
use bud_protocol::control::UsageSummaryDto;
use bud_store::{UsageFilter, UsageGroup};
use chrono::{DateTime, Duration, Utc};
use serde::Deserialize;
use uuid::Uuid;

use crate::convert;
use crate::error::ApiResult;
use crate::extract::ApiQuery;
use crate::identity::Caller;
use crate::state::AppState;

const KEY_VIEW: Permission = Permission::new(Module::Key, Access::View);
const USER_MANAGE: Permission = Permission::new(Module::User, Access::Manage);

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Start of the range (RFC 3339, inclusive); 24 hours before `until` by default.
    pub since: Option<String>,
    /// End of the range (RFC 3339, exclusive); now by default.
    pub until: Option<String>,
    /// Only this project's usage; without it the summary spans every project (admins only).
    pub project_id: Option<Uuid>,
    /// Only this API key's usage.
    pub key_id: Option<Uuid>,
    /// Only requests for this public model name.
    pub model: Option<String>,
    /// `project`, `key` or `model` (default).
    pub group_by: Option<String>,
}

/// Requests, errors, tokens and mean latency per project, key or model.
#[utoipa::path(get, path = "/usage", tag = "usage", params(UsageQuery), security(("bearer" = [])),
    responses((status = 200, body = UsageSummaryDto), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn usage_summary(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> ApiResult<Json<UsageSummaryDto>> {
    let project = q.project_id.map(ProjectId::from_uuid);
    match project {
        Some(p) => caller.require(KEY_VIEW, Target::Project(p), "project")?,
        None => caller.require(USER_MANAGE, Target::Platform, "usage")?,
    }
    let until = time("until", q.until.as_deref())?.unwrap_or_else(Utc::now);
    let since = time("since", q.since.as_deref())?.unwrap_or(until - Duration::hours(24));
    if since >= until {
        return Err(ValidationError::new("until", "must be after since").into());
    }
    let (group_by, group_name) = match q.group_by.as_deref().unwrap_or("model") {
        "project" => (UsageGroup::Project, "project"),
        "key" => (UsageGroup::Key, "key"),
        "model" => (UsageGroup::Model, "model"),
        _ => {
            return Err(
                ValidationError::new("group_by", "must be one of project, key, model").into()
            );
        }
    };
    let filter = UsageFilter {
        since,
        until,
        project,
        key: q.key_id.map(ApiKeyId::from_uuid),
        model: q.model,
        group_by,
    };
    let rows = state.store.usage_summary(&filter).await?;
    Ok(Json(UsageSummaryDto {
        since,
        until,
        group_by: group_name.to_owned(),
        data: rows.into_iter().map(convert::usage_row).collect(),
    }))
}

fn time(field: &str, value: Option<&str>) -> ApiResult<Option<DateTime<Utc>>> {
    value
        .map(|v| {
            DateTime::parse_from_rfc3339(v).map(|t| t.with_timezone(&Utc)).map_err(|_| {
                ValidationError::new(field, "must be an RFC 3339 time, e.g. 2025-01-31T00:00:00Z")
                    .into()
            })
        })
        .transpose()
}
