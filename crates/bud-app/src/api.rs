//! The route table: every handler, registered together with its OpenAPI description so the
//! document cannot drift from the routes. The one exception is budgateway's internal
//! configuration route ([`gateway_config`]), which users never call: it is mounted in
//! [`router`] beside the documented routes.

pub mod audit;
pub mod auth;
pub mod clusters;
pub mod endpoints;
pub mod gateway_config;
pub mod gateway_routes;
pub mod keys;
pub mod models;
pub mod projects;
pub mod system;
pub mod usage;
pub mod users;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiError;
use crate::state::AppState;
use bud_telemetry::request_context;

#[derive(OpenApi)]
#[openapi(
    info(title = "budapp", description = "Bud's control-plane API: identity, users, projects, RBAC, models, providers, API keys, clusters, endpoints, gateway routes, usage, audit."),
    modifiers(&BearerScheme),
)]
struct ApiDoc;

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build(),
            ),
        );
    }
}

/// All routes with their OpenAPI document.
pub fn routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(system::healthz))
        .routes(routes!(system::readyz))
        .routes(routes!(system::metrics))
        .routes(routes!(system::openid_configuration))
        .routes(routes!(system::jwks))
        .routes(routes!(auth::login))
        .routes(routes!(auth::refresh))
        .routes(routes!(auth::logout))
        .routes(routes!(auth::me))
        .routes(routes!(auth::my_permissions))
        .routes(routes!(users::list_users, users::create_user))
        .routes(routes!(users::get_user, users::update_user))
        .routes(routes!(users::get_permissions, users::grant_permission, users::revoke_permission))
        .routes(routes!(projects::list_projects, projects::create_project))
        .routes(routes!(projects::get_project, projects::update_project, projects::delete_project))
        .routes(routes!(projects::list_members, projects::add_member))
        .routes(routes!(projects::remove_member))
        .routes(routes!(keys::list_keys, keys::create_key))
        .routes(routes!(keys::get_key, keys::revoke_key))
        .routes(routes!(models::list_models, models::create_model))
        .routes(routes!(models::get_model, models::update_model, models::delete_model))
        .routes(routes!(models::list_providers, models::create_provider))
        .routes(routes!(models::get_provider, models::update_provider, models::delete_provider))
        .routes(routes!(clusters::list_clusters, clusters::create_cluster))
        .routes(routes!(clusters::get_cluster, clusters::delete_cluster))
        .routes(routes!(clusters::refresh_cluster))
        .routes(routes!(clusters::update_kubeconfig))
        .routes(routes!(endpoints::list_endpoints, endpoints::create_endpoint))
        .routes(routes!(
            endpoints::get_endpoint,
            endpoints::update_endpoint,
            endpoints::delete_endpoint
        ))
        .routes(routes!(endpoints::stop_endpoint))
        .routes(routes!(endpoints::start_endpoint))
        .routes(routes!(endpoints::retry_endpoint))
        .routes(routes!(endpoints::endpoint_logs))
        .routes(routes!(endpoints::endpoint_metrics))
        .routes(routes!(gateway_routes::list_routes, gateway_routes::create_route))
        .routes(routes!(
            gateway_routes::get_route,
            gateway_routes::update_route,
            gateway_routes::delete_route
        ))
        .routes(routes!(usage::usage_summary))
        .routes(routes!(audit::list_audit))
        .routes(routes!(audit::verify_audit))
        .split_for_parts()
}

/// The OpenAPI document alone (for `bud openapi` and tests).
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().1
}

/// budapp's whole HTTP surface with its middleware.
pub fn router(state: AppState) -> Router {
    let (routes, doc) = routes();
    let doc = Arc::new(doc);
    routes
        .route("/openapi.json", get(move || std::future::ready(axum::Json(doc.as_ref().clone()))))
        .route(gateway_config::PATH, get(gateway_config::gateway_config))
        .fallback(|| async { ApiError::NotFound("route") })
        .method_not_allowed_fallback(method_not_allowed)
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::Internal(anyhow::anyhow!("handler panicked")).into_response()
        }))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(30),
        ))
        .layer(middleware::from_fn(|req: Request, next: Next| request_context("budapp", req, next)))
        .with_state(state)
}

async fn method_not_allowed() -> Response {
    let mut r =
        ApiError::BadRequest("this method is not allowed on this route".into()).into_response();
    *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    r
}
