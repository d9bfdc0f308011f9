//! The hub side of model files: what `MODEL_ID` names, listing a repo (cache first when the hub
//! cannot be reached) and fetching one file into the standard cache (`HF_HOME`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hf_hub::{Cache, Repo, RepoType};

use super::progress::{DownloadProgress, Reporter};
use super::{FIX_HUB, WeightsError, list_dir};

pub use crate::limits::DEFAULT_MODEL_ID;
pub const REPO_4B: &str = "black-forest-labs/FLUX.2-klein-4B";
pub const REPO_9B: &str = "black-forest-labs/FLUX.2-klein-9B";

/// What `MODEL_ID` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Local(PathBuf),
    Hub(String),
}

/// The one spelling of a `MODEL_ID` that config, logs, /health and the loader all use: trimmed,
/// the `4B`/`9B` shortcuts (any case) expanded, and the known klein repos in their canonical
/// case (the hub answers `flux.2-klein-4b` too, but the cache folder is case-sensitive, so two
/// spellings would mean two caches). Anything else is kept as written.
pub fn canonical_model_id(model_id: &str) -> String {
    let id = model_id.trim();
    for (short, repo) in [("4B", REPO_4B), ("9B", REPO_9B)] {
        if id.eq_ignore_ascii_case(short) || id.eq_ignore_ascii_case(repo) {
            return repo.to_string();
        }
    }
    id.to_string()
}

/// `4B`/`9B` shortcuts first (a directory called `4B` is reachable as `./4B`), then an existing
/// directory, then `owner/name`; on [`canonical_model_id`]'s spelling.
pub fn resolve_model_id(model_id: &str) -> Result<ModelSource, WeightsError> {
    let canonical = canonical_model_id(model_id);
    let id = canonical.as_str();
    if id == REPO_4B || id == REPO_9B {
        return Ok(ModelSource::Hub(id.to_string()));
    }
    let path = Path::new(id);
    if path.is_dir() {
        return Ok(ModelSource::Local(path.to_path_buf()));
    }
    let looks_like_path = id.starts_with('/') || id.starts_with('.') || id.starts_with('~');
    let parts: Vec<&str> = id.split('/').collect();
    let valid_part = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if !looks_like_path && parts.len() == 2 && parts.iter().all(|p| valid_part(p)) {
        return Ok(ModelSource::Hub(id.to_string()));
    }
    Err(WeightsError::InvalidModelId(model_id.to_string()))
}

/// `HUGGING_FACE_TOKEN`, else `HF_TOKEN` (hf-hub 0.4 reads neither by itself). Empty = unset.
pub fn hf_token_from_env() -> Option<String> {
    ["HUGGING_FACE_TOKEN", "HF_TOKEN"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .find(|v| !v.trim().is_empty())
}

/// Hub access settings; [`HubOptions::from_env`] is what the service uses.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    pub token: Option<String>,
    /// The HF cache (`$HF_HOME/hub`); `None` = hf-hub's default from the environment.
    pub cache_dir: Option<PathBuf>,
    /// `None` = `HF_ENDPOINT` or the public hub.
    pub endpoint: Option<String>,
    /// Never touch the network (`HF_HUB_OFFLINE=1`): cached files only.
    pub offline: bool,
    /// How long listing the repo may take before the cache is used instead (`None`: 30 s), so
    /// a network that drops packets cannot hang model loading.
    pub list_timeout: Option<std::time::Duration>,
    /// Where download progress goes (`None`: nowhere); the server uses
    /// [`DownloadProgress::global`], which /health reads.
    pub progress: Option<Arc<DownloadProgress>>,
    /// Tries after the first when a download breaks off; each resumes from what the last one
    /// committed (hf-hub keeps a `.sync.part` file and a committed-bytes marker).
    pub retries: u32,
    /// Ranged-request size, the resume granularity (`None`: hf-hub's 10 MB).
    pub chunk_size: Option<usize>,
}

/// What the hub's listing says about one file; empty for a listing read from the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubFile {
    pub size: Option<u64>,
    /// Set for LFS files (the weights), whose etag is this digest.
    pub sha256: Option<String>,
}

impl HubOptions {
    pub fn from_env(token: Option<String>) -> Self {
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes"))
            .unwrap_or(false);
        Self {
            token,
            cache_dir: None,
            endpoint: None,
            offline,
            list_timeout: None,
            progress: Some(DownloadProgress::global()),
            retries: 5,
            chunk_size: None,
        }
    }

    /// Where the hub cache is.
    pub fn cache_path(&self) -> PathBuf {
        self.cache().path().clone()
    }

    fn cache(&self) -> Cache {
        match &self.cache_dir {
            Some(dir) => Cache::new(dir.clone()),
            None => Cache::from_env(),
        }
    }
}

/// What listing a repo found.
pub(super) struct Listed {
    pub files: BTreeMap<String, HubFile>,
    /// From the hub (`true`) or only from the cache (`false`: the hub was unreachable or
    /// `HF_HUB_OFFLINE` is set).
    pub online: bool,
    /// The commit every file is read at: the hub's current `main` when online (and `refs/main`
    /// of the cache is moved to it, so a later offline start reads the same one), else the
    /// commit the cache's `refs/main` names.
    pub revision: Option<String>,
}

/// The repo's file list at one revision, resolved once.
pub(super) fn list(repo: &str, opts: &HubOptions) -> Result<Listed, WeightsError> {
    let cache = opts.cache();
    let cached = cached_files(&cache, repo);
    let listed = if opts.offline {
        Err("offline mode (HF_HUB_OFFLINE)".to_string())
    } else {
        let (o, r) = (opts.clone(), repo.to_string());
        let limit = opts
            .list_timeout
            .unwrap_or(std::time::Duration::from_secs(30));
        run_blocking(move || async move {
            let api = build_api(&o)?;
            // `blobs=true` adds each file's size and, for LFS files, its sha256.
            let request = api.model(r).info_request().query(&[("blobs", "true")]);
            let listing = async {
                let response = request.send().await.map_err(|e| e.to_string())?;
                let response = response.error_for_status().map_err(|e| e.to_string())?;
                response.json::<Listing>().await.map_err(|e| e.to_string())
            };
            let listing = tokio::time::timeout(limit, listing)
                .await
                .map_err(|_| format!("no answer within {limit:?}"))??;
            let files = listing
                .siblings
                .into_iter()
                .map(|s| {
                    let meta = HubFile {
                        size: s.size.or(s.lfs.as_ref().map(|l| l.size)),
                        sha256: s.lfs.map(|l| l.sha256),
                    };
                    (s.rfilename, meta)
                })
                .collect::<BTreeMap<_, _>>();
            Ok((files, listing.sha))
        })
    };
    match (listed, cached) {
        (Ok((files, revision)), _) => {
            if let Some(sha) = &revision {
                pin_main(&cache, repo, sha);
            }
            Ok(Listed {
                files,
                online: true,
                revision,
            })
        }
        (Err(_), Some((commit, files))) if !files.is_empty() => Ok(Listed {
            files: files.into_iter().map(|f| (f, HubFile::default())).collect(),
            online: false,
            revision: Some(commit),
        }),
        (Err(reason), _) => Err(WeightsError::Offline {
            repo: repo.to_string(),
            cache: cache.path().display().to_string(),
            reason,
            fix: FIX_HUB.to_string(),
        }),
    }
}

/// Points the cache's `refs/main` at `sha`, the revision this process reads, so that a later
/// offline start reads the same files. Best effort: a read-only cache only loses that.
fn pin_main(cache: &Cache, repo: &str, sha: &str) {
    let r = Repo::new(repo.to_string(), RepoType::Model);
    let refs = cache.path().join(r.folder_name()).join("refs");
    if std::fs::create_dir_all(&refs).is_ok()
        && let Err(e) = std::fs::write(refs.join(r.revision()), sha)
    {
        tracing::debug!(error = %e, "cannot update the cache's refs/main");
    }
}

/// The cached copy of `file` at `revision` (the snapshot of that commit only, never another
/// revision's copy), or, without a revision, the one `refs/main` names.
pub(super) fn cached(
    repo: &str,
    opts: &HubOptions,
    revision: Option<&str>,
    file: &str,
) -> Option<PathBuf> {
    let cache = opts.cache();
    match revision {
        Some(sha) => {
            let r = Repo::new(repo.to_string(), RepoType::Model);
            let path = cache
                .path()
                .join(r.folder_name())
                .join("snapshots")
                .join(sha)
                .join(file);
            path.exists().then_some(path)
        }
        None => cache.model(repo.to_string()).get(file),
    }
}

/// Downloads `file` into the cache and returns its path. A broken-off transfer is retried
/// `opts.retries` times, each try resuming where the last stopped; the result is checked against
/// the listing's size and sha256 (a mismatching blob is deleted, so the next start refetches it).
pub(super) fn download(
    repo: &str,
    opts: &HubOptions,
    revision: Option<&str>,
    file: &str,
    expected: &HubFile,
) -> Result<PathBuf, String> {
    let progress = opts.progress.clone().unwrap_or_default();
    let mut failures = 0;
    // One runtime per try: hf-hub does not cancel the chunk tasks of a failed try, and dropping
    // their runtime does, so a resumed try is the only one still transferring.
    let path = loop {
        let (o, f, p) = (opts.clone(), file.to_string(), progress.clone());
        let r = match revision {
            Some(sha) => Repo::with_revision(repo.to_string(), RepoType::Model, sha.to_string()),
            None => Repo::new(repo.to_string(), RepoType::Model),
        };
        let tried = run_blocking(move || async move {
            let api = build_api(&o)?;
            api.repo(r)
                .download_with_progress(&f, Reporter(p))
                .await
                .map_err(|e| e.to_string())
        });
        match tried {
            Ok(path) => break path,
            Err(e) if failures < opts.retries => {
                failures += 1;
                let wait = std::time::Duration::from_millis(250 * (1 << failures.min(5)));
                tracing::warn!(
                    file,
                    error = %e,
                    "model download interrupted; resuming (try {} of {}) in {wait:?}",
                    failures + 1,
                    opts.retries + 1
                );
                std::thread::sleep(wait);
            }
            Err(e) => return Err(format!("{e} (after {} tries)", failures + 1)),
        }
    };
    verify(&path, expected).inspect_err(|_| {
        if let Ok(blob) = std::fs::canonicalize(&path) {
            let _ = std::fs::remove_file(blob);
        }
        let _ = std::fs::remove_file(&path);
    })?;
    Ok(path)
}

/// The downloaded file has the size and sha256 the hub listed (when it listed them).
fn verify(path: &Path, expected: &HubFile) -> Result<(), String> {
    let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if let Some(size) = expected.size
        && size != len
    {
        return Err(format!(
            "size mismatch: the hub lists {size} bytes, got {len}"
        ));
    }
    if let Some(want) = &expected.sha256 {
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
        std::io::copy(&mut f, &mut hasher).map_err(|e| e.to_string())?;
        let got = format!("{:x}", hasher.finalize());
        if !got.eq_ignore_ascii_case(want) {
            return Err(format!("sha256 mismatch: the hub lists {want}, got {got}"));
        }
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct Listing {
    siblings: Vec<Sibling>,
    /// The commit the listing describes.
    sha: Option<String>,
}

#[derive(serde::Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    lfs: Option<Lfs>,
}

#[derive(serde::Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

/// The commit `refs/main` points at and the files of its snapshot, if the repo is in the cache.
fn cached_files(cache: &Cache, repo: &str) -> Option<(String, BTreeSet<String>)> {
    let r = Repo::new(repo.to_string(), RepoType::Model);
    let repo_dir = cache.path().join(r.folder_name());
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(r.revision())).ok()?;
    let commit = commit.trim().to_string();
    let snapshot = repo_dir.join("snapshots").join(&commit);
    let mut files = BTreeSet::new();
    list_dir(&snapshot, &snapshot, &mut files).ok()?;
    Some((commit, files))
}

fn build_api(opts: &HubOptions) -> Result<hf_hub::api::tokio::Api, String> {
    let mut b = hf_hub::api::tokio::ApiBuilder::from_cache(opts.cache()).with_progress(false);
    if let Some(chunk) = opts.chunk_size {
        b = b.with_chunk_size(Some(chunk));
    }
    if let Ok(ep) = std::env::var("HF_ENDPOINT") {
        b = b.with_endpoint(ep);
    }
    if let Some(ep) = &opts.endpoint {
        b = b.with_endpoint(ep.clone());
    }
    if let Some(t) = &opts.token {
        b = b.with_token(Some(t.clone()));
    }
    b.build().map_err(|e| e.to_string())
}

/// Runs an async hub call to completion from sync code, on its own thread and runtime, so it
/// works whether or not the caller is inside a tokio runtime.
fn run_blocking<T, F, Fut>(f: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(f())
    })
    .join()
    .map_err(|_| "hub download thread panicked".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortcuts_and_repo_ids() {
        assert_eq!(
            resolve_model_id("4B").unwrap(),
            ModelSource::Hub(REPO_4B.into())
        );
        assert_eq!(
            resolve_model_id("9b").unwrap(),
            ModelSource::Hub(REPO_9B.into())
        );
        assert_eq!(
            resolve_model_id(DEFAULT_MODEL_ID).unwrap(),
            ModelSource::Hub("black-forest-labs/FLUX.2-klein-4B".into())
        );
        assert_eq!(
            resolve_model_id("someone/my-klein_v2.1").unwrap(),
            ModelSource::Hub("someone/my-klein_v2.1".into())
        );
        for bad in [
            "",
            "just-a-name",
            "a/b/c",
            "/no/such/dir",
            "./missing",
            "a b/c",
        ] {
            assert!(
                matches!(resolve_model_id(bad), Err(WeightsError::InvalidModelId(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn existing_directory_is_local() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().to_str().unwrap();
        assert_eq!(
            resolve_model_id(p).unwrap(),
            ModelSource::Local(dir.path().to_path_buf())
        );
    }
}
