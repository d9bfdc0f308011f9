//! The body extractor: the raw body (already capped at `MAX_BODY_BYTES` by a layer, 413 past it)
//! validated into a request type, or the FastAPI-style 422.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::response::{IntoResponse, Response};

use super::errors::ApiError;
use super::validation::Validate;

/// A validated request body of type `T`.
pub struct Validated<T>(pub T);

impl<S, T> FromRequest<S> for Validated<T>
where
    S: Send + Sync,
    T: Validate,
{
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let body = Bytes::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
        T::validate(&body)
            .map(Validated)
            .map_err(|errors| ApiError::Validation(errors).into_response())
    }
}
