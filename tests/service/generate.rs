//! /generate and /upscale end to end through the production server (`serve_on`) with the real
//! FLUX.2 pipeline and Real-ESRGAN on tiny random-weight models: real presigned uploads to
//! s3s-fs, references from the local peer server.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Value, json};

use crate::backend::{Paint, TinyEsrgan};
use crate::common::{Peer, S3, Server};

const HOUR: Duration = Duration::from_secs(3600);

async fn setup() -> (Server, S3, Peer) {
    let s = Server::start_real(&[]).await;
    s.wait_status("healthy", Duration::from_secs(60)).await;
    (s, S3::start().await, Peer::start().await)
}

async fn generate(s: &Server, body: Value) -> Value {
    let resp = s.post("/generate", body).await;
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

#[tokio::test]
async fn batch_of_three_uploads_three_images_with_consecutive_seeds() {
    let (s, s3, peer) = setup().await;
    let refs =
        json!([{"url": peer.url("/ref.png")}, {"url": peer.url("/redirect"), "weight": 0.5}]);
    let urls: Vec<String> = (0..3)
        .map(|i| s3.presign_put(&format!("out/{i}.png"), "image/png", HOUR))
        .collect();
    // The same prompt three times: only the seed tells the images apart.
    let v = generate(
        &s,
        json!({"prompts": ["a fox", "a fox", "a fox"], "upload_urls": urls, "seed": 100,
               "width": 300, "height": 260, "num_steps": 2, "images": refs}),
    )
    .await;
    assert_eq!(v["success"], true, "{v}");
    let mut stored = Vec::new();
    for i in 0..3u64 {
        let r = &v["results"][i as usize];
        assert_eq!(r["index"], i);
        assert_eq!(r["seed"], 100 + i);
        // Floored to multiples of 16: 300 -> 288, 260 -> 256.
        assert_eq!(
            (r["width"].as_u64(), r["height"].as_u64()),
            (Some(288), Some(256))
        );
        assert_eq!(r["error"], Value::Null);
        assert_eq!(r["timing_upscale_ms"], Value::Null);
        assert!(r["timing_inference_ms"].is_u64() && r["timing_upload_ms"].is_u64());
        let out = r["output_url"].as_str().unwrap();
        assert_eq!(out, format!("http://{}/images/out/{i}.png", s3.addr));
        let (ct, bytes) = s3
            .get(&format!("out/{i}.png"))
            .await
            .expect("object stored");
        assert_eq!(ct, "image/png");
        let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (288, 256));
        stored.push(img);
    }
    assert!(v["timing_total_ms"].is_u64());
    assert_ne!(
        stored[0], stored[1],
        "seeds 100 and 101 gave the same image"
    );
    assert_ne!(stored[1], stored[2]);
    // Seed 101 on its own reproduces item 1 exactly: item i really used seed + i.
    let again = s3.presign_put("again.png", "image/png", HOUR);
    let v = generate(
        &s,
        json!({"prompts": ["a fox"], "upload_urls": [again], "seed": 101,
               "width": 300, "height": 260, "num_steps": 2, "images": refs}),
    )
    .await;
    assert_eq!(v["success"], true, "{v}");
    let (_, bytes) = s3.get("again.png").await.unwrap();
    assert_eq!(
        image::load_from_memory(&bytes).unwrap().to_rgb8(),
        stored[1]
    );
}

#[tokio::test]
async fn formats_round_trip_with_matching_content_types() {
    let (s, s3, _peer) = setup().await;
    let mut first: Option<image::RgbImage> = None;
    for (format, ct) in [
        ("png", "image/png"),
        ("jpeg", "image/jpeg"),
        ("webp", "image/webp"),
    ] {
        let key = format!("fmt/x.{format}");
        let url = s3.presign_put(&key, ct, HOUR);
        let v: Value = s
            .post_json(
                "/generate",
                json!({"prompts": ["p"], "upload_urls": [url], "output_format": format,
                       "width": 256, "height": 256, "num_steps": 1, "seed": 7}),
            )
            .await;
        assert_eq!(v["success"], true, "{format}: {v}");
        let (got_ct, bytes) = s3.get(&key).await.unwrap();
        assert_eq!(got_ct, ct);
        let guessed = image::guess_format(&bytes).unwrap();
        assert_eq!(guessed.to_mime_type(), ct);
        let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (256, 256));
        // Same seed, same image: the upload is exactly our encoding of the PNG's pixels (random
        // weights make noise images, so closeness in pixels would prove little).
        let png = first.get_or_insert_with(|| img.clone());
        let fmt = match format {
            "png" => imagegen::io::OutputFormat::Png,
            "jpeg" => imagegen::io::OutputFormat::Jpeg,
            _ => imagegen::io::OutputFormat::Webp,
        };
        assert_eq!(bytes, imagegen::io::encode(png, fmt).unwrap(), "{format}");
    }
}

#[tokio::test]
async fn bad_upload_urls_fail_only_their_item() {
    let (s, s3, peer) = setup().await;
    let good = s3.presign_put("ok.png", "image/png", HOUR);
    let wrong = s3.presign_put_wrong_secret("wrong.png", "image/png");
    let expired = s3.presign_put("expired.png", "image/png", Duration::from_secs(1));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mismatched_type = s3.presign_put("jpeg-signed.png", "image/jpeg", HOUR);
    let resp = s
        .post(
            "/generate",
            json!({"prompts": ["a", "b", "c", "d", "e"],
                   "upload_urls": [good, wrong, expired, mismatched_type, peer.url("/forbidden")],
                   "width": 256, "height": 256, "num_steps": 1, "seed": 5}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["success"], false);
    let r = &v["results"];
    assert_eq!(r[0]["success"], true, "{v}");
    for i in 1..5 {
        assert_eq!(r[i]["success"], false, "{i}: {v}");
        let err = r[i]["error"].as_str().unwrap();
        assert!(err.contains("HTTP 403"), "{i}: {err}");
        assert!(
            !err.contains("X-Amz-Signature"),
            "presigned query leaked: {err}"
        );
        for key in [
            "output_url",
            "width",
            "height",
            "seed",
            "timing_inference_ms",
        ] {
            assert_eq!(r[i][key], Value::Null, "{i} {key}");
        }
    }
    assert!(
        r[1]["error"]
            .as_str()
            .unwrap()
            .contains("SignatureDoesNotMatch"),
        "{v}"
    );
    assert!(s3.get("ok.png").await.is_some());
    assert!(s3.get("wrong.png").await.is_none());
    assert!(s3.get("expired.png").await.is_none());
    // No retries on a 4xx.
    assert_eq!(peer.state.forbidden_attempts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_reference_that_cannot_be_downloaded_fails_every_item_with_its_index() {
    let (s, s3, peer) = setup().await;
    let urls: Vec<String> = (0..2)
        .map(|i| s3.presign_put(&format!("r{i}.png"), "image/png", HOUR))
        .collect();
    for (path, cause) in [
        ("/missing", "HTTP 404"),
        ("/not-image", "unrecognised image format"),
    ] {
        let resp = s
            .post(
                "/generate",
                json!({"prompts": ["a", "b"], "upload_urls": urls, "num_steps": 1,
                       "images": [{"url": peer.url("/ref.png")}, {"url": peer.url(path)}]}),
            )
            .await;
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["success"], false);
        for i in 0..2 {
            let err = v["results"][i]["error"].as_str().unwrap();
            assert!(err.contains("reference image 1"), "{err}");
            assert!(err.contains(cause), "{err}");
            assert_eq!(v["results"][i]["index"], i);
        }
    }
    assert!(s3.get("r0.png").await.is_none());
}

#[tokio::test]
async fn random_seeds_differ_between_requests_and_stay_in_range() {
    let (s, _s3, peer) = setup().await;
    let mut seeds = Vec::new();
    for _ in 0..3 {
        let v: Value = s
            .post_json(
                "/generate",
                json!({"prompts": ["a", "b"], "upload_urls": [peer.url("/record"), peer.url("/record")],
                       "width": 256, "height": 256, "num_steps": 1}),
            )
            .await;
        assert_eq!(v["success"], true, "{v}");
        let base = v["results"][0]["seed"].as_u64().unwrap();
        assert_eq!(v["results"][1]["seed"].as_u64().unwrap(), base + 1);
        assert!(base < u32::MAX as u64);
        seeds.push(base);
    }
    seeds.dedup();
    assert_eq!(seeds.len(), 3, "OS-entropy seeds repeated: {seeds:?}");
    // Uploads carry Content-Length and the format's type, never chunked encoding.
    let puts = peer.state.puts.lock().unwrap().clone();
    assert_eq!(puts.len(), 6);
    for p in puts {
        assert_eq!(p.transfer_encoding, None);
        assert_eq!(p.content_length, Some(p.body_len.to_string()));
        assert_eq!(p.content_type.as_deref(), Some("image/png"));
    }
}

#[tokio::test]
async fn uploads_retry_on_5xx() {
    let (s, _s3, peer) = setup().await;
    let v: Value = s
        .post_json(
            "/generate",
            json!({"prompts": ["a"], "upload_urls": [peer.url("/flaky?X-Amz-Signature=secret")],
                   "width": 256, "height": 256, "num_steps": 1}),
        )
        .await;
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(peer.state.flaky_attempts.load(Ordering::SeqCst), 3);
    assert_eq!(v["results"][0]["output_url"], peer.url("/flaky"));
    let text = s.get_text("/metrics").await;
    assert!(text.contains("imagegen_upload_retries_total 2"), "{text}");
}

#[tokio::test]
async fn generate_with_upscale_reports_the_upscaled_size() {
    let (s, s3, _peer) = setup().await;
    let urls: Vec<String> = (0..2)
        .map(|i| s3.presign_put(&format!("up{i}.webp"), "image/webp", HOUR))
        .collect();
    let v: Value = s
        .post_json(
            "/generate",
            json!({"prompts": ["a", "b"], "upload_urls": urls, "upscale": 2,
                   "width": 256, "height": 272, "num_steps": 1, "output_format": "webp"}),
        )
        .await;
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(v["results"][1]["width"], 512);
    assert_eq!(v["results"][1]["height"], 544);
    assert!(v["results"][0]["timing_upscale_ms"].is_u64());
    let (_, bytes) = s3.get("up1.webp").await.unwrap();
    assert_eq!(image::load_from_memory(&bytes).unwrap().width(), 512);
}

#[tokio::test]
async fn upscale_endpoint_round_trip_and_failure_shape() {
    let (s, s3, peer) = setup().await;
    let url = s3.presign_put("big.jpeg", "image/jpeg", HOUR);
    let v: Value = s
        .post_json(
            "/upscale",
            json!({"image_url": peer.url("/ref.png"), "upload_url": url, "output_format": "jpeg"}),
        )
        .await;
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(
        (v["input_width"].as_u64(), v["input_height"].as_u64()),
        (Some(128), Some(96))
    );
    assert_eq!(
        (v["output_width"].as_u64(), v["output_height"].as_u64()),
        (Some(512), Some(384))
    );
    assert_eq!(v["scale"], 4);
    for k in [
        "timing_download_ms",
        "timing_load_ms",
        "timing_upscale_ms",
        "timing_upload_ms",
        "timing_total_ms",
    ] {
        assert!(v[k].is_u64(), "{k}: {v}");
    }
    let (ct, bytes) = s3.get("big.jpeg").await.unwrap();
    assert_eq!(ct, "image/jpeg");
    assert_eq!(image::load_from_memory(&bytes).unwrap().width(), 512);

    let v: Value = s
        .post_json("/upscale", json!({"image_url": peer.url("/bomb.png"), "upload_url": peer.url("/record"), "scale": 2}))
        .await;
    assert_eq!(v["success"], false);
    assert!(v["error"].as_str().unwrap().contains("30000x30000"), "{v}");
    assert_eq!(v["output_url"], Value::Null);
    assert_eq!(v["scale"], Value::Null);
}

/// The worker's bookkeeping, seen through an instrumented test backend and the real upscaler:
/// references are encoded once per request and the upscaler is loaded once per batch.
#[tokio::test]
async fn references_encode_once_and_the_upscaler_loads_once_per_batch() {
    let paint = Paint::default();
    let esrgan = TinyEsrgan::default();
    let s = Server::start(paint.loader(Duration::ZERO), esrgan.clone(), &[]).await;
    s.wait_status("healthy", Duration::from_secs(10)).await;
    let peer = Peer::start().await;
    let v = generate(
        &s,
        json!({"prompts": ["a", "b", "c"], "upload_urls": vec![peer.url("/record"); 3],
               "images": [{"url": peer.url("/ref.png")}, {"url": peer.url("/ref.png")}],
               "width": 256, "height": 256, "num_steps": 1, "upscale": 2}),
    )
    .await;
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(paint.reference_encodes.load(Ordering::SeqCst), 1);
    assert_eq!(esrgan.loads.load(Ordering::SeqCst), 1);
    assert_eq!(v["results"][2]["width"], 512);
}

/// LoRA over HTTP: /health lists a working per-request adapter and a broken fused one (the
/// model serves anyway); an unknown name is a 422 naming `body.loras.0.name`; the named adapter
/// changes the image and the next request without it is the base image again.
#[tokio::test]
async fn lora_adapters_are_listed_selected_per_request_and_bad_ones_do_not_stop_serving() {
    let root = env!("CARGO_MANIFEST_DIR");
    let good = format!("ink={root}/tests/fixtures/flux2/lora/kohya.safetensors");
    let broken = format!("broken={root}/tests/fixtures/flux2/lora/missing.safetensors:0.5");
    let s = Server::start_real(&["--lora-preload", &good, "--loras", &broken]).await;
    s.wait_status("healthy", Duration::from_secs(60)).await;
    let s3 = S3::start().await;

    let health = s.get_json("/health").await;
    let loras = health["loras"].as_array().unwrap();
    assert_eq!(loras.len(), 2, "{health}");
    assert_eq!(loras[0]["name"], "broken");
    assert_eq!(loras[0]["status"], "failed");
    assert_eq!(loras[0]["mode"], "fused");
    assert!(loras[0]["error"].as_str().unwrap().contains("no such file"));
    assert_eq!(loras[1]["name"], "ink");
    assert_eq!(loras[1]["status"], "loaded");
    assert_eq!(loras[1]["mode"], "per_request");
    assert_eq!(loras[1]["format"], "kohya");

    let body = |key: &str, loras: Value| {
        json!({"prompts": ["a fox"], "upload_urls": [s3.presign_put(key, "image/png", HOUR)],
               "seed": 5, "width": 256, "height": 256, "num_steps": 2, "loras": loras})
    };
    for bad in ["broken", "nope"] {
        let resp = s
            .post(
                "/generate",
                body("x.png", json!([{"name": bad, "scale": 0.5}])),
            )
            .await;
        assert_eq!(resp.status(), 422, "{bad}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(
            v["detail"][0]["loc"],
            json!(["body", "loras", 0, "name"]),
            "{v}"
        );
        assert!(
            v["detail"][0]["msg"].as_str().unwrap().contains("[ink]"),
            "{v}"
        );
    }
    let resp = s
        .post(
            "/generate",
            body("x.png", json!([{"name": "ink", "scale": 9}])),
        )
        .await;
    assert_eq!(resp.status(), 422);

    let mut images = Vec::new();
    for (key, loras) in [
        ("base.png", json!([])),
        ("ink.png", json!([{"name": "ink", "scale": 1.3}])),
        ("base2.png", json!(null)),
    ] {
        let v = generate(&s, body(key, loras)).await;
        assert_eq!(v["success"], true, "{v}");
        let (_, bytes) = s3.get(key).await.unwrap();
        images.push(image::load_from_memory(&bytes).unwrap().to_rgb8());
    }
    assert_ne!(images[0], images[1], "the adapter changed nothing");
    assert_eq!(
        images[0], images[2],
        "the adapter leaked into the next request"
    );
}
