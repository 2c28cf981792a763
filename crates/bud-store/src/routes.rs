//! Gateway routes: a public model name in a project and the targets that serve it, weighted, with
//! ordered fallbacks. Endpoints are also routable without a route, under their model's name; a
//! route of that name in the project replaces that implicit route (the gateway's snapshot
//! builder decides, nothing implicit is stored).

use bud_domain::{
    Cursor, EndpointId, Name, Page, PageLimit, ProjectId, ProviderId, RouteId, Timestamp, UserId,
};
use serde::{Deserialize, Serialize};

use crate::audit::AuditEvent;
use crate::error::Violations;
use crate::row::{after_key, from_json, json_text, ms, opt_parse, overfetch, stored, timestamp};
use crate::{Store, StoreError};

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub id: RouteId,
    pub project_id: ProjectId,
    /// What clients put in `model`; unique within the project.
    pub name: Name,
    /// Balanced by weight; never empty (budapp checks).
    pub targets: Vec<RouteTarget>,
    /// Tried in order when every target failed before the first byte.
    pub fallbacks: Vec<RouteTarget>,
    /// Requests per minute to this route, the project's keys together; `None` means no limit
    /// of its own (each key's limit still applies).
    pub rpm_limit: Option<i64>,
    /// Tokens per minute to this route, the project's keys together; `None` means no limit of
    /// its own.
    pub tpm_limit: Option<i64>,
    pub created_by: Option<UserId>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// One place a route sends requests, stored as JSON
/// `{"endpoint_id" | "provider_id", "model"?, "weight"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "StoredTarget", into = "StoredTarget")]
pub struct RouteTarget {
    pub upstream: RouteUpstream,
    /// Share of traffic relative to the other targets; 1 to 1000 (budapp checks).
    pub weight: u32,
}

/// Where a target's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteUpstream {
    /// An endpoint of the route's project; it serves its own model's name.
    Endpoint(EndpointId),
    /// An external provider, asked for `model` (the provider's name for it).
    Provider { id: ProviderId, model: String },
}

/// Changes to a route; `None` leaves a field as it is, `Some(None)` clears a limit.
#[derive(Debug, Clone, Default)]
pub struct RoutePatch {
    pub name: Option<Name>,
    pub targets: Option<Vec<RouteTarget>>,
    pub fallbacks: Option<Vec<RouteTarget>>,
    pub rpm_limit: Option<Option<i64>>,
    pub tpm_limit: Option<Option<i64>>,
}

const ROUTE_WORDS: Violations<'static> = Violations {
    conflict: "a route with this name already exists in the project",
    reference: "the project does not exist",
};

impl Store {
    /// Conflict when the project already has a route of that name; Reference when the project
    /// (or creator) does not exist.
    pub async fn create_route(&self, route: &Route, audit: &AuditEvent) -> Result<(), StoreError> {
        let insert = sqlx::query(
            "INSERT INTO routes (id, project_id, name, targets, fallbacks, rpm_limit, tpm_limit, \
             created_by, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(route.id.to_string())
        .bind(route.project_id.to_string())
        .bind(route.name.as_str())
        .bind(json_text(&route.targets))
        .bind(json_text(&route.fallbacks))
        .bind(route.rpm_limit)
        .bind(route.tpm_limit)
        .bind(route.created_by.map(|id| id.to_string()))
        .bind(ms(route.created_at))
        .bind(ms(route.updated_at));
        self.insert_audited(insert, ROUTE_WORDS, audit).await
    }

    pub async fn route(&self, id: RouteId) -> Result<Option<Route>, StoreError> {
        let row: Option<RouteRow> =
            sqlx::query_as(&format!("SELECT {ROUTE_COLUMNS} FROM routes WHERE id = $1"))
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await?;
        row.map(Route::try_from).transpose()
    }

    /// A project's routes, oldest first.
    pub async fn list_routes(
        &self,
        project: ProjectId,
        after: Option<&Cursor>,
        limit: PageLimit,
    ) -> Result<Page<Route>, StoreError> {
        let rows: Vec<RouteRow> = sqlx::query_as(&format!(
            "SELECT {ROUTE_COLUMNS} FROM routes WHERE project_id = $1 AND id > $2 \
             ORDER BY id LIMIT $3"
        ))
        .bind(project.to_string())
        .bind(after_key(after))
        .bind(overfetch(limit))
        .fetch_all(&self.pool)
        .await?;
        let routes = rows.into_iter().map(Route::try_from).collect::<Result<Vec<_>, _>>()?;
        Ok(Page::from_overfetch(routes, limit, |r| r.id.to_string()))
    }

    /// Applies `patch`; `None` (and no audit record) if there is no such route. Conflict when
    /// the new name is taken in the project.
    pub async fn update_route(
        &self,
        id: RouteId,
        patch: &RoutePatch,
        now: Timestamp,
        audit: &AuditEvent,
    ) -> Result<Option<Route>, StoreError> {
        // A limit is set when its flag is 1, to the value beside it (which may be NULL).
        let sql = format!(
            "UPDATE routes SET name = COALESCE($2, name), targets = COALESCE($3, targets), \
             fallbacks = COALESCE($4, fallbacks), \
             rpm_limit = CASE WHEN $5 = 1 THEN $6 ELSE rpm_limit END, \
             tpm_limit = CASE WHEN $7 = 1 THEN $8 ELSE tpm_limit END, updated_at = $9 \
             WHERE id = $1 RETURNING {ROUTE_COLUMNS}"
        );
        let update = sqlx::query_as::<_, RouteRow>(&sql)
            .bind(id.to_string())
            .bind(patch.name.as_ref().map(|n| n.as_str().to_owned()))
            .bind(patch.targets.as_ref().map(json_text))
            .bind(patch.fallbacks.as_ref().map(json_text))
            .bind(i64::from(patch.rpm_limit.is_some()))
            .bind(patch.rpm_limit.flatten())
            .bind(i64::from(patch.tpm_limit.is_some()))
            .bind(patch.tpm_limit.flatten())
            .bind(ms(now));
        self.update_audited(update, ROUTE_WORDS, audit).await
    }

    /// False (and no audit record) if there was no such route.
    pub async fn delete_route(&self, id: RouteId, audit: &AuditEvent) -> Result<bool, StoreError> {
        let delete = sqlx::query("DELETE FROM routes WHERE id = $1").bind(id.to_string());
        self.delete_audited(delete, Violations::GENERIC, audit).await
    }
}

/// The JSON shape of a target: exactly one of the ids, and a model for providers.
#[derive(Serialize, Deserialize)]
struct StoredTarget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    endpoint_id: Option<EndpointId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    provider_id: Option<ProviderId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    weight: u32,
}

impl TryFrom<StoredTarget> for RouteTarget {
    type Error = &'static str;

    fn try_from(t: StoredTarget) -> Result<Self, Self::Error> {
        let upstream = match (t.endpoint_id, t.provider_id, t.model) {
            (Some(id), None, None) => RouteUpstream::Endpoint(id),
            (None, Some(id), Some(model)) => RouteUpstream::Provider { id, model },
            _ => return Err("a target names an endpoint, or a provider and its model"),
        };
        Ok(RouteTarget { upstream, weight: t.weight })
    }
}

impl From<RouteTarget> for StoredTarget {
    fn from(t: RouteTarget) -> Self {
        let (endpoint_id, provider_id, model) = match t.upstream {
            RouteUpstream::Endpoint(id) => (Some(id), None, None),
            RouteUpstream::Provider { id, model } => (None, Some(id), Some(model)),
        };
        StoredTarget { endpoint_id, provider_id, model, weight: t.weight }
    }
}

const ROUTE_COLUMNS: &str = "id, project_id, name, targets, fallbacks, rpm_limit, tpm_limit, \
                             created_by, created_at, updated_at";

#[derive(sqlx::FromRow)]
struct RouteRow {
    id: String,
    project_id: String,
    name: String,
    targets: String,
    fallbacks: String,
    rpm_limit: Option<i64>,
    tpm_limit: Option<i64>,
    created_by: Option<String>,
    created_at: i64,
    updated_at: i64,
}

impl TryFrom<RouteRow> for Route {
    type Error = StoreError;

    fn try_from(row: RouteRow) -> Result<Self, StoreError> {
        Ok(Route {
            id: stored("routes.id", row.id.parse())?,
            project_id: stored("routes.project_id", row.project_id.parse())?,
            name: stored("routes.name", Name::parse("name", &row.name))?,
            targets: stored("routes.targets", from_json(&row.targets))?,
            fallbacks: stored("routes.fallbacks", from_json(&row.fallbacks))?,
            rpm_limit: row.rpm_limit,
            tpm_limit: row.tpm_limit,
            created_by: stored("routes.created_by", opt_parse(row.created_by.as_deref()))?,
            created_at: stored("routes.created_at", timestamp(row.created_at))?,
            updated_at: stored("routes.updated_at", timestamp(row.updated_at))?,
        })
    }
}
