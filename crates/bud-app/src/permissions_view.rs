//! What a user may do, as `GET /permissions` and `GET /me/permissions` show it: the role's
//! permissions, explicit grants, and the effective project-scoped permissions per project.

use bud_domain::{Access, Decision, Module, Permission, ProjectId, Target};
use bud_protocol::control::{PermissionsDto, ProjectPermissionsDto};
use bud_store::User;

use crate::convert;
use crate::error::ApiResult;
use crate::identity::subject_of;
use crate::state::AppState;

pub async fn of_user(state: &AppState, user: &User) -> ApiResult<PermissionsDto> {
    let subject = subject_of(state, user).await?;
    let grants = state.store.grants_of(user.id).await?;
    let mut projects: Vec<ProjectId> = subject.projects.iter().copied().collect();
    projects.extend(grants.iter().filter_map(|g| g.grant.project_id()));
    projects.sort();
    projects.dedup();
    let scoped: Vec<Permission> = Module::ALL
        .into_iter()
        .filter(|m| m.is_project_scoped())
        .flat_map(|m| Access::ALL.map(|a| Permission::new(m, a)))
        .collect();
    let per_project = projects
        .into_iter()
        .map(|p| ProjectPermissionsDto {
            project_id: p.as_uuid(),
            permissions: scoped
                .iter()
                .filter(|perm| subject.decide(**perm, Target::Project(p)) == Decision::Allow)
                .map(ToString::to_string)
                .collect(),
        })
        .collect();
    Ok(PermissionsDto {
        user_id: user.id.as_uuid(),
        role: user.role.to_string(),
        role_permissions: user.role.permissions().iter().map(ToString::to_string).collect(),
        platform: subject.platform_permissions().iter().map(ToString::to_string).collect(),
        grants: grants.into_iter().map(convert::grant).collect(),
        projects: per_project,
    })
}
