//! The OpenAPI document (`/openapi.json`) and Swagger UI (`/docs`, assets compiled into the
//! binary: no CDN), as FastAPI users expect.

use axum::Router;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::SwaggerUi;

use super::routes;
use super::schemas::{
    ErrorBody, GenerateRequest, GenerateResponse, GenerateResult, HealthResponse, ReferenceImage,
    RootResponse, UpscaleRequest, UpscaleResponse, ValidationDetail, ValidationErrorBody,
};

#[derive(OpenApi)]
#[openapi(
    modifiers(&KeySchemes),
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

/// The two ways to present an API key, so /docs can send one ("Authorize").
struct KeySchemes;

impl Modify for KeySchemes {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "API_KEYS / API_KEYS_FILE key as `Authorization: Bearer <key>`",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-API-Key",
                "the same key in the X-API-Key header",
            ))),
        );
    }
}

/// `/docs` (Swagger UI) and `/openapi.json`.
pub fn docs_router() -> Router {
    SwaggerUi::new("/docs")
        .url("/openapi.json", ApiDoc::openapi())
        .into()
}
