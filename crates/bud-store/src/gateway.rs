//! What budgateway builds its snapshot from, read in one consistent view, and the version it
//! polls to learn that something changed.
//!
//! The version is a counter in a one-row table (`config_version`), bumped by database triggers
//! on every insert, update and delete of API keys, routes and providers, every model rename, and
//! every endpoint insert, delete, status change or address change. Polling it is one primary-key
//! read, cheap enough for every 500 ms. Triggers rather than the newest `updated_at` of those
//! tables: a change committed with an older timestamp than one already seen (writers on several
//! replicas, clock skew, the same millisecond) would leave that maximum where it was and the
//! change would never reach the gateway; a missed key revocation is a security failure. The
//! triggers' writes are the database's own: they do not count in [`Store::writes`].

use bud_domain::{ApiKeyId, EndpointId, EndpointStatus, ProjectId, ProviderId, RouteId, Timestamp};

use crate::row::{from_json, opt_timestamp, stored};
use crate::{Backend, RouteTarget, Store, StoreError};

/// The gateway's configuration at one version.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfigRecord {
    /// Changes whenever anything below changes; compare for equality only (a restored database
    /// may count from an older value).
    pub version: u64,
    /// Keys not revoked, expired ones included: the gateway refuses those by their expiry.
    pub keys: Vec<GatewayKey>,
    pub routes: Vec<GatewayRoute>,
    /// RUNNING endpoints only.
    pub endpoints: Vec<GatewayEndpoint>,
    pub providers: Vec<GatewayProvider>,
}

/// An API key as the gateway needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayKey {
    pub id: ApiKeyId,
    pub project_id: ProjectId,
    /// Lowercase hex SHA-256 of the key.
    pub hash: String,
    pub expires_at: Option<Timestamp>,
    pub rpm_limit: Option<i64>,
    pub tpm_limit: Option<i64>,
}

/// A route as the gateway needs it: a [`crate::Route`] without its bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayRoute {
    pub id: RouteId,
    pub project_id: ProjectId,
    /// The public model name, unique within the project.
    pub name: String,
    pub targets: Vec<RouteTarget>,
    pub fallbacks: Vec<RouteTarget>,
    pub rpm_limit: Option<i64>,
    pub tpm_limit: Option<i64>,
}

/// A RUNNING endpoint: where its replicas answer and the model name they serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayEndpoint {
    pub id: EndpointId,
    pub project_id: ProjectId,
    /// The model's name: what the engine serves, and the endpoint's implicit route.
    pub model_name: String,
    /// `host:port` of each ready replica, sorted.
    pub addresses: Vec<String>,
}

/// An external provider; its API key stays sealed until the gateway opens it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayProvider {
    pub id: ProviderId,
    pub base_url: String,
    /// Sealed with the associated data `bud_auth::secrets::aad::provider(id)`; empty when the
    /// provider needs no key.
    pub api_key_ciphertext: String,
}

impl Store {
    /// The current configuration version: one indexed read.
    pub async fn config_version(&self) -> Result<u64, StoreError> {
        let version: i64 = sqlx::query_scalar("SELECT version FROM config_version WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        stored("config_version.version", u64::try_from(version))
    }

    /// Everything the gateway's snapshot is built from, with its version, as of one moment: the
    /// reads share one transaction (a repeatable-read snapshot on PostgreSQL; SQLite's read
    /// transactions see one state of the database).
    pub async fn gateway_config(&self) -> Result<GatewayConfigRecord, StoreError> {
        let mut tx = match self.backend {
            Backend::Sqlite => self.pool.begin().await?,
            Backend::Postgres => {
                self.pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY").await?
            }
        };
        let version: i64 = sqlx::query_scalar("SELECT version FROM config_version WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
        let keys: Vec<KeyRow> = sqlx::query_as(
            "SELECT id, project_id, hash, expires_at, rpm_limit, tpm_limit FROM api_keys \
             WHERE revoked_at IS NULL ORDER BY id",
        )
        .fetch_all(&mut *tx)
        .await?;
        let routes: Vec<RouteRow> = sqlx::query_as(
            "SELECT id, project_id, name, targets, fallbacks, rpm_limit, tpm_limit FROM routes \
             ORDER BY id",
        )
        .fetch_all(&mut *tx)
        .await?;
        let endpoints: Vec<EndpointRow> = sqlx::query_as(
            "SELECT e.id, e.project_id, m.name AS model_name, e.addresses \
             FROM endpoints e JOIN models m ON m.id = e.model_id \
             WHERE e.status = $1 ORDER BY e.id",
        )
        .bind(EndpointStatus::Running.as_str())
        .fetch_all(&mut *tx)
        .await?;
        let providers: Vec<ProviderRow> =
            sqlx::query_as("SELECT id, base_url, api_key_ciphertext FROM providers ORDER BY id")
                .fetch_all(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(GatewayConfigRecord {
            version: stored("config_version.version", u64::try_from(version))?,
            keys: keys.into_iter().map(GatewayKey::try_from).collect::<Result<_, _>>()?,
            routes: routes.into_iter().map(GatewayRoute::try_from).collect::<Result<_, _>>()?,
            endpoints: endpoints
                .into_iter()
                .map(GatewayEndpoint::try_from)
                .collect::<Result<_, _>>()?,
            providers: providers
                .into_iter()
                .map(GatewayProvider::try_from)
                .collect::<Result<_, _>>()?,
        })
    }
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    id: String,
    project_id: String,
    hash: String,
    expires_at: Option<i64>,
    rpm_limit: Option<i64>,
    tpm_limit: Option<i64>,
}

impl TryFrom<KeyRow> for GatewayKey {
    type Error = StoreError;

    fn try_from(row: KeyRow) -> Result<Self, StoreError> {
        Ok(GatewayKey {
            id: stored("api_keys.id", row.id.parse())?,
            project_id: stored("api_keys.project_id", row.project_id.parse())?,
            hash: row.hash,
            expires_at: stored("api_keys.expires_at", opt_timestamp(row.expires_at))?,
            rpm_limit: row.rpm_limit,
            tpm_limit: row.tpm_limit,
        })
    }
}

#[derive(sqlx::FromRow)]
struct RouteRow {
    id: String,
    project_id: String,
    name: String,
    targets: String,
    fallbacks: String,
    rpm_limit: Option<i64>,
    tpm_limit: Option<i64>,
}

impl TryFrom<RouteRow> for GatewayRoute {
    type Error = StoreError;

    fn try_from(row: RouteRow) -> Result<Self, StoreError> {
        Ok(GatewayRoute {
            id: stored("routes.id", row.id.parse())?,
            project_id: stored("routes.project_id", row.project_id.parse())?,
            name: row.name,
            targets: stored("routes.targets", from_json(&row.targets))?,
            fallbacks: stored("routes.fallbacks", from_json(&row.fallbacks))?,
            rpm_limit: row.rpm_limit,
            tpm_limit: row.tpm_limit,
        })
    }
}

#[derive(sqlx::FromRow)]
struct EndpointRow {
    id: String,
    project_id: String,
    model_name: String,
    addresses: String,
}

impl TryFrom<EndpointRow> for GatewayEndpoint {
    type Error = StoreError;

    fn try_from(row: EndpointRow) -> Result<Self, StoreError> {
        Ok(GatewayEndpoint {
            id: stored("endpoints.id", row.id.parse())?,
            project_id: stored("endpoints.project_id", row.project_id.parse())?,
            model_name: row.model_name,
            addresses: stored("endpoints.addresses", from_json(&row.addresses))?,
        })
    }
}

#[derive(sqlx::FromRow)]
struct ProviderRow {
    id: String,
    base_url: String,
    api_key_ciphertext: String,
}

impl TryFrom<ProviderRow> for GatewayProvider {
    type Error = StoreError;

    fn try_from(row: ProviderRow) -> Result<Self, StoreError> {
        Ok(GatewayProvider {
            id: stored("providers.id", row.id.parse())?,
            base_url: row.base_url,
            api_key_ciphertext: row.api_key_ciphertext,
        })
    }
}
