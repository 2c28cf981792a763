//! Typed identifiers. Each id is a UUIDv7, so ids sort by creation time, which keyset pagination
//! relies on.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ValidationError;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $label:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A fresh, time-ordered id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            pub fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            pub fn as_uuid(&self) -> Uuid {
                self.0
            }

            /// Parses an id from outside input; the error names `field`.
            pub fn parse(field: &str, s: &str) -> Result<Self, ValidationError> {
                Uuid::parse_str(s).map(Self).map_err(|_| {
                    ValidationError::new(field, concat!("must be a ", $label, " id (a UUID)"))
                })
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = ValidationError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse("id", s)
            }
        }
    };
}

id_type!(
    /// A person or service account known to budapp.
    UserId, "user"
);
id_type!(
    /// A project: the unit of tenancy that owns endpoints and API keys.
    ProjectId, "project"
);
id_type!(
    /// A registered model.
    ModelId, "model"
);
id_type!(
    /// An external OpenAI-compatible provider.
    ProviderId, "provider"
);
id_type!(
    /// An API key for the gateway.
    ApiKeyId, "API key"
);
id_type!(
    /// An explicit permission grant on a user.
    GrantId, "grant"
);

id_type!(
    /// A registered cluster (Kubernetes, or this machine's `local` cluster).
    ClusterId, "cluster"
);
id_type!(
    /// A model endpoint: a model deployed with some replicas on a cluster.
    EndpointId, "endpoint"
);
id_type!(
    /// A gateway route: a public model name in a project and the targets it is served by.
    RouteId, "route"
);

/// Position of a record in the audit log's hash chain; the first record is 1.
pub type AuditSeq = i64;
