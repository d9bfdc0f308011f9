//! Access control: API keys on /generate and /upscale, open probes, optional protection of
//! /metrics and /docs, key-file reloads, per-key rate limits, and keys kept out of every output.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use imagegen::api::auth::key_id;
use imagegen::engine::NoUpscaler;
use serde_json::{Value, json};

use crate::backend::Paint;
use crate::common::{Peer, Server};

async fn server(flags: &[&str]) -> Server {
    let s = Server::start(Paint::default().loader(Duration::ZERO), NoUpscaler, flags).await;
    s.wait_status("healthy", Duration::from_secs(10)).await;
    s
}

fn bearer(key: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {key}"))
}

/// A body the handler would reject (422) if it were ever parsed.
fn bad_body() -> Value {
    json!({"prompts": []})
}

async fn status_with(s: &Server, path: &str, headers: &[(&str, &str)]) -> u16 {
    s.post_with(path, headers, bad_body())
        .await
        .status()
        .as_u16()
}

#[tokio::test]
async fn without_keys_the_service_is_open_and_health_says_so() {
    let s = server(&[]).await;
    let h: Value = s.get_json("/health").await;
    assert_eq!(h["auth"], "none", "{h}");
    assert_eq!(status_with(&s, "/generate", &[]).await, 422);
    assert_eq!(status_with(&s, "/upscale", &[]).await, 422);
}

#[tokio::test]
async fn protected_routes_need_a_right_key_in_either_header_before_anything_else() {
    let s = server(&["--api-keys", "key-alpha,key-beta"]).await;
    let peer = Peer::start().await;
    let h: Value = s.get_json("/health").await;
    assert_eq!(h["auth"], "api_key", "{h}");

    for path in ["/generate", "/upscale"] {
        let r = s.post_with(path, &[], bad_body()).await;
        assert_eq!(r.status(), 401, "{path} without a key");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body, json!({"detail": "Not authenticated"}));

        let (k, v) = bearer("key-gamma");
        let r = s.post_with(path, &[(k, &v)], bad_body()).await;
        assert_eq!(r.status(), 401, "{path} with a wrong key");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body, json!({"detail": "Invalid API key"}));
        assert_eq!(
            status_with(&s, path, &[("x-api-key", "key-alph")]).await,
            401
        );

        // A right key gets through to validation, in either header.
        let (k, v) = bearer("key-alpha");
        assert_eq!(
            status_with(&s, path, &[(k, &v)]).await,
            422,
            "{path} Bearer"
        );
        assert_eq!(
            status_with(&s, path, &[("x-api-key", "key-beta")]).await,
            422
        );
    }

    // Refused before anything is downloaded or queued: a valid upscale body without a key
    // never fetches its image.
    let body =
        json!({"image_url": peer.url("/ref.png"), "upload_url": peer.url("/record"), "scale": 2});
    let r = s.post_with("/upscale", &[], body.clone()).await;
    assert_eq!(r.status(), 401);
    let r = s
        .post_with(
            "/generate",
            &[],
            json!({"prompts": ["p"], "upload_urls": [peer.url("/record")],
        "images": [{"url": peer.url("/ref.png")}], "width": 256, "height": 256}),
        )
        .await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        peer.state
            .reference_gets
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert!(peer.state.puts.lock().unwrap().is_empty());
    // With the key the same upscale body is downloaded (this server has no upscaler, so the
    // item fails later, but its image was fetched).
    let (k, v) = bearer("key-alpha");
    let r = s.post_with("/upscale", &[(k, &v)], body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        peer.state
            .reference_gets
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );

    // Probes, metrics and docs stay open by default.
    for path in [
        "/",
        "/health",
        "/ready",
        "/live",
        "/metrics",
        "/openapi.json",
    ] {
        assert_eq!(s.get(path).await.status(), 200, "{path}");
    }
    let metrics = s.get_text("/metrics").await;
    for want in [
        "imagegen_auth_refusals_total{reason=\"missing\",route=\"/generate\"} 2".to_string(),
        "imagegen_auth_refusals_total{reason=\"invalid\",route=\"/upscale\"} 2".to_string(),
        format!(
            "imagegen_requests_by_key_total{{key_id=\"{}\",route=\"/upscale\"}} 2",
            key_id("key-alpha")
        ),
    ] {
        assert!(metrics.contains(&want), "{want} missing in\n{metrics}");
    }
    for text in [
        metrics,
        s.get_text("/health").await,
        s.get_text("/openapi.json").await,
    ] {
        assert!(!text.contains("key-alpha") && !text.contains("key-beta"));
    }
}

#[tokio::test]
async fn metrics_and_docs_can_be_put_behind_the_key() {
    let s = server(&[
        "--api-keys",
        "ops-key",
        "--protect-metrics",
        "true",
        "--protect-docs",
        "true",
    ])
    .await;
    for path in ["/metrics", "/openapi.json", "/docs/"] {
        let r = s.get(path).await;
        assert_eq!(r.status(), 401, "{path}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let (k, v) = bearer("ops-key");
        assert_eq!(s.get_with(path, &[(k, &v)]).await.status(), 200, "{path}");
    }
    for path in ["/health", "/ready", "/live", "/"] {
        assert_eq!(s.get(path).await.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn openapi_declares_the_bearer_and_header_schemes() {
    let s = server(&[]).await;
    let doc: Value = s.get_json("/openapi.json").await;
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["type"], "http", "{schemes}");
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert_eq!(schemes["api_key"]["in"], "header");
    assert_eq!(schemes["api_key"]["name"], "X-API-Key");
    for path in ["/generate", "/upscale"] {
        let sec = &doc["paths"][path]["post"]["security"];
        assert!(sec.to_string().contains("bearer"), "{path}: {sec}");
        assert!(doc["paths"][path]["post"]["responses"]["401"].is_object());
    }
}

/// Waits until `key` gets past the guard on /generate (422 for the bad body).
async fn wait_accepted(s: &Server, key: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while status_with(s, "/generate", &[("x-api-key", key)]).await != 422 {
        assert!(Instant::now() < deadline, "{key} never became valid");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_key_file_is_followed_when_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.txt");
    std::fs::write(&path, "# one key a line\nfile-key-1\n").unwrap();
    let p = path.to_str().unwrap();
    let s = server(&["--api-keys-file", p, "--api-keys-poll-secs", "1"]).await;
    assert_eq!(
        status_with(&s, "/generate", &[("x-api-key", "file-key-1")]).await,
        422
    );
    assert_eq!(
        status_with(&s, "/generate", &[("x-api-key", "file-key-2")]).await,
        401
    );

    std::fs::write(&path, "file-key-2\n").unwrap();
    wait_accepted(&s, "file-key-2", Duration::from_secs(30)).await;
    assert_eq!(
        status_with(&s, "/generate", &[("x-api-key", "file-key-1")]).await,
        401
    );
}

#[tokio::test]
async fn sighup_reloads_the_key_file_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.txt");
    std::fs::write(&path, "hup-key-1\n").unwrap();
    // Polling effectively off: only the signal can make the new key valid.
    let s = server(&[
        "--api-keys-file",
        path.to_str().unwrap(),
        "--api-keys-poll-secs",
        "3600",
    ])
    .await;
    // The server answered, so its SIGHUP handler is installed (before it serves).
    assert_eq!(
        status_with(&s, "/generate", &[("x-api-key", "hup-key-1")]).await,
        422
    );
    std::fs::write(&path, "hup-key-2\n").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        status_with(&s, "/generate", &[("x-api-key", "hup-key-2")]).await,
        401
    );
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    wait_accepted(&s, "hup-key-2", Duration::from_secs(30)).await;
}

#[tokio::test]
async fn each_key_has_its_own_rate_limit() {
    let s = server(&["--api-keys", "rate-a,rate-b", "--rate-limit-per-key", "2"]).await;
    let a = [("x-api-key", "rate-a")];
    assert_eq!(status_with(&s, "/generate", &a).await, 422);
    assert_eq!(status_with(&s, "/upscale", &a).await, 422);
    let r = s.post_with("/generate", &a, bad_body()).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    let body: Value = r.json().await.unwrap();
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("2 requests per minute"),
        "{body}"
    );
    assert_eq!(
        status_with(&s, "/generate", &[("x-api-key", "rate-b")]).await,
        422
    );
    let metrics = s.get_text("/metrics").await;
    assert!(
        metrics.contains(
            "imagegen_auth_refusals_total{reason=\"rate_limited\",route=\"/generate\"} 1"
        ),
        "{metrics}"
    );
}

/// Every log line of this test binary, from the first use on (a global subscriber: the other
/// tests' lines land here too, which only widens what is checked).
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("imagegen=debug,tower_http=debug")
            .with_ansi(false)
            .with_writer(move || LogSink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("no other global subscriber");
        buf
    })
    .clone()
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn keys_never_reach_logs_metrics_errors_or_health() {
    let logs = captured_logs();
    let key = "sk-log-canary-7f3a";
    let s = server(&["--api-keys", key]).await;
    let (k, v) = bearer(key);
    let mut seen = Vec::new();
    for headers in [
        vec![(k, v.as_str())],
        vec![("x-api-key", key)],
        vec![("authorization", "Bearer sk-log-canary-wrong")],
        vec![("x-api-key", "sk-log-canary-wrong")],
    ] {
        let r = s.post_with("/generate", &headers, bad_body()).await;
        seen.push(r.text().await.unwrap());
    }
    seen.push(s.get_text("/metrics").await);
    seen.push(s.get_text("/health").await);
    for text in &seen {
        assert!(!text.contains("log-canary"), "{text}");
    }
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).to_string();
    // The capture works: our refusals and the admitted key's id are in it.
    assert!(
        text.contains("request refused"),
        "no auth lines captured:\n{text}"
    );
    assert!(text.contains(&key_id(key)), "key id not logged:\n{text}");
    assert!(!text.contains("log-canary"), "a key leaked into the logs");
}
