//! Every HTTP error of the API and its status code, in one place: handlers and jobs return
//! [`ApiError`], and only its `IntoResponse` decides status, headers and body.
//!
//! Engine failures arrive typed ([`EngineError`]) and map here: not loaded, a lost device, out
//! of memory → 503 with `Retry-After` (the original's `{"detail": "Model not loaded"}` body is
//! kept for the first); invalid input → 422; a model-file problem or a bug → 500. Failures of
//! single items of a batch stay inside the 200 response (`success=false` per item), as in the
//! original; a request answers with an engine error's status only when the failure is about
//! the server (not loaded, device lost) and hit every item.

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
    /// 503 with `Retry-After`, the queue depth and capacity.
    #[error("queue full")]
    QueueFull { full: QueueFull, retry_after: u64 },
    /// 503 with `Retry-After`: the download stage (references, /upscale input) is full.
    #[error("download stage full")]
    DownloadsFull { full: QueueFull, retry_after: u64 },
    /// 503 while shutting down.
    #[error("server is shutting down")]
    Draining,
    /// What the GPU worker said, by cause (see the module doc for the mapping).
    #[error("{error}")]
    Engine {
        error: EngineError,
        retry_after: u64,
    },
    /// 500: a bug outside the engine.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The status of each error: the one table of the API's error codes.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::QueueFull { .. } | ApiError::DownloadsFull { .. } | ApiError::Draining => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Engine { error, .. } => match error {
                EngineError::NotLoaded
                | EngineError::DeviceLost(_)
                | EngineError::OutOfMemory(_)
                | EngineError::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
                EngineError::InvalidInput(_) => StatusCode::UNPROCESSABLE_ENTITY,
                EngineError::ModelFiles(_) | EngineError::Refused(_) | EngineError::Internal(_) => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            },
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Seconds for `Retry-After`, on the errors that a later try can get past.
    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::QueueFull { retry_after, .. }
            | ApiError::DownloadsFull { retry_after, .. } => Some(*retry_after),
            ApiError::Engine {
                error:
                    EngineError::NotLoaded | EngineError::DeviceLost(_) | EngineError::OutOfMemory(_),
                retry_after,
            } => Some(*retry_after),
            _ => None,
        }
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
        let status = self.status();
        let retry_after = self.retry_after();
        let mut resp = match self {
            ApiError::Validation(errors) => {
                (status, Json(ValidationErrorBody { detail: errors })).into_response()
            }
            ApiError::Draining => (status, Json(detail("Server is shutting down"))).into_response(),
            ApiError::QueueFull { full, .. } => {
                let body = ErrorBody {
                    detail: format!(
                        "Queue full: {} of {} places taken, retry later",
                        full.depth, full.capacity
                    ),
                    queue_depth: Some(full.depth),
                    max_queue: Some(full.capacity),
                    request_id: None,
                };
                (status, Json(body)).into_response()
            }
            ApiError::DownloadsFull { full, .. } => {
                let body = detail(format!(
                    "Download stage full: {} of {} requests are fetching their images \
                     (MAX_CONCURRENT_DOWNLOADS), retry later",
                    full.depth, full.capacity
                ));
                (status, Json(body)).into_response()
            }
            ApiError::Engine { error, .. } => {
                if status == StatusCode::INTERNAL_SERVER_ERROR {
                    tracing::error!(error = %error, "engine error");
                }
                match error {
                    EngineError::InvalidInput(msg) => {
                        let errors = vec![ValidationDetail {
                            kind: "value_error".into(),
                            loc: vec!["body".into()],
                            msg,
                            input: serde_json::Value::Null,
                            ctx: None,
                        }];
                        (status, Json(ValidationErrorBody { detail: errors })).into_response()
                    }
                    // The original's exact body.
                    EngineError::NotLoaded => {
                        (status, Json(detail("Model not loaded"))).into_response()
                    }
                    other => (status, Json(detail(other.to_string()))).into_response(),
                }
            }
            ApiError::Internal(msg) => {
                tracing::error!(error = %msg, "internal error");
                (status, Json(detail(msg))).into_response()
            }
        };
        if let Some(secs) = retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(error: EngineError) -> ApiError {
        ApiError::Engine {
            error,
            retry_after: 9,
        }
    }

    #[test]
    fn engine_errors_map_to_their_documented_status_and_retry_after() {
        let cases = [
            (EngineError::NotLoaded, 503, Some(9)),
            (EngineError::DeviceLost("xid 79".into()), 503, Some(9)),
            (EngineError::OutOfMemory("2 GiB".into()), 503, Some(9)),
            (EngineError::Cancelled, 503, None),
            (EngineError::InvalidInput("width".into()), 422, None),
            (EngineError::ModelFiles("config.json".into()), 500, None),
            (EngineError::Refused("ATTENTION=cudnn".into()), 500, None),
            (EngineError::Internal("bug".into()), 500, None),
        ];
        for (error, code, retry) in cases {
            let label = error.kind();
            let resp = engine(error).into_response();
            assert_eq!(resp.status().as_u16(), code, "{label}");
            let got = resp
                .headers()
                .get(header::RETRY_AFTER)
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            assert_eq!(got, retry, "{label}");
        }
    }
}
