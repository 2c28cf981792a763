//! Every secret the store holds sealed, listed in one place so the master key can be rotated:
//! read each ciphertext, reseal it under the new key, write it back only if nobody changed it
//! meanwhile.

use crate::{Store, StoreError};

/// Which column a sealed secret lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealedKind {
    /// `providers.api_key_ciphertext`, keyed by provider id.
    ProviderApiKey,
    /// `signing_keys.private_key_ciphertext`, keyed by kid.
    SigningKey,
    /// `clusters.kubeconfig_ciphertext`, keyed by cluster id; local clusters have none.
    Kubeconfig,
}

/// One sealed value and the row it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedSecret {
    pub kind: SealedKind,
    /// The row's key: a provider id, a signing key's kid or a cluster id.
    pub id: String,
    pub ciphertext: String,
}

impl SealedKind {
    /// Every kind, in the order [`Store::sealed_secrets`] lists them.
    pub const ALL: [SealedKind; 3] =
        [SealedKind::ProviderApiKey, SealedKind::SigningKey, SealedKind::Kubeconfig];

    /// Table, key column and ciphertext column. Fixed strings, never input.
    fn columns(self) -> (&'static str, &'static str, &'static str) {
        match self {
            SealedKind::ProviderApiKey => ("providers", "id", "api_key_ciphertext"),
            SealedKind::SigningKey => ("signing_keys", "kid", "private_key_ciphertext"),
            SealedKind::Kubeconfig => ("clusters", "id", "kubeconfig_ciphertext"),
        }
    }
}

impl Store {
    /// Every sealed secret in the store (providers without a key and local clusters have none).
    pub async fn sealed_secrets(&self) -> Result<Vec<SealedSecret>, StoreError> {
        let mut all = Vec::new();
        for kind in SealedKind::ALL {
            let (table, key, column) = kind.columns();
            let rows: Vec<(String, String)> = sqlx::query_as(&format!(
                "SELECT {key}, {column} FROM {table} WHERE {column} <> '' ORDER BY {key}"
            ))
            .fetch_all(&self.pool)
            .await?;
            all.extend(rows.into_iter().map(|(id, ciphertext)| SealedSecret {
                kind,
                id,
                ciphertext,
            }));
        }
        Ok(all)
    }

    /// Replaces `secret`'s ciphertext with `resealed` if it is still the one read; false when
    /// the row changed or is gone (the caller reads it again).
    pub async fn reseal(&self, secret: &SealedSecret, resealed: &str) -> Result<bool, StoreError> {
        let (table, key, column) = secret.kind.columns();
        self.note_write();
        let updated = sqlx::query(&format!(
            "UPDATE {table} SET {column} = $1 WHERE {key} = $2 AND {column} = $3"
        ))
        .bind(resealed)
        .bind(&secret.id)
        .bind(&secret.ciphertext)
        .execute(&self.pool)
        .await?;
        Ok(updated.rows_affected() == 1)
    }
}
