//! The hub download path end to end against a local stub of the hub's HTTP API on 127.0.0.1
//! (nothing leaves the machine): repo listing, a gated repo refusing requests without the token,
//! ranged downloads into the standard HF cache layout, offline use of that cache, a transfer
//! resumed after a dropped connection, and a digest that does not match.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device};
use imagegen::flux2::text_encoder::PromptEncoder;
use imagegen::flux2::weights::{DownloadProgress, HubOptions, ModelFiles, WeightsError};

use crate::common::{flux2_fixtures, max_abs_diff};
use crate::fake_hub::{COMMIT, FakeHub, Faults, REPO, TOKEN};

fn model_dir() -> PathBuf {
    flux2_fixtures().join("tiny-model")
}

#[test]
fn hub_download_with_token_then_offline_from_cache() {
    let hub = FakeHub::start(
        &model_dir(),
        Faults {
            require_token: true,
            ..Default::default()
        },
    );
    let cache = tempfile::tempdir().unwrap();
    let opts = |token: Option<&str>| HubOptions {
        token: token.map(str::to_string),
        cache_dir: Some(cache.path().to_path_buf()),
        endpoint: Some(hub.endpoint()),
        offline: false,
        list_timeout: None,
        ..Default::default()
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

const CHUNK: usize = 64 * 1024;

fn hub_opts(hub: &FakeHub, cache: &std::path::Path, progress: Arc<DownloadProgress>) -> HubOptions {
    HubOptions {
        cache_dir: Some(cache.to_path_buf()),
        endpoint: Some(hub.endpoint()),
        progress: Some(progress),
        retries: 3,
        chunk_size: Some(CHUNK),
        ..Default::default()
    }
}

/// A connection that breaks mid-file is resumed from the committed chunks, not restarted, and
/// the result has the listed size and sha256; progress counts every needed byte once.
#[test]
fn a_dropped_download_resumes_and_is_verified() {
    const FILE: &str = "transformer/diffusion_pytorch_model.safetensors";
    let hub = FakeHub::start(
        &model_dir(),
        Faults {
            drop_once: Some(FILE.into()),
            ..Default::default()
        },
    );
    let cache = tempfile::tempdir().unwrap();
    let progress = Arc::new(DownloadProgress::default());
    let files =
        ModelFiles::open_with(REPO, hub_opts(&hub, cache.path(), progress.clone())).unwrap();
    let needed = files.needed_files();
    assert!(needed.contains(&FILE.to_string()) && needed.contains(&"model_index.json".into()));
    let total: u64 = needed
        .iter()
        .map(|f| std::fs::metadata(model_dir().join(f)).unwrap().len())
        .sum();

    let fetched = files.prefetch().unwrap();
    assert_eq!(fetched, total, "every needed byte counted once");
    assert!(hub.dropped(), "the stub broke one transfer");
    let size = std::fs::metadata(model_dir().join(FILE)).unwrap().len();
    // Restarting from zero would send the file twice; resuming sends it once plus the chunk
    // that broke (and hf-hub's one-byte metadata probe).
    let served = hub.served(FILE);
    assert!(
        served < size + 2 * CHUNK as u64,
        "served {served} bytes of a {size}-byte file: not resumed"
    );
    assert_eq!(
        std::fs::read(files.get(FILE).unwrap()).unwrap(),
        std::fs::read(model_dir().join(FILE)).unwrap()
    );
    assert!(
        progress.snapshot().is_none(),
        "progress ends with the download"
    );
    // A second prefetch finds everything cached.
    assert_eq!(files.prefetch().unwrap(), 0);
}

/// A file whose bytes do not match the listed sha256 is an error naming the file, and is not
/// left in the cache as if good.
#[test]
fn a_digest_mismatch_is_refused_and_not_cached() {
    const FILE: &str = "vae/diffusion_pytorch_model.safetensors";
    let hub = FakeHub::start(
        &model_dir(),
        Faults {
            wrong_sha256: Some(FILE.into()),
            ..Default::default()
        },
    );
    let cache = tempfile::tempdir().unwrap();
    let opts = hub_opts(&hub, cache.path(), Arc::default());
    let files = ModelFiles::open_with(REPO, opts.clone()).unwrap();
    let err = files.prefetch().unwrap_err().to_string();
    assert!(
        err.contains(FILE) && err.contains("sha256 mismatch"),
        "{err}"
    );
    let offline = HubOptions {
        offline: true,
        ..opts
    };
    let cached = ModelFiles::open_with(REPO, offline).unwrap();
    assert!(cached.get(FILE).is_err(), "the bad blob was removed");
}

/// The cache holds an older revision of the repo (`refs/main` → OLD, with its own
/// `model_index.json`) and the hub has moved on to COMMIT. Every file must come from COMMIT:
/// reading cache-first by `refs/main` would mix OLD's index with COMMIT's weights.
#[test]
fn every_file_is_read_at_the_one_revision_the_hub_lists() {
    const OLD: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    let hub = FakeHub::start(&model_dir(), Faults::default());
    let cache = tempfile::tempdir().unwrap();
    let repo_dir = cache.path().join("models--test-org--klein-tiny");
    let old_snapshot = repo_dir.join("snapshots").join(OLD);
    std::fs::create_dir_all(old_snapshot.join("text_encoder")).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), OLD).unwrap();
    std::fs::write(old_snapshot.join("model_index.json"), b"{\"stale\": true}").unwrap();
    std::fs::write(old_snapshot.join("text_encoder/config.json"), b"{}").unwrap();

    let opts = HubOptions {
        cache_dir: Some(cache.path().to_path_buf()),
        endpoint: Some(hub.endpoint()),
        ..Default::default()
    };
    let files = ModelFiles::open_with(REPO, opts.clone()).unwrap();
    assert_eq!(files.revision(), Some(COMMIT));
    for file in ["model_index.json", "text_encoder/config.json"] {
        let path = files.get(file).unwrap();
        assert!(
            path.starts_with(repo_dir.join("snapshots").join(COMMIT)),
            "{file} read from {}",
            path.display()
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            std::fs::read(model_dir().join(file)).unwrap(),
            "{file} is the hub's current content"
        );
    }
    // The cache now names the revision that was read, so an offline start reads it too.
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        COMMIT
    );
    let offline = ModelFiles::open_with(
        REPO,
        HubOptions {
            offline: true,
            ..opts
        },
    )
    .unwrap();
    assert_eq!(offline.revision(), Some(COMMIT));
    assert!(
        offline
            .get("model_index.json")
            .unwrap()
            .starts_with(repo_dir.join("snapshots").join(COMMIT))
    );
}
