//! External OpenAI-compatible providers the gateway can route to.

use bud_domain::{Cursor, Name, Page, PageLimit, ProviderId, Timestamp, UserId};

use crate::audit::AuditEvent;
use crate::error::Violations;
use crate::row::{after_key, ms, opt_parse, overfetch, stored, timestamp};
use crate::{Store, StoreError};

#[derive(Debug, Clone, PartialEq)]
pub struct Provider {
    pub id: ProviderId,
    /// Unique across providers.
    pub name: Name,
    pub base_url: String,
    /// The provider's API key, encrypted by the caller; the store never sees it in clear.
    pub api_key_ciphertext: String,
    pub created_by: Option<UserId>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// Changes to a provider; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct ProviderPatch {
    pub name: Option<Name>,
    pub base_url: Option<String>,
    pub api_key_ciphertext: Option<String>,
}

const PROVIDER_WORDS: Violations<'static> = Violations {
    conflict: "a provider with this name already exists",
    reference: "the creator does not exist",
};

impl Store {
    pub async fn create_provider(
        &self,
        provider: &Provider,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let insert = sqlx::query(
            "INSERT INTO providers (id, name, base_url, api_key_ciphertext, created_by, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(provider.id.to_string())
        .bind(provider.name.as_str())
        .bind(&provider.base_url)
        .bind(&provider.api_key_ciphertext)
        .bind(provider.created_by.map(|id| id.to_string()))
        .bind(ms(provider.created_at))
        .bind(ms(provider.updated_at));
        self.insert_audited(insert, PROVIDER_WORDS, audit).await
    }

    pub async fn provider(&self, id: ProviderId) -> Result<Option<Provider>, StoreError> {
        let row: Option<ProviderRow> =
            sqlx::query_as(&format!("SELECT {PROVIDER_COLUMNS} FROM providers WHERE id = $1"))
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await?;
        row.map(Provider::try_from).transpose()
    }

    pub async fn list_providers(
        &self,
        after: Option<&Cursor>,
        limit: PageLimit,
    ) -> Result<Page<Provider>, StoreError> {
        let rows: Vec<ProviderRow> = sqlx::query_as(&format!(
            "SELECT {PROVIDER_COLUMNS} FROM providers WHERE id > $1 ORDER BY id LIMIT $2"
        ))
        .bind(after_key(after))
        .bind(overfetch(limit))
        .fetch_all(&self.pool)
        .await?;
        let providers = rows.into_iter().map(Provider::try_from).collect::<Result<Vec<_>, _>>()?;
        Ok(Page::from_overfetch(providers, limit, |p| p.id.to_string()))
    }

    /// Applies `patch`; `None` (and no audit record) if there is no such provider.
    pub async fn update_provider(
        &self,
        id: ProviderId,
        patch: &ProviderPatch,
        now: Timestamp,
        audit: &AuditEvent,
    ) -> Result<Option<Provider>, StoreError> {
        let sql = format!(
            "UPDATE providers SET name = COALESCE($2, name), base_url = COALESCE($3, base_url), \
             api_key_ciphertext = COALESCE($4, api_key_ciphertext), updated_at = $5 \
             WHERE id = $1 RETURNING {PROVIDER_COLUMNS}"
        );
        let update = sqlx::query_as::<_, ProviderRow>(&sql)
            .bind(id.to_string())
            .bind(patch.name.as_ref().map(|n| n.as_str().to_owned()))
            .bind(patch.base_url.clone())
            .bind(patch.api_key_ciphertext.clone())
            .bind(ms(now));
        self.update_audited(update, PROVIDER_WORDS, audit).await
    }

    /// False (and no audit record) if there was no such provider.
    pub async fn delete_provider(
        &self,
        id: ProviderId,
        audit: &AuditEvent,
    ) -> Result<bool, StoreError> {
        let delete = sqlx::query("DELETE FROM providers WHERE id = $1").bind(id.to_string());
        self.delete_audited(delete, Violations::GENERIC, audit).await
    }
}

const PROVIDER_COLUMNS: &str =
    "id, name, base_url, api_key_ciphertext, created_by, created_at, updated_at";

#[derive(sqlx::FromRow)]
struct ProviderRow {
    id: String,
    name: String,
    base_url: String,
    api_key_ciphertext: String,
    created_by: Option<String>,
    created_at: i64,
    updated_at: i64,
}

impl TryFrom<ProviderRow> for Provider {
    type Error = StoreError;

    fn try_from(row: ProviderRow) -> Result<Self, StoreError> {
        Ok(Provider {
            id: stored("providers.id", row.id.parse())?,
            name: stored("providers.name", Name::parse("name", &row.name))?,
            base_url: row.base_url,
            api_key_ciphertext: row.api_key_ciphertext,
            created_by: stored("providers.created_by", opt_parse(row.created_by.as_deref()))?,
            created_at: stored("providers.created_at", timestamp(row.created_at))?,
            updated_at: stored("providers.updated_at", timestamp(row.updated_at))?,
        })
    }
}
