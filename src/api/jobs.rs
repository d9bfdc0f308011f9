//! What an admitted request does: fetch its inputs, hand the model work to the GPU worker, and
//! encode and upload what comes back, item by item. The handlers in `routes` only extract,
//! admit and call these.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use image::RgbImage;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::AppState;
use super::errors::ApiError;
use super::schemas::{
    GenerateRequest, GenerateResponse, GenerateResult, ReferenceImage, UpscaleRequest,
    UpscaleResponse, ValidationDetail,
};
use crate::engine::{
    CancelFlag, EngineError, GenerateJob, GeneratedItem, ItemParams, JobKind, UpscaleJob,
};
use crate::flux2::lora::LoraMode;
use crate::io::{self, OutputFormat, ssrf::redact};
use serde_json::json;

fn ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

/// Draws the base seed from OS entropy, uniformly in 0..=2^32-2 (the original's range).
fn random_seed() -> u64 {
    loop {
        match getrandom::u32() {
            Ok(v) if v != u32::MAX => return v as u64,
            Ok(_) => continue,
            Err(e) => {
                // No OS entropy is a broken host; fall back to the clock rather than failing.
                tracing::warn!(error = %e, "OS entropy unavailable, seeding from the clock");
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0);
                return (nanos % u32::MAX) as u64;
            }
        }
    }
}

/// Downloads and decodes one input image (SSRF guard, byte cap, pixel cap before decoding).
async fn fetch_image(app: &AppState, url: &str) -> Result<RgbImage, String> {
    let started = Instant::now();
    let bytes = app.fetcher.get(url).await.map_err(|e| e.to_string())?;
    let max_pixels = app.max_input_pixels;
    let image = tokio::task::spawn_blocking(move || io::decode_rgb(&bytes, max_pixels))
        .await
        .map_err(|e| format!("internal error decoding: {e}"))?
        .map_err(|e| e.to_string())?;
    app.metrics.stage("download", started.elapsed());
    Ok(image)
}

/// All references, downloaded concurrently; the first failure names its index.
async fn fetch_references(
    app: &AppState,
    images: &[ReferenceImage],
) -> Result<Vec<RgbImage>, String> {
    let downloads = images.iter().map(|r| fetch_image(app, &r.url));
    let results = futures_util::future::join_all(downloads).await;
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.map_err(|e| format!("reference image {i} ({}): {e}", redact(&images[i].url)))
        })
        .collect()
}

/// Encodes and uploads one generated image; returns its result entry.
async fn finish_item(
    app: Arc<AppState>,
    index: usize,
    item: GeneratedItem,
    upload_url: String,
    format: OutputFormat,
    seed: u64,
) -> GenerateResult {
    let (width, height) = item.image.dimensions();
    let uploaded = encode_and_upload(&app, item.image, &upload_url, format).await;
    match uploaded {
        Ok(upload_ms) => {
            app.metrics.item("generate", "success");
            tracing::info!(
                index,
                inference_ms = item.inference_ms as u64,
                upscale_ms = item.upscale_ms.unwrap_or(0.0) as u64,
                upload_ms,
                "item done"
            );
            GenerateResult {
                index,
                success: true,
                error: None,
                output_url: Some(io::output_url(&upload_url)),
                width: Some(width),
                height: Some(height),
                seed: Some(seed),
                timing_inference_ms: Some(item.inference_ms.round() as u64),
                timing_upscale_ms: item.upscale_ms.map(|v| v.round() as u64),
                timing_upload_ms: Some(upload_ms),
            }
        }
        Err((kind, e)) => {
            app.metrics.item("generate", kind);
            tracing::error!(index, error = %e, "item failed");
            GenerateResult::failed(index, e)
        }
    }
}

/// Encodes (on the blocking pool) and uploads; returns the upload time in ms.
async fn encode_and_upload(
    app: &AppState,
    image: RgbImage,
    upload_url: &str,
    format: OutputFormat,
) -> Result<u64, (&'static str, String)> {
    let started = Instant::now();
    let bytes = tokio::task::spawn_blocking(move || io::encode(&image, format))
        .await
        .map_err(|e| ("internal", format!("internal error encoding: {e}")))?
        .map_err(|e| ("encode", e.to_string()))?;
    app.metrics.stage("encode", started.elapsed());
    let started = Instant::now();
    let report = app
        .uploader
        .put(upload_url, Bytes::from(bytes), format.content_type())
        .await
        .map_err(|e| ("upload", e.to_string()))?;
    app.metrics.stage("upload", started.elapsed());
    if report.retries > 0 {
        app.metrics.inc(
            "imagegen_upload_retries_total",
            String::new(),
            report.retries as u64,
        );
    }
    Ok(ms(started))
}

/// 422 unless every `loras` name is a per-request adapter that loaded (listed by /health). The
/// worker checks again, so a stale state can only turn into a per-item error, never a wrong
/// image.
pub fn check_loras(app: &AppState, req: &GenerateRequest) -> Result<(), ApiError> {
    let state = app.engine.state();
    let errors: Vec<ValidationDetail> = req
        .loras
        .iter()
        .enumerate()
        .filter(|(_, l)| !state.per_request_lora(&l.name))
        .map(|(i, l)| {
            let known: Vec<String> = state
                .loras()
                .into_iter()
                .filter(|s| s.status == "loaded" && s.mode == LoraMode::PerRequest)
                .map(|s| s.name)
                .collect();
            ValidationDetail {
                kind: "value_error".into(),
                loc: vec![json!("body"), json!("loras"), json!(i), json!("name")],
                msg: format!(
                    "Value error, unknown LoRA adapter '{}': per-request adapters are [{}]",
                    l.name,
                    known.join(", ")
                ),
                input: json!(l.name),
                ctx: Some(json!({"error": {}})),
            }
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Validation(errors))
    }
}

/// Batch generation: item i uses seed + i; each item fails or succeeds on its own.
///
/// Order: refuse early what cannot run (draining, no model, device lost), fetch references in
/// the download stage, then take a queue place: a request waiting on slow URLs never holds one.
pub async fn generate(
    app: Arc<AppState>,
    req: GenerateRequest,
) -> Result<GenerateResponse, ApiError> {
    let started = Instant::now();
    let n = req.prompts.len();
    tracing::info!("GENERATE: {n} images, {} refs", req.images.len());
    app.check_generate()?;

    let fetched = if req.images.is_empty() {
        Ok(Vec::new())
    } else {
        let _place = app.enter_downloads()?;
        fetch_references(&app, &req.images).await
    };
    let references = match fetched {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "reference download failed; failing every item");
            for _ in 0..n {
                app.metrics.item("generate", "reference_download");
            }
            return Ok(GenerateResponse {
                success: false,
                results: (0..n)
                    .map(|i| GenerateResult::failed(i, e.clone()))
                    .collect(),
                timing_total_ms: ms(started),
            });
        }
    };

    let admission = app.admit_generate()?;
    let base_seed = req.seed.unwrap_or_else(random_seed);
    let items: Vec<ItemParams> = req
        .prompts
        .iter()
        .enumerate()
        .map(|(i, prompt)| ItemParams {
            prompt: prompt.clone(),
            width: req.width,
            height: req.height,
            num_steps: req.num_steps,
            seed: base_seed + i as u64,
            guidance_scale: req.guidance_scale as f32,
            loras: req
                .loras
                .iter()
                .map(|l| (l.name.clone(), l.scale))
                .collect(),
        })
        .collect();
    let cancel = CancelFlag::default();
    let cancel_guard = cancel.on_drop();
    let (tx, mut rx) = mpsc::unbounded_channel();
    app.engine
        .submit(
            admission,
            JobKind::Generate(GenerateJob {
                items,
                references,
                upscale: req.upscale,
                cancel,
                events: tx,
            }),
        )
        .map_err(|e| app.engine_error(e))?;

    // Uploads run while the worker generates the next items; dropping the JoinSet (client
    // gone) aborts them.
    let mut results: Vec<Option<GenerateResult>> = vec![None; n];
    let mut uploads = JoinSet::new();
    // Set while every item so far failed with the same server-side error (not loaded, device
    // lost): then the request answers with that error's status instead of 200.
    let mut server_side: Option<EngineError> = None;
    let mut seen = 0;
    while let Some(out) = rx.recv().await {
        seen += 1;
        server_side = match (&out.result, seen) {
            (Err(e), 1) if e.is_server_side() => Some(e.clone()),
            (Err(e), _) if server_side.as_ref() == Some(e) => server_side,
            _ => None,
        };
        let i = out.index;
        match out.result {
            Ok(item) => {
                // The task keeps the request's span, so its log lines carry the request id.
                uploads.spawn(
                    finish_item(
                        app.clone(),
                        i,
                        item,
                        req.upload_urls[i].clone(),
                        req.output_format,
                        base_seed + i as u64,
                    )
                    .instrument(tracing::Span::current()),
                );
            }
            Err(e) => {
                app.metrics.item("generate", e.kind());
                results[i] = Some(GenerateResult::failed(i, e.to_string()));
            }
        }
    }
    while let Some(done) = uploads.join_next().await {
        match done {
            Ok(r) => {
                let i = r.index;
                results[i] = Some(r);
            }
            Err(e) => tracing::error!(error = %e, "upload task failed"),
        }
    }
    cancel_guard.disarm();
    if let Some(e) = server_side.filter(|_| seen == n) {
        tracing::error!(error = %e, "every item failed on the server side");
        return Err(app.engine_error(e));
    }
    let results: Vec<GenerateResult> = results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap_or_else(|| {
                GenerateResult::failed(i, "internal error: the item produced no result")
            })
        })
        .collect();
    let ok = results.iter().filter(|r| r.success).count();
    tracing::info!("Complete: {ok}/{n} in {}ms", ms(started));
    Ok(GenerateResponse {
        success: ok == n,
        results,
        timing_total_ms: ms(started),
    })
}

/// Real-ESRGAN upscaling of one image: the input is fetched in the download stage, then the
/// job takes a queue place.
pub async fn upscale(app: Arc<AppState>, req: UpscaleRequest) -> Result<UpscaleResponse, ApiError> {
    let started = Instant::now();
    tracing::info!("UPSCALE: {}x", req.scale);
    app.check_upscale()?;
    let failed = |app: &AppState, kind: &str, e: String| {
        app.metrics.item("upscale", kind);
        tracing::error!(error = %e, "Upscale failed");
        Ok(UpscaleResponse::failed(e))
    };

    let t = Instant::now();
    let place = app.enter_downloads()?;
    let fetched = fetch_image(&app, &req.image_url).await;
    drop(place);
    let image = match fetched {
        Ok(image) => image,
        Err(e) => return failed(&app, "download", e),
    };
    let download_ms = ms(t);
    let admission = app.admit_upscale()?;
    let (input_width, input_height) = image.dimensions();

    let cancel = CancelFlag::default();
    let cancel_guard = cancel.on_drop();
    let (tx, rx) = oneshot::channel();
    app.engine
        .submit(
            admission,
            JobKind::Upscale(UpscaleJob {
                image,
                scale: req.scale,
                cancel,
                reply: tx,
            }),
        )
        .map_err(|e| app.engine_error(e))?;
    let up = match rx.await {
        Ok(Ok(up)) => up,
        Ok(Err(e)) => return failed(&app, e.kind(), e.to_string()),
        Err(_) => {
            return failed(
                &app,
                "internal",
                "internal error: the upscale job produced no result".into(),
            );
        }
    };
    cancel_guard.disarm();
    let (output_width, output_height) = up.image.dimensions();
    let upload_ms =
        match encode_and_upload(&app, up.image, &req.upload_url, req.output_format).await {
            Ok(ms) => ms,
            Err((kind, e)) => return failed(&app, kind, e),
        };
    app.metrics.item("upscale", "success");
    Ok(UpscaleResponse {
        success: true,
        error: None,
        output_url: Some(io::output_url(&req.upload_url)),
        input_width: Some(input_width),
        input_height: Some(input_height),
        output_width: Some(output_width),
        output_height: Some(output_height),
        scale: Some(req.scale),
        timing_download_ms: Some(download_ms),
        timing_load_ms: Some(up.load_ms.round() as u64),
        timing_upscale_ms: Some(up.upscale_ms.round() as u64),
        timing_upload_ms: Some(upload_ms),
        timing_total_ms: Some(ms(started)),
    })
}
