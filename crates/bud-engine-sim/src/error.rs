//! The simulator's one error type, and its HTTP face: vLLM's error body
//! `{"object":"error","message","type","param":null,"code"}`.
//!
//! Error types are the OpenAI SDK's exception names, which is what vLLM puts there.

use std::io;
use std::net::SocketAddr;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Why a request or the engine itself failed.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The body is not a request this route takes, or asks for something the model cannot do
    /// (zero tokens, more than the context window).
    #[error("{0}")]
    BadRequest(String),

    /// A fault set (from the command line or `POST /sim/faults`) that makes no sense.
    #[error("invalid faults: {0}")]
    InvalidFaults(String),

    /// The request names a model this engine does not serve.
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),

    /// The error-rate fault picked this request.
    #[error("simulated engine error (error-rate fault)")]
    Injected {
        /// The configured `error_status`.
        status: StatusCode,
    },

    /// The cut-stream-after fault ended a stream; the server drops the connection.
    #[error("stream cut (cut-stream-after fault)")]
    StreamCut,

    /// The engine is stopping; a hung request is let go with this.
    #[error("the engine is shutting down")]
    ShuttingDown,

    /// The fail-start fault: the engine never listens.
    #[error("simulated start failure (fail-start fault)")]
    FailStart,

    /// The crash-after fault fired.
    #[error("simulated crash after {completed} completed requests (crash-after fault)")]
    Crashed {
        /// Requests completed before the crash.
        completed: u64,
    },

    /// After the start delay the engine could not listen on its address again.
    #[error("could not listen on {addr} after the start delay")]
    Relisten {
        /// The address the caller's listener had.
        addr: SocketAddr,
        /// Why binding failed.
        #[source]
        source: io::Error,
    },
}

impl SimError {
    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) | Self::InvalidFaults(_) => StatusCode::BAD_REQUEST,
            Self::ModelNotFound(_) => StatusCode::NOT_FOUND,
            Self::Injected { status } => *status,
            Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::StreamCut | Self::FailStart | Self::Crashed { .. } | Self::Relisten { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// Turns a start-up or crash error into what [`crate::run`] returns.
    pub(crate) fn into_io(self) -> io::Error {
        io::Error::other(self)
    }
}

/// The `type` field for a status, as the OpenAI SDK names its exceptions.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "AuthenticationError",
        403 => "PermissionDeniedError",
        404 => "NotFoundError",
        409 => "ConflictError",
        422 => "UnprocessableEntityError",
        429 => "RateLimitError",
        400..=499 => "BadRequestError",
        _ => "InternalServerError",
    }
}

/// vLLM's error body.
#[derive(Serialize)]
struct ErrorBody<'a> {
    object: &'static str,
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<()>,
    code: u16,
}

impl IntoResponse for SimError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = self.to_string();
        let body = ErrorBody {
            object: "error",
            message: &message,
            kind: error_type(status),
            param: None,
            code: status.as_u16(),
        };
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
