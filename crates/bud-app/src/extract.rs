//! Extractors of our own, so malformed input gets the control plane's error shape rather than a
//! framework default, and list queries are parsed once.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use bud_domain::{Cursor, PageLimit};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// JSON body; a body that does not parse is a 400 that quotes serde's reason.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(rejection) => Err(ApiError::BadRequest(match rejection {
                JsonRejection::MissingJsonContentType(_) => {
                    "send the body as JSON with `Content-Type: application/json`".to_owned()
                }
                other => format!("the request body is not valid: {}", other.body_text()),
            })),
        }
    }
}

/// Query string; a bad one is a 400 naming the problem.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Self(q.0))
            .map_err(|e: QueryRejection| {
                ApiError::BadRequest(format!("the query string is not valid: {}", e.body_text()))
            })
    }
}

/// One UUID path segment (`/projects/{id}`), or two (`/projects/{id}/members/{user_id}`).
#[derive(Debug, Clone, Copy)]
pub struct IdPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for IdPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state).await.map(|p| Self(p.0)).map_err(
            |_: PathRejection| ApiError::BadRequest("ids in the path must be UUIDs".into()),
        )
    }
}

/// `?cursor=…&limit=…` of every list.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Items per page, 1 to 200 (default 50).
    pub limit: Option<u32>,
}

impl PageQuery {
    pub fn parse(&self) -> Result<(Option<Cursor>, PageLimit), ApiError> {
        let cursor = self.cursor.as_deref().map(Cursor::parse).transpose()?;
        Ok((cursor, PageLimit::parse(self.limit)?))
    }
}

/// The client's IP address as the listener saw it, or `unknown` when served without one (tests
/// calling the router in-process).
#[derive(Debug, Clone)]
pub struct ClientAddress(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddress {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>();
        Ok(Self(peer.map(|p| p.0.ip().to_string()).unwrap_or_else(|| "unknown".into())))
    }
}
