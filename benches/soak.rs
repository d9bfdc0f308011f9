//! Soak: thousands of mixed requests against `imagegen serve` (a child process, CPU, the tiny
//! random-weight FLUX.2 model and upscaler) on loopback, to see leaks and drift rather than
//! speed. Reports the server's RSS, open file descriptors and threads at the start and the end,
//! latency percentiles per request kind, the outcome counts and the load average.
//!
//! `cargo bench --profile dev --bench soak -- --bench --secs 600 --clients 8`
//! (the dev profile has optimised dependencies; a release build is not needed to find leaks).
//! Without `--bench` (as under `cargo test --all-targets`) it runs for 3 s as a smoke check.
//! Figures are written to target/bench/soak.json too.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, put};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Mutex;

/// Process facts read from /proc.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct ProcStats {
    rss_kib: u64,
    fds: usize,
    threads: u64,
}

fn proc_stats(pid: u32) -> ProcStats {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    ProcStats {
        rss_kib: field("VmRSS:"),
        fds,
        threads: field("Threads:"),
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(default)
}

/// The request kinds of the mix, in rotation.
const KINDS: [&str; 7] = [
    "generate",
    "generate_refs",
    "upscale",
    "health",
    "invalid_422",
    "too_large_413",
    "metrics",
];

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_server(client: &reqwest::Client) -> Server {
    let root = env!("CARGO_MANIFEST_DIR");
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_imagegen"))
        .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--device", "cpu", "--model-id"])
        .arg(format!("{root}/tests/fixtures/flux2/tiny-model"))
        .args(["--upscaler-model", "general-x4v3", "--upscaler-weights"])
        .arg(format!(
            "{root}/tests/fixtures/upscale/srvgg_x4.safetensors"
        ))
        .args(["--upscale-tile", "0", "--upscaler-allow-download", "false"])
        .args(["--allow-private-urls", "true", "--queue-size", "64"])
        .args(["--max-body-bytes", "65536", "--log-level", "warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start imagegen serve");
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = client.get(format!("{base}/ready")).send().await
            && r.status() == 200
        {
            break;
        }
        assert!(Instant::now() < deadline, "server never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Server { child, base }
}

/// Reference images to download and an upload sink, in this process.
async fn start_peer() -> String {
    let png = {
        let img =
            image::RgbImage::from_fn(128, 96, |x, y| image::Rgb([x as u8 * 2, y as u8 * 2, 80]));
        let mut out = Vec::new();
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    };
    let app = Router::new()
        .route(
            "/ref.png",
            get(move || {
                let png = png.clone();
                async move { png }
            }),
        )
        .route("/sink/{*key}", put(|| async { StatusCode::OK }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// Sends one request of `kind`; returns (HTTP status, whether the answer was as expected).
async fn one(client: &reqwest::Client, base: &str, peer: &str, kind: &str, n: u64) -> (u16, bool) {
    let gen_body = |refs: bool| {
        let mut b = json!({"prompts": ["soak"], "upload_urls": [format!("{peer}/sink/{n}.png")],
                           "width": 256, "height": 256, "num_steps": 1, "seed": n});
        if refs {
            b["images"] = json!([{"url": format!("{peer}/ref.png")}]);
        }
        b
    };
    let resp = match kind {
        "generate" => {
            client
                .post(format!("{base}/generate"))
                .json(&gen_body(false))
                .send()
                .await
        }
        "generate_refs" => {
            client
                .post(format!("{base}/generate"))
                .json(&gen_body(true))
                .send()
                .await
        }
        "upscale" => {
            let b = json!({"image_url": format!("{peer}/ref.png"), "scale": 2,
                           "upload_url": format!("{peer}/sink/up-{n}.png")});
            client.post(format!("{base}/upscale")).json(&b).send().await
        }
        "health" => client.get(format!("{base}/health")).send().await,
        "metrics" => client.get(format!("{base}/metrics")).send().await,
        "invalid_422" => {
            let b = json!({"prompts": [], "upload_urls": ["x"], "width": 1});
            client
                .post(format!("{base}/generate"))
                .json(&b)
                .send()
                .await
        }
        "too_large_413" => {
            let b = json!({"prompts": ["x".repeat(70_000)], "upload_urls": ["http://x/1"]});
            client
                .post(format!("{base}/generate"))
                .json(&b)
                .send()
                .await
        }
        _ => unreachable!(),
    };
    let Ok(resp) = resp else { return (0, false) };
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let ok = match kind {
        "generate" | "generate_refs" | "upscale" => status == 200 && body["success"] == true,
        "invalid_422" => status == 422,
        "too_large_413" => status == 413,
        _ => status == 200,
    };
    (status, ok)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[tokio::main]
async fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let secs = if bench { arg("--secs", 600) } else { 3 };
    let clients = arg("--clients", 8);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let peer = start_peer().await;
    let server = start_server(&client).await;
    let pid = server.child.id();
    // Warm-up: one of each, so lazily built state is not counted as growth.
    for (i, kind) in KINDS.iter().enumerate() {
        one(&client, &server.base, &peer, kind, i as u64).await;
    }
    let start = proc_stats(pid);
    let load_start = load_average();
    eprintln!(
        "soak: {secs} s, {clients} clients, server pid {pid}; start {start:?}, load {load_start}"
    );

    let latencies: Arc<Mutex<BTreeMap<&'static str, Vec<f64>>>> = Arc::default();
    let outcomes: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let counter = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, base, peer) = (client.clone(), server.base.clone(), peer.clone());
        let (latencies, outcomes, counter) = (latencies.clone(), outcomes.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < stop {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let kind = KINDS[n as usize % KINDS.len()];
                let t = Instant::now();
                let (status, ok) = one(&client, &base, &peer, kind, n).await;
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                latencies.lock().await.entry(kind).or_default().push(ms);
                let key = format!("{kind} {status} {}", if ok { "ok" } else { "UNEXPECTED" });
                *outcomes.lock().await.entry(key).or_default() += 1;
            }
        }));
    }
    let mut mid = Vec::new();
    while Instant::now() < stop {
        tokio::time::sleep(Duration::from_secs(secs.clamp(1, 60))).await;
        let s = proc_stats(pid);
        eprintln!(
            "soak: t+{:>4.0}s {} requests, {s:?}, load {}",
            secs as f64 - stop.saturating_duration_since(Instant::now()).as_secs_f64(),
            counter.load(Ordering::Relaxed),
            load_average()
        );
        mid.push(s);
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Let in-flight uploads and dropped connections settle before the final reading.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let end = proc_stats(pid);
    let load_end = load_average();

    let total = counter.load(Ordering::Relaxed);
    println!("\nsoak: {total} requests in {secs} s with {clients} clients");
    println!("server start: {start:?}");
    println!("server end:   {end:?}");
    println!("load average start {load_start}, end {load_end} (1, 5, 15 min)");
    println!("\n| kind | n | p50 ms | p90 ms | p99 ms | max ms |\n|---|---|---|---|---|---|");
    let mut table = serde_json::Map::new();
    for (kind, v) in latencies.lock().await.iter_mut() {
        v.sort_by(f64::total_cmp);
        let (p50, p90, p99, max) = (
            percentile(v, 0.5),
            percentile(v, 0.9),
            percentile(v, 0.99),
            percentile(v, 1.0),
        );
        println!(
            "| {kind} | {} | {p50:.1} | {p90:.1} | {p99:.1} | {max:.1} |",
            v.len()
        );
        table.insert(
            kind.to_string(),
            json!({"n": v.len(), "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": max}),
        );
    }
    let outcomes = outcomes.lock().await.clone();
    println!("\noutcomes:");
    for (k, n) in &outcomes {
        println!("  {k}: {n}");
    }
    let report = json!({
        "secs": secs, "clients": clients, "requests": total,
        "start": start, "end": end, "samples": mid,
        "load_average": {"start": load_start, "end": load_end},
        "latency": table, "outcomes": outcomes,
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(
        dir.join("soak.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    );
    let unexpected: u64 = outcomes
        .iter()
        .filter(|(k, _)| k.ends_with("UNEXPECTED"))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(unexpected, 0, "requests with unexpected answers");
}
