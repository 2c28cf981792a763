//! Explicit permission grants: permissions a user holds beyond their role, platform-wide or in
//! one project.

use bud_domain::{Grant, GrantId, Permission, ProjectId, Timestamp, UserId};

use crate::audit::AuditEvent;
use crate::error::Violations;
use crate::row::{ms, opt_parse, stored, timestamp};
use crate::{Store, StoreError};

#[derive(Debug, Clone, PartialEq)]
pub struct GrantRecord {
    pub id: GrantId,
    pub user_id: UserId,
    /// Unique per user: a user holds a permission once per project (or once platform-wide).
    pub grant: Grant,
    pub granted_by: Option<UserId>,
    pub created_at: Timestamp,
}

impl Store {
    /// Conflict when the user already holds the permission in that scope; Reference when the
    /// user, the granting user or the project does not exist.
    pub async fn grant(&self, record: &GrantRecord, audit: &AuditEvent) -> Result<(), StoreError> {
        let insert = sqlx::query(
            "INSERT INTO grants (id, user_id, permission, project_id, granted_by, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(record.id.to_string())
        .bind(record.user_id.to_string())
        .bind(record.grant.permission().to_string())
        .bind(record.grant.project_id().map(|id| id.to_string()))
        .bind(record.granted_by.map(|id| id.to_string()))
        .bind(ms(record.created_at));
        let words = Violations {
            conflict: "the user already holds this permission",
            reference: "the user or project does not exist",
        };
        self.insert_audited(insert, words, audit).await
    }

    /// Removes a grant; false (and no audit record) when the user did not hold it.
    pub async fn revoke_grant(
        &self,
        user: UserId,
        permission: Permission,
        project: Option<ProjectId>,
        audit: &AuditEvent,
    ) -> Result<bool, StoreError> {
        let delete = sqlx::query(
            "DELETE FROM grants WHERE user_id = $1 AND permission = $2 \
             AND (project_id = $3 OR (project_id IS NULL AND $3 IS NULL))",
        )
        .bind(user.to_string())
        .bind(permission.to_string())
        .bind(project.map(|id| id.to_string()));
        self.delete_audited(delete, Violations::GENERIC, audit).await
    }

    /// Every grant the user holds, oldest first.
    pub async fn grants_of(&self, user: UserId) -> Result<Vec<GrantRecord>, StoreError> {
        let rows: Vec<GrantRow> = sqlx::query_as(
            "SELECT id, user_id, permission, project_id, granted_by, created_at \
             FROM grants WHERE user_id = $1 ORDER BY id",
        )
        .bind(user.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(GrantRecord::try_from).collect()
    }
}

#[derive(sqlx::FromRow)]
struct GrantRow {
    id: String,
    user_id: String,
    permission: String,
    project_id: Option<String>,
    granted_by: Option<String>,
    created_at: i64,
}

impl TryFrom<GrantRow> for GrantRecord {
    type Error = StoreError;

    fn try_from(row: GrantRow) -> Result<Self, StoreError> {
        let permission = stored("grants.permission", row.permission.parse())?;
        let project_id = stored("grants.project_id", opt_parse(row.project_id.as_deref()))?;
        Ok(GrantRecord {
            id: stored("grants.id", row.id.parse())?,
            user_id: stored("grants.user_id", row.user_id.parse())?,
            grant: stored("grants.project_id", Grant::new(permission, project_id))?,
            granted_by: stored("grants.granted_by", opt_parse(row.granted_by.as_deref()))?,
            created_at: stored("grants.created_at", timestamp(row.created_at))?,
        })
    }
}
