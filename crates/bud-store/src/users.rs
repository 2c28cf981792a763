//! Users: people and service accounts, with a local password or an external identity.

use bud_domain::{Cursor, Email, Name, Page, PageLimit, Role, Timestamp, UserId};

use crate::audit::AuditEvent;
use crate::error::{Violations, unique_violation_mentions};
use crate::row::{after_key, ms, opt_timestamp, overfetch, stored, timestamp};
use crate::{Store, StoreError};

#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub id: UserId,
    /// Unique across users.
    pub email: Email,
    pub name: Name,
    pub role: Role,
    /// Set for users who sign in with a local password.
    pub password_hash: Option<String>,
    /// With `subject`: the external identity (OIDC issuer and subject), unique when set.
    pub issuer: Option<String>,
    pub subject: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// Set while the user may not sign in.
    pub disabled_at: Option<Timestamp>,
}

/// Changes to a user; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct UserPatch {
    pub name: Option<Name>,
    pub role: Option<Role>,
    pub password_hash: Option<String>,
    /// `Some(true)` disables (keeping the first disabled_at), `Some(false)` enables.
    pub disabled: Option<bool>,
}

impl Store {
    /// Conflict when the email, or the issuer and subject, already belong to a user.
    pub async fn create_user(&self, user: &User, audit: &AuditEvent) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        self.note_write();
        sqlx::query(
            "INSERT INTO users (id, email, name, role, password_hash, issuer, subject, \
             created_at, updated_at, disabled_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(user.id.to_string())
        .bind(user.email.as_str())
        .bind(user.name.as_str())
        .bind(user.role.as_str())
        .bind(user.password_hash.clone())
        .bind(user.issuer.clone())
        .bind(user.subject.clone())
        .bind(ms(user.created_at))
        .bind(ms(user.updated_at))
        .bind(user.disabled_at.map(ms))
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            let conflict = if unique_violation_mentions(&e, "subject") {
                "a user with this identity provider subject already exists"
            } else {
                "a user with this email already exists"
            };
            StoreError::from_sqlx(e, Violations { conflict, ..Violations::GENERIC })
        })?;
        self.append_in(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn user(&self, id: UserId) -> Result<Option<User>, StoreError> {
        self.user_where("id = $1", &id.to_string()).await
    }

    pub async fn user_by_email(&self, email: &Email) -> Result<Option<User>, StoreError> {
        self.user_where("email = $1", email.as_str()).await
    }

    /// The user linked to an external identity.
    pub async fn user_by_subject(
        &self,
        issuer: &str,
        subject: &str,
    ) -> Result<Option<User>, StoreError> {
        let row: Option<UserRow> = sqlx::query_as(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE issuer = $1 AND subject = $2"
        ))
        .bind(issuer)
        .bind(subject)
        .fetch_optional(&self.pool)
        .await?;
        row.map(User::try_from).transpose()
    }

    pub async fn list_users(
        &self,
        after: Option<&Cursor>,
        limit: PageLimit,
    ) -> Result<Page<User>, StoreError> {
        let rows: Vec<UserRow> = sqlx::query_as(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE id > $1 ORDER BY id LIMIT $2"
        ))
        .bind(after_key(after))
        .bind(overfetch(limit))
        .fetch_all(&self.pool)
        .await?;
        let users = rows.into_iter().map(User::try_from).collect::<Result<Vec<_>, _>>()?;
        Ok(Page::from_overfetch(users, limit, |u| u.id.to_string()))
    }

    /// How many users exist, e.g. to decide whether the first one becomes admin.
    pub async fn count_users(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM users").fetch_one(&self.pool).await?)
    }

    /// Applies `patch` and returns the updated user; `None` (and no audit record) if there is no
    /// such user.
    pub async fn update_user(
        &self,
        id: UserId,
        patch: &UserPatch,
        now: Timestamp,
        audit: &AuditEvent,
    ) -> Result<Option<User>, StoreError> {
        let sql = format!(
            "UPDATE users SET \
             name = COALESCE($2, name), \
             role = COALESCE($3, role), \
             password_hash = COALESCE($4, password_hash), \
             disabled_at = CASE WHEN $5 IS NULL THEN disabled_at \
                                WHEN $5 = 1 THEN COALESCE(disabled_at, $6) \
                                ELSE NULL END, \
             updated_at = $6 \
             WHERE id = $1 RETURNING {USER_COLUMNS}"
        );
        let update = sqlx::query_as::<_, UserRow>(&sql)
            .bind(id.to_string())
            .bind(patch.name.as_ref().map(|n| n.as_str().to_owned()))
            .bind(patch.role.map(|r| r.as_str().to_owned()))
            .bind(patch.password_hash.clone())
            .bind(patch.disabled.map(i64::from))
            .bind(ms(now));
        self.update_audited(update, Violations::GENERIC, audit).await
    }

    async fn user_where(&self, condition: &str, value: &str) -> Result<Option<User>, StoreError> {
        let row: Option<UserRow> =
            sqlx::query_as(&format!("SELECT {USER_COLUMNS} FROM users WHERE {condition}"))
                .bind(value)
                .fetch_optional(&self.pool)
                .await?;
        row.map(User::try_from).transpose()
    }
}

const USER_COLUMNS: &str =
    "id, email, name, role, password_hash, issuer, subject, created_at, updated_at, disabled_at";

#[derive(sqlx::FromRow)]
struct UserRow {
    id: String,
    email: String,
    name: String,
    role: String,
    password_hash: Option<String>,
    issuer: Option<String>,
    subject: Option<String>,
    created_at: i64,
    updated_at: i64,
    disabled_at: Option<i64>,
}

impl TryFrom<UserRow> for User {
    type Error = StoreError;

    fn try_from(row: UserRow) -> Result<Self, StoreError> {
        Ok(User {
            id: stored("users.id", row.id.parse())?,
            email: stored("users.email", Email::parse("email", &row.email))?,
            name: stored("users.name", Name::parse("name", &row.name))?,
            role: stored("users.role", row.role.parse())?,
            password_hash: row.password_hash,
            issuer: row.issuer,
            subject: row.subject,
            created_at: stored("users.created_at", timestamp(row.created_at))?,
            updated_at: stored("users.updated_at", timestamp(row.updated_at))?,
            disabled_at: stored("users.disabled_at", opt_timestamp(row.disabled_at))?,
        })
    }
}
