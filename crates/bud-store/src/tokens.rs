//! Bookkeeping for the built-in token issuer: refresh tokens, which rotate within a family, and
//! the signing keys whose public halves the JWKS publishes. These record no audit events of
//! their own: the services audit the logins and refreshes that cause them.

use bud_domain::{Timestamp, UserId};

use crate::error::Violations;
use crate::row::{ms, opt_timestamp, stored, timestamp};
use crate::{Store, StoreError};

/// One refresh token. Each refresh uses the presented token and issues a successor in the same
/// family; presenting a used token again is reuse, and revokes the family.
#[derive(Debug, Clone, PartialEq)]
pub struct RefreshToken {
    pub id: String,
    pub family_id: String,
    pub user_id: UserId,
    /// Hash of the token; the token itself is never stored.
    pub token_hash: String,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub used_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
}

/// A key the built-in issuer signs tokens with.
#[derive(Debug, Clone, PartialEq)]
pub struct SigningKey {
    pub kid: String,
    pub algorithm: String,
    /// Encrypted by the caller; the store never sees the private key in clear.
    pub private_key_ciphertext: String,
    pub public_jwk: String,
    pub created_at: Timestamp,
    /// Set when the key stops signing; retired keys still verify tokens until those expire.
    pub retired_at: Option<Timestamp>,
}

impl Store {
    /// Reference when the user does not exist.
    pub async fn insert_refresh_token(&self, token: &RefreshToken) -> Result<(), StoreError> {
        self.note_write();
        sqlx::query(
            "INSERT INTO refresh_tokens (id, family_id, user_id, token_hash, created_at, \
             expires_at, used_at, revoked_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&token.id)
        .bind(&token.family_id)
        .bind(token.user_id.to_string())
        .bind(&token.token_hash)
        .bind(ms(token.created_at))
        .bind(ms(token.expires_at))
        .bind(token.used_at.map(ms))
        .bind(token.revoked_at.map(ms))
        .execute(&self.pool)
        .await
        .map_err(|e| {
            StoreError::from_sqlx(
                e,
                Violations {
                    conflict: "a refresh token with this id or hash already exists",
                    reference: "user does not exist",
                },
            )
        })?;
        Ok(())
    }

    pub async fn refresh_token_by_hash(
        &self,
        token_hash: &str,
    ) -> Result<Option<RefreshToken>, StoreError> {
        let row: Option<RefreshTokenRow> = sqlx::query_as(
            "SELECT id, family_id, user_id, token_hash, created_at, expires_at, used_at, \
             revoked_at FROM refresh_tokens WHERE token_hash = $1",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(RefreshToken::try_from).transpose()
    }

    /// Marks the token used if it is neither used nor revoked, in one statement; returns false
    /// otherwise. Reuse detection relies on this: of two concurrent refreshes with the same
    /// token exactly one gets true.
    pub async fn mark_refresh_token_used(
        &self,
        id: &str,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        self.note_write();
        let marked = sqlx::query(
            "UPDATE refresh_tokens SET used_at = $2 \
             WHERE id = $1 AND used_at IS NULL AND revoked_at IS NULL",
        )
        .bind(id)
        .bind(ms(now))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(marked == 1)
    }

    /// Revokes every live token of a family; returns how many were revoked.
    pub async fn revoke_refresh_family(
        &self,
        family_id: &str,
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        self.revoke_refresh_where("family_id = $1", family_id, now).await
    }

    /// Revokes every live token of a user, e.g. when they are disabled.
    pub async fn revoke_refresh_tokens_of_user(
        &self,
        user: UserId,
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        self.revoke_refresh_where("user_id = $1", &user.to_string(), now).await
    }

    pub async fn insert_signing_key(&self, key: &SigningKey) -> Result<(), StoreError> {
        self.note_write();
        sqlx::query(
            "INSERT INTO signing_keys (kid, algorithm, private_key_ciphertext, public_jwk, \
             created_at, retired_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&key.kid)
        .bind(&key.algorithm)
        .bind(&key.private_key_ciphertext)
        .bind(&key.public_jwk)
        .bind(ms(key.created_at))
        .bind(key.retired_at.map(ms))
        .execute(&self.pool)
        .await
        .map_err(|e| {
            StoreError::from_sqlx(
                e,
                Violations {
                    conflict: "a signing key with this kid already exists",
                    ..Violations::GENERIC
                },
            )
        })?;
        Ok(())
    }

    /// Every signing key, retired or not, newest first.
    pub async fn signing_keys(&self) -> Result<Vec<SigningKey>, StoreError> {
        let rows: Vec<SigningKeyRow> = sqlx::query_as(
            "SELECT kid, algorithm, private_key_ciphertext, public_jwk, created_at, retired_at \
             FROM signing_keys ORDER BY created_at DESC, kid DESC",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(SigningKey::try_from).collect()
    }

    /// Retires a key, keeping the first retired_at; false if there is no such key.
    pub async fn retire_signing_key(&self, kid: &str, now: Timestamp) -> Result<bool, StoreError> {
        self.note_write();
        let updated = sqlx::query(
            "UPDATE signing_keys SET retired_at = COALESCE(retired_at, $2) WHERE kid = $1",
        )
        .bind(kid)
        .bind(ms(now))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(updated == 1)
    }

    async fn revoke_refresh_where(
        &self,
        condition: &str,
        value: &str,
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        self.note_write();
        let revoked = sqlx::query(&format!(
            "UPDATE refresh_tokens SET revoked_at = $2 WHERE {condition} AND revoked_at IS NULL"
        ))
        .bind(value)
        .bind(ms(now))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(revoked)
    }
}

#[derive(sqlx::FromRow)]
struct RefreshTokenRow {
    id: String,
    family_id: String,
    user_id: String,
    token_hash: String,
    created_at: i64,
    expires_at: i64,
    used_at: Option<i64>,
    revoked_at: Option<i64>,
}

impl TryFrom<RefreshTokenRow> for RefreshToken {
    type Error = StoreError;

    fn try_from(row: RefreshTokenRow) -> Result<Self, StoreError> {
        Ok(RefreshToken {
            id: row.id,
            family_id: row.family_id,
            user_id: stored("refresh_tokens.user_id", row.user_id.parse())?,
            token_hash: row.token_hash,
            created_at: stored("refresh_tokens.created_at", timestamp(row.created_at))?,
            expires_at: stored("refresh_tokens.expires_at", timestamp(row.expires_at))?,
            used_at: stored("refresh_tokens.used_at", opt_timestamp(row.used_at))?,
            revoked_at: stored("refresh_tokens.revoked_at", opt_timestamp(row.revoked_at))?,
        })
    }
}

#[derive(sqlx::FromRow)]
struct SigningKeyRow {
    kid: String,
    algorithm: String,
    private_key_ciphertext: String,
    public_jwk: String,
    created_at: i64,
    retired_at: Option<i64>,
}

impl TryFrom<SigningKeyRow> for SigningKey {
    type Error = StoreError;

    fn try_from(row: SigningKeyRow) -> Result<Self, StoreError> {
        Ok(SigningKey {
            kid: row.kid,
            algorithm: row.algorithm,
            private_key_ciphertext: row.private_key_ciphertext,
            public_jwk: row.public_jwk,
            created_at: stored("signing_keys.created_at", timestamp(row.created_at))?,
            retired_at: stored("signing_keys.retired_at", opt_timestamp(row.retired_at))?,
        })
    }
}
