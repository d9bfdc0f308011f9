//! Downloads and uploads: SSRF refusals (decided before any connection), byte and pixel caps,
//! redirects re-checked per hop.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{Peer, Server};

async fn upscale_error(s: &Server, image_url: &str, upload_url: &str) -> String {
    let resp = s
        .post(
            "/upscale",
            json!({"image_url": image_url, "upload_url": upload_url}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["success"], false, "{v}");
    v["error"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn private_and_metadata_targets_are_refused_by_default() {
    // This server keeps the default policy: no loopback, private or link-local targets.
    let s = Server::start_real(&["--allow-private-urls", "false"]).await;
    let peer = Peer::start().await;
    let cases = [
        (peer.url("/ref.png"), "loopback"),
        (
            "http://169.254.169.254/latest/meta-data/".to_string(),
            "link-local",
        ),
        ("http://10.0.0.1/x.png".to_string(), "private"),
        ("http://[::1]:9/x.png".to_string(), "loopback"),
        (
            format!("http://localhost:{}/ref.png", peer.addr.port()),
            "local name",
        ),
        ("file:///etc/passwd".to_string(), "only http and https"),
    ];
    for (url, why) in cases {
        let err = upscale_error(&s, &url, "http://203.0.113.9/out.png").await;
        assert!(err.contains(why), "{url}: {err}");
        assert!(
            err.contains("ALLOW_PRIVATE_URLS") || why.starts_with("only"),
            "{err}"
        );
    }
    // Reference images go through the same guard.
    s.wait_status("healthy", Duration::from_secs(60)).await;
    let v: Value = s
        .post_json(
            "/generate",
            json!({"prompts": ["a"], "upload_urls": ["http://203.0.113.9/o.png"],
                   "images": [{"url": "http://169.254.169.254/"}]}),
        )
        .await;
    let err = v["results"][0]["error"].as_str().unwrap();
    assert!(
        err.contains("reference image 0") && err.contains("link-local"),
        "{err}"
    );
}

#[tokio::test]
async fn caps_and_redirects() {
    let s = Server::start_real(&[
        "--preload-models",
        "false",
        "--max-download-bytes",
        "1000000",
        "--max-input-pixels",
        "1000000",
    ])
    .await;
    let peer = Peer::start().await;
    let sink = peer.url("/record");
    let err = upscale_error(&s, &peer.url("/big"), &sink).await;
    assert!(
        err.contains("larger than the limit of 1000000 bytes"),
        "{err}"
    );
    let err = upscale_error(&s, &peer.url("/bomb.png"), &sink).await;
    assert!(err.contains("more than the limit of 1000000"), "{err}");
    let err = upscale_error(&s, &peer.url("/loop"), &sink).await;
    assert!(err.contains("more than 5 redirects"), "{err}");
    let err = upscale_error(&s, &peer.url("/redirect-file"), &sink).await;
    assert!(err.contains("only http and https"), "{err}");
    let err = upscale_error(&s, &peer.url("/not-image"), &sink).await;
    assert!(err.contains("unrecognised image format"), "{err}");
    // A redirect to an allowed target is followed; /upscale works with no FLUX model.
    let v: Value = s
        .post_json(
            "/upscale",
            json!({"image_url": peer.url("/redirect"), "upload_url": sink, "scale": 2}),
        )
        .await;
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(v["output_width"], 256);
    assert_eq!(peer.state.puts.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn missing_upscaler_weights_fail_the_request_not_the_server() {
    let s = Server::start_real(&["--upscaler-weights", "/nonexistent/missing.safetensors"]).await;
    let peer = Peer::start().await;
    let err = upscale_error(&s, &peer.url("/ref.png"), &peer.url("/record")).await;
    assert!(err.contains("missing.safetensors"), "{err}");
    let live = s.get("/live").await;
    assert_eq!(live.status(), 200);
}

/// A paint server (no model work to speak of) with the given flags, and a peer.
async fn quick_server(flags: &[&str]) -> (Server, Peer) {
    let s = Server::start(
        crate::backend::Paint::default().loader(Duration::ZERO),
        imagegen::engine::NoUpscaler,
        flags,
    )
    .await;
    s.wait_status("healthy", Duration::from_secs(10)).await;
    (s, Peer::start().await)
}

#[tokio::test]
async fn a_download_has_one_deadline_across_all_its_redirects() {
    // Four hops of 400 ms each: every hop is well inside 1 s, the whole chain is not.
    let (s, peer) = quick_server(&["--download-timeout-secs", "1"]).await;
    let v: Value = s
        .post_json(
            "/generate",
            json!({"prompts": ["p"], "upload_urls": [peer.url("/record")], "num_steps": 1,
                   "width": 256, "height": 256, "images": [{"url": peer.url("/slow-hop/3")}]}),
        )
        .await;
    let err = v["results"][0]["error"].as_str().unwrap();
    assert!(err.contains("reference image 0"), "{err}");
    assert!(err.contains("total deadline of 1s"), "{err}");
    assert!(err.contains("DOWNLOAD_TIMEOUT_SECS"), "{err}");
    // It says where the time went.
    assert!(err.contains("redirect(s)"), "{err}");
    // A single slow hop still succeeds: the deadline is per download, not shorter.
    let v: Value = s
        .post_json(
            "/generate",
            json!({"prompts": ["p"], "upload_urls": [peer.url("/record")], "num_steps": 1,
                   "width": 256, "height": 256, "images": [{"url": peer.url("/slow-hop/0")}]}),
        )
        .await;
    assert_eq!(v["success"], true, "{v}");
}

#[tokio::test]
async fn an_upload_has_one_deadline_across_all_its_retries() {
    // Each attempt answers 503 after 400 ms (inside the 2 s per-attempt timeout) and is
    // retried up to 10 times; the upload as a whole may take 1 s.
    let (s, peer) = quick_server(&[
        "--upload-timeout-secs",
        "2",
        "--upload-retries",
        "10",
        "--upload-deadline-secs",
        "1",
    ])
    .await;
    let v: Value = s
        .post_json(
            "/generate",
            json!({"prompts": ["p"], "upload_urls": [peer.url("/slow-503")], "num_steps": 1,
                   "width": 256, "height": 256}),
        )
        .await;
    let err = v["results"][0]["error"].as_str().unwrap();
    assert!(err.contains("total deadline of 1s"), "{err}");
    assert!(err.contains("UPLOAD_DEADLINE_SECS"), "{err}");
    assert!(err.contains("HTTP 503"), "last error named: {err}");
    let attempts = peer.state.puts.lock().unwrap().len();
    assert!(
        attempts < 11,
        "{attempts} attempts: the deadline did not stop the retries"
    );
}
