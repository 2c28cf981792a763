//! API keys for the gateway. Only a hash of each key is stored; the prefix identifies a key to
//! people without revealing it.

use bud_domain::{ApiKeyId, Cursor, Name, Page, PageLimit, ProjectId, Timestamp, UserId};

use crate::audit::AuditEvent;
use crate::error::Violations;
use crate::row::{after_key, ms, opt_parse, opt_timestamp, overfetch, stored, timestamp};
use crate::{Store, StoreError};

#[derive(Debug, Clone, PartialEq)]
pub struct ApiKey {
    pub id: ApiKeyId,
    pub project_id: ProjectId,
    pub name: Name,
    /// The key's first characters, shown in lists so people can tell keys apart.
    pub prefix: String,
    /// Hash of the whole key, unique; the gateway looks keys up by it.
    pub hash: String,
    pub created_by: Option<UserId>,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    /// Set once, by the first revocation.
    pub revoked_at: Option<Timestamp>,
    /// Requests per minute; `None` means no limit of its own.
    pub rpm_limit: Option<i64>,
    /// Tokens per minute; `None` means no limit of its own.
    pub tpm_limit: Option<i64>,
}

impl Store {
    /// Reference when the project (or creator) does not exist.
    pub async fn create_api_key(&self, key: &ApiKey, audit: &AuditEvent) -> Result<(), StoreError> {
        let insert = sqlx::query(
            "INSERT INTO api_keys (id, project_id, name, prefix, hash, created_by, created_at, \
             expires_at, revoked_at, rpm_limit, tpm_limit) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(key.id.to_string())
        .bind(key.project_id.to_string())
        .bind(key.name.as_str())
        .bind(&key.prefix)
        .bind(&key.hash)
        .bind(key.created_by.map(|id| id.to_string()))
        .bind(ms(key.created_at))
        .bind(key.expires_at.map(ms))
        .bind(key.revoked_at.map(ms))
        .bind(key.rpm_limit)
        .bind(key.tpm_limit);
        let words = Violations {
            conflict: "an API key with this hash already exists",
            reference: "the project does not exist",
        };
        self.insert_audited(insert, words, audit).await
    }

    pub async fn api_key(&self, id: ApiKeyId) -> Result<Option<ApiKey>, StoreError> {
        self.api_key_where("id = $1", &id.to_string()).await
    }

    /// The key whose hash is `hash`, revoked or not: the caller decides what revocation means.
    pub async fn api_key_by_hash(&self, hash: &str) -> Result<Option<ApiKey>, StoreError> {
        self.api_key_where("hash = $1", hash).await
    }

    /// A project's keys, oldest first.
    pub async fn list_api_keys(
        &self,
        project: ProjectId,
        after: Option<&Cursor>,
        limit: PageLimit,
    ) -> Result<Page<ApiKey>, StoreError> {
        let rows: Vec<ApiKeyRow> = sqlx::query_as(&format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE project_id = $1 AND id > $2 \
             ORDER BY id LIMIT $3"
        ))
        .bind(project.to_string())
        .bind(after_key(after))
        .bind(overfetch(limit))
        .fetch_all(&self.pool)
        .await?;
        let keys = rows.into_iter().map(ApiKey::try_from).collect::<Result<Vec<_>, _>>()?;
        Ok(Page::from_overfetch(keys, limit, |k| k.id.to_string()))
    }

    /// Revokes the key and returns it. Idempotent: revoking again keeps the first revoked_at and
    /// appends no audit record. `None` if there is no such key.
    pub async fn revoke_api_key(
        &self,
        id: ApiKeyId,
        now: Timestamp,
        audit: &AuditEvent,
    ) -> Result<Option<ApiKey>, StoreError> {
        let sql = format!(
            "UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL \
             RETURNING {API_KEY_COLUMNS}"
        );
        let revoke = sqlx::query_as::<_, ApiKeyRow>(&sql).bind(id.to_string()).bind(ms(now));
        match self.update_audited(revoke, Violations::GENERIC, audit).await? {
            Some(key) => Ok(Some(key)),
            None => self.api_key(id).await,
        }
    }

    async fn api_key_where(
        &self,
        condition: &str,
        value: &str,
    ) -> Result<Option<ApiKey>, StoreError> {
        let row: Option<ApiKeyRow> =
            sqlx::query_as(&format!("SELECT {API_KEY_COLUMNS} FROM api_keys WHERE {condition}"))
                .bind(value)
                .fetch_optional(&self.pool)
                .await?;
        row.map(ApiKey::try_from).transpose()
    }
}

const API_KEY_COLUMNS: &str = "id, project_id, name, prefix, hash, created_by, created_at, \
                               expires_at, revoked_at, rpm_limit, tpm_limit";

#[derive(sqlx::FromRow)]
struct ApiKeyRow {
    id: String,
    project_id: String,
    name: String,
    prefix: String,
    hash: String,
    created_by: Option<String>,
    created_at: i64,
    expires_at: Option<i64>,
    revoked_at: Option<i64>,
    rpm_limit: Option<i64>,
    tpm_limit: Option<i64>,
}

impl TryFrom<ApiKeyRow> for ApiKey {
    type Error = StoreError;

    fn try_from(row: ApiKeyRow) -> Result<Self, StoreError> {
        Ok(ApiKey {
            id: stored("api_keys.id", row.id.parse())?,
            project_id: stored("api_keys.project_id", row.project_id.parse())?,
            name: stored("api_keys.name", Name::parse("name", &row.name))?,
            prefix: row.prefix,
            hash: row.hash,
            created_by: stored("api_keys.created_by", opt_parse(row.created_by.as_deref()))?,
            created_at: stored("api_keys.created_at", timestamp(row.created_at))?,
            expires_at: stored("api_keys.expires_at", opt_timestamp(row.expires_at))?,
            revoked_at: stored("api_keys.revoked_at", opt_timestamp(row.revoked_at))?,
            rpm_limit: row.rpm_limit,
            tpm_limit: row.tpm_limit,
        })
    }
}
