//! budcluster's own HTTP surface, for budapp when the services run apart: wake, logs and
//! metrics of endpoints, plus health, readiness and Prometheus metrics.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bud_domain::EndpointId;
use serde::Deserialize;

use crate::service::{ClusterError, ClusterService};

#[derive(Clone)]
struct Api {
    service: Arc<ClusterService>,
    store: bud_store::Store,
    token: Option<String>,
}

/// The router; `token`, when set, is required as `Authorization: Bearer` on `/internal/*`.
pub fn router(
    service: Arc<ClusterService>,
    store: bud_store::Store,
    token: Option<String>,
) -> Router {
    let api = Api { service, store, token };
    let internal = Router::new()
        .route("/internal/wake", post(wake))
        .route("/internal/endpoints/{id}/logs", get(logs))
        .route("/internal/endpoints/{id}/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(api.clone(), require_token));
    Router::new()
        .merge(internal)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(|| async { bud_telemetry::metrics_handle().render() }))
        .layer(middleware::from_fn(|req: Request, next: Next| {
            bud_telemetry::request_context("budcluster", req, next)
        }))
        .with_state(api)
}

async fn require_token(State(api): State<Api>, request: Request, next: Next) -> Response {
    if let Some(token) = &api.token {
        let presented = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        if presented != Some(format!("Bearer {token}").as_str()) {
            return (StatusCode::UNAUTHORIZED, "budcluster's internal API needs its token")
                .into_response();
        }
    }
    next.run(request).await
}

async fn wake(State(api): State<Api>) -> StatusCode {
    api.service.wake();
    StatusCode::ACCEPTED
}

#[derive(Deserialize)]
struct Tail {
    tail: Option<usize>,
}

async fn logs(
    State(api): State<Api>,
    Path(id): Path<uuid::Uuid>,
    Query(q): Query<Tail>,
) -> Response {
    match api.service.logs(EndpointId::from_uuid(id), q.tail.unwrap_or(200).min(10_000)).await {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response(),
        Err(e) => error(e),
    }
}

async fn metrics(State(api): State<Api>, Path(id): Path<uuid::Uuid>) -> Response {
    match api.service.metrics(EndpointId::from_uuid(id)).await {
        Ok(m) => axum::Json(m).into_response(),
        Err(e) => error(e),
    }
}

async fn readyz(State(api): State<Api>) -> Response {
    match api.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(e) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("database unreachable: {e}")).into_response()
        }
    }
}

fn error(e: ClusterError) -> Response {
    let status = match &e {
        ClusterError::NotFound(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, e.to_string()).into_response()
}
