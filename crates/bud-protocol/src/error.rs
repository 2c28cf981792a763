//! The control plane's error envelope.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Every 4xx and 5xx body of the control plane.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable code, e.g. `token_expired`, `permission_denied`.
    pub code: String,
    /// What went wrong and, for 4xx, what to change.
    pub message: String,
    /// The `x-request-id` of the request, to find it in the logs.
    pub request_id: String,
    /// The request field at fault, for validation errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}
