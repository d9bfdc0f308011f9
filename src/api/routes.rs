//! The handlers: small by design. Each extracts a validated body and calls `jobs`, which takes
//! a download-stage place, fetches the inputs, takes a queue place and hands the model work to
//! the GPU worker; every error goes out through [`ApiError`].

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::errors::ApiError;
use super::extract::Validated;
use super::schemas::{
    self, ErrorBody, GenerateRequest, GenerateResponse, HealthResponse, RootResponse,
    UpscaleRequest, UpscaleResponse, ValidationErrorBody,
};
use super::{AppState, jobs};
use crate::engine::ModelStatus;

/// Service info, as the original.
#[utoipa::path(get, path = "/", responses((status = 200, body = RootResponse)))]
pub async fn root() -> Json<RootResponse> {
    Json(RootResponse {
        name: "Image-Gen API",
        version: super::API_VERSION,
        endpoints: vec![
            "POST /generate - Batch image generation with optional references",
            "POST /upscale - Image upscaling (2x/4x)",
            "GET /health - Health check",
        ],
    })
}

/// Health and GPU facts; always 200, answered from shared state (never waits for the GPU).
#[utoipa::path(get, path = "/health", responses((status = 200, body = HealthResponse)))]
pub async fn health(State(app): State<Arc<AppState>>) -> Json<HealthResponse> {
    let state = app.engine.state();
    let model = state.model_status();
    let gpu = app.gpu.read().unwrap_or_else(|p| p.into_inner()).clone();
    let download = match model {
        ModelStatus::Loading => app.downloads.snapshot(),
        _ => None,
    };
    Json(HealthResponse {
        status: match model {
            ModelStatus::Loaded => "healthy",
            ModelStatus::Loading if download.is_some() => "downloading",
            ModelStatus::Loading => "loading",
            ModelStatus::NotLoaded | ModelStatus::Failed => "unhealthy",
        }
        .into(),
        download,
        flux_loaded: model == ModelStatus::Loaded,
        gpu_available: gpu.available,
        gpu_name: gpu.name,
        gpu_memory_gb: gpu.memory_gb,
        gpu_memory_used_gb: gpu.memory_used_gb,
        model_id: app.model_id.clone(),
        model_revision: state.model_revision(),
        quantization: app.quantization.to_string(),
        text_encoder_quantization: app.text_encoder_quantization.to_string(),
        dtype: crate::model_args::dtype_name(app.dtype),
        version: super::API_VERSION.into(),
        queue_depth: state.queue_depth(),
        queue_capacity: state.queue_capacity(),
        error: state.model_error(),
        attention: state.attention(),
        loras: state.loras(),
        auth: app.auth.mode().as_str().into(),
        warnings: app.warnings.clone(),
    })
}

/// Readiness: 200 once the model is loaded, 503 while loading, without a model, and while
/// draining for shutdown.
#[utoipa::path(get, path = "/ready", responses((status = 200), (status = 503)))]
pub async fn ready(State(app): State<Arc<AppState>>) -> Response {
    let state = app.engine.state();
    let status = if state.draining() {
        "draining"
    } else {
        match state.model_status() {
            ModelStatus::Loaded => "ready",
            ModelStatus::Loading => "loading",
            ModelStatus::NotLoaded => "not_loaded",
            ModelStatus::Failed => "failed",
        }
    };
    let code = if status == "ready" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(json!({ "status": status }))).into_response()
}

/// Liveness: the process answers HTTP.
#[utoipa::path(get, path = "/live", responses((status = 200)))]
pub async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "alive" }))
}

/// Prometheus metrics (text exposition format 0.0.4).
#[utoipa::path(get, path = "/metrics", responses((status = 200, content_type = "text/plain")))]
pub async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    let state = app.engine.state();
    let model = state.model_status();
    let text = app.metrics.render(&[
        (
            "imagegen_queue_depth",
            "Jobs waiting for the GPU worker.",
            state.queue_depth() as f64,
        ),
        (
            "imagegen_queue_capacity",
            "Most jobs that may wait.",
            state.queue_capacity() as f64,
        ),
        (
            "imagegen_download_stage_depth",
            "Requests fetching their input images (before a queue place).",
            app.download_stage.in_flight() as f64,
        ),
        (
            "imagegen_download_stage_capacity",
            "Most requests that may fetch input images at once.",
            app.download_stage.capacity() as f64,
        ),
        (
            "imagegen_worker_busy",
            "1 while the GPU worker runs a job.",
            state.busy() as u8 as f64,
        ),
        (
            "imagegen_model_loaded",
            "1 once the FLUX model is loaded.",
            (model == ModelStatus::Loaded) as u8 as f64,
        ),
    ]);
    let text = match state.attention() {
        Some(report) => text + &crate::flux2::attention::report_metrics(&report),
        None => text,
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Batch generation: item i uses seed + i; each item fails or succeeds on its own.
#[utoipa::path(
    post, path = "/generate",
    request_body = schemas::GenerateRequest,
    security((), ("bearer" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "Per-item results (success=false items carry an error)", body = GenerateResponse),
        (status = 401, description = "Missing or wrong API key (when keys are configured); WWW-Authenticate: Bearer", body = ErrorBody),
        (status = 429, description = "Per-key rate limit (RATE_LIMIT_PER_KEY) exceeded; Retry-After", body = ErrorBody),
        (status = 422, description = "Invalid body, or a `loras` name that is not a loaded per-request adapter", body = ValidationErrorBody),
        (status = 503, description = "Model not loaded, device lost, download stage or queue full (all with Retry-After)", body = ErrorBody),
    )
)]
pub async fn generate(
    State(app): State<Arc<AppState>>,
    Validated(req): Validated<GenerateRequest>,
) -> Result<Json<GenerateResponse>, ApiError> {
    jobs::check_loras(&app, &req)?;
    Ok(Json(jobs::generate(app, req).await?))
}

/// Real-ESRGAN upscaling of one image; works without the FLUX model.
#[utoipa::path(
    post, path = "/upscale",
    request_body = schemas::UpscaleRequest,
    security((), ("bearer" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "Result (success=false carries an error)", body = UpscaleResponse),
        (status = 401, description = "Missing or wrong API key (when keys are configured); WWW-Authenticate: Bearer", body = ErrorBody),
        (status = 429, description = "Per-key rate limit (RATE_LIMIT_PER_KEY) exceeded; Retry-After", body = ErrorBody),
        (status = 422, description = "Invalid body", body = ValidationErrorBody),
        (status = 503, description = "Device lost, download stage or queue full (Retry-After)", body = ErrorBody),
    )
)]
pub async fn upscale(
    State(app): State<Arc<AppState>>,
    Validated(req): Validated<UpscaleRequest>,
) -> Result<Json<UpscaleResponse>, ApiError> {
    Ok(Json(jobs::upscale(app, req).await?))
}
