//! Health, readiness, metrics, the OpenAPI document and OpenID discovery: the unauthenticated
//! surface.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use bud_protocol::control::HealthDto;

use crate::state::AppState;

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "system", responses((status = 200, body = HealthDto)))]
pub async fn healthz() -> Json<HealthDto> {
    Json(HealthDto { status: "ok".into(), checks: Default::default() })
}

/// Readiness: false (503) while the database cannot be reached.
#[utoipa::path(get, path = "/readyz", tag = "system",
    responses((status = 200, body = HealthDto), (status = 503, body = HealthDto)))]
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let db = tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await;
    let (status, db_check) = match db {
        Ok(Ok(())) => (StatusCode::OK, "ok".to_owned()),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("unreachable: {e}")),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "unreachable: no answer within 2s".to_owned()),
    };
    let mut checks = serde_json::Map::new();
    checks.insert("database".into(), db_check.into());
    let word = if status == StatusCode::OK { "ready" } else { "not_ready" };
    (status, Json(HealthDto { status: word.into(), checks }))
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "system", responses((status = 200, body = String, content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let (size, idle) = state.store.pool_stats();
    metrics::gauge!("db_pool_connections", "service" => "budapp", "state" => "open")
        .set(size as f64);
    metrics::gauge!("db_pool_connections", "service" => "budapp", "state" => "idle")
        .set(idle as f64);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

/// OpenID Connect discovery for the built-in issuer.
#[utoipa::path(get, path = "/.well-known/openid-configuration", tag = "identity",
    responses((status = 200, body = Object), (status = 404, body = bud_protocol::ErrorBody)))]
pub async fn openid_configuration(
    State(state): State<AppState>,
) -> crate::error::ApiResult<Json<serde_json::Value>> {
    state.issuer.as_ref().ok_or(crate::error::ApiError::NotFound("discovery document"))?;
    let base = state.config.public_url.trim_end_matches('/');
    Ok(Json(bud_auth::jwt::discovery_document(
        &state.config.public_url,
        &format!("{base}/.well-known/jwks.json"),
        &format!("{base}/auth/login"),
    )))
}

/// The built-in issuer's public keys.
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "identity",
    responses((status = 200, body = Object), (status = 404, body = bud_protocol::ErrorBody)))]
pub async fn jwks(State(state): State<AppState>) -> crate::error::ApiResult<impl IntoResponse> {
    let set = state.public_jwks.clone().ok_or(crate::error::ApiError::NotFound("key set"))?;
    Ok(([(header::CACHE_CONTROL, "public, max-age=300")], Json(set)))
}
