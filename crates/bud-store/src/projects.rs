//! Projects, the unit of tenancy, and their members.

use bud_domain::{Cursor, Email, Name, Page, PageLimit, ProjectId, Timestamp, UserId};

use crate::audit::AuditEvent;
use crate::error::Violations;
use crate::row::{after_key, ms, opt_parse, overfetch, stored, timestamp};
use crate::{Store, StoreError};

#[derive(Debug, Clone, PartialEq)]
pub struct Project {
    pub id: ProjectId,
    /// Unique across projects.
    pub name: Name,
    pub description: String,
    pub created_by: Option<UserId>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// A user's membership of a project, with the user's email and name for display.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub project_id: ProjectId,
    pub user_id: UserId,
    pub email: Email,
    pub name: Name,
    pub added_at: Timestamp,
}

/// Changes to a project; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct ProjectPatch {
    pub name: Option<Name>,
    pub description: Option<String>,
}

const PROJECT_CONFLICT: &str = "a project with this name already exists";

impl Store {
    /// Creates the project and, in the same transaction, makes `creator_member` (user, added at)
    /// its first member.
    pub async fn create_project(
        &self,
        project: &Project,
        creator_member: Option<(UserId, Timestamp)>,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let words =
            Violations { conflict: PROJECT_CONFLICT, reference: "the creator does not exist" };
        let mut tx = self.begin_write().await?;
        self.note_write();
        sqlx::query(
            "INSERT INTO projects (id, name, description, created_by, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(project.id.to_string())
        .bind(project.name.as_str())
        .bind(&project.description)
        .bind(project.created_by.map(|id| id.to_string()))
        .bind(ms(project.created_at))
        .bind(ms(project.updated_at))
        .execute(&mut *tx)
        .await
        .map_err(|e| StoreError::from_sqlx(e, words))?;
        if let Some((user, added_at)) = creator_member {
            self.note_write();
            sqlx::query(
                "INSERT INTO project_members (project_id, user_id, added_at) VALUES ($1, $2, $3)",
            )
            .bind(project.id.to_string())
            .bind(user.to_string())
            .bind(ms(added_at))
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, words))?;
        }
        self.append_in(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn project(&self, id: ProjectId) -> Result<Option<Project>, StoreError> {
        let row: Option<ProjectRow> =
            sqlx::query_as(&format!("SELECT {PROJECT_COLUMNS} FROM projects WHERE id = $1"))
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await?;
        row.map(Project::try_from).transpose()
    }

    /// All projects (`visible_to` None), or those a user can see: where they are a member or
    /// hold a project grant, as the authorization policy decides visibility.
    pub async fn list_projects(
        &self,
        visible_to: Option<UserId>,
        after: Option<&Cursor>,
        limit: PageLimit,
    ) -> Result<Page<Project>, StoreError> {
        let rows: Vec<ProjectRow> = match visible_to {
            None => {
                sqlx::query_as(&format!(
                    "SELECT {PROJECT_COLUMNS} FROM projects WHERE id > $1 ORDER BY id LIMIT $2"
                ))
                .bind(after_key(after))
                .bind(overfetch(limit))
                .fetch_all(&self.pool)
                .await?
            }
            Some(user) => {
                sqlx::query_as(&format!(
                    "SELECT {PROJECT_COLUMNS} FROM projects WHERE id > $1 \
                     AND (id IN (SELECT project_id FROM project_members WHERE user_id = $3) \
                          OR id IN (SELECT project_id FROM grants \
                                 WHERE user_id = $3 AND project_id IS NOT NULL)) \
                     ORDER BY id LIMIT $2"
                ))
                .bind(after_key(after))
                .bind(overfetch(limit))
                .bind(user.to_string())
                .fetch_all(&self.pool)
                .await?
            }
        };
        let projects = rows.into_iter().map(Project::try_from).collect::<Result<Vec<_>, _>>()?;
        Ok(Page::from_overfetch(projects, limit, |p| p.id.to_string()))
    }

    /// Applies `patch`; `None` (and no audit record) if there is no such project.
    pub async fn update_project(
        &self,
        id: ProjectId,
        patch: &ProjectPatch,
        now: Timestamp,
        audit: &AuditEvent,
    ) -> Result<Option<Project>, StoreError> {
        let sql = format!(
            "UPDATE projects SET name = COALESCE($2, name), \
             description = COALESCE($3, description), updated_at = $4 \
             WHERE id = $1 RETURNING {PROJECT_COLUMNS}"
        );
        let update = sqlx::query_as::<_, ProjectRow>(&sql)
            .bind(id.to_string())
            .bind(patch.name.as_ref().map(|n| n.as_str().to_owned()))
            .bind(patch.description.clone())
            .bind(ms(now));
        let words = Violations { conflict: PROJECT_CONFLICT, ..Violations::GENERIC };
        self.update_audited(update, words, audit).await
    }

    /// Deletes the project with its members, API keys and project grants; false (and no audit
    /// record) if there was no such project. Reference while endpoints remain in the project:
    /// they hold GPUs on a cluster, so they are stopped and deleted first, never swept away.
    pub async fn delete_project(
        &self,
        id: ProjectId,
        audit: &AuditEvent,
    ) -> Result<bool, StoreError> {
        let delete = sqlx::query("DELETE FROM projects WHERE id = $1").bind(id.to_string());
        let words = Violations {
            reference: "the project still has endpoints; delete them first",
            ..Violations::GENERIC
        };
        self.delete_audited(delete, words, audit).await
    }

    /// Conflict when the user is already a member; Reference when the user or project is missing.
    pub async fn add_member(
        &self,
        project: ProjectId,
        user: UserId,
        now: Timestamp,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let insert = sqlx::query(
            "INSERT INTO project_members (project_id, user_id, added_at) VALUES ($1, $2, $3)",
        )
        .bind(project.to_string())
        .bind(user.to_string())
        .bind(ms(now));
        let words = Violations {
            conflict: "the user is already a member",
            reference: "user or project does not exist",
        };
        self.insert_audited(insert, words, audit).await
    }

    /// False (and no audit record) if the user was not a member.
    pub async fn remove_member(
        &self,
        project: ProjectId,
        user: UserId,
        audit: &AuditEvent,
    ) -> Result<bool, StoreError> {
        let delete =
            sqlx::query("DELETE FROM project_members WHERE project_id = $1 AND user_id = $2")
                .bind(project.to_string())
                .bind(user.to_string());
        self.delete_audited(delete, Violations::GENERIC, audit).await
    }

    /// A project's members ordered by user id; the cursor is the last user id.
    pub async fn members(
        &self,
        project: ProjectId,
        after: Option<&Cursor>,
        limit: PageLimit,
    ) -> Result<Page<Member>, StoreError> {
        let rows: Vec<MemberRow> = sqlx::query_as(
            "SELECT m.project_id, m.user_id, u.email, u.name, m.added_at \
             FROM project_members m JOIN users u ON u.id = m.user_id \
             WHERE m.project_id = $1 AND m.user_id > $2 ORDER BY m.user_id LIMIT $3",
        )
        .bind(project.to_string())
        .bind(after_key(after))
        .bind(overfetch(limit))
        .fetch_all(&self.pool)
        .await?;
        let members = rows.into_iter().map(Member::try_from).collect::<Result<Vec<_>, _>>()?;
        Ok(Page::from_overfetch(members, limit, |m| m.user_id.to_string()))
    }

    /// The projects a user is a member of (not those reached only through grants).
    pub async fn memberships_of(&self, user: UserId) -> Result<Vec<ProjectId>, StoreError> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT project_id FROM project_members WHERE user_id = $1 ORDER BY project_id",
        )
        .bind(user.to_string())
        .fetch_all(&self.pool)
        .await?;
        ids.iter().map(|id| stored("project_members.project_id", id.parse())).collect()
    }
}

const PROJECT_COLUMNS: &str = "id, name, description, created_by, created_at, updated_at";

#[derive(sqlx::FromRow)]
struct ProjectRow {
    id: String,
    name: String,
    description: String,
    created_by: Option<String>,
    created_at: i64,
    updated_at: i64,
}

impl TryFrom<ProjectRow> for Project {
    type Error = StoreError;

    fn try_from(row: ProjectRow) -> Result<Self, StoreError> {
        Ok(Project {
            id: stored("projects.id", row.id.parse())?,
            name: stored("projects.name", Name::parse("name", &row.name))?,
            description: row.description,
            created_by: stored("projects.created_by", opt_parse(row.created_by.as_deref()))?,
            created_at: stored("projects.created_at", timestamp(row.created_at))?,
            updated_at: stored("projects.updated_at", timestamp(row.updated_at))?,
        })
    }
}

#[derive(sqlx::FromRow)]
struct MemberRow {
    project_id: String,
    user_id: String,
    email: String,
    name: String,
    added_at: i64,
}

impl TryFrom<MemberRow> for Member {
    type Error = StoreError;

    fn try_from(row: MemberRow) -> Result<Self, StoreError> {
        Ok(Member {
            project_id: stored("project_members.project_id", row.project_id.parse())?,
            user_id: stored("project_members.user_id", row.user_id.parse())?,
            email: stored("users.email", Email::parse("email", &row.email))?,
            name: stored("users.name", Name::parse("name", &row.name))?,
            added_at: stored("project_members.added_at", timestamp(row.added_at))?,
        })
    }
}
