//! Roles, permissions and the authorization policy: one pure function decides every access.
//!
//! A permission is `<module>:<view|manage>`; `manage` implies `view`. Modules `endpoint` and `key`
//! live inside projects, so their permissions hold per project; the others are platform-wide.
//! A caller who cannot see a project gets "not found" for everything in it, so ids do not leak.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{ProjectId, UserId, ValidationError};

/// A user's platform role; each role carries a fixed set of permissions (see [`Role::permissions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Developer,
    Devops,
    Tester,
}

/// A part of the platform that permissions are about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Module {
    Model,
    Project,
    Cluster,
    User,
    Endpoint,
    Key,
}

/// How much a permission allows; `Manage` implies `View`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    View,
    Manage,
}

/// `<module>:<access>`, written that way on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Permission {
    pub module: Module,
    pub access: Access,
}

/// A permission granted to a user on top of their role; project-scoped modules name the project.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Grant {
    permission: Permission,
    /// Set exactly when the module is project-scoped (endpoint, key).
    project_id: Option<ProjectId>,
}

/// What the policy knows about the caller: role, explicit grants and project memberships.
#[derive(Debug, Clone)]
pub struct Subject {
    pub user_id: UserId,
    pub role: Role,
    pub grants: Vec<Grant>,
    pub projects: HashSet<ProjectId>,
}

/// Where an access happens: platform-wide, or inside one project.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Platform,
    Project(ProjectId),
}

/// The policy's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// The caller sees the target but lacks this permission: 403 naming it.
    Forbidden(Permission),
    /// The target is in a project the caller cannot see: 404, so its existence does not leak.
    NotFound,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Admin, Role::Developer, Role::Devops, Role::Tester];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Developer => "developer",
            Role::Devops => "devops",
            Role::Tester => "tester",
        }
    }

    /// The permissions a role carries. Admin carries everything and sees every project; the
    /// others hold project-scoped permissions only in projects they are members of.
    pub fn permissions(self) -> &'static [Permission] {
        use Access::{Manage, View};
        use Module::*;
        const fn p(module: Module, access: Access) -> Permission {
            Permission { module, access }
        }
        const ADMIN: &[Permission] = &[
            p(Model, Manage),
            p(Project, Manage),
            p(Cluster, Manage),
            p(User, Manage),
            p(Endpoint, Manage),
            p(Key, Manage),
        ];
        const DEVELOPER: &[Permission] = &[
            p(Model, Manage),
            p(Project, Manage),
            p(Cluster, View),
            p(Endpoint, Manage),
            p(Key, Manage),
        ];
        const DEVOPS: &[Permission] = &[
            p(Model, View),
            p(Project, View),
            p(Cluster, Manage),
            p(User, View),
            p(Endpoint, Manage),
            p(Key, View),
        ];
        const TESTER: &[Permission] =
            &[p(Model, View), p(Project, View), p(Endpoint, View), p(Key, View)];
        match self {
            Role::Admin => ADMIN,
            Role::Developer => DEVELOPER,
            Role::Devops => DEVOPS,
            Role::Tester => TESTER,
        }
    }
}

impl Module {
    pub const ALL: [Module; 6] = [
        Module::Model,
        Module::Project,
        Module::Cluster,
        Module::User,
        Module::Endpoint,
        Module::Key,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Module::Model => "model",
            Module::Project => "project",
            Module::Cluster => "cluster",
            Module::User => "user",
            Module::Endpoint => "endpoint",
            Module::Key => "key",
        }
    }

    /// Endpoints and keys belong to a project; their permissions hold per project.
    pub fn is_project_scoped(self) -> bool {
        matches!(self, Module::Endpoint | Module::Key)
    }
}

impl Access {
    pub const ALL: [Access; 2] = [Access::View, Access::Manage];

    pub fn as_str(self) -> &'static str {
        match self {
            Access::View => "view",
            Access::Manage => "manage",
        }
    }
}

str_enum!(Role, "role");
str_enum!(Module, "module");
str_enum!(Access, "access");

impl Permission {
    pub const fn new(module: Module, access: Access) -> Self {
        Self { module, access }
    }

    /// Whether holding `self` allows what `needed` asks: same module, and manage covers view.
    pub fn implies(self, needed: Permission) -> bool {
        self.module == needed.module
            && (self.access == Access::Manage || needed.access == Access::View)
    }

    pub fn parse(field: &str, s: &str) -> Result<Self, ValidationError> {
        let err = || {
            ValidationError::new(
                field,
                "must be <module>:<view|manage> with module one of model, project, cluster, user, endpoint, key",
            )
        };
        let (m, a) = s.split_once(':').ok_or_else(err)?;
        Ok(Self { module: m.parse().map_err(|_| err())?, access: a.parse().map_err(|_| err())? })
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.module, self.access)
    }
}

impl FromStr for Permission {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse("permission", s)
    }
}

impl Serialize for Permission {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Permission {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Grant {
    /// A grant must name a project exactly when its module is project-scoped.
    pub fn new(
        permission: Permission,
        project_id: Option<ProjectId>,
    ) -> Result<Self, ValidationError> {
        match (permission.module.is_project_scoped(), project_id) {
            (true, None) => Err(ValidationError::new(
                "project_id",
                format!("is required: {} permissions are granted per project", permission.module),
            )),
            (false, Some(_)) => Err(ValidationError::new(
                "project_id",
                format!("must be absent: {} permissions are platform-wide", permission.module),
            )),
            _ => Ok(Self { permission, project_id }),
        }
    }

    pub fn permission(&self) -> Permission {
        self.permission
    }

    pub fn project_id(&self) -> Option<ProjectId> {
        self.project_id
    }
}

impl Subject {
    /// The single authorization decision: may this subject do `needed` at `target`?
    pub fn decide(&self, needed: Permission, target: Target) -> Decision {
        if self.role == Role::Admin {
            return Decision::Allow;
        }
        let from_role = self.role.permissions().iter().any(|p| p.implies(needed));
        let platform_grant =
            self.grants.iter().any(|g| g.project_id.is_none() && g.permission.implies(needed));
        match target {
            Target::Platform => {
                // Project-scoped modules across all projects are for admins only.
                if !needed.module.is_project_scoped() && (from_role || platform_grant) {
                    Decision::Allow
                } else {
                    Decision::Forbidden(needed)
                }
            }
            Target::Project(project) => {
                let member = self.projects.contains(&project);
                let project_grants =
                    || self.grants.iter().filter(|g| g.project_id == Some(project));
                if !member && project_grants().next().is_none() {
                    return Decision::NotFound;
                }
                let allowed = if needed.module.is_project_scoped() {
                    (from_role && member) || project_grants().any(|g| g.permission.implies(needed))
                } else {
                    from_role || platform_grant
                };
                if allowed { Decision::Allow } else { Decision::Forbidden(needed) }
            }
        }
    }

    /// Every permission the subject holds platform-wide (role and grants), for display.
    pub fn platform_permissions(&self) -> Vec<Permission> {
        let mut all: Vec<Permission> = self
            .role
            .permissions()
            .iter()
            .copied()
            .chain(self.grants.iter().filter(|g| g.project_id.is_none()).map(|g| g.permission))
            .collect();
        all.sort();
        all.dedup();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn subject(role: Role, member_of: &[ProjectId], grants: Vec<Grant>) -> Subject {
        Subject {
            user_id: UserId::new(),
            role,
            grants,
            projects: member_of.iter().copied().collect(),
        }
    }

    fn perm(s: &str) -> Permission {
        s.parse().unwrap()
    }

    #[test]
    fn permission_round_trips_and_rejects_junk() {
        assert_eq!(perm("endpoint:manage").to_string(), "endpoint:manage");
        for bad in ["", "model", "model:edit", "gpu:view", ":view"] {
            assert!(Permission::parse("permission", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn manage_implies_view_only_within_module() {
        assert!(perm("model:manage").implies(perm("model:view")));
        assert!(!perm("model:view").implies(perm("model:manage")));
        assert!(!perm("model:manage").implies(perm("cluster:view")));
    }

    #[test]
    fn grants_must_match_module_scope() {
        let p = ProjectId::new();
        assert!(Grant::new(perm("endpoint:view"), None).is_err());
        assert!(Grant::new(perm("model:view"), Some(p)).is_err());
        assert!(Grant::new(perm("key:manage"), Some(p)).is_ok());
    }

    #[test]
    fn foreign_project_is_not_found_and_own_project_is_checked() {
        let mine = ProjectId::new();
        let theirs = ProjectId::new();
        let tester = subject(Role::Tester, &[mine], vec![]);
        assert_eq!(tester.decide(perm("key:view"), Target::Project(mine)), Decision::Allow);
        assert_eq!(
            tester.decide(perm("key:manage"), Target::Project(mine)),
            Decision::Forbidden(perm("key:manage"))
        );
        assert_eq!(tester.decide(perm("key:view"), Target::Project(theirs)), Decision::NotFound);
    }

    #[test]
    fn project_grant_gives_access_without_role_permission() {
        let p = ProjectId::new();
        let g = Grant::new(perm("key:manage"), Some(p)).unwrap();
        let tester = subject(Role::Tester, &[], vec![g]);
        assert_eq!(tester.decide(perm("key:manage"), Target::Project(p)), Decision::Allow);
        assert_eq!(
            tester.decide(perm("key:manage"), Target::Project(ProjectId::new())),
            Decision::NotFound
        );
    }

    proptest! {
        #[test]
        fn admin_is_allowed_everything(m in 0usize..6, a in 0usize..2, scoped in any::<bool>()) {
            let admin = subject(Role::Admin, &[], vec![]);
            let target = if scoped { Target::Project(ProjectId::new()) } else { Target::Platform };
            prop_assert_eq!(admin.decide(Permission::new(Module::ALL[m], Access::ALL[a]), target), Decision::Allow);
        }

        #[test]
        fn non_members_never_see_inside_projects(r in 1usize..4, m in 0usize..6, a in 0usize..2) {
            let s = subject(Role::ALL[r], &[ProjectId::new()], vec![]);
            let d = s.decide(Permission::new(Module::ALL[m], Access::ALL[a]), Target::Project(ProjectId::new()));
            prop_assert_eq!(d, Decision::NotFound);
        }
    }
}
