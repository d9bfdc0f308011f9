//! The hub download path end to end against a local stub of the hub's HTTP API on 127.0.0.1
//! (nothing leaves the machine): repo listing, a gated repo refusing requests without the token,
//! ranged downloads into the standard HF cache layout, then offline use of that cache.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use candle_core::{DType, Device};
use imagegen::flux2::text_encoder::PromptEncoder;
use imagegen::flux2::weights::{HubOptions, ModelFiles, WeightsError};

const REPO: &str = "test-org/klein-tiny";
const TOKEN: &str = "hf_stub_token";
const COMMIT: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

use crate::common::{flux2_fixtures, max_abs_diff};

fn model_dir() -> PathBuf {
    flux2_fixtures().join("tiny-model")
}

fn authorized(headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {TOKEN}"))
}

fn repo_files(root: &Path) -> Vec<String> {
    let files = ModelFiles::local(root).unwrap();
    files.files().map(str::to_string).collect()
}

async fn info(
    State(root): State<PathBuf>,
    UrlPath((owner, name)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if format!("{owner}/{name}") != REPO {
        return StatusCode::NOT_FOUND.into_response();
    }
    let siblings: Vec<_> = repo_files(&root)
        .into_iter()
        .map(|f| serde_json::json!({ "rfilename": f }))
        .collect();
    axum::Json(serde_json::json!({ "siblings": siblings, "sha": COMMIT })).into_response()
}

/// `GET /{repo}/resolve/main/{file}` with `Range: bytes=a-b`, as hf-hub 0.4 requests it.
async fn resolve(
    State(root): State<PathBuf>,
    UrlPath((_owner, _name, file)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let Ok(bytes) = std::fs::read(root.join(&file)) else {
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
    let etag = format!("\"etag-{}\"", file.replace('/', "-"));
    (
        StatusCode::PARTIAL_CONTENT,
        [
            ("etag", etag),
            ("x-repo-commit", COMMIT.to_string()),
            (
                "content-range",
                format!("bytes {start}-{stop}/{}", bytes.len()),
            ),
        ],
        bytes[start..=stop].to_vec(),
    )
        .into_response()
}

/// Starts the stub on a free loopback port, in its own thread and runtime.
fn start_stub(root: PathBuf) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let app = Router::new()
                .route("/api/models/{owner}/{name}/revision/main", get(info))
                .route("/{owner}/{name}/resolve/main/{*file}", get(resolve))
                .with_state(root);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    rx.recv().unwrap()
}

#[test]
fn hub_download_with_token_then_offline_from_cache() {
    let addr = start_stub(model_dir());
    let cache = tempfile::tempdir().unwrap();
    let opts = |token: Option<&str>| HubOptions {
        token: token.map(str::to_string),
        cache_dir: Some(cache.path().to_path_buf()),
        endpoint: Some(format!("http://{addr}")),
        offline: false,
        list_timeout: None,
    };

    // Gated: without the token the hub answers 401 and nothing is cached.
    let err = ModelFiles::open_with(REPO, opts(None)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, WeightsError::Offline { .. }), "{msg}");
    assert!(msg.contains("401") && msg.contains("HF_TOKEN"), "{msg}");

    // With the token: listing, downloads into the HF cache, and the embeddings of the fixture.
    let files = ModelFiles::open_with(REPO, opts(Some(TOKEN))).unwrap();
    assert!(files.contains("text_encoder/model.safetensors"));
    let pe = PromptEncoder::load(&files, DType::F32, &Device::Cpu).unwrap();
    let online = pe.encode(&["a red fox"]).unwrap();
    let cached = cache
        .path()
        .join("models--test-org--klein-tiny/snapshots")
        .join(COMMIT)
        .join("text_encoder/model.safetensors");
    assert_eq!(
        std::fs::read(&cached).unwrap(),
        std::fs::read(model_dir().join("text_encoder/model.safetensors")).unwrap(),
        "downloaded bytes equal the served file"
    );
    // A file the repo does not have is named in the error.
    let err = files.get("transformer/missing.safetensors").unwrap_err();
    assert!(err.to_string().contains("transformer/missing.safetensors"));

    // Offline afterwards: the same encoder from the cache alone.
    let offline = HubOptions {
        offline: true,
        ..opts(None)
    };
    let files = ModelFiles::open_with(REPO, offline).unwrap();
    let pe = PromptEncoder::load(&files, DType::F32, &Device::Cpu).unwrap();
    let again = pe.encode(&["a red fox"]).unwrap();
    assert_eq!(max_abs_diff(&online, &again), 0.0);
    // Files never downloaded are not there offline, and the error says where it looked.
    let err = files.get("vae/config.json").unwrap_err().to_string();
    assert!(
        err.contains("vae/config.json") && err.contains(REPO),
        "{err}"
    );
}
