//! Where the model files come from and how they become `VarBuilder`s.
//!
//! `MODEL_ID` is a local diffusers directory, a hub repo id, or the shortcuts `4B` / `9B`.
//! Hub files go through hf-hub into the standard cache (`HF_HOME`), cache first; a missing or
//! unreachable file is an error that names the file and the fix.
//!
//! Transformer weights load from the diffusers `transformer/` folder or from a BFL single file
//! (`flux-2-klein-*.safetensors`, optionally fp8 with scales); either way the model code sees
//! diffusers names only ([`transformer_var_builder`]).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use hf_hub::{Cache, Repo, RepoType};

use super::config::{ModelIndex, Qwen3Config};

pub const DEFAULT_MODEL_ID: &str = "black-forest-labs/FLUX.2-klein-4B";
pub const REPO_4B: &str = "black-forest-labs/FLUX.2-klein-4B";
pub const REPO_9B: &str = "black-forest-labs/FLUX.2-klein-9B";

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

/// What `MODEL_ID` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Local(PathBuf),
    Hub(String),
}

/// `4B`/`9B` shortcuts first (a directory called `4B` is reachable as `./4B`), then an existing
/// directory, then `owner/name`.
pub fn resolve_model_id(model_id: &str) -> Result<ModelSource, WeightsError> {
    let id = model_id.trim();
    match id.to_ascii_uppercase().as_str() {
        "4B" => return Ok(ModelSource::Hub(REPO_4B.to_string())),
        "9B" => return Ok(ModelSource::Hub(REPO_9B.to_string())),
        _ => {}
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
        }
    }

    fn cache(&self) -> Cache {
        match &self.cache_dir {
            Some(dir) => Cache::new(dir.clone()),
            None => Cache::from_env(),
        }
    }
}

enum Backing {
    Local(PathBuf),
    Hub {
        repo: String,
        opts: HubOptions,
        /// Files cached locally (offline) or listed by the hub.
        online: bool,
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
                let info = tokio::time::timeout(limit, api.model(r).info())
                    .await
                    .map_err(|_| format!("no answer within {limit:?}"))?
                    .map_err(|e| e.to_string())?;
                Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
            })
        };
        let (files, online) = match (listed, cached) {
            (Ok(files), _) => (files, true),
            (Err(_), Some(files)) if !files.is_empty() => (files, false),
            (Err(reason), _) => {
                return Err(WeightsError::Offline {
                    repo: repo.to_string(),
                    cache: cache.path().display().to_string(),
                    reason,
                    fix: FIX_HUB.to_string(),
                });
            }
        };
        Ok(Self {
            id: repo.to_string(),
            backing: Backing::Hub {
                repo: repo.to_string(),
                opts,
                online,
            },
            files,
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
            Backing::Hub { repo, opts, online } => {
                if let Some(p) = opts.cache().model(repo.clone()).get(file) {
                    return Ok(p);
                }
                if !*online {
                    return Err(self.missing(file));
                }
                let (o, r, f) = (opts.clone(), repo.clone(), file.to_string());
                run_blocking(move || async move {
                    let api = build_api(&o)?;
                    api.model(r).get(&f).await.map_err(|e| e.to_string())
                })
                .map_err(|reason| WeightsError::MissingFile {
                    file: file.to_string(),
                    location: format!("hub repo {repo} (download failed: {reason})"),
                    fix: FIX_HUB.to_string(),
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
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

fn list_dir(root: &Path, dir: &Path, out: &mut BTreeSet<String>) -> std::io::Result<()> {
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

/// Files of the cached snapshot that `refs/main` points at, if the repo is in the cache.
fn cached_files(cache: &Cache, repo: &str) -> Option<BTreeSet<String>> {
    let r = Repo::new(repo.to_string(), RepoType::Model);
    let repo_dir = cache.path().join(r.folder_name());
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(r.revision())).ok()?;
    let snapshot = repo_dir.join("snapshots").join(commit.trim());
    let mut files = BTreeSet::new();
    list_dir(&snapshot, &snapshot, &mut files).ok()?;
    Some(files)
}

fn build_api(opts: &HubOptions) -> Result<hf_hub::api::tokio::Api, String> {
    let mut b = hf_hub::api::tokio::ApiBuilder::from_cache(opts.cache()).with_progress(false);
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

// ------------------------------------------------------------------------------------------
// Transformer weights: diffusers folder or BFL single file, seen through diffusers names.

/// Which layout the transformer weights came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransformerFormat {
    Diffusers,
    /// BFL single file; `fp8` when its Linears are F8_E4M3 with scales.
    Bfl {
        fp8: bool,
    },
}

/// The transformer's weights under **diffusers names** whatever the file layout: the diffusers
/// `transformer/` folder if present, else the BFL single file at the model root. Quantization is
/// applied later, per Linear, by [`super::quant::linear_no_bias`].
pub fn transformer_var_builder(
    files: &ModelFiles,
    dtype: DType,
    device: &Device,
) -> Result<(VarBuilder<'static>, TransformerFormat), WeightsError> {
    if let Some(f) = &files.weights_override {
        return Ok((f(dtype, device), TransformerFormat::Diffusers));
    }
    match files.component_weight_files("transformer") {
        Ok(paths) => {
            // SAFETY: read-only memory map of model files (see component_var_builder).
            let vb = unsafe { VarBuilder::from_mmaped_safetensors(&paths, dtype, device)? };
            Ok((vb, TransformerFormat::Diffusers))
        }
        Err(e) => match files.bfl_transformer_file() {
            Some(f) => {
                let path = files.get(&f)?;
                let (vb, fp8) = bfl_var_builder(&path, dtype, device)?;
                Ok((vb, TransformerFormat::Bfl { fp8 }))
            }
            None => Err(e),
        },
    }
}

/// A `VarBuilder` that serves a BFL-format single-file transformer under diffusers names:
/// fused qkv split into q/k/v, `linear1`/`linear2` and `*.scale` renamed, the final layer's
/// [shift; scale] rows swapped to diffusers' [scale; shift], and fp8 weights multiplied by their
/// `weight_scale` (or `scale_weight`). A `model.diffusion_model.` prefix is accepted. Returns
/// whether the file had scaled (fp8) weights.
pub fn bfl_var_builder(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(VarBuilder<'static>, bool), WeightsError> {
    // SAFETY: read-only memory map of a model file.
    let st = unsafe { MmapedSafetensors::new(path)? };
    let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    let prefix = if names
        .iter()
        .any(|n| n == "model.diffusion_model.img_in.weight")
    {
        "model.diffusion_model.".to_string()
    } else if names.iter().any(|n| n == "img_in.weight") {
        String::new()
    } else {
        return Err(WeightsError::BadFile {
            file: path.display().to_string(),
            message: "not a BFL FLUX.2 transformer (no img_in.weight)".into(),
        });
    };
    let fp8 = names
        .iter()
        .any(|n| n.ends_with(".weight_scale") || n.ends_with(".scale_weight"));
    let backend = BflBackend { st, prefix };
    Ok((
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone()),
        fp8,
    ))
}

/// Suffixes under which the BFL backend serves an fp8 Linear's stored values and per-row scales
/// unchanged (`<layer>.weight` + suffix), so `quant::linear_no_bias` with `Quantization::Fp8`
/// keeps the file's exact fp8 weights instead of re-quantizing dequantized ones.
pub const RAW_FP8_SUFFIX: &str = "#fp8";
pub const RAW_FP8_SCALE_SUFFIX: &str = "#fp8_scale";

/// How one diffusers tensor is made from the BFL file.
#[derive(Debug, Clone, PartialEq, Eq)]
enum BflSource {
    Direct(String),
    /// Part `index` of `parts` equal chunks along dim 0 (fused qkv).
    Chunk(String, usize, usize),
    /// Rows [a; b] become [b; a] (final layer modulation).
    SwapHalves(String),
}

impl BflSource {
    /// The BFL tensor name.
    fn bfl(&self) -> &str {
        match self {
            Self::Direct(b) | Self::Chunk(b, _, _) | Self::SwapHalves(b) => b,
        }
    }

    /// The rows of BFL tensor `t` (or of its per-row scales) that make up the diffusers tensor.
    fn select_rows(&self, t: Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Direct(_) => Ok(t),
            Self::Chunk(b, i, n) => {
                let rows = t.dim(0)?;
                if !rows.is_multiple_of(*n) {
                    candle_core::bail!("{b}: {rows} rows do not split into {n}");
                }
                t.narrow(0, i * rows / n, rows / n)?.contiguous()
            }
            Self::SwapHalves(_) => {
                let half = t.dim(0)? / 2;
                Tensor::cat(&[t.narrow(0, half, half)?, t.narrow(0, 0, half)?], 0)
            }
        }
    }
}

/// diffusers name -> BFL source (the inverse of diffusers' single-file converter).
fn bfl_source(name: &str) -> Option<BflSource> {
    use BflSource::*;
    let top = [
        ("x_embedder.weight", "img_in.weight"),
        ("context_embedder.weight", "txt_in.weight"),
        (
            "time_guidance_embed.timestep_embedder.linear_1.weight",
            "time_in.in_layer.weight",
        ),
        (
            "time_guidance_embed.timestep_embedder.linear_2.weight",
            "time_in.out_layer.weight",
        ),
        (
            "time_guidance_embed.guidance_embedder.linear_1.weight",
            "guidance_in.in_layer.weight",
        ),
        (
            "time_guidance_embed.guidance_embedder.linear_2.weight",
            "guidance_in.out_layer.weight",
        ),
        (
            "double_stream_modulation_img.linear.weight",
            "double_stream_modulation_img.lin.weight",
        ),
        (
            "double_stream_modulation_txt.linear.weight",
            "double_stream_modulation_txt.lin.weight",
        ),
        (
            "single_stream_modulation.linear.weight",
            "single_stream_modulation.lin.weight",
        ),
        ("proj_out.weight", "final_layer.linear.weight"),
    ];
    if let Some((_, b)) = top.iter().find(|(d, _)| *d == name) {
        return Some(Direct(b.to_string()));
    }
    if name == "norm_out.linear.weight" {
        return Some(SwapHalves("final_layer.adaLN_modulation.1.weight".into()));
    }
    if let Some(rest) = name.strip_prefix("transformer_blocks.") {
        let (i, within) = rest.split_once('.')?;
        let p = format!("double_blocks.{i}.");
        let src = match within {
            "attn.to_q.weight" => Chunk(p + "img_attn.qkv.weight", 0, 3),
            "attn.to_k.weight" => Chunk(p + "img_attn.qkv.weight", 1, 3),
            "attn.to_v.weight" => Chunk(p + "img_attn.qkv.weight", 2, 3),
            "attn.add_q_proj.weight" => Chunk(p + "txt_attn.qkv.weight", 0, 3),
            "attn.add_k_proj.weight" => Chunk(p + "txt_attn.qkv.weight", 1, 3),
            "attn.add_v_proj.weight" => Chunk(p + "txt_attn.qkv.weight", 2, 3),
            "attn.norm_q.weight" => Direct(p + "img_attn.norm.query_norm.scale"),
            "attn.norm_k.weight" => Direct(p + "img_attn.norm.key_norm.scale"),
            "attn.norm_added_q.weight" => Direct(p + "txt_attn.norm.query_norm.scale"),
            "attn.norm_added_k.weight" => Direct(p + "txt_attn.norm.key_norm.scale"),
            "attn.to_out.0.weight" => Direct(p + "img_attn.proj.weight"),
            "attn.to_add_out.weight" => Direct(p + "txt_attn.proj.weight"),
            "ff.linear_in.weight" => Direct(p + "img_mlp.0.weight"),
            "ff.linear_out.weight" => Direct(p + "img_mlp.2.weight"),
            "ff_context.linear_in.weight" => Direct(p + "txt_mlp.0.weight"),
            "ff_context.linear_out.weight" => Direct(p + "txt_mlp.2.weight"),
            _ => return None,
        };
        return Some(src);
    }
    if let Some(rest) = name.strip_prefix("single_transformer_blocks.") {
        let (i, within) = rest.split_once('.')?;
        let p = format!("single_blocks.{i}.");
        let src = match within {
            "attn.to_qkv_mlp_proj.weight" => Direct(p + "linear1.weight"),
            "attn.to_out.weight" => Direct(p + "linear2.weight"),
            "attn.norm_q.weight" => Direct(p + "norm.query_norm.scale"),
            "attn.norm_k.weight" => Direct(p + "norm.key_norm.scale"),
            _ => return None,
        };
        return Some(src);
    }
    None
}

struct BflBackend {
    st: MmapedSafetensors,
    prefix: String,
}

impl BflBackend {
    fn has(&self, bfl: &str) -> bool {
        self.st.get(&format!("{}{bfl}", self.prefix)).is_ok()
    }

    /// The `weight_scale` / `scale_weight` tensor name of a BFL weight, if it has one.
    fn scale_name(&self, bfl: &str) -> Option<String> {
        let base = format!("{}{bfl}", self.prefix);
        let base = base.strip_suffix(".weight")?;
        [
            format!("{base}.weight_scale"),
            format!("{base}.scale_weight"),
        ]
        .into_iter()
        .find(|n| self.st.get(n).is_ok())
    }

    /// F8E4M3 values (`#fp8`) or `[out, 1]` f32 scales (`#fp8_scale`) of a scaled fp8 weight.
    fn get_raw_fp8(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        let (weight, want_scale) = match name.strip_suffix(RAW_FP8_SCALE_SUFFIX) {
            Some(w) => (w, true),
            None => (name.strip_suffix(RAW_FP8_SUFFIX).unwrap_or(name), false),
        };
        let src = bfl_source(weight)
            .ok_or_else(|| candle_core::Error::msg(format!("no BFL tensor maps to {weight}")))?;
        let (BflSource::Direct(b) | BflSource::Chunk(b, _, _)) = &src else {
            candle_core::bail!("{weight}: no raw fp8 form");
        };
        let scale_name = self
            .scale_name(b)
            .ok_or_else(|| candle_core::Error::msg(format!("{b} has no fp8 scale")))?;
        // Sliced on the host: copying fp8 rows on the GPU needs candle's fp8 copy kernel, which
        // compute_80 builds lack (they have the fp8 casts, the only fp8 kernels used later).
        let raw = self.st.load(&format!("{}{b}", self.prefix), &Device::Cpu)?;
        if raw.dtype() != DType::F8E4M3 {
            candle_core::bail!("{b} is {:?}, not F8E4M3", raw.dtype());
        }
        let rows = src.select_rows(raw)?.to_device(dev)?;
        if !want_scale {
            return Ok(rows);
        }
        let out = rows.dim(0)?;
        let s = self.st.load(&scale_name, dev)?.to_dtype(DType::F32)?;
        let full_rows = match &src {
            BflSource::Chunk(_, _, n) => out * n,
            _ => out,
        };
        let s = match s.elem_count() {
            1 => s.flatten_all()?.broadcast_as((out, 1))?.contiguous()?,
            k if k == full_rows => src.select_rows(s.reshape((full_rows, 1))?)?,
            k => candle_core::bail!("{scale_name}: {k} elements, expected 1 or {full_rows}"),
        };
        Ok(s)
    }

    fn has_raw_fp8(&self, name: &str) -> bool {
        let weight = name
            .strip_suffix(RAW_FP8_SCALE_SUFFIX)
            .or_else(|| name.strip_suffix(RAW_FP8_SUFFIX));
        match weight.and_then(bfl_source) {
            Some(BflSource::Direct(b) | BflSource::Chunk(b, _, _)) => {
                self.scale_name(&b).is_some()
                    && self
                        .st
                        .get(&format!("{}{b}", self.prefix))
                        .is_ok_and(|v| DType::try_from(v.dtype()).ok() == Some(DType::F8E4M3))
            }
            _ => false,
        }
    }

    /// Loads a BFL tensor in f32 with its fp8 scale applied, if it has one.
    fn load_dequantized(&self, bfl: &str, dev: &Device) -> candle_core::Result<Tensor> {
        let full = format!("{}{bfl}", self.prefix);
        let t32 = self.st.load(&full, dev)?.to_dtype(DType::F32)?;
        let Some(scale_name) = self.scale_name(bfl) else {
            return Ok(t32);
        };
        let s = self.st.load(&scale_name, dev)?.to_dtype(DType::F32)?;
        let out = t32.dim(0)?;
        let s = match s.elem_count() {
            1 => s.flatten_all()?.reshape((1, 1))?,
            n if n == out => s.reshape((out, 1))?,
            n => candle_core::bail!("{full}: scale has {n} elements, expected 1 or {out}"),
        };
        t32.broadcast_mul(&s)
    }
}

impl SimpleBackend for BflBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "shape mismatch for {name} (from the BFL file): expected {s:?}, got {:?}",
                t.shape()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if name.ends_with(RAW_FP8_SUFFIX) || name.ends_with(RAW_FP8_SCALE_SUFFIX) {
            // Served as stored; the caller asks for the matching dtype.
            return self.get_raw_fp8(name, dev);
        }
        let src = bfl_source(name)
            .ok_or_else(|| candle_core::Error::msg(format!("no BFL tensor maps to {name}")))?;
        src.select_rows(self.load_dequantized(src.bfl(), dev)?)?
            .to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        if name.ends_with(RAW_FP8_SUFFIX) || name.ends_with(RAW_FP8_SCALE_SUFFIX) {
            return self.has_raw_fp8(name);
        }
        bfl_source(name).is_some_and(|src| self.has(src.bfl()))
    }
}

/// Names and shapes requested from a [`recording_var_builder`].
pub type RequestLog =
    std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, Vec<usize>>>>;

struct RecordingBackend {
    log: RequestLog,
}

impl SimpleBackend for RecordingBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.log
            .lock()
            .map_err(|_| candle_core::Error::msg("request log poisoned"))?
            .insert(name.to_string(), s.dims().to_vec());
        // A stride-0 view of one zero: the real 4B/9B shapes cost no memory.
        Tensor::zeros(1, dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("recording backend: {name} requested without a shape")
    }

    /// Every checkpoint name, but not the BFL backend's raw-fp8 aliases.
    fn contains_tensor(&self, name: &str) -> bool {
        !name.contains('#')
    }
}

/// A `VarBuilder` that serves zero tensors of any requested shape and logs every request:
/// builds a model at the real 4B/9B sizes without weights, to check against the committed
/// checkpoint manifests (tests/fixtures/flux2/manifests) which names and shapes it would load.
pub fn recording_var_builder(dtype: DType, device: &Device) -> (VarBuilder<'static>, RequestLog) {
    let log = RequestLog::default();
    let backend = RecordingBackend { log: log.clone() };
    (
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone()),
        log,
    )
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

    #[test]
    fn bfl_mapping_covers_the_block_names() {
        assert_eq!(
            bfl_source("transformer_blocks.3.attn.add_v_proj.weight"),
            Some(BflSource::Chunk(
                "double_blocks.3.txt_attn.qkv.weight".into(),
                2,
                3
            ))
        );
        assert_eq!(
            bfl_source("single_transformer_blocks.11.attn.norm_k.weight"),
            Some(BflSource::Direct(
                "single_blocks.11.norm.key_norm.scale".into()
            ))
        );
        assert_eq!(
            bfl_source("norm_out.linear.weight"),
            Some(BflSource::SwapHalves(
                "final_layer.adaLN_modulation.1.weight".into()
            ))
        );
        assert_eq!(bfl_source("transformer_blocks.0.attn.unknown.weight"), None);
    }

    #[derive(serde::Deserialize)]
    struct Manifest {
        tensors: std::collections::BTreeMap<String, Vec<usize>>,
    }

    fn manifest(name: &str) -> Manifest {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/flux2/manifests")
            .join(format!("{name}.json"));
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    /// Every diffusers tensor of the real transformers has a BFL source of the right shape,
    /// and every tensor of the real BFL file is used.
    #[test]
    fn bfl_mapping_covers_the_real_4b_and_9b_checkpoints() {
        for variant in ["transformer-4b", "transformer-9b"] {
            let diffusers = manifest(variant).tensors;
            let bfl = manifest(&format!("{variant}-bfl")).tensors;
            let mut used = BTreeSet::new();
            for (name, shape) in &diffusers {
                let src = bfl_source(name).unwrap_or_else(|| panic!("{variant}: {name} unmapped"));
                let (b, want) = match &src {
                    BflSource::Direct(b) | BflSource::SwapHalves(b) => (b, shape.clone()),
                    BflSource::Chunk(b, _, n) => {
                        let mut s = shape.clone();
                        s[0] *= n;
                        (b, s)
                    }
                };
                assert_eq!(bfl.get(b), Some(&want), "{variant}: {name} <- {b}");
                used.insert(b.clone());
            }
            let unused: Vec<_> = bfl.keys().filter(|k| !used.contains(*k)).collect();
            assert!(
                unused.is_empty(),
                "{variant}: BFL tensors never loaded: {unused:?}"
            );
        }
    }
}
