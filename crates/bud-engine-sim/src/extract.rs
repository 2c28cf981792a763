//! A JSON body extractor of our own, so a malformed body gets vLLM's 400 error body rather
//! than axum's plain-text rejection. Like vLLM (FastAPI), it parses the body whatever its
//! `Content-Type` says.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use crate::error::SimError;

/// A JSON request body; one that does not parse is a `BadRequestError` quoting serde.
#[derive(Debug, Clone, Copy, Default)]
pub struct SimJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for SimJson<T> {
    type Rejection = SimError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let body = Bytes::from_request(req, state)
            .await
            .map_err(|rejection| SimError::BadRequest(rejection.body_text()))?;
        serde_json::from_slice(&body)
            .map(Self)
            .map_err(|error| SimError::BadRequest(format!("invalid request body: {error}")))
    }
}
