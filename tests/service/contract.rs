//! The API contract: validation errors, 503 without a model, health/ready/live, metrics,
//! OpenAPI and Swagger UI, request ids.

use std::time::Duration;

use imagegen::engine::NoUpscaler;
use serde_json::{Value, json};

use crate::backend::Paint;
use crate::common::Server;

/// The production server with the tiny real model, loaded.
async fn loaded() -> Server {
    let s = Server::start_real(&[]).await;
    s.wait_status("healthy", Duration::from_secs(60)).await;
    s
}

fn ok_body() -> Value {
    json!({"prompts": ["a cat"], "upload_urls": ["http://127.0.0.1:9/x.png"]})
}

fn with(mut base: Value, key: &str, v: Value) -> Value {
    base[key] = v;
    base
}

fn without(mut base: Value, key: &str) -> Value {
    base.as_object_mut().unwrap().remove(key);
    base
}

#[tokio::test]
async fn twenty_kinds_of_bad_body_give_422_with_the_right_loc() {
    let s = loaded().await;
    let urls = |n: usize| json!(vec!["http://127.0.0.1:9/x"; n]);
    let cases: Vec<(Value, &str, Value)> = vec![
        (
            without(ok_body(), "prompts"),
            "missing",
            json!(["body", "prompts"]),
        ),
        (
            without(ok_body(), "upload_urls"),
            "missing",
            json!(["body", "upload_urls"]),
        ),
        (
            with(ok_body(), "prompts", json!([])),
            "too_short",
            json!(["body", "prompts"]),
        ),
        (
            json!({"prompts": vec!["p"; 21], "upload_urls": urls(21)}),
            "too_long",
            json!(["body", "prompts"]),
        ),
        (
            with(ok_body(), "prompts", json!("a cat")),
            "list_type",
            json!(["body", "prompts"]),
        ),
        (
            with(ok_body(), "prompts", json!([1])),
            "string_type",
            json!(["body", "prompts", 0]),
        ),
        (
            with(ok_body(), "width", json!(255)),
            "greater_than_equal",
            json!(["body", "width"]),
        ),
        (
            with(ok_body(), "width", json!(2049)),
            "less_than_equal",
            json!(["body", "width"]),
        ),
        (
            with(ok_body(), "height", json!(512.5)),
            "int_from_float",
            json!(["body", "height"]),
        ),
        (
            with(ok_body(), "height", json!("tall")),
            "int_parsing",
            json!(["body", "height"]),
        ),
        (
            with(ok_body(), "num_steps", json!(0)),
            "greater_than_equal",
            json!(["body", "num_steps"]),
        ),
        (
            with(ok_body(), "num_steps", json!(51)),
            "less_than_equal",
            json!(["body", "num_steps"]),
        ),
        (
            with(ok_body(), "guidance_scale", json!(20.5)),
            "less_than_equal",
            json!(["body", "guidance_scale"]),
        ),
        (
            with(ok_body(), "seed", json!(-1)),
            "greater_than_equal",
            json!(["body", "seed"]),
        ),
        (
            with(ok_body(), "seed", json!(18446744073709551600u64)),
            "less_than_equal",
            json!(["body", "seed"]),
        ),
        (
            with(ok_body(), "upscale", json!(3)),
            "literal_error",
            json!(["body", "upscale"]),
        ),
        (
            with(ok_body(), "upscale", json!("2")),
            "literal_error",
            json!(["body", "upscale"]),
        ),
        (
            with(ok_body(), "output_format", json!("jpg")),
            "literal_error",
            json!(["body", "output_format"]),
        ),
        (
            with(ok_body(), "images", Value::Null),
            "list_type",
            json!(["body", "images"]),
        ),
        (
            with(
                ok_body(),
                "images",
                json!(vec![json!({"url": "http://127.0.0.1:9/r"}); 17]),
            ),
            "too_long",
            json!(["body", "images"]),
        ),
        (
            with(ok_body(), "images", json!([{"url": "u", "weight": 2.5}])),
            "less_than_equal",
            json!(["body", "images", 0, "weight"]),
        ),
        (
            with(ok_body(), "images", json!([{"weight": 1.0}])),
            "missing",
            json!(["body", "images", 0, "url"]),
        ),
        (
            json!({"prompts": ["a", "b"], "upload_urls": urls(1)}),
            "value_error",
            json!(["body"]),
        ),
    ];
    assert!(cases.len() >= 20);
    for (body, kind, loc) in cases {
        let resp = s.post("/generate", body.clone()).await;
        assert_eq!(resp.status(), 422, "{body}");
        let v: Value = resp.json().await.unwrap();
        let first = &v["detail"][0];
        assert_eq!(first["type"], kind, "{body} -> {v}");
        assert_eq!(first["loc"], loc, "{body} -> {v}");
        assert!(first["msg"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(first.get("input").is_some());
    }
    // A malformed body, and /upscale's own fields.
    let resp = s
        .client
        .post(s.url("/generate"))
        .header("content-type", "application/json")
        .body("{\"prompts\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["detail"][0]["type"], "json_invalid");
    let resp = s
        .post("/upscale", json!({"image_url": "u", "scale": 8}))
        .await;
    assert_eq!(resp.status(), 422);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["detail"][0]["loc"], json!(["body", "upload_url"]));
    assert_eq!(v["detail"][1]["loc"], json!(["body", "scale"]));
    assert_eq!(v["detail"][1]["msg"], "Input should be 2 or 4");
}

#[tokio::test]
async fn without_a_model_generate_is_503_and_health_unhealthy_but_422_still_first() {
    let s = Server::start_real(&["--preload-models", "false"]).await;
    let h: Value = s.get_json("/health").await;
    assert_eq!(h["status"], "unhealthy");
    assert_eq!(h["flux_loaded"], false);
    assert_eq!(h["gpu_available"], false);
    assert_eq!(h["gpu_name"], Value::Null);
    let resp = s.post("/generate", ok_body()).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"detail": "Model not loaded"})
    );
    let resp = s
        .post("/generate", with(ok_body(), "width", json!(1)))
        .await;
    assert_eq!(resp.status(), 422);
    let resp = s.get("/ready").await;
    assert_eq!(resp.status(), 503);
}

#[tokio::test]
async fn ready_is_503_while_loading_and_health_says_loading() {
    let s = Server::start(
        Paint::default().loader(Duration::from_secs(2)),
        NoUpscaler,
        &[],
    )
    .await;
    let h: Value = s.get_json("/health").await;
    assert_eq!(h["status"], "loading", "{h}");
    let resp = s.get("/ready").await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.json::<Value>().await.unwrap()["status"], "loading");
    let resp = s.post("/generate", ok_body()).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(s.get("/live").await.status(), 200);
    s.wait_status("healthy", Duration::from_secs(20)).await;
    assert_eq!(s.get("/ready").await.status(), 200);
}

#[tokio::test]
async fn root_health_fields_and_request_id() {
    let s = loaded().await;
    let root: Value = s.get_json("/").await;
    assert_eq!(root["name"], "Image-Gen API");
    // One version everywhere: GET /, /health, OpenAPI and `--version` (tests/cli/generate.rs)
    // all say Cargo's package version.
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(root["version"], version);
    let spec: Value = s.get_json("/openapi.json").await;
    assert_eq!(spec["info"]["version"], version);
    assert_eq!(root["endpoints"].as_array().unwrap().len(), 3);

    let resp = s
        .client
        .get(s.url("/health"))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "trace-me-42");
    let h: Value = resp.json().await.unwrap();
    for key in [
        "status",
        "flux_loaded",
        "gpu_available",
        "gpu_name",
        "gpu_memory_gb",
        "gpu_memory_used_gb",
        "model_id",
        "model_revision",
        "quantization",
        "text_encoder_quantization",
        "dtype",
        "version",
    ] {
        assert!(h.get(key).is_some(), "missing {key} in {h}");
    }
    assert_eq!(h["status"], "healthy");
    assert_eq!(h["version"], version);
    assert!(
        h["model_id"]
            .as_str()
            .unwrap()
            .ends_with("tests/fixtures/flux2/tiny-model")
    );
    assert_eq!(h["quantization"], "none");
    assert_eq!(h["text_encoder_quantization"], "none");
    // CPU default.
    assert_eq!(h["dtype"], "f32");
    // Without an incoming id the server makes one.
    let resp = s.get("/live").await;
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 36, "{id}");
}

#[tokio::test]
async fn openapi_is_valid_and_docs_are_served_without_a_cdn() {
    let s = loaded().await;
    let spec: Value = s.get_json("/openapi.json").await;
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/generate",
        "/upscale",
        "/health",
        "/ready",
        "/live",
        "/metrics",
        "/",
    ] {
        assert!(
            spec["paths"].get(path).is_some(),
            "{path} missing from the spec"
        );
    }
    let req = &spec["components"]["schemas"]["GenerateRequest"]["properties"];
    assert_eq!(req["width"]["minimum"], 256);
    assert_eq!(req["width"]["maximum"], 2048);
    let resp = s.get("/docs/").await;
    assert_eq!(resp.status(), 200);
    let html = resp.text().await.unwrap();
    assert!(html.contains("swagger"), "{html}");
    assert!(
        !html.contains("cdn") && !html.contains("unpkg"),
        "docs must not load from a CDN"
    );
    let js = s.get("/docs/swagger-ui-bundle.js").await;
    assert_eq!(js.status(), 200);
    assert!(js.bytes().await.unwrap().len() > 100_000);
}

#[tokio::test]
async fn metrics_expose_queue_stages_and_outcomes() {
    let s = loaded().await;
    s.post("/generate", with(ok_body(), "width", json!(1)))
        .await;
    let text = s.get_text("/metrics").await;
    for needle in [
        "imagegen_queue_depth 0",
        "imagegen_queue_capacity 8",
        "imagegen_model_loaded 1",
        "# TYPE imagegen_stage_duration_seconds histogram",
        "# TYPE imagegen_queue_wait_seconds histogram",
        "# TYPE imagegen_upload_retries_total counter",
        "imagegen_http_requests_total{route=\"/generate\",status=\"422\"} 1",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
}

#[tokio::test]
async fn a_model_that_fails_to_load_is_reported_not_served() {
    let empty = tempfile::tempdir().unwrap();
    let dir = empty.path().to_str().unwrap().to_string();
    let s = Server::start_real(&["--model-id", &dir]).await;
    s.wait_status("unhealthy", Duration::from_secs(30)).await;
    let h: Value = s.get_json("/health").await;
    assert_eq!(h["flux_loaded"], false);
    let err = h["error"].as_str().unwrap();
    assert!(err.contains("model_index.json"), "{err}");
    let resp = s.get("/ready").await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.json::<Value>().await.unwrap()["status"], "failed");
    assert_eq!(s.post("/generate", ok_body()).await.status(), 503);
}

/// `--quantization int8` alone quantizes the text encoder too; /health reports both settings,
/// and the quantized model loads.
#[tokio::test]
async fn health_reports_both_quantizations_and_the_quantized_model_loads() {
    let s = Server::start_real(&["--quantization", "int8"]).await;
    s.wait_status("healthy", Duration::from_secs(60)).await;
    let h: Value = s.get_json("/health").await;
    assert_eq!(h["quantization"], "int8", "{h}");
    assert_eq!(h["text_encoder_quantization"], "int8", "{h}");
    let s = Server::start_real(&[
        "--quantization",
        "fp8",
        "--text-encoder-quantization",
        "none",
    ])
    .await;
    s.wait_status("healthy", Duration::from_secs(60)).await;
    let h: Value = s.get_json("/health").await;
    assert_eq!(h["quantization"], "fp8", "{h}");
    assert_eq!(h["text_encoder_quantization"], "none", "{h}");
}

/// `--dtype bf16` loads and serves on the CPU, and /health says so.
#[tokio::test]
async fn health_reports_the_dtype_and_a_bf16_model_loads_on_cpu() {
    let s = Server::start_real(&["--dtype", "bf16"]).await;
    s.wait_status("healthy", Duration::from_secs(60)).await;
    let h: Value = s.get_json("/health").await;
    assert_eq!(h["dtype"], "bf16", "{h}");
}
