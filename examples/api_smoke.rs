//! `make test-api`: a live smoke test of a running imagegen server (the port of the original's
//! scripts/test_api.py), uploading to a local S3-compatible server instead of an internet host.
//!
//!   cargo run --release --example api_smoke -- --base-url http://127.0.0.1:7000 [--size 512]
//!       [--s3-port 9000] [--skip-generate] [--skip-upscale]
//!
//! The server must be allowed to reach the loopback S3 (`ALLOW_PRIVATE_URLS=true`); against a
//! remote box, tunnel both ways: `ssh -L 7000:localhost:7000 -R 9000:localhost:9000 ...`.
//! Checks: /live, /ready, /health and / answer as documented; one prompt; a batch of three
//! (seeds seed, seed+1, seed+2); a prompt with a reference image; /upscale 2x. Every upload
//! is fetched back from S3 and decoded at the reported size. Exit code 0 only if all pass.

#[path = "support/s3.rs"]
mod s3;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};

struct Args {
    base: String,
    size: u32,
    s3_port: u16,
    skip_generate: bool,
    skip_upscale: bool,
    timeout: u64,
    /// Sent as `Authorization: Bearer` on every request (`--api-key`, else env API_KEY).
    api_key: Option<String>,
}

fn parse_args() -> Args {
    let mut a = Args {
        base: "http://127.0.0.1:7000".into(),
        size: 512,
        s3_port: 0,
        skip_generate: false,
        skip_upscale: false,
        timeout: 600,
        api_key: std::env::var("API_KEY").ok().filter(|k| !k.is_empty()),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(x) = it.next() {
        let mut val = || it.next().cloned().unwrap_or_default();
        match x.as_str() {
            "--base-url" => a.base = val().trim_end_matches('/').to_string(),
            "--size" => a.size = val().parse().expect("--size"),
            "--s3-port" => a.s3_port = val().parse().expect("--s3-port"),
            "--timeout" => a.timeout = val().parse().expect("--timeout"),
            "--api-key" => a.api_key = Some(val()),
            "--skip-generate" => a.skip_generate = true,
            "--skip-upscale" => a.skip_upscale = true,
            other => {
                eprintln!("unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    a
}

struct Checks {
    passed: usize,
    failed: Vec<String>,
}

impl Checks {
    fn check(&mut self, name: &str, r: anyhow::Result<String>) {
        match r {
            Ok(detail) => {
                self.passed += 1;
                println!("PASS {name}: {detail}");
            }
            Err(e) => {
                println!("FAIL {name}: {e:#}");
                self.failed.push(name.to_string());
            }
        }
    }
}

/// Decodes the object at `key` and returns its size.
fn stored_image(s3: &s3::LocalS3, key: &str) -> anyhow::Result<(u32, u32)> {
    let bytes = std::fs::read(s3.object_path(key))
        .map_err(|e| anyhow::anyhow!("object {key} not in S3: {e}"))?;
    let img = image::load_from_memory(&bytes)?;
    Ok((img.width(), img.height()))
}

fn reference_png(side: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(side, side, |x, y| {
        image::Rgb([(x * 255 / side) as u8, (y * 255 / side) as u8, 128])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("png");
    out.into_inner()
}

async fn get_json(http: &reqwest::Client, url: &str) -> anyhow::Result<(u16, Value)> {
    let r = http.get(url).send().await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await?))
}

async fn generate(http: &reqwest::Client, base: &str, body: Value) -> anyhow::Result<Value> {
    let r = http
        .post(format!("{base}/generate"))
        .json(&body)
        .send()
        .await?;
    let status = r.status();
    let v: Value = r.json().await?;
    anyhow::ensure!(status.is_success(), "HTTP {status}: {v}");
    anyhow::ensure!(v["success"] == json!(true), "success false: {v}");
    Ok(v)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = parse_args();
    let root = tempfile::tempdir()?;
    let s3 = s3::LocalS3::start(root.path(), SocketAddr::from(([127, 0, 0, 1], a.s3_port))).await?;
    println!("local S3 on http://{}; server {}", s3.addr, a.base);
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = &a.api_key {
        let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))?;
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(a.timeout))
        .default_headers(headers)
        .build()?;
    let mut c = Checks {
        passed: 0,
        failed: vec![],
    };
    let base = a.base.as_str();

    c.check(
        "GET /live",
        async {
            let r = http.get(format!("{base}/live")).send().await?;
            anyhow::ensure!(r.status().is_success(), "HTTP {}", r.status());
            Ok(format!("HTTP {}", r.status()))
        }
        .await,
    );
    if a.api_key.is_some() {
        c.check(
            "POST /generate without the key is refused",
            async {
                let r = reqwest::Client::new()
                    .post(format!("{base}/generate"))
                    .json(&json!({"prompts": ["x"], "upload_urls": ["https://example.com/x"]}))
                    .send()
                    .await?;
                anyhow::ensure!(r.status() == 401, "HTTP {} (expected 401)", r.status());
                Ok("401".into())
            }
            .await,
        );
    }
    let (ready_status, _) = match http.get(format!("{base}/ready")).send().await {
        Ok(r) => (r.status().as_u16(), ()),
        Err(_) => (0, ()),
    };
    c.check(
        "GET /health",
        async {
            let (status, v) = get_json(&http, &format!("{base}/health")).await?;
            anyhow::ensure!(status == 200, "HTTP {status}");
            for k in [
                "status",
                "flux_loaded",
                "gpu_available",
                "model_id",
                "quantization",
                "text_encoder_quantization",
                "version",
                "auth",
            ] {
                anyhow::ensure!(v.get(k).is_some(), "field {k} missing: {v}");
            }
            // /ready and /health agree: ready ⇔ healthy.
            let healthy = v["status"] == json!("healthy");
            anyhow::ensure!(
                healthy == (ready_status == 200),
                "/ready {ready_status} but /health {v}"
            );
            Ok(format!(
                "status {} flux_loaded {} (/ready {ready_status})",
                v["status"], v["flux_loaded"]
            ))
        }
        .await,
    );
    c.check(
        "GET /",
        async {
            let (status, v) = get_json(&http, &format!("{base}/")).await?;
            anyhow::ensure!(status == 200 && v["name"].is_string(), "HTTP {status}: {v}");
            Ok(format!("{} {}", v["name"], v["version"]))
        }
        .await,
    );

    let n = a.size;
    if !a.skip_generate {
        c.check(
            "POST /generate (1 prompt)",
            async {
                let url = s3.presign_put("single.png", "image/png");
                let v = generate(
                    &http,
                    base,
                    json!({
                        "prompts": ["A cute robot cat sitting on a windowsill, digital art"],
                        "upload_urls": [url], "width": n, "height": n, "num_steps": 4, "seed": 42
                    }),
                )
                .await?;
                let r = &v["results"][0];
                anyhow::ensure!(r["success"] == json!(true) && r["seed"] == json!(42), "{v}");
                let (w, h) = stored_image(&s3, "single.png")?;
                anyhow::ensure!((w, h) == (n, n), "stored {w}x{h}, expected {n}x{n}");
                Ok(format!(
                    "{w}x{h} png in S3, inference {} ms",
                    r["timing_inference_ms"]
                ))
            }
            .await,
        );
        c.check(
            "POST /generate (batch of 3, seeds increment)",
            async {
                let urls: Vec<String> = (0..3)
                    .map(|i| s3.presign_put(&format!("batch{i}.jpg"), "image/jpeg"))
                    .collect();
                let v = generate(&http, base, json!({
                "prompts": ["A red apple", "A green apple", "A yellow banana"],
                "upload_urls": urls, "width": n, "height": n, "seed": 100, "output_format": "jpeg"
            })).await?;
                let seeds: Vec<Value> = v["results"]
                    .as_array()
                    .map(|r| r.iter().map(|x| x["seed"].clone()).collect())
                    .unwrap_or_default();
                anyhow::ensure!(
                    seeds == vec![json!(100), json!(101), json!(102)],
                    "seeds {seeds:?}"
                );
                for i in 0..3 {
                    stored_image(&s3, &format!("batch{i}.jpg"))?;
                }
                Ok("3 jpegs in S3, seeds 100..102".into())
            }
            .await,
        );
        c.check(
            "POST /generate (reference image)",
            async {
                std::fs::write(s3.object_path("ref.png"), reference_png(n.max(64)))?;
                let v = generate(
                    &http,
                    base,
                    json!({
                        "prompts": ["The same scene at night"],
                        "upload_urls": [s3.presign_put("edited.webp", "image/webp")],
                        "images": [{"url": s3.presign_get("ref.png")}],
                        "width": n, "height": n, "seed": 7, "output_format": "webp"
                    }),
                )
                .await?;
                let (w, h) = stored_image(&s3, "edited.webp")?;
                Ok(format!("{w}x{h} webp in S3, {} ms", v["timing_total_ms"]))
            }
            .await,
        );
    }
    if !a.skip_upscale {
        c.check(
            "POST /upscale (2x)",
            async {
                std::fs::write(s3.object_path("small.png"), reference_png(64))?;
                let r = http
                    .post(format!("{base}/upscale"))
                    .json(&json!({
                        "image_url": s3.presign_get("small.png"),
                        "upload_url": s3.presign_put("big.png", "image/png"),
                        "scale": 2
                    }))
                    .send()
                    .await?;
                let status = r.status();
                let v: Value = r.json().await?;
                anyhow::ensure!(
                    status.is_success() && v["success"] == json!(true),
                    "HTTP {status}: {v}"
                );
                let (w, h) = stored_image(&s3, "big.png")?;
                anyhow::ensure!((w, h) == (128, 128), "stored {w}x{h}, expected 128x128");
                Ok(format!(
                    "64x64 -> {w}x{h}, upscale {} ms",
                    v["timing_upscale_ms"]
                ))
            }
            .await,
        );
    }

    println!("\n{} passed, {} failed", c.passed, c.failed.len());
    if !c.failed.is_empty() {
        println!("failed: {}", c.failed.join(", "));
        std::process::exit(1);
    }
    Ok(())
}
