//! Bud's domain vocabulary: identifiers, roles and permissions, the authorization policy and the
//! validated newtypes every other crate speaks in.
//!
//! This crate does no IO and has no async code; everything here is a value or a pure function.

/// Display and FromStr for a fieldless enum with `ALL` and `as_str`; the parse error lists the
/// accepted values.
macro_rules! str_enum {
    ($t:ty, $field:literal) => {
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $t {
            type Err = $crate::ValidationError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                <$t>::ALL.into_iter().find(|v| v.as_str() == s).ok_or_else(|| {
                    let all: Vec<_> = <$t>::ALL.iter().map(|v| v.as_str()).collect();
                    $crate::ValidationError::new(
                        $field,
                        format!("must be one of {}", all.join(", ")),
                    )
                })
            }
        }
    };
}

pub mod authz;
pub mod id;
pub mod lifecycle;
pub mod page;
pub mod resource;
pub mod validate;

pub use authz::{Access, Decision, Grant, Module, Permission, Role, Subject, Target};
pub use id::{
    ApiKeyId, AuditSeq, ClusterId, EndpointId, GrantId, ModelId, ProjectId, ProviderId, RouteId,
    UserId,
};
pub use lifecycle::{ClusterStatus, EndpointCommand, EndpointStatus, FailureReason};
pub use page::{Cursor, Page, PageLimit};
pub use resource::{Engine, Modality};
pub use validate::{Email, Name, SourceUri, ValidationError};

/// Wall-clock time as every crate records it: UTC, millisecond precision in storage.
pub type Timestamp = chrono::DateTime<chrono::Utc>;
