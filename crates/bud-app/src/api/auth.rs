//! `/auth/*` (the built-in issuer) and `/me`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use bud_protocol::ErrorBody;
use bud_protocol::control::{LoginRequest, PermissionsDto, RefreshRequest, TokenResponse, UserDto};

use crate::error::ApiResult;
use crate::extract::{ApiJson, ClientAddress};
use crate::identity::{self, Caller, IssuedTokens};
use crate::state::AppState;
use crate::{convert, permissions_view};

fn token_response(t: IssuedTokens) -> Json<TokenResponse> {
    Json(TokenResponse {
        access_token: t.access_token,
        token_type: "Bearer".into(),
        expires_in: t.expires_in,
        refresh_token: t.refresh_token,
    })
}

/// Log in with email and password (built-in identity). Rate-limited per account and address.
#[utoipa::path(post, path = "/auth/login", tag = "identity", request_body = LoginRequest,
    responses((status = 200, body = TokenResponse), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn login(
    State(state): State<AppState>,
    ClientAddress(address): ClientAddress,
    ApiJson(req): ApiJson<LoginRequest>,
) -> ApiResult<Json<TokenResponse>> {
    identity::login(&state, &req.email, &req.password, &address).await.map(token_response)
}

/// Exchange a refresh token for new tokens. Each refresh token works once.
#[utoipa::path(post, path = "/auth/refresh", tag = "identity", request_body = RefreshRequest,
    responses((status = 200, body = TokenResponse), (status = 401, body = ErrorBody)))]
pub async fn refresh(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<RefreshRequest>,
) -> ApiResult<Json<TokenResponse>> {
    identity::refresh(&state, &req.refresh_token).await.map(token_response)
}

/// End the session the refresh token belongs to.
#[utoipa::path(post, path = "/auth/logout", tag = "identity", request_body = RefreshRequest,
    responses((status = 204), (status = 400, body = ErrorBody)))]
pub async fn logout(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<RefreshRequest>,
) -> ApiResult<StatusCode> {
    identity::logout(&state, &req.refresh_token).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The calling user.
#[utoipa::path(get, path = "/me", tag = "identity", security(("bearer" = [])),
    responses((status = 200, body = UserDto), (status = 401, body = ErrorBody)))]
pub async fn me(caller: Caller) -> Json<UserDto> {
    Json(convert::user(caller.user))
}

/// The calling user's permissions.
#[utoipa::path(get, path = "/me/permissions", tag = "identity", security(("bearer" = [])),
    responses((status = 200, body = PermissionsDto), (status = 401, body = ErrorBody)))]
pub async fn my_permissions(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<PermissionsDto>> {
    permissions_view::of_user(&state, &caller.user).await.map(Json)
}
