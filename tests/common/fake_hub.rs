//! A stub of the model hub's HTTP API on 127.0.0.1 (nothing leaves the machine), serving a local
//! diffusers directory as repo [`REPO`]: the listing with sizes and LFS sha256s, and ranged
//! `resolve` downloads as hf-hub 0.4 requests them. Faults on demand: a gated repo (token), one
//! connection dropped mid-file, a wrong listed digest, a file held back until released.

// Each test binary uses only some of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::Digest;

pub const REPO: &str = "test-org/klein-tiny";
pub const TOKEN: &str = "hf_stub_token";
pub const COMMIT: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

/// What the stub does besides serving files.
#[derive(Default)]
pub struct Faults {
    /// Requests without `Authorization: Bearer TOKEN` get 401.
    pub require_token: bool,
    /// Drop the connection once, halfway through the first body of this file that starts past
    /// its first byte (a mid-file chunk).
    pub drop_once: Option<String>,
    /// List this digest for a file instead of its real sha256.
    pub wrong_sha256: Option<String>,
    /// Hold every request for this file until [`FakeHub::release`].
    pub hold: Option<String>,
}

pub struct FakeHub {
    pub addr: SocketAddr,
    state: Arc<Stub>,
}

struct Stub {
    root: PathBuf,
    faults: Faults,
    dropped: AtomicBool,
    released: AtomicBool,
    served: Mutex<HashMap<String, u64>>,
    requests: AtomicU64,
}

impl FakeHub {
    /// Starts the stub for `root` on a free loopback port, in its own thread and runtime.
    pub fn start(root: &Path, faults: Faults) -> FakeHub {
        let state = Arc::new(Stub {
            root: root.to_path_buf(),
            faults,
            dropped: AtomicBool::new(false),
            released: AtomicBool::new(false),
            served: Mutex::new(HashMap::new()),
            requests: AtomicU64::new(0),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let app = Router::new()
            .route("/api/models/{owner}/{name}/revision/main", get(info))
            .route("/{owner}/{name}/resolve/{revision}/{*file}", get(resolve))
            .with_state(state.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        FakeHub {
            addr: rx.recv().unwrap(),
            state,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Lets held requests through.
    pub fn release(&self) {
        self.state.released.store(true, Ordering::Release);
    }

    /// Body bytes sent for `file` so far (a dropped body counts what it sent).
    pub fn served(&self, file: &str) -> u64 {
        self.state
            .served
            .lock()
            .unwrap()
            .get(file)
            .copied()
            .unwrap_or(0)
    }

    pub fn dropped(&self) -> bool {
        self.state.dropped.load(Ordering::Acquire)
    }
}

/// Every file under `root`, relative with `/`.
pub fn repo_files(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap();
                let parts: Vec<_> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(parts.join("/"));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

fn authorized(stub: &Stub, headers: &HeaderMap) -> bool {
    !stub.faults.require_token
        || headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            == Some(&format!("Bearer {TOKEN}"))
}

async fn info(
    State(stub): State<Arc<Stub>>,
    UrlPath((owner, name)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    stub.requests.fetch_add(1, Ordering::Relaxed);
    if !authorized(&stub, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if format!("{owner}/{name}") != REPO {
        return StatusCode::NOT_FOUND.into_response();
    }
    let siblings: Vec<_> = repo_files(&stub.root)
        .into_iter()
        .map(|f| {
            let bytes = std::fs::read(stub.root.join(&f)).unwrap();
            let mut entry = serde_json::json!({ "rfilename": f, "size": bytes.len() });
            if f.ends_with(".safetensors") {
                let sha = match &stub.faults.wrong_sha256 {
                    Some(w) if *w == f => "0".repeat(64),
                    _ => format!("{:x}", sha2::Sha256::digest(&bytes)),
                };
                entry["lfs"] = serde_json::json!({ "sha256": sha, "size": bytes.len() });
            }
            entry
        })
        .collect();
    axum::Json(serde_json::json!({ "siblings": siblings, "sha": COMMIT })).into_response()
}

/// `GET /{repo}/resolve/{main or COMMIT}/{file}` with `Range: bytes=a-b`.
async fn resolve(
    State(stub): State<Arc<Stub>>,
    UrlPath((_owner, _name, revision, file)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    stub.requests.fetch_add(1, Ordering::Relaxed);
    if !authorized(&stub, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if revision != "main" && revision != COMMIT {
        return StatusCode::NOT_FOUND.into_response();
    }
    if stub.faults.hold.as_deref() == Some(file.as_str()) {
        while !stub.released.load(Ordering::Acquire) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    let Ok(bytes) = std::fs::read(stub.root.join(&file)) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let (start, stop) = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
        .unwrap_or((0, bytes.len().saturating_sub(1)));
    let stop = stop.min(bytes.len().saturating_sub(1));
    let body = bytes[start..=stop].to_vec();
    let drop_now = start > 0
        && stub.faults.drop_once.as_deref() == Some(file.as_str())
        && !stub.dropped.swap(true, Ordering::AcqRel);
    let sent = if drop_now { body.len() / 2 } else { body.len() };
    *stub.served.lock().unwrap().entry(file.clone()).or_default() += sent as u64;
    let etag = format!("\"etag-{}\"", file.replace('/', "-"));
    let head = [
        ("etag", etag),
        ("x-repo-commit", COMMIT.to_string()),
        (
            "content-range",
            format!("bytes {start}-{stop}/{}", bytes.len()),
        ),
    ];
    if drop_now {
        // Half the body, then the connection breaks (the declared length is never reached).
        let half = Bytes::from(body[..sent].to_vec());
        let stream = futures_util::stream::iter(vec![
            Ok::<_, std::io::Error>(half),
            Err(std::io::Error::other("stub: connection dropped")),
        ]);
        let mut resp =
            (StatusCode::PARTIAL_CONTENT, head, Body::from_stream(stream)).into_response();
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, body.len().into());
        return resp;
    }
    (StatusCode::PARTIAL_CONTENT, head, body).into_response()
}
