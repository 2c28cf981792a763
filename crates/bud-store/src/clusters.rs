//! Clusters budcluster deploys to, the prober's findings about them, and the history of their
//! status.

use std::fmt;
use std::str::FromStr;

use bud_domain::{
    ClusterId, ClusterStatus, Cursor, Name, Page, PageLimit, Timestamp, UserId, ValidationError,
};
use serde::{Deserialize, Serialize};
use sqlx::AnyConnection;

use crate::audit::AuditEvent;
use crate::error::Violations;
use crate::row::{
    after_key, event_id, from_json, json_text, ms, opt_parse, opt_timestamp, overfetch, stored,
    timestamp,
};
use crate::{Store, StoreError};

/// The namespace endpoints' workloads go to unless a cluster names another.
pub const DEFAULT_WORKLOADS_NAMESPACE: &str = "bud-workloads";

/// What kind of machine a cluster is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterKind {
    /// This machine, running engines as local processes; has no kubeconfig.
    Local,
    /// A Kubernetes cluster reached through its kubeconfig.
    Kubernetes,
}

/// Nodes and GPUs of a cluster as a probe found them; stored as JSON text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub nodes: i64,
    pub gpus_total: i64,
    /// GPUs the scheduler may still hand out: what new replicas can get.
    pub gpus_allocatable: i64,
    /// Without the NVIDIA device plugin no pod can request a GPU, whatever the nodes have.
    pub device_plugin_running: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    pub id: ClusterId,
    /// Unique across clusters.
    pub name: Name,
    pub kind: ClusterKind,
    /// The kubeconfig, encrypted by the caller; "" for a local cluster. Listed by
    /// [`Store::sealed_secrets`] so master key rotation reseals it.
    pub kubeconfig_ciphertext: String,
    /// Where endpoints' workloads go, normally [`DEFAULT_WORKLOADS_NAMESPACE`].
    pub namespace: String,
    pub status: ClusterStatus,
    /// Why the cluster is in its status, in words; "" when there is nothing to say.
    pub reason: String,
    /// Failed probes in a row; the prober moves NOT_AVAILABLE to ERROR after enough of them.
    pub consecutive_failures: i64,
    pub last_checked_at: Option<Timestamp>,
    /// `None` until a probe reached the cluster.
    pub inventory: Option<Inventory>,
    pub created_by: Option<UserId>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// One change of a cluster's status, kept so operators can see why it is where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterEvent {
    /// UUIDv7.
    pub id: String,
    pub cluster_id: ClusterId,
    pub at: Timestamp,
    /// `None` for the event that records the cluster's creation.
    pub from_status: Option<ClusterStatus>,
    pub to_status: ClusterStatus,
    pub reason: String,
}

/// What a probe found, written only when something changed.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeRecord {
    pub status: ClusterStatus,
    pub reason: String,
    pub consecutive_failures: i64,
    /// Stored as given: `None` clears what an earlier probe found.
    pub inventory: Option<Inventory>,
    pub checked_at: Timestamp,
}

const CLUSTER_WORDS: Violations<'static> = Violations {
    conflict: "a cluster with this name already exists",
    reference: "the creator does not exist",
};

impl Store {
    /// Creates the cluster and records its first status as a [`ClusterEvent`].
    pub async fn create_cluster(
        &self,
        cluster: &Cluster,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        self.note_write();
        sqlx::query(
            "INSERT INTO clusters (id, name, kind, kubeconfig_ciphertext, namespace, status, \
             reason, consecutive_failures, last_checked_at, inventory, created_by, created_at, \
             updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(cluster.id.to_string())
        .bind(cluster.name.as_str())
        .bind(cluster.kind.as_str())
        .bind(&cluster.kubeconfig_ciphertext)
        .bind(&cluster.namespace)
        .bind(cluster.status.as_str())
        .bind(&cluster.reason)
        .bind(cluster.consecutive_failures)
        .bind(cluster.last_checked_at.map(ms))
        .bind(cluster.inventory.as_ref().map(json_text))
        .bind(cluster.created_by.map(|id| id.to_string()))
        .bind(ms(cluster.created_at))
        .bind(ms(cluster.updated_at))
        .execute(&mut *tx)
        .await
        .map_err(|e| StoreError::from_sqlx(e, CLUSTER_WORDS))?;
        let created = ClusterEvent {
            id: event_id(),
            cluster_id: cluster.id,
            at: cluster.created_at,
            from_status: None,
            to_status: cluster.status,
            reason: "registered".to_owned(),
        };
        self.insert_cluster_event(&mut tx, &created).await?;
        self.append_in(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn cluster(&self, id: ClusterId) -> Result<Option<Cluster>, StoreError> {
        self.cluster_where("id = $1", &id.to_string()).await
    }

    pub async fn cluster_by_name(&self, name: &str) -> Result<Option<Cluster>, StoreError> {
        self.cluster_where("name = $1", name).await
    }

    pub async fn list_clusters(
        &self,
        after: Option<&Cursor>,
        limit: PageLimit,
    ) -> Result<Page<Cluster>, StoreError> {
        let rows: Vec<ClusterRow> = sqlx::query_as(&format!(
            "SELECT {CLUSTER_COLUMNS} FROM clusters WHERE id > $1 ORDER BY id LIMIT $2"
        ))
        .bind(after_key(after))
        .bind(overfetch(limit))
        .fetch_all(&self.pool)
        .await?;
        let clusters = rows.into_iter().map(Cluster::try_from).collect::<Result<Vec<_>, _>>()?;
        Ok(Page::from_overfetch(clusters, limit, |c| c.id.to_string()))
    }

    /// Every cluster ordered by id, for the prober and the reconciler: there are few.
    pub async fn all_clusters(&self) -> Result<Vec<Cluster>, StoreError> {
        let rows: Vec<ClusterRow> =
            sqlx::query_as(&format!("SELECT {CLUSTER_COLUMNS} FROM clusters ORDER BY id"))
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter().map(Cluster::try_from).collect()
    }

    /// Replaces the kubeconfig and starts the registration over: status REGISTERING, reason "",
    /// no failures; records a [`ClusterEvent`]. `None` (and no audit record) when there is no
    /// such cluster or it is DELETING: a deletion under way is never undone by a new kubeconfig.
    pub async fn set_cluster_kubeconfig(
        &self,
        id: ClusterId,
        ciphertext: &str,
        now: Timestamp,
        audit: &AuditEvent,
    ) -> Result<Option<Cluster>, StoreError> {
        let mut tx = self.begin_write().await?;
        let current: Option<String> = sqlx::query_scalar(&format!(
            "SELECT status FROM clusters WHERE id = $1{}",
            self.for_update()
        ))
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(current) = current else { return Ok(None) };
        let from: ClusterStatus = stored("clusters.status", current.parse())?;
        if from == ClusterStatus::Deleting {
            return Ok(None);
        }
        self.note_write();
        let row: ClusterRow = sqlx::query_as(&format!(
            "UPDATE clusters SET kubeconfig_ciphertext = $2, status = $3, reason = '', \
             consecutive_failures = 0, updated_at = $4 WHERE id = $1 RETURNING {CLUSTER_COLUMNS}"
        ))
        .bind(id.to_string())
        .bind(ciphertext)
        .bind(ClusterStatus::Registering.as_str())
        .bind(ms(now))
        .fetch_one(&mut *tx)
        .await?;
        let cluster = Cluster::try_from(row)?;
        let event = ClusterEvent {
            id: event_id(),
            cluster_id: id,
            at: now,
            from_status: Some(from),
            to_status: ClusterStatus::Registering,
            reason: "kubeconfig replaced".to_owned(),
        };
        self.insert_cluster_event(&mut tx, &event).await?;
        self.append_in(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(Some(cluster))
    }

    /// Compare-and-set on status: applies `probe` only if the cluster's status is still
    /// `expected` (so a concurrent user refresh or delete wins); records a [`ClusterEvent`]
    /// when the status changes; returns whether it applied. Not audited: it is the system
    /// observing, and the events say what it saw.
    pub async fn record_probe(
        &self,
        id: ClusterId,
        expected: ClusterStatus,
        probe: &ProbeRecord,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        self.note_write();
        let applied = sqlx::query(
            "UPDATE clusters SET status = $3, reason = $4, consecutive_failures = $5, \
             inventory = $6, last_checked_at = $7, updated_at = $7 \
             WHERE id = $1 AND status = $2",
        )
        .bind(id.to_string())
        .bind(expected.as_str())
        .bind(probe.status.as_str())
        .bind(&probe.reason)
        .bind(probe.consecutive_failures)
        .bind(probe.inventory.as_ref().map(json_text))
        .bind(ms(probe.checked_at))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if applied == 0 {
            return Ok(false);
        }
        if probe.status != expected {
            let event = ClusterEvent {
                id: event_id(),
                cluster_id: id,
                at: probe.checked_at,
                from_status: Some(expected),
                to_status: probe.status,
                reason: probe.reason.clone(),
            };
            self.insert_cluster_event(&mut tx, &event).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// User-requested status change (refresh: ERROR/NOT_AVAILABLE/AVAILABLE → REGISTERING;
    /// delete: → DELETING), compare-and-set on `expected`; audited. Starts the failure count
    /// over and records a [`ClusterEvent`] when the status changes. False (and no audit record)
    /// when the cluster is gone or no longer `expected`. The caller checks the transition is
    /// legal ([`ClusterStatus::can_become`]).
    pub async fn set_cluster_status(
        &self,
        id: ClusterId,
        expected: ClusterStatus,
        to: ClusterStatus,
        reason: &str,
        now: Timestamp,
        audit: &AuditEvent,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        self.note_write();
        let applied = sqlx::query(
            "UPDATE clusters SET status = $3, reason = $4, consecutive_failures = 0, \
             updated_at = $5 WHERE id = $1 AND status = $2",
        )
        .bind(id.to_string())
        .bind(expected.as_str())
        .bind(to.as_str())
        .bind(reason)
        .bind(ms(now))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if applied == 0 {
            return Ok(false);
        }
        if to != expected {
            let event = ClusterEvent {
                id: event_id(),
                cluster_id: id,
                at: now,
                from_status: Some(expected),
                to_status: to,
                reason: reason.to_owned(),
            };
            self.insert_cluster_event(&mut tx, &event).await?;
        }
        self.append_in(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Removes the cluster and its events; false (and no audit record) if there was no such
    /// cluster. Reference while endpoints remain on it: they are deleted first.
    pub async fn delete_cluster(
        &self,
        id: ClusterId,
        audit: &AuditEvent,
    ) -> Result<bool, StoreError> {
        let delete = sqlx::query("DELETE FROM clusters WHERE id = $1").bind(id.to_string());
        let words =
            Violations { reference: "endpoints still run on this cluster", ..Violations::GENERIC };
        self.delete_audited(delete, words, audit).await
    }

    /// The cluster's last `limit` status changes, newest first.
    pub async fn cluster_events(
        &self,
        id: ClusterId,
        limit: i64,
    ) -> Result<Vec<ClusterEvent>, StoreError> {
        let rows: Vec<ClusterEventRow> = sqlx::query_as(
            "SELECT id, cluster_id, at, from_status, to_status, reason FROM cluster_events \
             WHERE cluster_id = $1 ORDER BY at DESC, id DESC LIMIT $2",
        )
        .bind(id.to_string())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(ClusterEvent::try_from).collect()
    }

    async fn cluster_where(
        &self,
        condition: &str,
        value: &str,
    ) -> Result<Option<Cluster>, StoreError> {
        let row: Option<ClusterRow> =
            sqlx::query_as(&format!("SELECT {CLUSTER_COLUMNS} FROM clusters WHERE {condition}"))
                .bind(value)
                .fetch_optional(&self.pool)
                .await?;
        row.map(Cluster::try_from).transpose()
    }

    /// Adds a status change inside the caller's transaction.
    async fn insert_cluster_event(
        &self,
        conn: &mut AnyConnection,
        event: &ClusterEvent,
    ) -> Result<(), StoreError> {
        self.note_write();
        sqlx::query(
            "INSERT INTO cluster_events (id, cluster_id, at, from_status, to_status, reason) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&event.id)
        .bind(event.cluster_id.to_string())
        .bind(ms(event.at))
        .bind(event.from_status.map(|s| s.as_str().to_owned()))
        .bind(event.to_status.as_str())
        .bind(&event.reason)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

impl ClusterKind {
    pub const ALL: [ClusterKind; 2] = [ClusterKind::Local, ClusterKind::Kubernetes];

    pub fn as_str(self) -> &'static str {
        match self {
            ClusterKind::Local => "local",
            ClusterKind::Kubernetes => "kubernetes",
        }
    }
}

impl fmt::Display for ClusterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ClusterKind {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ClusterKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| ValidationError::new("kind", "must be one of local, kubernetes"))
    }
}

const CLUSTER_COLUMNS: &str = "id, name, kind, kubeconfig_ciphertext, namespace, status, reason, \
                               consecutive_failures, last_checked_at, inventory, created_by, \
                               created_at, updated_at";

#[derive(sqlx::FromRow)]
struct ClusterRow {
    id: String,
    name: String,
    kind: String,
    kubeconfig_ciphertext: String,
    namespace: String,
    status: String,
    reason: String,
    consecutive_failures: i64,
    last_checked_at: Option<i64>,
    inventory: Option<String>,
    created_by: Option<String>,
    created_at: i64,
    updated_at: i64,
}

impl TryFrom<ClusterRow> for Cluster {
    type Error = StoreError;

    fn try_from(row: ClusterRow) -> Result<Self, StoreError> {
        Ok(Cluster {
            id: stored("clusters.id", row.id.parse())?,
            name: stored("clusters.name", Name::parse("name", &row.name))?,
            kind: stored("clusters.kind", row.kind.parse())?,
            kubeconfig_ciphertext: row.kubeconfig_ciphertext,
            namespace: row.namespace,
            status: stored("clusters.status", row.status.parse())?,
            reason: row.reason,
            consecutive_failures: row.consecutive_failures,
            last_checked_at: stored(
                "clusters.last_checked_at",
                opt_timestamp(row.last_checked_at),
            )?,
            inventory: stored(
                "clusters.inventory",
                row.inventory.as_deref().map(from_json).transpose(),
            )?,
            created_by: stored("clusters.created_by", opt_parse(row.created_by.as_deref()))?,
            created_at: stored("clusters.created_at", timestamp(row.created_at))?,
            updated_at: stored("clusters.updated_at", timestamp(row.updated_at))?,
        })
    }
}

#[derive(sqlx::FromRow)]
struct ClusterEventRow {
    id: String,
    cluster_id: String,
    at: i64,
    from_status: Option<String>,
    to_status: String,
    reason: String,
}

impl TryFrom<ClusterEventRow> for ClusterEvent {
    type Error = StoreError;

    fn try_from(row: ClusterEventRow) -> Result<Self, StoreError> {
        Ok(ClusterEvent {
            id: row.id,
            cluster_id: stored("cluster_events.cluster_id", row.cluster_id.parse())?,
            at: stored("cluster_events.at", timestamp(row.at))?,
            from_status: stored(
                "cluster_events.from_status",
                opt_parse(row.from_status.as_deref()),
            )?,
            to_status: stored("cluster_events.to_status", row.to_status.parse())?,
            reason: row.reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_back() {
        for kind in ClusterKind::ALL {
            assert_eq!(kind.as_str().parse::<ClusterKind>().unwrap(), kind);
        }
        assert!("docker".parse::<ClusterKind>().is_err());
    }

    #[test]
    fn inventory_round_trips_as_json() {
        let inventory =
            Inventory { nodes: 2, gpus_total: 8, gpus_allocatable: 6, device_plugin_running: true };
        assert_eq!(from_json::<Inventory>(&json_text(&inventory)).unwrap(), inventory);
    }
}
