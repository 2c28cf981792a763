//! `GET /internal/gateway/config`: budgateway's configuration for a gateway running apart from
//! the control plane. Internal: callers present the shared gateway token rather than a user's
//! token, so it is outside the OpenAPI document and the authorization matrix, and it is served
//! only when `gateway_token` is configured.
//!
//! Gateways poll it every second with the version they hold (`?since=`); while nothing changed
//! the answer is an empty 304 after one indexed read.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::convert;
use crate::error::{ApiError, ApiResult};
use crate::extract::ApiQuery;
use crate::state::AppState;

/// Where the route is mounted.
pub const PATH: &str = "/internal/gateway/config";

#[derive(Debug, Default, Deserialize)]
pub struct ConfigQuery {
    /// The version the gateway holds.
    pub since: Option<u64>,
}

/// The configuration, or 304 when it is still at `since`.
pub async fn gateway_config(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<ConfigQuery>,
) -> ApiResult<Response> {
    let Some(expected) = state.config.gateway_token.as_deref().filter(|t| !t.is_empty()) else {
        return Err(ApiError::Refused(
            "the gateway configuration is not served: set gateway_token in budapp's configuration"
                .into(),
        ));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !same_secret(presented, expected) {
        return Err(ApiError::unauthenticated(
            "invalid_gateway_token",
            "present the gateway token as `Authorization: Bearer <token>`",
        ));
    }
    if let Some(since) = q.since
        && state.store.config_version().await? == since
    {
        return Ok(StatusCode::NOT_MODIFIED.into_response());
    }
    let config = state.store.gateway_config().await?;
    Ok(axum::Json(convert::gateway_config(config)).into_response())
}

/// Compares digests rather than the strings, so the time taken says nothing about how much of
/// the token a guess got right.
fn same_secret(presented: &str, expected: &str) -> bool {
    Sha256::digest(presented.as_bytes()) == Sha256::digest(expected.as_bytes())
}
