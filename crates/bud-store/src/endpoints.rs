//! Endpoints: a model deployed with some replicas on a cluster, in a project. Users change the
//! spec (and so the generation); the reconciler moves the status and reports ready replicas;
//! both leave endpoint events behind.

use bud_domain::{
    ClusterId, Cursor, EndpointId, EndpointStatus, FailureReason, ModelId, Name, Page, PageLimit,
    ProjectId, Timestamp, UserId,
};
use sqlx::AnyConnection;

use crate::audit::AuditEvent;
use crate::error::Violations;
use crate::row::{
    after_key, event_id, from_json, json_text, ms, opt_parse, overfetch, stored, timestamp,
};
use crate::{Store, StoreError};

#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub id: EndpointId,
    pub project_id: ProjectId,
    pub model_id: ModelId,
    pub cluster_id: ClusterId,
    /// Unique within the project.
    pub name: Name,
    /// Replicas the user asked for.
    pub replicas: i64,
    /// The endpoint counts as serving once this many replicas are ready.
    pub min_replicas: i64,
    /// Extra arguments for the engine; stored as a JSON array.
    pub engine_args: Vec<String>,
    pub gpus_per_replica: i64,
    /// How long DEPLOYING may last before the endpoint goes to ERROR (timeout).
    pub deployment_timeout_secs: i64,
    pub status: EndpointStatus,
    /// Set in ERROR: why, in terms a person can act on.
    pub reason: Option<FailureReason>,
    /// What the cluster said, for the person reading the reason.
    pub reason_detail: String,
    /// When the current status began: the deployment timeout counts from it.
    pub status_since: Timestamp,
    /// Replicas the reconciler last saw ready.
    pub ready_replicas: i64,
    /// `host:port` of each replica the reconciler last saw ready, sorted: where the gateway
    /// sends this endpoint's requests. Empty once the replicas are gone.
    pub addresses: Vec<String>,
    /// Bumped by every user change; the reconciler compares it to drop decisions it took on an
    /// older spec.
    pub generation: i64,
    pub created_by: Option<UserId>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// Something that happened to an endpoint, shown to its users.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointEvent {
    /// UUIDv7.
    pub id: String,
    pub endpoint_id: EndpointId,
    pub at: Timestamp,
    /// "status" for status changes, "warning" or "info" for what the reconciler or a user
    /// command noticed.
    pub kind: String,
    pub message: String,
}

/// Changes to an endpoint's spec; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct EndpointPatch {
    pub replicas: Option<i64>,
    pub min_replicas: Option<i64>,
}

/// A status change decided by the reconciler or a user command.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusChange {
    /// The status the decision was taken in; the change applies only if it still holds.
    pub from: EndpointStatus,
    pub to: EndpointStatus,
    pub reason: Option<FailureReason>,
    pub reason_detail: String,
    pub at: Timestamp,
    /// The endpoint event's message.
    pub message: String,
}

impl Store {
    /// Creates the endpoint and its first event ("created"). Conflict when the project already
    /// has an endpoint of that name; Reference when the project, model, cluster (or creator)
    /// does not exist.
    pub async fn create_endpoint(
        &self,
        endpoint: &Endpoint,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let words = Violations {
            conflict: "an endpoint with this name already exists in the project",
            reference: "the project, model or cluster does not exist",
        };
        let mut tx = self.begin_write().await?;
        self.note_write();
        sqlx::query(
            "INSERT INTO endpoints (id, project_id, model_id, cluster_id, name, replicas, \
             min_replicas, engine_args, gpus_per_replica, deployment_timeout_secs, status, \
             reason, reason_detail, status_since, ready_replicas, addresses, generation, \
             created_by, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
             $18, $19, $20)",
        )
        .bind(endpoint.id.to_string())
        .bind(endpoint.project_id.to_string())
        .bind(endpoint.model_id.to_string())
        .bind(endpoint.cluster_id.to_string())
        .bind(endpoint.name.as_str())
        .bind(endpoint.replicas)
        .bind(endpoint.min_replicas)
        .bind(json_text(&endpoint.engine_args))
        .bind(endpoint.gpus_per_replica)
        .bind(endpoint.deployment_timeout_secs)
        .bind(endpoint.status.as_str())
        .bind(endpoint.reason.map(|r| r.as_str().to_owned()))
        .bind(&endpoint.reason_detail)
        .bind(ms(endpoint.status_since))
        .bind(endpoint.ready_replicas)
        .bind(json_text(&sorted(&endpoint.addresses)))
        .bind(endpoint.generation)
        .bind(endpoint.created_by.map(|id| id.to_string()))
        .bind(ms(endpoint.created_at))
        .bind(ms(endpoint.updated_at))
        .execute(&mut *tx)
        .await
        .map_err(|e| StoreError::from_sqlx(e, words))?;
        let created = EndpointEvent {
            id: event_id(),
            endpoint_id: endpoint.id,
            at: endpoint.created_at,
            kind: "info".to_owned(),
            message: "created".to_owned(),
        };
        self.insert_endpoint_event(&mut tx, &created).await?;
        self.append_in(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn endpoint(&self, id: EndpointId) -> Result<Option<Endpoint>, StoreError> {
        let row: Option<EndpointRow> =
            sqlx::query_as(&format!("SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE id = $1"))
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await?;
        row.map(Endpoint::try_from).transpose()
    }

    /// Endpoints ordered by id: of one project or all (`project` None), and of every project
    /// (`visible_to` None) or only those a user can see: where they are a member or hold a
    /// project grant, as [`Store::list_projects`] decides.
    pub async fn list_endpoints(
        &self,
        project: Option<ProjectId>,
        visible_to: Option<UserId>,
        after: Option<&Cursor>,
        limit: PageLimit,
    ) -> Result<Page<Endpoint>, StoreError> {
        // $1 and $2 are the page; each filter that is set takes the next placeholder.
        let mut sql = format!("SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE id > $1");
        let mut binds = Vec::new();
        if let Some(project) = project {
            binds.push(project.to_string());
            sql.push_str(&format!(" AND project_id = ${}", binds.len() + 2));
        }
        if let Some(user) = visible_to {
            binds.push(user.to_string());
            let n = binds.len() + 2;
            sql.push_str(&format!(
                " AND (project_id IN (SELECT project_id FROM project_members WHERE user_id = ${n}) \
                   OR project_id IN (SELECT project_id FROM grants \
                                     WHERE user_id = ${n} AND project_id IS NOT NULL))"
            ));
        }
        sql.push_str(" ORDER BY id LIMIT $2");
        let mut query =
            sqlx::query_as::<_, EndpointRow>(&sql).bind(after_key(after)).bind(overfetch(limit));
        for bind in binds {
            query = query.bind(bind);
        }
        let rows = query.fetch_all(&self.pool).await?;
        let endpoints = rows.into_iter().map(Endpoint::try_from).collect::<Result<Vec<_>, _>>()?;
        Ok(Page::from_overfetch(endpoints, limit, |e| e.id.to_string()))
    }

    /// Every endpoint on a cluster ordered by id, for the reconciler.
    pub async fn endpoints_on_cluster(
        &self,
        cluster: ClusterId,
    ) -> Result<Vec<Endpoint>, StoreError> {
        let rows: Vec<EndpointRow> = sqlx::query_as(&format!(
            "SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE cluster_id = $1 ORDER BY id"
        ))
        .bind(cluster.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Endpoint::try_from).collect()
    }

    pub async fn count_endpoints_on_cluster(&self, cluster: ClusterId) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM endpoints WHERE cluster_id = $1")
            .bind(cluster.to_string())
            .fetch_one(&self.pool)
            .await?)
    }

    /// User change of spec: replicas and min_replicas. Bumps the generation, writes an
    /// endpoint event; audited. `None` (and no audit record) if there is no such endpoint.
    pub async fn update_endpoint(
        &self,
        id: EndpointId,
        patch: &EndpointPatch,
        now: Timestamp,
        audit: &AuditEvent,
    ) -> Result<Option<Endpoint>, StoreError> {
        let mut tx = self.begin_write().await?;
        self.note_write();
        let row: Option<EndpointRow> = sqlx::query_as(&format!(
            "UPDATE endpoints SET replicas = COALESCE($2, replicas), \
             min_replicas = COALESCE($3, min_replicas), generation = generation + 1, \
             updated_at = $4 WHERE id = $1 RETURNING {ENDPOINT_COLUMNS}"
        ))
        .bind(id.to_string())
        .bind(patch.replicas)
        .bind(patch.min_replicas)
        .bind(ms(now))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let endpoint = Endpoint::try_from(row)?;
        let event = EndpointEvent {
            id: event_id(),
            endpoint_id: id,
            at: now,
            kind: "info".to_owned(),
            message: format!(
                "spec changed: replicas {}, min replicas {}",
                endpoint.replicas, endpoint.min_replicas
            ),
        };
        self.insert_endpoint_event(&mut tx, &event).await?;
        self.append_in(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(Some(endpoint))
    }

    /// Status transition, compare-and-set on `change.from` and, when `expected_generation` is
    /// set, on the generation, so a reconciler decision taken on an older spec is dropped. Sets
    /// status, reason, reason_detail, status_since and updated_at (both `change.at`) and writes
    /// an endpoint event (kind "status", `change.message`). `audit` is set for user commands
    /// (stop, start, retry), which also bump the generation; the reconciler passes `None`: its
    /// changes show as endpoint events. Returns whether it applied; the caller checks the
    /// transition is legal ([`EndpointStatus::can_become`]).
    pub async fn transition_endpoint(
        &self,
        id: EndpointId,
        change: &StatusChange,
        expected_generation: Option<i64>,
        audit: Option<&AuditEvent>,
    ) -> Result<bool, StoreError> {
        let mut sql = "UPDATE endpoints SET status = $3, reason = $4, reason_detail = $5, \
                       status_since = $6, updated_at = $6, generation = generation + $7 \
                       WHERE id = $1 AND status = $2"
            .to_owned();
        if expected_generation.is_some() {
            sql.push_str(" AND generation = $8");
        }
        let mut update = sqlx::query(&sql)
            .bind(id.to_string())
            .bind(change.from.as_str())
            .bind(change.to.as_str())
            .bind(change.reason.map(|r| r.as_str().to_owned()))
            .bind(&change.reason_detail)
            .bind(ms(change.at))
            .bind(i64::from(audit.is_some()));
        if let Some(generation) = expected_generation {
            update = update.bind(generation);
        }
        let mut tx = self.begin_write().await?;
        self.note_write();
        if update.execute(&mut *tx).await?.rows_affected() == 0 {
            return Ok(false);
        }
        let event = EndpointEvent {
            id: event_id(),
            endpoint_id: id,
            at: change.at,
            kind: "status".to_owned(),
            message: change.message.clone(),
        };
        self.insert_endpoint_event(&mut tx, &event).await?;
        if let Some(audit) = audit {
            self.append_in(&mut tx, audit).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// The reconciler's observation of ready replicas and their addresses. Writes only when it
    /// differs from what is stored (a pass that sees nothing new runs no write); addresses are
    /// compared as sorted lists and stored sorted. Returns whether it wrote. Leaves updated_at
    /// alone: it tracks changes of spec and status, not observations.
    pub async fn set_ready_replicas(
        &self,
        id: EndpointId,
        ready: i64,
        addresses: &[String],
    ) -> Result<bool, StoreError> {
        let addresses = json_text(&sorted(addresses));
        let current: Option<(i64, String)> =
            sqlx::query_as("SELECT ready_replicas, addresses FROM endpoints WHERE id = $1")
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await?;
        let Some((stored_ready, stored_addresses)) = current else { return Ok(false) };
        let stored_addresses: Vec<String> =
            stored("endpoints.addresses", from_json(&stored_addresses))?;
        if stored_ready == ready && json_text(&sorted(&stored_addresses)) == addresses {
            return Ok(false);
        }
        // The condition repeats the comparison: another writer may have got there first.
        self.note_write();
        let written = sqlx::query(
            "UPDATE endpoints SET ready_replicas = $2, addresses = $3 \
             WHERE id = $1 AND (ready_replicas <> $2 OR addresses <> $3)",
        )
        .bind(id.to_string())
        .bind(ready)
        .bind(&addresses)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(written == 1)
    }

    /// Removes the endpoint and its events; false (and no audit record) if there was no such
    /// endpoint.
    pub async fn delete_endpoint(
        &self,
        id: EndpointId,
        audit: &AuditEvent,
    ) -> Result<bool, StoreError> {
        let delete = sqlx::query("DELETE FROM endpoints WHERE id = $1").bind(id.to_string());
        self.delete_audited(delete, Violations::GENERIC, audit).await
    }

    /// Adds an event on its own, e.g. a warning the reconciler noticed. Reference when the
    /// endpoint does not exist.
    pub async fn add_endpoint_event(&self, event: &EndpointEvent) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        self.insert_endpoint_event(&mut conn, event).await
    }

    /// The endpoint's last `limit` events, newest first.
    pub async fn endpoint_events(
        &self,
        id: EndpointId,
        limit: i64,
    ) -> Result<Vec<EndpointEvent>, StoreError> {
        let rows: Vec<EndpointEventRow> = sqlx::query_as(
            "SELECT id, endpoint_id, at, kind, message FROM endpoint_events \
             WHERE endpoint_id = $1 ORDER BY at DESC, id DESC LIMIT $2",
        )
        .bind(id.to_string())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(EndpointEvent::try_from).collect()
    }

    /// Adds an event on `conn`, inside the caller's transaction or on its own.
    async fn insert_endpoint_event(
        &self,
        conn: &mut AnyConnection,
        event: &EndpointEvent,
    ) -> Result<(), StoreError> {
        let words = Violations { reference: "the endpoint does not exist", ..Violations::GENERIC };
        self.note_write();
        sqlx::query(
            "INSERT INTO endpoint_events (id, endpoint_id, at, kind, message) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&event.id)
        .bind(event.endpoint_id.to_string())
        .bind(ms(event.at))
        .bind(&event.kind)
        .bind(&event.message)
        .execute(&mut *conn)
        .await
        .map_err(|e| StoreError::from_sqlx(e, words))?;
        Ok(())
    }
}

const ENDPOINT_COLUMNS: &str = "id, project_id, model_id, cluster_id, name, replicas, \
                                min_replicas, engine_args, gpus_per_replica, \
                                deployment_timeout_secs, status, reason, reason_detail, \
                                status_since, ready_replicas, addresses, generation, \
                                created_by, created_at, updated_at";

#[derive(sqlx::FromRow)]
struct EndpointRow {
    id: String,
    project_id: String,
    model_id: String,
    cluster_id: String,
    name: String,
    replicas: i64,
    min_replicas: i64,
    engine_args: String,
    gpus_per_replica: i64,
    deployment_timeout_secs: i64,
    status: String,
    reason: Option<String>,
    reason_detail: String,
    status_since: i64,
    ready_replicas: i64,
    addresses: String,
    generation: i64,
    created_by: Option<String>,
    created_at: i64,
    updated_at: i64,
}

impl TryFrom<EndpointRow> for Endpoint {
    type Error = StoreError;

    fn try_from(row: EndpointRow) -> Result<Self, StoreError> {
        Ok(Endpoint {
            id: stored("endpoints.id", row.id.parse())?,
            project_id: stored("endpoints.project_id", row.project_id.parse())?,
            model_id: stored("endpoints.model_id", row.model_id.parse())?,
            cluster_id: stored("endpoints.cluster_id", row.cluster_id.parse())?,
            name: stored("endpoints.name", Name::parse("name", &row.name))?,
            replicas: row.replicas,
            min_replicas: row.min_replicas,
            engine_args: stored("endpoints.engine_args", from_json(&row.engine_args))?,
            gpus_per_replica: row.gpus_per_replica,
            deployment_timeout_secs: row.deployment_timeout_secs,
            status: stored("endpoints.status", row.status.parse())?,
            reason: stored("endpoints.reason", opt_parse(row.reason.as_deref()))?,
            reason_detail: row.reason_detail,
            status_since: stored("endpoints.status_since", timestamp(row.status_since))?,
            ready_replicas: row.ready_replicas,
            addresses: stored("endpoints.addresses", from_json(&row.addresses))?,
            generation: row.generation,
            created_by: stored("endpoints.created_by", opt_parse(row.created_by.as_deref()))?,
            created_at: stored("endpoints.created_at", timestamp(row.created_at))?,
            updated_at: stored("endpoints.updated_at", timestamp(row.updated_at))?,
        })
    }
}

/// `addresses` in the order they are stored and compared in.
fn sorted(addresses: &[String]) -> Vec<String> {
    let mut sorted = addresses.to_vec();
    sorted.sort();
    sorted
}

#[derive(sqlx::FromRow)]
struct EndpointEventRow {
    id: String,
    endpoint_id: String,
    at: i64,
    kind: String,
    message: String,
}

impl TryFrom<EndpointEventRow> for EndpointEvent {
    type Error = StoreError;

    fn try_from(row: EndpointEventRow) -> Result<Self, StoreError> {
        Ok(EndpointEvent {
            id: row.id,
            endpoint_id: stored("endpoint_events.endpoint_id", row.endpoint_id.parse())?,
            at: stored("endpoint_events.at", timestamp(row.at))?,
            kind: row.kind,
            message: row.message,
        })
    }
}
