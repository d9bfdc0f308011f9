//! The OpenAPI document (`/openapi.json`) and Swagger UI (`/docs`, assets compiled into the
//! binary: no CDN), as FastAPI users expect.

use axum::Router;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

use super::routes;
use super::schemas::{
    ErrorBody, GenerateRequest, GenerateResponse, GenerateResult, HealthResponse, ReferenceImage,
    RootResponse, UpscaleRequest, UpscaleResponse, ValidationDetail, ValidationErrorBody,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Image-Gen API",
        description = "FLUX.2 klein batch image generation",
        version = "0.2.0"
    ),
    paths(
        routes::root,
        routes::health,
        routes::ready,
        routes::live,
        routes::metrics,
        routes::generate,
        routes::upscale
    ),
    components(schemas(
        GenerateRequest,
        ReferenceImage,
        GenerateResponse,
        GenerateResult,
        UpscaleRequest,
        UpscaleResponse,
        HealthResponse,
        RootResponse,
        ValidationDetail,
        ValidationErrorBody,
        ErrorBody
    ))
)]
pub struct ApiDoc;

/// `/docs` (Swagger UI) and `/openapi.json`.
pub fn docs_router() -> Router {
    SwaggerUi::new("/docs")
        .url("/openapi.json", ApiDoc::openapi())
        .into()
}
