//! The only SQL in Bud: a connection pool, the migrations for SQLite and PostgreSQL, and one
//! module per aggregate.
//!
//! One code path of SQL runs on both backends through sqlx's `Any` driver: `$N` placeholders, UUID
//! text ids, BIGINT unix-millisecond timestamps, nullable timestamps instead of booleans. Services
//! create ids and timestamps; the store persists what it is given (it mints only the ids of the
//! events it writes beside a change, see `row::event_id`). Every mutating method that changes
//! platform state takes the [`AuditEvent`] describing the change and appends it to the hash-chained
//! audit log in the same transaction, so no change lands without its audit record. What the system
//! itself observes or coordinates (cluster probes, the reconciler's status changes and ready
//! replicas, leases) is not audited: cluster and endpoint events record it instead; nor is the
//! usage the gateway meters, which is data about traffic rather than a change.

mod api_keys;
mod audit;
mod clusters;
mod endpoints;
mod error;
mod gateway;
mod grants;
mod leases;
mod models;
mod projects;
mod providers;
mod routes;
mod row;
mod sealed;
pub mod testing;
mod tokens;
mod usage;
mod users;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::any::{AnyArguments, AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyConnection, AnyPool, Executor, Transaction};

use crate::error::Violations;

pub use api_keys::ApiKey;
pub use audit::{
    AuditEvent, AuditFilter, AuditRecord, AuditVerification, GENESIS_HASH, audit_hash,
};
pub use clusters::{
    Cluster, ClusterEvent, ClusterKind, DEFAULT_WORKLOADS_NAMESPACE, Inventory, ProbeRecord,
};
pub use endpoints::{Endpoint, EndpointEvent, EndpointPatch, StatusChange};
pub use error::StoreError;
pub use gateway::{
    GatewayConfigRecord, GatewayEndpoint, GatewayKey, GatewayProvider, GatewayRoute,
};
pub use grants::GrantRecord;
pub use models::{Model, ModelPatch};
pub use projects::{Member, Project, ProjectPatch};
pub use providers::{Provider, ProviderPatch};
pub use routes::{Route, RoutePatch, RouteTarget, RouteUpstream};
pub use sealed::{SealedKind, SealedSecret};
pub use tokens::{RefreshToken, SigningKey};
pub use usage::{UsageFilter, UsageGroup, UsageRow, UsageSummaryRow};
pub use users::{User, UserPatch};

/// How to reach the database and how long to wait for it.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `sqlite://path/bud.db` (file and parent directory created if missing) or
    /// `postgres://user@host/db`.
    pub url: String,
    /// Upper bound on pooled connections.
    pub max_connections: u32,
    /// How long a caller waits for a pooled connection. Short, so a saturated or dead pool
    /// fails fast with [`StoreError::Unavailable`] instead of piling up requests.
    pub acquire_timeout: Duration,
    /// Longest a statement may run: PostgreSQL's `statement_timeout`; on SQLite the busy
    /// timeout, the longest a writer waits for the write lock.
    pub statement_timeout: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://bud-data/bud.db".to_owned(),
            max_connections: 10,
            acquire_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(5),
        }
    }
}

/// Which database a [`Store`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The database: a pool of connections, cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// Modifying statements run through this store and its clones; see [`Store::writes`].
    writes: Arc<AtomicU64>,
}

impl Store {
    /// Opens a pool and one connection to prove the database is reachable; an unreachable
    /// database is [`StoreError::Unavailable`]. SQLite runs in WAL mode with foreign keys on.
    pub async fn connect(cfg: &StoreConfig) -> Result<Store, StoreError> {
        // Guarded by its own `Once`, so calling it on every connect is cheap and safe.
        sqlx::any::install_default_drivers();
        let backend = Backend::of_url(&cfg.url)?;
        let url = match backend {
            Backend::Sqlite => prepare_sqlite_url(&cfg.url)?,
            Backend::Postgres => cfg.url.clone(),
        };
        let timeout_ms = u64::try_from(cfg.statement_timeout.as_millis()).unwrap_or(u64::MAX);
        let pool = AnyPoolOptions::new()
            .max_connections(cfg.max_connections)
            .acquire_timeout(cfg.acquire_timeout)
            .after_connect(move |conn, _meta| Box::pin(configure_session(conn, timeout_ms)))
            .connect(&url)
            .await?;
        Ok(Store { pool, backend, writes: Arc::default() })
    }

    /// Applies the migrations this build embeds for the backend; never destructive.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self.backend {
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite").run(&self.pool).await?,
            Backend::Postgres => sqlx::migrate!("./migrations/postgres").run(&self.pool).await?,
        }
        Ok(())
    }

    /// Round trip to the database, for readiness probes.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes every connection; later calls fail with [`StoreError::Unavailable`].
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Open connections and how many of them are idle, for metrics.
    pub fn pool_stats(&self) -> (u32, usize) {
        (self.pool.size(), self.pool.num_idle())
    }

    /// How many statements that modify rows (INSERT, UPDATE, DELETE, upsert) this store and its
    /// clones have run since it connected, for benchmarks and tests: a pass of the reconciler
    /// that finds nothing to change must leave it as it was.
    ///
    /// It counts statements *run*, not rows changed: an `UPDATE` whose `WHERE` matches nothing
    /// counts, as does one that fails or whose transaction rolls back; an audit record counts
    /// as the three statements that chain it. Reads, migrations and [`Store::execute_raw`] do
    /// not count.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Runs raw SQL (several statements allowed) and returns the rows affected. Test support
    /// only: contract tests use it to tamper with the audit log. Not counted in
    /// [`Store::writes`].
    #[doc(hidden)]
    pub async fn execute_raw(&self, sql: &str) -> Result<u64, StoreError> {
        Ok(sqlx::raw_sql(sql).execute(&self.pool).await?.rows_affected())
    }

    /// Counts one modifying statement in [`Store::writes`]. Every INSERT, UPDATE and DELETE in
    /// this crate calls it just before running the statement.
    fn note_write(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    /// `FOR UPDATE` on PostgreSQL, to lock a row read before changing it; nothing on SQLite,
    /// whose write transactions ([`Store::begin_write`]) already hold the database's lock.
    fn for_update(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE",
        }
    }

    /// Starts a transaction that will write. SQLite takes the write lock up front (`BEGIN
    /// IMMEDIATE`): a deferred transaction that reads and then writes can fail with SQLITE_BUSY
    /// when two of them try to upgrade at once, and the busy timeout cannot resolve that.
    async fn begin_write(&self) -> Result<Transaction<'static, Any>, StoreError> {
        let tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        };
        Ok(tx)
    }
}

/// A statement with its arguments bound, ready to run.
type Statement<'q> = sqlx::query::Query<'q, Any, AnyArguments<'q>>;
/// A statement whose rows decode into `R`.
type RowStatement<'q, R> = sqlx::query::QueryAs<'q, Any, R, AnyArguments<'q>>;

/// The shapes every audited change takes: one statement and its audit record, in one
/// transaction. The audit record is appended only when the statement changed something.
impl Store {
    /// Runs an insert; constraint failures are worded with `words`.
    async fn insert_audited(
        &self,
        statement: Statement<'_>,
        words: Violations<'_>,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        self.note_write();
        statement.execute(&mut *tx).await.map_err(|e| StoreError::from_sqlx(e, words))?;
        self.append_in(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Runs an `UPDATE … RETURNING` of at most one row; `None` when no row matched.
    async fn update_audited<R, T>(
        &self,
        statement: RowStatement<'_, R>,
        words: Violations<'_>,
        audit: &AuditEvent,
    ) -> Result<Option<T>, StoreError>
    where
        R: for<'r> sqlx::FromRow<'r, AnyRow> + Send + Unpin,
        T: TryFrom<R, Error = StoreError>,
    {
        let mut tx = self.begin_write().await?;
        self.note_write();
        let row = statement
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, words))?;
        let Some(row) = row else { return Ok(None) };
        let updated = T::try_from(row)?;
        self.append_in(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(Some(updated))
    }

    /// Runs a `DELETE`; false when it removed nothing. A foreign key that refuses the delete
    /// (rows elsewhere still refer to it) is worded with `words.reference`.
    async fn delete_audited(
        &self,
        statement: Statement<'_>,
        words: Violations<'_>,
        audit: &AuditEvent,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        self.note_write();
        let deleted =
            statement.execute(&mut *tx).await.map_err(|e| StoreError::from_sqlx(e, words))?;
        if deleted.rows_affected() == 0 {
            return Ok(false);
        }
        self.append_in(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(true)
    }
}

impl Backend {
    fn of_url(url: &str) -> Result<Backend, StoreError> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Ok(Backend::Postgres)
        } else {
            Err(StoreError::Database(sqlx::Error::Configuration(
                "the database URL must start with sqlite:// or postgres://".into(),
            )))
        }
    }
}

/// Per-connection settings, run on every new connection of the pool.
async fn configure_session(conn: &mut AnyConnection, timeout_ms: u64) -> Result<(), sqlx::Error> {
    let statements = if conn.backend_name() == "SQLite" {
        // WAL lets readers run beside the one writer; it is a property of the file, so after the
        // first connection sets it the pragma is a no-op. Foreign keys are per connection.
        vec![
            "PRAGMA journal_mode = WAL".to_owned(),
            "PRAGMA foreign_keys = ON".to_owned(),
            format!("PRAGMA busy_timeout = {timeout_ms}"),
        ]
    } else {
        vec![format!("SET statement_timeout = {timeout_ms}")]
    };
    for statement in statements {
        conn.execute(statement.as_str()).await?;
    }
    Ok(())
}

/// Creates the SQLite file's parent directory and asks for the file to be created if missing
/// (`mode=rwc`) unless the URL already names a mode.
fn prepare_sqlite_url(url: &str) -> Result<String, StoreError> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).unwrap_or(url);
    let (path, query) = match rest.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (rest, None),
    };
    if let Some(dir) = Path::new(path).parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Database(sqlx::Error::Configuration(
                format!("cannot create the database directory {}: {e}", dir.display()).into(),
            ))
        })?;
    }
    Ok(match query {
        Some(q) if q.split('&').any(|pair| pair.starts_with("mode=")) => url.to_owned(),
        Some(_) => format!("{url}&mode=rwc"),
        None => format!("{url}?mode=rwc"),
    })
}
