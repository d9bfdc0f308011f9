//! Where the model files come from and how they become `VarBuilder`s.
//!
//! The pipeline asks [`ModelFiles`] for everything: configs, and each component's weights under
//! diffusers names. Behind it, [`hub`] lists and fetches hub files, [`bfl`] renames a BFL single
//! file, and `recording` (tests only) builds models of any size without weights.
//!
//! `MODEL_ID` is a local diffusers directory, a hub repo id, or the shortcuts `4B` / `9B`.
//! Hub files go through hf-hub into the standard cache (`HF_HOME`), cache first; a missing or
//! unreachable file is an error that names the file and the fix.
//!
//! Transformer weights load from the diffusers `transformer/` folder or from a BFL single file
//! (`flux-2-klein-*.safetensors`, optionally fp8 with scales); either way the model code sees
//! diffusers names only ([`ModelFiles::transformer_var_builder`]).

mod bfl;
mod hub;
mod progress;
#[cfg(any(test, feature = "test-support"))]
mod recording;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::config::{ModelIndex, Qwen3Config};
use super::transformer::Flux2TransformerConfig;

pub use bfl::{BflRows, RAW_FP8_SCALE_SUFFIX, RAW_FP8_SUFFIX, bfl_rows_of, bfl_var_builder};
pub use hub::{
    DEFAULT_MODEL_ID, HubFile, HubOptions, ModelSource, REPO_4B, REPO_9B, canonical_model_id,
    hf_token_from_env, resolve_model_id,
};
pub use progress::{DownloadProgress, DownloadSnapshot, human_bytes};
#[cfg(any(test, feature = "test-support"))]
pub use recording::{RequestLog, recording_var_builder};

const FIX_HUB: &str = "download it once with network access (it is cached under HF_HOME, by default ~/.cache/huggingface), \
     set HF_TOKEN or HUGGING_FACE_TOKEN if the repo is gated and its licence accepted, \
     or set MODEL_ID to a local diffusers directory that contains it";
const FIX_LOCAL: &str = "MODEL_ID must be a FLUX.2-klein diffusers directory (model_index.json, tokenizer/, \
     text_encoder/, transformer/, vae/), or a hub repo id / 4B / 9B";

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// A file the model needs is not there; `file` is relative to the model root.
    #[error("model file '{file}' not found in {location}: {fix}")]
    MissingFile {
        file: String,
        location: String,
        fix: String,
    },
    #[error(
        "cannot reach the model hub for '{repo}' and nothing is cached under {cache}: {reason}. Fix: {fix}"
    )]
    Offline {
        repo: String,
        cache: String,
        reason: String,
        fix: String,
    },
    #[error(
        "MODEL_ID '{0}' is neither an existing directory, a hub repo id (owner/name), 4B nor 9B"
    )]
    InvalidModelId(String),
    #[error("cannot parse {file}: {message}")]
    BadFile { file: String, message: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

enum Backing {
    Local(PathBuf),
    Hub {
        repo: String,
        opts: HubOptions,
        /// Files cached locally (offline) or listed by the hub.
        online: bool,
        /// Sizes and digests from the hub's listing (empty when listed from the cache).
        meta: BTreeMap<String, HubFile>,
        /// The one commit every file is read at (resolved when listing).
        revision: Option<String>,
    },
}

/// The files of one model, local or on the hub, with the list of what exists.
pub struct ModelFiles {
    id: String,
    backing: Backing,
    files: BTreeSet<String>,
    /// Serves every component's weights instead of the files (see [`Self::with_weights_from`]).
    weights_override: Option<WeightsOverride>,
}

/// Builds a component's `VarBuilder` (dtype, device) without reading any weight file.
pub type WeightsOverride =
    std::sync::Arc<dyn Fn(DType, &Device) -> VarBuilder<'static> + Send + Sync>;

impl std::fmt::Debug for ModelFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFiles")
            .field("id", &self.id)
            .field("files", &self.files.len())
            .finish()
    }
}

impl ModelFiles {
    /// Resolves `model_id` with hub settings from the environment (`HF_HOME`, `HF_ENDPOINT`,
    /// `HF_HUB_OFFLINE`) and the given token.
    pub fn open(model_id: &str, hf_token: Option<String>) -> Result<Self, WeightsError> {
        Self::open_with(model_id, HubOptions::from_env(hf_token))
    }

    pub fn open_with(model_id: &str, opts: HubOptions) -> Result<Self, WeightsError> {
        match resolve_model_id(model_id)? {
            ModelSource::Local(dir) => Self::local(&dir),
            ModelSource::Hub(repo) => Self::hub(&repo, opts),
        }
    }

    pub fn local(dir: &Path) -> Result<Self, WeightsError> {
        let mut files = BTreeSet::new();
        list_dir(dir, dir, &mut files).map_err(|e| WeightsError::BadFile {
            file: dir.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(Self {
            id: dir.display().to_string(),
            backing: Backing::Local(dir.to_path_buf()),
            files,
            weights_override: None,
        })
    }

    fn hub(repo: &str, opts: HubOptions) -> Result<Self, WeightsError> {
        let hub::Listed {
            files: meta,
            online,
            revision,
        } = hub::list(repo, &opts)?;
        tracing::info!(
            repo,
            revision = revision.as_deref().unwrap_or("unknown"),
            online,
            "model revision"
        );
        Ok(Self {
            id: repo.to_string(),
            files: meta.keys().cloned().collect(),
            backing: Backing::Hub {
                repo: repo.to_string(),
                opts,
                online,
                meta,
                revision,
            },
            weights_override: None,
        })
    }

    /// Takes every component's weights from `f` instead of the files, keeping the configs and
    /// tokenizer from the files: `imagegen bench --random-weights` builds the exact 4B/9B
    /// architectures with random weights this way. Never used by the server.
    pub fn with_weights_from(mut self, f: WeightsOverride) -> Self {
        self.weights_override = Some(f);
        self
    }

    /// The model id as given (directory or repo id).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The hub commit every file is read at; `None` for a local directory (or a hub that
    /// listed no commit).
    pub fn revision(&self) -> Option<&str> {
        match &self.backing {
            Backing::Local(_) => None,
            Backing::Hub { revision, .. } => revision.as_deref(),
        }
    }

    pub fn contains(&self, file: &str) -> bool {
        self.files.contains(file)
    }

    /// Every file the model has (relative paths with `/`).
    pub fn files(&self) -> impl Iterator<Item = &str> {
        self.files.iter().map(String::as_str)
    }

    /// The local path of `file` (relative to the model root), downloading it if needed.
    pub fn get(&self, file: &str) -> Result<PathBuf, WeightsError> {
        if !self.files.contains(file) {
            return Err(self.missing(file));
        }
        match &self.backing {
            Backing::Local(dir) => Ok(dir.join(file)),
            Backing::Hub {
                repo,
                opts,
                online,
                meta,
                revision,
            } => {
                if let Some(p) = hub::cached(repo, opts, revision.as_deref(), file) {
                    return Ok(p);
                }
                if !*online {
                    return Err(self.missing(file));
                }
                let expected = meta.get(file).cloned().unwrap_or_default();
                hub::download(repo, opts, revision.as_deref(), file, &expected).map_err(|reason| {
                    WeightsError::MissingFile {
                        file: file.to_string(),
                        location: format!("hub repo {repo} (download failed: {reason})"),
                        fix: FIX_HUB.to_string(),
                    }
                })
            }
        }
    }

    fn missing(&self, file: &str) -> WeightsError {
        match &self.backing {
            Backing::Local(dir) => WeightsError::MissingFile {
                file: file.to_string(),
                location: dir.display().to_string(),
                fix: FIX_LOCAL.to_string(),
            },
            Backing::Hub { repo, online, .. } => WeightsError::MissingFile {
                file: file.to_string(),
                location: if *online {
                    format!("hub repo {repo}")
                } else {
                    format!("the local cache of hub repo {repo} (hub unreachable)")
                },
                fix: FIX_HUB.to_string(),
            },
        }
    }

    pub fn read_json<T: serde::de::DeserializeOwned>(&self, file: &str) -> Result<T, WeightsError> {
        let path = self.get(file)?;
        let text = std::fs::read_to_string(&path).map_err(|e| WeightsError::BadFile {
            file: path.display().to_string(),
            message: e.to_string(),
        })?;
        serde_json::from_str(&text).map_err(|e| WeightsError::BadFile {
            file: path.display().to_string(),
            message: e.to_string(),
        })
    }

    pub fn model_index(&self) -> Result<ModelIndex, WeightsError> {
        self.read_json("model_index.json")
    }

    pub fn text_encoder_config(&self) -> Result<Qwen3Config, WeightsError> {
        self.read_json("text_encoder/config.json")
    }

    /// The safetensors files of a diffusers component: the single file, or every shard listed
    /// by the component's `*.safetensors.index.json`.
    pub fn component_weight_files(&self, component: &str) -> Result<Vec<PathBuf>, WeightsError> {
        for stem in ["diffusion_pytorch_model", "model"] {
            let single = format!("{component}/{stem}.safetensors");
            if self.contains(&single) {
                return Ok(vec![self.get(&single)?]);
            }
            let index = format!("{component}/{stem}.safetensors.index.json");
            if self.contains(&index) {
                let idx: ShardIndex = self.read_json(&index)?;
                let shards: BTreeSet<String> = idx.weight_map.into_values().collect();
                return shards
                    .iter()
                    .map(|s| self.get(&format!("{component}/{s}")))
                    .collect();
            }
        }
        Err(self.missing(&format!(
            "{component}/diffusion_pytorch_model.safetensors (or model.safetensors, or a sharded *.safetensors.index.json)"
        )))
    }

    /// A `VarBuilder` over a diffusers component's weights (names as in its checkpoint).
    pub fn component_var_builder(
        &self,
        component: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>, WeightsError> {
        if let Some(f) = &self.weights_override {
            return Ok(f(dtype, device));
        }
        let files = self.component_weight_files(component)?;
        // SAFETY: the files are memory-mapped read-only; candle's loader requires that they are
        // not modified while mapped, which holds for model files we never write.
        Ok(unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device)? })
    }

    /// The BFL single-file transformer at the model root, if any (`flux-2-klein*.safetensors`).
    pub fn bfl_transformer_file(&self) -> Option<String> {
        self.files
            .iter()
            .find(|f| !f.contains('/') && f.starts_with("flux-2") && f.ends_with(".safetensors"))
            .cloned()
    }

    /// The files a pipeline load reads: the index, the components' folders, and the BFL single
    /// file only when there is no diffusers transformer (so a repo with both is fetched once).
    pub fn needed_files(&self) -> Vec<String> {
        const COMPONENTS: [&str; 5] = [
            "scheduler/",
            "text_encoder/",
            "tokenizer/",
            "transformer/",
            "vae/",
        ];
        let diffusers_transformer = self
            .files
            .iter()
            .any(|f| f.starts_with("transformer/") && f.contains(".safetensors"));
        let mut needed: Vec<String> = self
            .files
            .iter()
            .filter(|f| *f == "model_index.json" || COMPONENTS.iter().any(|c| f.starts_with(c)))
            .cloned()
            .collect();
        if !diffusers_transformer && let Some(bfl) = self.bfl_transformer_file() {
            needed.push(bfl);
        }
        needed
    }

    /// Downloads every needed file that is not cached yet, reporting progress (log and
    /// /health); returns the bytes fetched. Local models and offline caches fetch nothing.
    pub fn prefetch(&self) -> Result<u64, WeightsError> {
        let Backing::Hub {
            repo,
            opts,
            online: true,
            meta,
            revision,
        } = &self.backing
        else {
            return Ok(0);
        };
        let missing: Vec<String> = self
            .needed_files()
            .into_iter()
            .filter(|f| hub::cached(repo, opts, revision.as_deref(), f).is_none())
            .collect();
        if missing.is_empty() {
            return Ok(0);
        }
        let size = |f: &str| meta.get(f).and_then(|m| m.size).unwrap_or(0);
        let total: u64 = missing.iter().map(|f| size(f)).sum();
        let progress = opts.progress.clone().unwrap_or_default();
        tracing::info!(
            repo = %repo,
            files = missing.len(),
            total_bytes = total,
            "downloading {} model files ({}) into {}",
            missing.len(),
            human_bytes(total),
            opts.cache_path().display()
        );
        progress.begin(missing.len() as u64, total);
        let fetched = missing.iter().try_fold(0u64, |sum, f| {
            self.get(f)?;
            progress.finish_file(size(f));
            Ok::<_, WeightsError>(sum + size(f))
        });
        progress.end();
        let fetched = fetched?;
        tracing::info!(repo = %repo, bytes = fetched, "model files downloaded");
        Ok(fetched)
    }

    /// Parameters of the stored transformer, read from the safetensors headers only (`None`
    /// for the random-weight override or unreadable files).
    pub fn transformer_parameters(&self) -> Option<u64> {
        if self.weights_override.is_some() {
            return None;
        }
        let paths = match self.component_weight_files("transformer") {
            Ok(p) => p,
            Err(_) => vec![self.get(&self.bfl_transformer_file()?).ok()?],
        };
        // SAFETY: read-only memory map of model files; only the headers are read.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&paths).ok()? };
        Some(
            st.tensors()
                .iter()
                .map(|(_, v)| v.shape().iter().product::<usize>() as u64)
                .sum(),
        )
    }

    /// `transformer/config.json`, or for a BFL single-file model without it, the config read off
    /// the file's tensor shapes.
    pub fn transformer_config(&self) -> Result<Flux2TransformerConfig, WeightsError> {
        if self.contains("transformer/config.json") {
            return self.read_json("transformer/config.json");
        }
        match self.bfl_transformer_file() {
            Some(file) => bfl::config_from_shapes(&self.get(&file)?, &file),
            // Names the missing file and the fix.
            None => self.read_json("transformer/config.json"),
        }
    }

    /// The transformer's weights under **diffusers names** whatever the file layout: the
    /// diffusers `transformer/` folder if present, else the BFL single file at the model root.
    /// Quantization is applied later, per Linear, by [`super::quant::linear_no_bias`].
    pub fn transformer_var_builder(
        &self,
        dtype: DType,
        device: &Device,
    ) -> Result<(VarBuilder<'static>, TransformerFormat), WeightsError> {
        if let Some(f) = &self.weights_override {
            return Ok((f(dtype, device), TransformerFormat::Diffusers));
        }
        match self.component_weight_files("transformer") {
            Ok(paths) => {
                // SAFETY: read-only memory map of model files (see component_var_builder).
                let vb = unsafe { VarBuilder::from_mmaped_safetensors(&paths, dtype, device)? };
                Ok((vb, TransformerFormat::Diffusers))
            }
            Err(e) => match self.bfl_transformer_file() {
                Some(f) => {
                    let (vb, fp8) = bfl_var_builder(&self.get(&f)?, dtype, device)?;
                    Ok((vb, TransformerFormat::Bfl { fp8 }))
                }
                None => Err(e),
            },
        }
    }
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

/// Which layout the transformer weights came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransformerFormat {
    Diffusers,
    /// BFL single file; `fp8` when its Linears are F8_E4M3 with scales.
    Bfl {
        fp8: bool,
    },
}

pub(super) fn list_dir(root: &Path, dir: &Path, out: &mut BTreeSet<String>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if path.is_dir() {
            list_dir(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            let rel: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            out.insert(rel.join("/"));
        }
    }
    Ok(())
}
