//! LoRA adapters for FLUX.2 [klein]: loading (three key layouts, [`formats`]), fusing into the
//! weights at load time, and the unfused side path that per-request adapters use.
//!
//! A LoRA pair on a Linear `W [out, in]` is `down [r, in]`, `up [out, r]` and an optional
//! `alpha`; with adapter scale `s` the effective weight is `W + s · alpha/r · up @ down` (alpha
//! absent: alpha = r). That is diffusers' `load_lora_weights` + `set_adapters(…, weights=s)`.
//!
//! * **Fused** (`LORAS`, at start-up): the delta is added to the base weight in f32 *before* the
//!   Linear is quantised ([`fused_var_builder`] wraps the checkpoint's `VarBuilder`), so there
//!   is no per-step cost and fp8/int8 quantise the fused weight.
//! * **Side path** (`LORA_PRELOAD`, chosen per request): each targeted Linear keeps `down`/`up`
//!   in the compute dtype and adds `s · (x @ downᵀ) @ upᵀ` when its adapter is active
//!   ([`SideLora`], [`ActiveLoras`]); the base weight (quantised or not) is never touched, so
//!   requests with different adapters need no re-fuse. See docs/lora.md for the cost.

pub mod formats;
pub mod spec;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

pub use formats::{BaseLinears, Component, KeyResolver, LoraFormat, Part, UpRows};
pub use spec::{LoraList, LoraMode, LoraSource, LoraSpec, LoraStatus, parse_specs};

use super::quant::quantize_fp8;
use super::weights::{RAW_FP8_SCALE_SUFFIX, RAW_FP8_SUFFIX};

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// A key fits no layout, or its tensor has the wrong shape for the base model.
    #[error("LoRA '{adapter}' ({file}): key '{key}': {message}")]
    BadKey {
        adapter: String,
        file: String,
        key: String,
        message: String,
    },
    /// The file cannot be found, read or parsed.
    #[error("LoRA '{adapter}' ({file}): {message}")]
    File {
        adapter: String,
        file: String,
        message: String,
    },
}

/// One LoRA pair, ready for a Linear: `down [r, in]`, `up [out, r]` (rows already selected for
/// this Linear), both f32 on the CPU, and `alpha / r`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub down: Tensor,
    pub up: Tensor,
    pub alpha_over_rank: f64,
}

impl LoraPair {
    pub fn rank(&self) -> usize {
        self.down.dim(0).unwrap_or(0)
    }

    /// `scale · alpha/r · up @ down`, `[out, in]` f32 on `device`.
    pub fn delta(&self, scale: f64, device: &Device) -> candle_core::Result<Tensor> {
        let up = self.up.to_device(device)?;
        let down = self.down.to_device(device)?;
        up.matmul(&down)? * (scale * self.alpha_over_rank)
    }
}

/// A loaded adapter: every pair under the diffusers/HF name of the Linear it targets.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub name: String,
    /// Where it came from (path or `hf:` reference), for /health and errors.
    pub source: String,
    pub format: LoraFormat,
    pub pairs: BTreeMap<(Component, String), LoraPair>,
}

impl LoraAdapter {
    /// Reads a safetensors LoRA file and maps every key onto the base model's Linears.
    pub fn load(
        name: &str,
        path: &Path,
        source: &str,
        resolver: &KeyResolver,
    ) -> Result<Self, LoraError> {
        let tensors =
            candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| LoraError::File {
                adapter: name.to_string(),
                file: source.to_string(),
                message: format!("cannot read safetensors file {}: {e}", path.display()),
            })?;
        Self::from_tensors(name, source, tensors, resolver)
    }

    /// Maps `tensors` (file key -> tensor) onto the base model; the error names the first bad
    /// key (in sorted order) and what the base model expected.
    pub fn from_tensors(
        name: &str,
        source: &str,
        tensors: HashMap<String, Tensor>,
        resolver: &KeyResolver,
    ) -> Result<Self, LoraError> {
        let bad = |key: &str, message: String| LoraError::BadKey {
            adapter: name.to_string(),
            file: source.to_string(),
            key: key.to_string(),
            message,
        };
        if tensors.is_empty() {
            return Err(LoraError::File {
                adapter: name.to_string(),
                file: source.to_string(),
                message: "the file holds no tensors".into(),
            });
        }
        let mut keys: Vec<&String> = tensors.keys().collect();
        keys.sort();
        // (format, component, module) -> part -> file key
        type Group = HashMap<Part, String>;
        let mut groups: BTreeMap<(LoraFormat, Component, String), Group> = BTreeMap::new();
        let mut format = None;
        for key in keys {
            let parsed = resolver.parse(key).map_err(|m| bad(key, m))?;
            if parsed.component == Component::Transformer {
                match format {
                    None => format = Some(parsed.format),
                    Some(f) if f != parsed.format => {
                        return Err(bad(
                            key,
                            format!(
                                "{} layout, but earlier transformer keys are {}; one file, one layout",
                                parsed.format.as_str(),
                                f.as_str()
                            ),
                        ));
                    }
                    _ => {}
                }
            }
            let g = groups
                .entry((parsed.format, parsed.component, parsed.module.clone()))
                .or_default();
            if let Some(prev) = g.insert(parsed.part, key.clone()) {
                return Err(bad(key, format!("duplicates {prev}")));
            }
        }
        let mut pairs = BTreeMap::new();
        for ((fmt, component, module), g) in groups {
            let (Some(down_key), Some(up_key)) = (g.get(&Part::Down), g.get(&Part::Up)) else {
                let have = g.values().next().cloned().unwrap_or_default();
                return Err(bad(
                    &have,
                    format!(
                        "module '{module}' needs both a down (lora_A) and an up (lora_B) matrix"
                    ),
                ));
            };
            let to_f32 = |k: &str| {
                tensors[k]
                    .to_dtype(DType::F32)
                    .map_err(|e| bad(k, e.to_string()))
            };
            let down = to_f32(down_key)?;
            let up = to_f32(up_key)?;
            let (Ok((rank, inp)), Ok((out_all, rank_up))) = (down.dims2(), up.dims2()) else {
                return Err(bad(
                    down_key,
                    format!(
                        "down {:?} / up {:?}: both must be 2-D",
                        down.dims(),
                        up.dims()
                    ),
                ));
            };
            if rank == 0 || rank != rank_up {
                return Err(bad(
                    up_key,
                    format!("rank mismatch: down {:?}, up {:?}", down.dims(), up.dims()),
                ));
            }
            let alpha = match g.get(&Part::Alpha) {
                Some(k) => {
                    let a = to_f32(k)?;
                    if a.elem_count() != 1 {
                        return Err(bad(
                            k,
                            format!("alpha must be a scalar, got {:?}", a.dims()),
                        ));
                    }
                    let v = a
                        .flatten_all()
                        .and_then(|a| a.to_vec1::<f32>())
                        .map_err(|e| bad(k, e.to_string()))?[0] as f64;
                    if !v.is_finite() {
                        return Err(bad(k, format!("alpha {v} is not finite")));
                    }
                    v
                }
                None => rank as f64,
            };
            let parsed = formats::ParsedKey {
                format: fmt,
                component,
                module: module.clone(),
                part: Part::Down,
            };
            let targets = resolver.targets(&parsed).map_err(|m| bad(down_key, m))?;
            for t in targets {
                let (out, want_in) = t.shape;
                let want_out_all = match t.rows {
                    UpRows::Chunk { parts, .. } => out * parts,
                    _ => out,
                };
                if inp != want_in {
                    return Err(bad(
                        down_key,
                        format!(
                            "shape {:?}, expected [rank, {want_in}] for {} {} of the base model ({})",
                            down.dims(),
                            t.component.as_str(),
                            t.name,
                            resolver.base().description
                        ),
                    ));
                }
                if out_all != want_out_all {
                    return Err(bad(
                        up_key,
                        format!(
                            "shape {:?}, expected [{want_out_all}, rank] for {} {} of the base model ({})",
                            up.dims(),
                            t.component.as_str(),
                            t.name,
                            resolver.base().description
                        ),
                    ));
                }
                let select = || -> candle_core::Result<Tensor> {
                    match t.rows {
                        UpRows::All => Ok(up.clone()),
                        UpRows::Chunk { index, .. } => up.narrow(0, index * out, out)?.contiguous(),
                        UpRows::SwapHalves => {
                            let h = out / 2;
                            Tensor::cat(&[up.narrow(0, h, h)?, up.narrow(0, 0, h)?], 0)
                        }
                    }
                };
                let up_rows = select().map_err(|e| bad(up_key, e.to_string()))?;
                let pair = LoraPair {
                    down: down.clone(),
                    up: up_rows,
                    alpha_over_rank: alpha / rank as f64,
                };
                if pairs.insert((t.component, t.name.clone()), pair).is_some() {
                    return Err(bad(down_key, format!("a second LoRA pair for {}", t.name)));
                }
            }
        }
        Ok(Self {
            name: name.to_string(),
            source: source.to_string(),
            format: format.unwrap_or(LoraFormat::Diffusers),
            pairs,
        })
    }

    pub fn pair(&self, component: Component, module: &str) -> Option<&LoraPair> {
        self.pairs.get(&(component, module.to_string()))
    }

    /// Number of Linears this adapter changes in `component`.
    pub fn targets_in(&self, component: Component) -> usize {
        self.pairs.keys().filter(|(c, _)| *c == component).count()
    }

    /// Largest rank over its pairs.
    pub fn rank(&self) -> usize {
        self.pairs.values().map(LoraPair::rank).max().unwrap_or(0)
    }
}

/// Wraps a component's `VarBuilder` so every Linear weight an adapter targets comes out as
/// `W + Σ scale · alpha/r · up @ down` (in f32, then cast), before any quantisation. For
/// BFL fp8 files, whose Linears `quant::linear_no_bias` reads as raw fp8 (`#fp8`), a targeted
/// Linear's raw form is the fused weight re-quantised to fp8 with per-row scales.
pub fn fused_var_builder(
    inner: VarBuilder<'static>,
    component: Component,
    adapters: Vec<(Arc<LoraAdapter>, f64)>,
) -> VarBuilder<'static> {
    let (dtype, device) = (inner.dtype(), inner.device().clone());
    let backend = FuseBackend {
        inner,
        component,
        adapters,
        fp8_scales: Mutex::new(HashMap::new()),
    };
    VarBuilder::from_backend(Box::new(backend), dtype, device)
}

struct FuseBackend {
    inner: VarBuilder<'static>,
    component: Component,
    adapters: Vec<(Arc<LoraAdapter>, f64)>,
    /// Scales of fused fp8 weights, computed with their values and handed out next.
    fp8_scales: Mutex<HashMap<String, Tensor>>,
}

impl FuseBackend {
    fn pairs(&self, weight: &str) -> Vec<(&LoraPair, f64)> {
        let Some(module) = weight.strip_suffix(".weight") else {
            return vec![];
        };
        self.adapters
            .iter()
            .filter_map(|(a, s)| a.pair(self.component, module).map(|p| (p, *s)))
            .collect()
    }

    /// The fused f32 weight, or `None` when no adapter targets `weight`.
    fn fused_f32(&self, weight: &str, dev: &Device) -> candle_core::Result<Option<Tensor>> {
        let pairs = self.pairs(weight);
        if pairs.is_empty() {
            return Ok(None);
        }
        let mut w = self
            .inner
            .get_unchecked_dtype(weight, DType::F32)?
            .to_device(dev)?;
        for (p, s) in pairs {
            w = (w + p.delta(s, dev)?)?;
        }
        Ok(Some(w))
    }
}

impl SimpleBackend for FuseBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let is_raw = name.ends_with(RAW_FP8_SUFFIX) || name.ends_with(RAW_FP8_SCALE_SUFFIX);
        if !is_raw && let Some(w) = self.fused_f32(name, dev)? {
            if w.shape() != &s {
                candle_core::bail!(
                    "shape mismatch for {name}: expected {s:?}, got {:?}",
                    w.shape()
                );
            }
            return w.to_dtype(dtype);
        }
        if is_raw {
            return self.get_unchecked(name, dtype, dev);
        }
        self.inner.get_with_hints_dtype(s, name, h, dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if let Some(weight) = name.strip_suffix(RAW_FP8_SCALE_SUFFIX) {
            if let Some(s) = self.fp8_scales.lock().expect("fp8 scales").remove(weight) {
                return Ok(s);
            }
            if let Some(w) = self.fused_f32(weight, dev)? {
                return Ok(quantize_fp8(&w)?.1);
            }
        } else if let Some(weight) = name.strip_suffix(RAW_FP8_SUFFIX)
            && let Some(w) = self.fused_f32(weight, dev)?
        {
            let (q, s) = quantize_fp8(&w)?;
            self.fp8_scales
                .lock()
                .expect("fp8 scales")
                .insert(weight.to_string(), s);
            return Ok(q);
        } else if let Some(w) = self.fused_f32(name, dev)? {
            return w.to_dtype(dtype);
        }
        self.inner.get_unchecked_dtype(name, dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// Per-request scales of the side-path adapters, one slot per preloaded adapter (0 = off);
/// shared by every Linear that carries a [`SideLora`]. The worker sets them for a job and
/// clears them after it ([`ActiveLoras::activate`]); one job runs at a time.
#[derive(Debug, Clone, Default)]
pub struct ActiveLoras(Arc<RwLock<Vec<f64>>>);

impl ActiveLoras {
    pub fn new(slots: usize) -> Self {
        Self(Arc::new(RwLock::new(vec![0.0; slots])))
    }

    /// Sets `(slot, scale)` for the lifetime of the guard; every other slot is off.
    pub fn activate(&self, scales: &[(usize, f64)]) -> ActiveGuard {
        let mut v = self.0.write().expect("active loras");
        v.iter_mut().for_each(|s| *s = 0.0);
        for &(slot, scale) in scales {
            if let Some(s) = v.get_mut(slot) {
                *s += scale;
            }
        }
        ActiveGuard(self.clone())
    }

    pub fn scale(&self, slot: usize) -> f64 {
        self.0
            .read()
            .expect("active loras")
            .get(slot)
            .copied()
            .unwrap_or(0.0)
    }

    pub fn any_active(&self) -> bool {
        self.0
            .read()
            .expect("active loras")
            .iter()
            .any(|s| *s != 0.0)
    }
}

/// Turns every side-path adapter off when dropped (also on error or cancellation).
pub struct ActiveGuard(ActiveLoras);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if let Ok(mut v) = self.0.0.write() {
            v.iter_mut().for_each(|s| *s = 0.0);
        }
    }
}

/// One adapter's unfused pair on a Linear: `down_t [in, r]`, `up_t [r, out]` already multiplied
/// by alpha/r, in the compute dtype on the device.
#[derive(Debug, Clone)]
pub struct SideLora {
    pub slot: usize,
    pub down_t: Tensor,
    pub up_t: Tensor,
    pub active: ActiveLoras,
}

impl SideLora {
    pub fn new(
        slot: usize,
        pair: &LoraPair,
        dtype: DType,
        device: &Device,
        active: ActiveLoras,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            slot,
            down_t: pair
                .down
                .t()?
                .contiguous()?
                .to_dtype(dtype)?
                .to_device(device)?,
            up_t: (pair.up.t()?.contiguous()? * pair.alpha_over_rank)?
                .to_dtype(dtype)?
                .to_device(device)?,
            active,
        })
    }

    /// `(scale · x @ downᵀ) @ upᵀ` if this adapter is active, else `None`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let scale = self.active.scale(self.slot);
        if scale == 0.0 {
            return Ok(None);
        }
        // Scaled at rank r, not at the output width: one pass over the small tensor instead
        // of the large one.
        let h = (crate::nn::matmul::broadcast_matmul(x, &self.down_t)? * scale)?;
        Ok(Some(crate::nn::matmul::broadcast_matmul(&h, &self.up_t)?))
    }
}

/// Loads every configured adapter against the base model `resolver` describes. A failure is
/// logged and reported in its status, never returned: a bad adapter must not stop the service.
/// Returns the adapters that loaded (with their spec) and one status per spec, in order.
pub fn load_all(
    specs: &[LoraSpec],
    resolver: &KeyResolver,
    hf_token: Option<String>,
) -> (Vec<(LoraSpec, Arc<LoraAdapter>)>, Vec<LoraStatus>) {
    let mut loaded = Vec::new();
    let mut statuses = Vec::new();
    for spec in specs {
        let result = load_one(spec, resolver, hf_token.clone()).and_then(|a| {
            if spec.mode == LoraMode::PerRequest && a.targets_in(Component::TextEncoder) > 0 {
                return Err(LoraError::File {
                    adapter: spec.name.clone(),
                    file: spec.source.clone(),
                    message: format!(
                        "changes {} text-encoder Linears; per-request adapters (LORA_PRELOAD) \
                         may change the transformer only, fuse it with LORAS instead",
                        a.targets_in(Component::TextEncoder)
                    ),
                });
            }
            Ok(a)
        });
        let mut status = LoraStatus {
            name: spec.name.clone(),
            source: spec.source.clone(),
            mode: spec.mode,
            scale: (spec.mode == LoraMode::Fused).then_some(spec.scale),
            status: "loaded".into(),
            format: None,
            transformer_targets: 0,
            text_encoder_targets: 0,
            rank: 0,
            error: None,
        };
        match result {
            Ok(a) => {
                tracing::info!(
                    lora = %a.name,
                    format = a.format.as_str(),
                    mode = ?spec.mode,
                    transformer_targets = a.targets_in(Component::Transformer),
                    text_encoder_targets = a.targets_in(Component::TextEncoder),
                    rank = a.rank(),
                    "LoRA adapter loaded"
                );
                status.format = Some(a.format);
                status.transformer_targets = a.targets_in(Component::Transformer);
                status.text_encoder_targets = a.targets_in(Component::TextEncoder);
                status.rank = a.rank();
                loaded.push((spec.clone(), Arc::new(a)));
            }
            Err(e) => {
                tracing::error!(lora = %spec.name, "LoRA adapter not loaded, serving without it: {e}");
                status.status = "failed".into();
                status.error = Some(e.to_string());
            }
        }
        statuses.push(status);
    }
    (loaded, statuses)
}

fn load_one(
    spec: &LoraSpec,
    resolver: &KeyResolver,
    hf_token: Option<String>,
) -> Result<LoraAdapter, LoraError> {
    let file_err = |message: String| LoraError::File {
        adapter: spec.name.clone(),
        file: spec.source.clone(),
        message,
    };
    let path = match spec.location().map_err(file_err)? {
        LoraSource::Local(p) => {
            if !p.is_file() {
                return Err(file_err(format!("no such file {}", p.display())));
            }
            p
        }
        LoraSource::Hub { repo, file } => {
            let files = super::weights::ModelFiles::open(&repo, hf_token)
                .map_err(|e| file_err(e.to_string()))?;
            files.get(&file).map_err(|e| file_err(e.to_string()))?
        }
    };
    LoraAdapter::load(&spec.name, &path, &spec.source, resolver)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> crate::flux2::transformer::Flux2TransformerConfig {
        serde_json::from_value(serde_json::json!({
            "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 8,
            "num_attention_heads": 2, "joint_attention_dim": 12, "in_channels": 8,
            "axes_dims_rope": [2, 2, 2, 2], "timestep_guidance_channels": 4
        }))
        .unwrap()
    }

    fn resolver() -> KeyResolver {
        KeyResolver::new(BaseLinears::new(&cfg(), None, "test-base"))
    }

    fn t(shape: (usize, usize), seed: f32) -> Tensor {
        let n = shape.0 * shape.1;
        let v: Vec<f32> = (0..n).map(|i| ((i as f32 + seed) * 0.37).sin()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn load(pairs: Vec<(&str, Tensor)>) -> Result<LoraAdapter, LoraError> {
        let map = pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        LoraAdapter::from_tensors("a", "a.safetensors", map, &resolver())
    }

    #[test]
    fn bfl_qkv_shares_down_and_splits_up_by_rows() {
        let (d, r) = (16, 2);
        let down = t((r, d), 1.0);
        let up = t((3 * d, r), 2.0);
        let a = load(vec![
            (
                "diffusion_model.double_blocks.0.txt_attn.qkv.lora_A.weight",
                down.clone(),
            ),
            (
                "diffusion_model.double_blocks.0.txt_attn.qkv.lora_B.weight",
                up.clone(),
            ),
        ])
        .unwrap();
        assert_eq!(a.format, LoraFormat::Bfl);
        for (i, n) in ["add_q_proj", "add_k_proj", "add_v_proj"]
            .iter()
            .enumerate()
        {
            let p = a
                .pair(
                    Component::Transformer,
                    &format!("transformer_blocks.0.attn.{n}"),
                )
                .unwrap();
            let want = up.narrow(0, i * d, d).unwrap();
            let diff = (&p.up - &want).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{n}");
            assert_eq!(p.down.dims(), down.dims());
        }
        assert_eq!(a.pairs.len(), 3);
    }

    #[test]
    fn kohya_names_and_alpha_map_onto_diffusers_linears() {
        let (d, f, r) = (16, 48, 4);
        let a = load(vec![
            (
                "lora_unet_double_blocks_0_img_mlp_2.lora_down.weight",
                t((r, f), 0.0),
            ),
            (
                "lora_unet_double_blocks_0_img_mlp_2.lora_up.weight",
                t((d, r), 1.0),
            ),
            (
                "lora_unet_double_blocks_0_img_mlp_2.alpha",
                Tensor::new(2f32, &Device::Cpu).unwrap(),
            ),
            (
                "lora_unet_single_blocks_0_linear1.lora_down.weight",
                t((r, d), 2.0),
            ),
            (
                "lora_unet_single_blocks_0_linear1.lora_up.weight",
                t((3 * d + 2 * f, r), 3.0),
            ),
        ])
        .unwrap();
        assert_eq!(a.format, LoraFormat::Kohya);
        let p = a
            .pair(Component::Transformer, "transformer_blocks.0.ff.linear_out")
            .unwrap();
        assert_eq!(p.alpha_over_rank, 0.5);
        let p = a
            .pair(
                Component::Transformer,
                "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
            )
            .unwrap();
        assert_eq!(p.alpha_over_rank, 1.0, "no alpha: alpha = rank");
    }

    #[test]
    fn bfl_final_layer_up_rows_are_swapped_like_the_weight() {
        let (d, r) = (16, 2);
        let up = t((2 * d, r), 5.0);
        let a = load(vec![
            (
                "diffusion_model.final_layer.adaLN_modulation.1.lora_A.weight",
                t((r, d), 4.0),
            ),
            (
                "diffusion_model.final_layer.adaLN_modulation.1.lora_B.weight",
                up.clone(),
            ),
        ])
        .unwrap();
        let p = a.pair(Component::Transformer, "norm_out.linear").unwrap();
        let want = Tensor::cat(
            &[up.narrow(0, d, d).unwrap(), up.narrow(0, 0, d).unwrap()],
            0,
        )
        .unwrap();
        let diff = (&p.up - &want).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn errors_name_the_first_bad_key_and_the_base_model() {
        let (d, r) = (16, 2);
        let e = load(vec![
            (
                "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
                t((r, d), 0.0),
            ),
            (
                "transformer.transformer_blocks.0.attn.to_q.lora_B.weight",
                t((d, r), 0.0),
            ),
            (
                "transformer.transformer_blocks.0.attn.to_zz.lora_A.weight",
                t((r, d), 0.0),
            ),
            (
                "transformer.transformer_blocks.0.attn.to_zz.lora_B.weight",
                t((d, r), 0.0),
            ),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("key 'transformer.transformer_blocks.0.attn.to_zz.lora_A.weight'")
                && e.contains("not a Linear of the base transformer (test-base)"),
            "{e}"
        );
        let e = load(vec![
            ("transformer.proj_out.lora_A.weight", t((r, d), 0.0)),
            ("transformer.proj_out.lora_B.weight", t((3, r), 0.0)),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("key 'transformer.proj_out.lora_B.weight'")
                && e.contains("shape [3, 2], expected [8, rank] for transformer proj_out")
                && e.contains("test-base"),
            "{e}"
        );
        let e = load(vec![("transformer.proj_out.lora_A.weight", t((r, d), 0.0))])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("needs both a down (lora_A) and an up (lora_B)"),
            "{e}"
        );
        let e = load(vec![("some.other.tensor", t((1, 1), 0.0))])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("key 'some.other.tensor': not a LoRA tensor"),
            "{e}"
        );
        let e = load(vec![(
            "lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight",
            t((r, d), 0.0),
        )])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("lora_unet_double_blocks_7_img_attn_qkv is not a Linear"),
            "{e}"
        );
        let e = load(vec![
            (
                "text_encoder.model.layers.0.mlp.up_proj.lora_A.weight",
                t((r, d), 0.0),
            ),
            (
                "text_encoder.model.layers.0.mlp.up_proj.lora_B.weight",
                t((d, r), 0.0),
            ),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("no text encoder config"), "{e}");
    }

    #[test]
    fn side_path_is_off_unless_activated_and_the_guard_turns_it_off() {
        let active = ActiveLoras::new(2);
        let pair = LoraPair {
            down: t((2, 4), 0.0),
            up: t((3, 2), 1.0),
            alpha_over_rank: 0.5,
        };
        let side = SideLora::new(1, &pair, DType::F32, &Device::Cpu, active.clone()).unwrap();
        let x = t((5, 4), 2.0);
        assert!(side.forward(&x).unwrap().is_none());
        {
            let _g = active.activate(&[(1, 2.0)]);
            let y = side.forward(&x).unwrap().unwrap();
            let delta = pair.delta(2.0, &Device::Cpu).unwrap();
            let want = x.matmul(&delta.t().unwrap()).unwrap();
            let diff = (&y - &want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
            assert!(active.any_active());
        }
        assert!(!active.any_active());
        assert!(side.forward(&x).unwrap().is_none());
    }
}
