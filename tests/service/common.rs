//! The test harness: the imagegen server on an ephemeral loopback port, a real S3-compatible
//! server (s3s-fs, which checks SigV4 presigned signatures, signed headers and expiry) with URLs
//! presigned by rusty-s3, and a local HTTP server for reference images and misbehaving peers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, put};
use imagegen::config::ServeArgs;
use imagegen::engine::{BackendLoader, DeviceMemory, ImageBackend, UpscaleBackend};
use rusty_s3::Credentials;
use rusty_s3::actions::S3Action as _;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The S3 server and presigner the smoke examples use (s3s-fs on a folder, rusty-s3 URLs).
#[allow(dead_code)]
#[path = "../../examples/support/s3.rs"]
mod local_s3;
use local_s3::{ACCESS_KEY, LocalS3};

/// An in-process s3s-fs server on 127.0.0.1 with authentication on.
pub struct S3 {
    pub addr: SocketAddr,
    server: LocalS3,
    /// Keeps the bucket folder alive as long as the server.
    _root: tempfile::TempDir,
}

impl S3 {
    pub async fn start() -> S3 {
        let root = tempfile::tempdir().unwrap();
        let server = LocalS3::start(root.path(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        S3 {
            addr: server.addr,
            server,
            _root: root,
        }
    }

    /// A presigned PUT URL that signs `content_type` (as production callers do).
    pub fn presign_put(&self, key: &str, content_type: &str, expires: Duration) -> String {
        let mut action = self.server.bucket.put_object(Some(&self.server.creds), key);
        action.headers_mut().insert("content-type", content_type);
        action.sign(expires).to_string()
    }

    /// A presigned PUT URL signed with the wrong secret.
    pub fn presign_put_wrong_secret(&self, key: &str, content_type: &str) -> String {
        let wrong = Credentials::new(ACCESS_KEY, "not-the-secret");
        let mut action = self.server.bucket.put_object(Some(&wrong), key);
        action.headers_mut().insert("content-type", content_type);
        action.sign(Duration::from_secs(600)).to_string()
    }

    /// GETs a stored object through the S3 API: (content type, bytes); None if absent.
    pub async fn get(&self, key: &str) -> Option<(String, Vec<u8>)> {
        let url = self
            .server
            .bucket
            .get_object(Some(&self.server.creds), key)
            .sign(Duration::from_secs(60));
        let resp = reqwest::get(url.as_str()).await.unwrap();
        if resp.status() == StatusCode::NOT_FOUND {
            return None;
        }
        assert!(resp.status().is_success(), "GET {key}: {}", resp.status());
        let ct = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        Some((ct, resp.bytes().await.unwrap().to_vec()))
    }
}

/// What the peer server saw of one PUT.
#[derive(Debug, Clone)]
pub struct SeenPut {
    pub content_length: Option<String>,
    pub transfer_encoding: Option<String>,
    pub content_type: Option<String>,
    pub body_len: usize,
}

/// A local HTTP server: reference images, redirects, oversized and hostile bodies, and upload
/// endpoints that fail on purpose.
pub struct Peer {
    pub addr: SocketAddr,
    pub state: Arc<PeerState>,
}

#[derive(Default)]
pub struct PeerState {
    /// GETs of /ref.png served so far.
    pub reference_gets: AtomicUsize,
    pub flaky_attempts: AtomicUsize,
    pub forbidden_attempts: AtomicUsize,
    pub puts: Mutex<Vec<SeenPut>>,
    pub reference_png: Vec<u8>,
    /// GETs of /hold.png waiting now; they answer once `released` is set.
    pub held: AtomicUsize,
    pub released: std::sync::atomic::AtomicBool,
}

pub fn png_bytes(img: &image::RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img.clone())
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// A PNG whose header declares 30000x30000 pixels (a decompression bomb's first bytes).
pub fn pixel_bomb() -> Vec<u8> {
    let mut png = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png, 30000, 30000);
        enc.set_color(png::ColorType::Rgb);
        let mut w = enc.write_header().unwrap();
        // A 5-byte stored deflate block: the first bytes of a 900 MP image.
        let idat = [0x78, 0x01, 0x00, 0x05, 0x00, 0xfa, 0xff, 0, 0, 0, 0, 0];
        w.write_chunk(png::chunk::IDAT, &idat).unwrap();
    }
    png
}

pub fn reference_image() -> image::RgbImage {
    image::RgbImage::from_fn(128, 96, |x, y| image::Rgb([x as u8 * 2, y as u8 * 2, 90]))
}

impl Peer {
    pub async fn start() -> Peer {
        let state = Arc::new(PeerState {
            reference_png: png_bytes(&reference_image()),
            ..Default::default()
        });
        let app = Router::new()
            .route(
                "/ref.png",
                get(|State(s): State<Arc<PeerState>>| async move {
                    s.reference_gets.fetch_add(1, Ordering::SeqCst);
                    (
                        [(header::CONTENT_TYPE, "image/png")],
                        s.reference_png.clone(),
                    )
                }),
            )
            .route(
                "/redirect",
                get(|| async { Redirect::temporary("/ref.png") }),
            )
            .route("/loop", get(|| async { Redirect::temporary("/loop") }))
            .route("/big", get(|| async { vec![0u8; 3 * 1024 * 1024] }))
            .route("/bomb.png", get(|| async { pixel_bomb() }))
            .route("/not-image", get(|| async { "<html>hello</html>" }))
            .route(
                "/redirect-file",
                get(|| async { Redirect::temporary("file:///etc/passwd") }),
            )
            .route("/hold.png", get(hold))
            .route("/slow-hop/{n}", get(slow_hop))
            .route("/slow-503", put(slow_503))
            .route("/flaky", put(flaky))
            .route("/forbidden", put(forbidden))
            .route("/record", put(record))
            .with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Peer { addr, state }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// An /upscale body for this peer's reference image, uploaded to its recorder.
    pub fn upscale_body(&self) -> serde_json::Value {
        serde_json::json!({"image_url": self.url("/ref.png"), "upload_url": self.url("/record")})
    }
}

fn seen(headers: &HeaderMap, body: &Bytes) -> SeenPut {
    let h = |name: header::HeaderName| {
        headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("").to_string())
    };
    SeenPut {
        content_length: h(header::CONTENT_LENGTH),
        transfer_encoding: h(header::TRANSFER_ENCODING),
        content_type: h(header::CONTENT_TYPE),
        body_len: body.len(),
    }
}

/// The reference PNG, once the test sets `released` (a URL as slow as the test wants).
async fn hold(State(s): State<Arc<PeerState>>) -> Response {
    s.held.fetch_add(1, Ordering::SeqCst);
    while !s.released.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.held.fetch_sub(1, Ordering::SeqCst);
    (
        [(header::CONTENT_TYPE, "image/png")],
        s.reference_png.clone(),
    )
        .into_response()
}

/// A chain of redirects, each hop answering after 400 ms: /slow-hop/n → n-1 → ... → /ref.png.
async fn slow_hop(axum::extract::Path(n): axum::extract::Path<u32>) -> Response {
    tokio::time::sleep(Duration::from_millis(400)).await;
    if n == 0 {
        Redirect::temporary("/ref.png").into_response()
    } else {
        Redirect::temporary(&format!("/slow-hop/{}", n - 1)).into_response()
    }
}

/// Every PUT answers 503 after 400 ms (each attempt inside its own timeout, retried).
async fn slow_503(State(s): State<Arc<PeerState>>, headers: HeaderMap, body: Bytes) -> Response {
    s.puts.lock().unwrap().push(seen(&headers, &body));
    tokio::time::sleep(Duration::from_millis(400)).await;
    StatusCode::SERVICE_UNAVAILABLE.into_response()
}

/// 503 twice, then 200.
async fn flaky(State(s): State<Arc<PeerState>>, headers: HeaderMap, body: Bytes) -> Response {
    s.puts.lock().unwrap().push(seen(&headers, &body));
    if s.flaky_attempts.fetch_add(1, Ordering::SeqCst) < 2 {
        StatusCode::SERVICE_UNAVAILABLE.into_response()
    } else {
        StatusCode::OK.into_response()
    }
}

async fn forbidden(State(s): State<Arc<PeerState>>) -> Response {
    s.forbidden_attempts.fetch_add(1, Ordering::SeqCst);
    (
        StatusCode::FORBIDDEN,
        "<Error><Code>AccessDenied</Code></Error>",
    )
        .into_response()
}

/// Rejects what real S3 rejects (chunked bodies, no Content-Length) and records the request.
async fn record(State(s): State<Arc<PeerState>>, headers: HeaderMap, body: Bytes) -> Response {
    let put = seen(&headers, &body);
    s.puts.lock().unwrap().push(put.clone());
    if put.transfer_encoding.is_some() {
        return StatusCode::NOT_IMPLEMENTED.into_response();
    }
    if put.content_length.is_none() {
        return StatusCode::LENGTH_REQUIRED.into_response();
    }
    StatusCode::OK.into_response()
}

/// Flags every test server starts with: loopback URLs allowed (the test peers live there), fast
/// upload retries and a 2 s shutdown grace period.
const TEST_FLAGS: [&str; 6] = [
    "--allow-private-urls",
    "true",
    "--upload-retry-base-ms",
    "20",
    "--shutdown-grace-secs",
    "2",
];

/// A running imagegen server; stops (gracefully) when dropped.
pub struct Server {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    pub handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Starts `imagegen::api::run` with the given backends and extra flags. Outbound loopback
    /// traffic is allowed (the test peers live there).
    pub async fn start<B: ImageBackend, U: UpscaleBackend>(
        loader: Option<BackendLoader<B>>,
        upscaler: U,
        flags: &[&str],
    ) -> Server {
        Self::launch(&[], flags, |listener, args, stopped| {
            imagegen::api::run(listener, args, false, loader, upscaler, async move {
                let _ = stopped.await;
            })
        })
        .await
    }

    /// [`Server::start`] with a device-memory hook the worker calls after each job.
    pub async fn start_with_memory<B: ImageBackend, U: UpscaleBackend, M: DeviceMemory>(
        loader: Option<BackendLoader<B>>,
        upscaler: U,
        memory: M,
        flags: &[&str],
    ) -> Server {
        Self::launch(&[], flags, |listener, args, stopped| {
            imagegen::api::run_with_memory(
                listener,
                args,
                false,
                loader,
                upscaler,
                memory,
                async move {
                    let _ = stopped.await;
                },
            )
        })
        .await
    }

    /// Starts the production server (`imagegen::api::serve_on`) on CPU with the committed tiny
    /// random-weight FLUX.2 model and the tiny random-weight SRVGGNetCompact upscaler: the real
    /// pipeline and the real upscaler, just small.
    pub async fn start_real(flags: &[&str]) -> Server {
        let root = env!("CARGO_MANIFEST_DIR");
        let model = format!("{root}/tests/fixtures/flux2/tiny-model");
        let weights = format!("{root}/tests/fixtures/upscale/srvgg_x4.safetensors");
        let real = [
            "--device",
            "cpu",
            "--model-id",
            &model,
            "--upscaler-model",
            "general-x4v3",
            "--upscaler-weights",
            &weights,
            "--upscale-tile",
            "0",
            "--upscaler-allow-download",
            "false",
        ];
        Self::launch(&real, flags, |listener, args, stopped| {
            imagegen::api::serve_on(listener, args, async move {
                let _ = stopped.await;
            })
        })
        .await
    }

    /// Parses `TEST_FLAGS`, then `preset`, then `flags`; binds an ephemeral loopback port and
    /// spawns `serve` on it with a shutdown signal that `shutdown` (or drop) fires.
    async fn launch<F, Fut>(preset: &[&str], flags: &[&str], serve: F) -> Server
    where
        F: FnOnce(TcpListener, ServeArgs, oneshot::Receiver<()>) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let mut argv: Vec<&str> = TEST_FLAGS.to_vec();
        argv.extend_from_slice(preset);
        argv.extend_from_slice(flags);
        let args = ServeArgs::try_parse_from(argv).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(serve(listener, args, stopped));
        Server {
            addr,
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            stop: Some(stop),
            handle: Some(handle),
        }
    }

    /// Waits until /health reports `status`, for at most `within`.
    pub async fn wait_status(&self, status: &str, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let h: serde_json::Value = self.get_json("/health").await;
            if h["status"] == status {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "status never became {status}: {h}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// POSTs `body` as JSON to `path` and parses the answer as JSON, whatever its status.
    pub async fn post_json(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        self.post(path, body).await.json().await.unwrap()
    }

    /// GETs `path`, whatever the answer's status.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    /// GETs `path` and parses the body as JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.get(path).await.json().await.unwrap()
    }

    /// GETs `path` and returns the body as text.
    pub async fn get_text(&self, path: &str) -> String {
        self.get(path).await.text().await.unwrap()
    }

    /// POSTs `body` as JSON to `path` with extra request headers.
    pub async fn post_with(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: serde_json::Value,
    ) -> reqwest::Response {
        let mut req = self.client.post(self.url(path)).json(&body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.unwrap()
    }

    /// GETs `path` with extra request headers.
    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut req = self.client.get(self.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.unwrap()
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// POSTs `body` as JSON to `path` on a spawned task, which yields the JSON answer.
    pub fn spawn_post_json(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> tokio::task::JoinHandle<serde_json::Value> {
        let (client, url) = (self.client.clone(), self.url(path));
        tokio::spawn(async move {
            client
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap()
        })
    }

    pub fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}
