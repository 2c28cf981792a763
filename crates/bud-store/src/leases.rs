//! Leases: one holder per name at a time, e.g. "cluster:<id>", so several budcluster replicas
//! can run on one database and only one of them works on each cluster. A lease ends when its
//! holder releases it or when it expires; holders renew well before that.

use std::time::Duration;

use bud_domain::Timestamp;

use crate::row::ms;
use crate::{Store, StoreError};

impl Store {
    /// Takes the lease `name` for `holder` until `now + ttl` if it is free, expired or already
    /// held by `holder` (a renewal); returns whether `holder` holds it after the call. One
    /// statement, so of several callers racing for a free lease exactly one wins.
    pub async fn try_acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now: Timestamp,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let expires_at = ms(now).saturating_add(ttl_ms);
        // A conflicting row whose WHERE fails is left alone and counts as no row affected, on
        // both backends.
        self.note_write();
        let taken = sqlx::query(
            "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE \
             SET holder = excluded.holder, expires_at = excluded.expires_at \
             WHERE leases.expires_at <= $4 OR leases.holder = excluded.holder",
        )
        .bind(name)
        .bind(holder)
        .bind(expires_at)
        .bind(ms(now))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(taken == 1)
    }

    /// Gives the lease up if `holder` has it, so another can take it without waiting for it to
    /// expire; does nothing otherwise.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        self.note_write();
        sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Who holds the lease at `now`; `None` when it is free or expired.
    pub async fn lease_holder(
        &self,
        name: &str,
        now: Timestamp,
    ) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar("SELECT holder FROM leases WHERE name = $1 AND expires_at > $2")
            .bind(name)
            .bind(ms(now))
            .fetch_optional(&self.pool)
            .await?)
    }
}
