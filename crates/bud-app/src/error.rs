//! The control plane's error registry: every failure a handler can return, its HTTP status and
//! its stable code, rendered as `{"error": {"code", "message", "request_id", "field"}}`.
//!
//! 4xx messages say what to change. 5xx bodies are opaque; their cause is logged here, once,
//! with the request id.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bud_domain::{Permission, ValidationError};
use bud_protocol::{ErrorBody, ErrorDetail};
use bud_store::StoreError;

use bud_telemetry::current_request_id;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request could not be read: malformed JSON, wrong content type, bad query string.
    #[error("{0}")]
    BadRequest(String),
    /// A field's value does not fit; the field is named.
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// No valid credentials; `code` is the reason (`token_expired`, `malformed`, ...).
    #[error("{message}")]
    Unauthenticated { code: &'static str, message: String },
    /// The caller is known but lacks `permission`; `scope` says where it was needed.
    #[error("missing permission {permission}{scope}")]
    Forbidden { permission: Permission, scope: String },
    /// A named action is refused for a reason other than a missing permission.
    #[error("{0}")]
    Refused(String),
    /// The resource does not exist, or lies in a project the caller cannot see.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The change collides with existing state (a duplicate name, a member already added).
    #[error("{0}")]
    Conflict(String),
    /// Too many attempts; retry after the given time.
    #[error("{message}")]
    RateLimited { message: String, retry_after: Duration },
    /// A dependency (the database, budcluster) is unreachable.
    #[error("{0}")]
    Unavailable(String),
    /// A named dependency is unreachable; `code` says which (`identity_provider_unavailable`).
    #[error("{message}")]
    DependencyUnavailable { code: &'static str, message: String },
    /// A bug or an unexpected failure; the body says nothing more than "internal error".
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    /// The registry: status and code of each variant.
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ApiError::Validation(_) => (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
            ApiError::Unauthenticated { code, .. } => (StatusCode::UNAUTHORIZED, code),
            ApiError::Forbidden { .. } => (StatusCode::FORBIDDEN, "permission_denied"),
            ApiError::Refused(_) => (StatusCode::FORBIDDEN, "action_refused"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable"),
            ApiError::DependencyUnavailable { code, .. } => (StatusCode::SERVICE_UNAVAILABLE, code),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        }
    }

    pub fn unauthenticated(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::Unauthenticated { code, message: message.into() }
    }

    pub fn forbidden_in_project(permission: Permission, project: impl std::fmt::Display) -> Self {
        ApiError::Forbidden { permission, scope: format!(" in project {project}") }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { what } => ApiError::Conflict(what),
            StoreError::Reference { what } => {
                ApiError::Validation(ValidationError::new("reference", what))
            }
            StoreError::Unavailable(source) => {
                tracing::warn!(error = %source, "database unavailable");
                ApiError::Unavailable("the database is unreachable; retry in a few seconds".into())
            }
            other => ApiError::Internal(anyhow::Error::new(other)),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let request_id = current_request_id();
        let (message, field) = match &self {
            ApiError::Internal(cause) => {
                tracing::error!(request_id = %request_id, error = ?cause, "internal error");
                ("internal error; quote the request id when reporting it".to_owned(), None)
            }
            ApiError::Validation(v) => (v.to_string(), Some(v.field.clone())),
            other => (other.to_string(), None),
        };
        let body =
            ErrorBody { error: ErrorDetail { code: code.to_owned(), message, request_id, field } };
        let mut response = (status, axum::Json(body)).into_response();
        match &self {
            ApiError::RateLimited { retry_after, .. } => {
                let secs = retry_after.as_secs().max(1);
                if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                    response.headers_mut().insert(header::RETRY_AFTER, v);
                }
            }
            ApiError::Unauthenticated { code, .. } => {
                let challenge =
                    format!("Bearer error=\"invalid_token\", error_description=\"{code}\"");
                if let Ok(v) = HeaderValue::from_str(&challenge) {
                    response.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
            }
            ApiError::Unavailable(_) | ApiError::DependencyUnavailable { .. } => {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
            }
            _ => {}
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
