//! `/health` latency idle vs while the GPU worker runs a generation (the real pipeline with the
//! tiny random-weight model on CPU), side by side in one process. `cargo bench --bench
//! service_health`; under `cargo test` it runs a few requests only, as a smoke check.
//!
//! Prints median and p99 per phase and the busy/idle ratio of the medians.

use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::put;
use imagegen::config::ServeArgs;
use tokio::net::TcpListener;

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

async fn sample(client: &reqwest::Client, url: &str, n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = client.get(url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        out.push(t.elapsed());
    }
    out.sort();
    out
}

async fn busy(client: &reqwest::Client, base: &str) -> bool {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.contains("imagegen_worker_busy 1")
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full { 300 } else { 5 };
    let root = env!("CARGO_MANIFEST_DIR");
    let model = format!("{root}/tests/fixtures/flux2/tiny-model");
    let args = ServeArgs::try_parse_from([
        "--device",
        "cpu",
        "--model-id",
        &model,
        "--allow-private-urls",
        "true",
        "--log-level",
        "warn",
    ])
    .unwrap();
    // An upload sink on loopback.
    let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let app = Router::new().route("/put", put(|| async { StatusCode::OK }));
    tokio::spawn(async move { axum::serve(sink, app).await.unwrap() });

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(imagegen::api::serve_on(
        listener,
        args,
        std::future::pending(),
    ));
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let health = format!("{base}/health");
    loop {
        let v: serde_json::Value = match client.get(&health).send().await {
            Ok(r) => r.json().await.unwrap(),
            Err(_) => serde_json::Value::Null,
        };
        if v["status"] == "healthy" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let idle = sample(&client, &health, n).await;

    let steps = if full { 50 } else { 4 };
    let body = serde_json::json!({
        "prompts": ["a", "b", "c", "d"], "upload_urls": vec![format!("http://{sink_addr}/put"); 4],
        "width": 256, "height": 256, "num_steps": steps, "seed": 1
    });
    let job = tokio::spawn({
        let (c, u) = (client.clone(), format!("{base}/generate"));
        async move { c.post(u).json(&body).send().await.unwrap().status() }
    });
    while !busy(&client, &base).await {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let during = sample(&client, &health, n).await;
    let still_busy = busy(&client, &base).await;
    assert_eq!(job.await.unwrap(), 200);

    let (mi, md) = (quantile(&idle, 0.5), quantile(&during, 0.5));
    println!("/health latency, {n} sequential requests per phase (loopback, CPU build)");
    println!("| phase | median | p99 | max |");
    println!("|---|---|---|---|");
    for (name, s) in [("idle", &idle), ("worker generating", &during)] {
        println!(
            "| {name} | {:?} | {:?} | {:?} |",
            quantile(s, 0.5),
            quantile(s, 0.99),
            s[s.len() - 1]
        );
    }
    println!(
        "busy/idle median ratio: {:.2} (worker still busy after sampling: {still_busy})",
        md.as_secs_f64() / mi.as_secs_f64()
    );
}
