//! Every HTTP error of the API and its status code, in one place.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::schemas::{ErrorBody, ValidationDetail, ValidationErrorBody};
use crate::engine::{EngineError, QueueFull};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 422 with FastAPI's `{"detail": [...]}`.
    #[error("validation failed")]
    Validation(Vec<ValidationDetail>),
    /// 503 `{"detail": "Model not loaded"}`, as the original.
    #[error("Model not loaded")]
    ModelNotLoaded,
    /// 503 with `Retry-After`, the queue depth and capacity.
    #[error("queue full")]
    QueueFull { full: QueueFull, retry_after: u64 },
    /// 503 while shutting down.
    #[error("server is shutting down")]
    Draining,
    /// 500: a bug or a dead worker.
    #[error("{0}")]
    Internal(String),
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

fn detail(detail: impl Into<String>) -> ErrorBody {
    ErrorBody {
        detail: detail.into(),
        queue_depth: None,
        max_queue: None,
        request_id: None,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Validation(errors) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(ValidationErrorBody { detail: errors }),
            )
                .into_response(),
            ApiError::ModelNotLoaded => (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(detail("Model not loaded")),
            )
                .into_response(),
            ApiError::Draining => (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(detail("Server is shutting down")),
            )
                .into_response(),
            ApiError::QueueFull { full, retry_after } => {
                let body = ErrorBody {
                    detail: format!(
                        "Queue full: {} of {} places taken, retry later",
                        full.depth, full.capacity
                    ),
                    queue_depth: Some(full.depth),
                    max_queue: Some(full.capacity),
                    request_id: None,
                };
                let mut resp = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
                resp
            }
            ApiError::Internal(msg) => {
                tracing::error!(error = %msg, "internal error");
                (StatusCode::INTERNAL_SERVER_ERROR, Json(detail(msg))).into_response()
            }
        }
    }
}
