//! The OpenAPI document (`/openapi.json`) and Swagger UI (`/docs`, assets compiled into the
//! binary: no CDN), as FastAPI users expect.

use axum::Router;
use serde_json::{Value, json};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::SwaggerUi;

use super::routes;
use super::schemas::{
    ErrorBody, GenerateRequest, GenerateResponse, GenerateResult, HealthResponse, LoraRef,
    ReferenceImage, RootResponse, UpscaleRequest, UpscaleResponse, ValidationDetail,
    ValidationErrorBody,
};

#[derive(OpenApi)]
#[openapi(
    modifiers(&KeySchemes, &Limits),
    info(
        title = "Image-Gen API",
        description = "FLUX.2 klein batch image generation"
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
        LoraRef,
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

/// Writes the request bounds and defaults from [`crate::limits`] into the schemas, so the document
/// states exactly what validation enforces (utoipa's attributes take only literals).
struct Limits;

impl Limits {
    fn bounds() -> Vec<(&'static str, &'static str, Value)> {
        use crate::limits::*;
        vec![
            (
                "GenerateRequest",
                "prompts",
                json!({"minItems": 1, "maxItems": MAX_PROMPTS}),
            ),
            (
                "GenerateRequest",
                "upload_urls",
                json!({"minItems": 1, "maxItems": MAX_PROMPTS}),
            ),
            (
                "GenerateRequest",
                "images",
                json!({"maxItems": MAX_REFERENCES}),
            ),
            (
                "GenerateRequest",
                "width",
                json!({"minimum": MIN_SIZE, "maximum": MAX_SIZE, "default": DEFAULT_SIZE}),
            ),
            (
                "GenerateRequest",
                "height",
                json!({"minimum": MIN_SIZE, "maximum": MAX_SIZE, "default": DEFAULT_SIZE}),
            ),
            (
                "GenerateRequest",
                "num_steps",
                json!({"minimum": MIN_STEPS, "maximum": MAX_STEPS, "default": DEFAULT_STEPS}),
            ),
            (
                "GenerateRequest",
                "guidance_scale",
                json!({"minimum": 0.0, "maximum": MAX_GUIDANCE, "default": DEFAULT_GUIDANCE}),
            ),
            (
                "GenerateRequest",
                "seed",
                json!({"minimum": 0, "maximum": MAX_SEED}),
            ),
            (
                "GenerateRequest",
                "upscale",
                json!({"enum": UPSCALE_FACTORS}),
            ),
            (
                "ReferenceImage",
                "weight",
                json!({
                    "minimum": 0.0,
                    "maximum": MAX_REFERENCE_WEIGHT,
                    "default": DEFAULT_REFERENCE_WEIGHT
                }),
            ),
            (
                "GenerateRequest",
                "loras",
                json!({"maxItems": MAX_LORAS_PER_REQUEST, "default": []}),
            ),
            (
                "LoraRef",
                "scale",
                json!({"minimum": LORA_SCALE_MIN, "maximum": LORA_SCALE_MAX, "default": 1.0}),
            ),
            (
                "UpscaleRequest",
                "scale",
                json!({"enum": UPSCALE_FACTORS, "default": DEFAULT_UPSCALE_SCALE}),
            ),
        ]
    }
}

impl Modify for Limits {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let Ok(mut value) = serde_json::to_value(&*doc) else {
            return;
        };
        for (schema, field, bounds) in Self::bounds() {
            let property = &mut value["components"]["schemas"][schema]["properties"][field];
            if let (Some(p), Value::Object(b)) = (property.as_object_mut(), bounds) {
                p.extend(b);
            }
        }
        if let Ok(patched) = serde_json::from_value(value) {
            *doc = patched;
        }
    }
}

/// `/docs` (Swagger UI) and `/openapi.json`.
pub fn docs_router() -> Router {
    SwaggerUi::new("/docs")
        .url("/openapi.json", ApiDoc::openapi())
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits;

    fn property(doc: &Value, schema: &str, field: &str) -> Value {
        doc["components"]["schemas"][schema]["properties"][field].clone()
    }

    /// The document states the bounds validation enforces, and the version Cargo has.
    #[test]
    fn schema_carries_the_limits_and_the_version() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        assert_eq!(doc["info"]["version"], limits::VERSION);
        let loras = property(&doc, "GenerateRequest", "loras");
        assert_eq!(loras["maxItems"], json!(limits::MAX_LORAS_PER_REQUEST));
        assert_eq!(
            loras["items"]["$ref"],
            json!("#/components/schemas/LoraRef")
        );
        let scale = property(&doc, "LoraRef", "scale");
        // utoipa writes whole numbers without a fraction (-4, not -4.0): compare the values.
        assert_eq!(scale["minimum"].as_f64(), Some(limits::LORA_SCALE_MIN));
        assert_eq!(scale["maximum"].as_f64(), Some(limits::LORA_SCALE_MAX));
        let width = property(&doc, "GenerateRequest", "width");
        assert_eq!(width["minimum"], json!(limits::MIN_SIZE));
        assert_eq!(width["maximum"], json!(limits::MAX_SIZE));
        assert_eq!(width["default"], json!(limits::DEFAULT_SIZE));
        let steps = property(&doc, "GenerateRequest", "num_steps");
        assert_eq!(steps["maximum"], json!(limits::MAX_STEPS));
        assert_eq!(
            property(&doc, "GenerateRequest", "prompts")["maxItems"],
            json!(limits::MAX_PROMPTS)
        );
        assert_eq!(
            property(&doc, "GenerateRequest", "images")["maxItems"],
            json!(limits::MAX_REFERENCES)
        );
        assert_eq!(
            property(&doc, "GenerateRequest", "seed")["maximum"],
            json!(limits::MAX_SEED)
        );
        assert_eq!(
            property(&doc, "UpscaleRequest", "scale")["default"],
            json!(limits::DEFAULT_UPSCALE_SCALE)
        );
        // Every patched property exists (a renamed field would otherwise be silently skipped).
        for (schema, field, bounds) in Limits::bounds() {
            let p = property(&doc, schema, field);
            for (k, v) in bounds.as_object().unwrap() {
                match (p[k].as_f64(), v.as_f64()) {
                    // 20.0 may come back as 20: compare numbers as numbers.
                    (Some(got), Some(want)) if !v.is_u64() || want < 2f64.powi(53) => {
                        assert_eq!(got, want, "{schema}.{field}.{k}")
                    }
                    _ => assert_eq!(&p[k], v, "{schema}.{field}.{k}"),
                }
            }
        }
    }
}
