//! `Flux2Pipeline`: text-to-image and multi-reference generation with FLUX.2 [klein], step for
//! step what diffusers' `Flux2KleinPipeline` does (see flux2-klein.md §5).

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;

use super::Quantization;
use super::attention::{
    AttentionChoice, AttentionError, AttentionReport, CheckPlan, compiled_backends,
    model_check_shapes, select,
};
use super::lora::{
    self, ActiveLoras, BaseLinears, Component, KeyResolver, LoraMode, LoraSpec, LoraStatus,
    SideLora,
};
use super::reference::{self, ReferenceError};
use super::rng;
use super::scheduler;
use super::text_encoder::{PromptEncoder, PromptEncoderError};
use super::tokenizer::{MAX_LENGTH, TokenizerError};
use super::transformer::Flux2Transformer2DModel;
use super::vae::{AutoencoderKLFlux2, AutoencoderKLFlux2Config, pack, unpack};
use super::weights::{ModelFiles, WeightsError};

/// Largest width or height accepted, in pixels (after flooring to a multiple of 16).
pub use crate::limits::MAX_PIPELINE_SIDE as MAX_SIDE;
/// Position-id spacing of reference images on the T axis (diffusers `scale=10`).
const REF_T_SCALE: f32 = 10.0;
/// Timed calls per shape in the attention self-check: enough to see a 2× difference through
/// launch noise, few enough that the check at the largest size costs seconds, not minutes.
const ATTENTION_CHECK_ITERS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum Flux2Error {
    /// A request field is out of range; the message names the field and the limit.
    #[error("invalid {field}: {message}")]
    InvalidInput { field: String, message: String },
    /// A reference image was rejected (names its index and the limit).
    #[error(transparent)]
    InvalidReference(#[from] ReferenceError),
    /// Model files missing, unreadable or inconsistent (names the file and the fix).
    #[error(transparent)]
    ModelFiles(#[from] WeightsError),
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error("cancelled")]
    Cancelled,
    /// The requested attention backend is absent or failed its load-time self-check.
    #[error(transparent)]
    Attention(#[from] AttentionError),
    /// Tensor or device failure (out of memory, CUDA error, shape bug).
    #[error("model/device error: {0}")]
    Candle(#[from] candle_core::Error),
}

impl Flux2Error {
    fn invalid(field: &str, message: impl Into<String>) -> Self {
        Flux2Error::InvalidInput {
            field: field.to_string(),
            message: message.into(),
        }
    }

    /// Whether the caller's input (not the model or the device) caused the error.
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Flux2Error::InvalidInput { .. } | Flux2Error::InvalidReference(_)
        )
    }
}

impl From<PromptEncoderError> for Flux2Error {
    fn from(e: PromptEncoderError) -> Self {
        match e {
            PromptEncoderError::Weights(w) => Flux2Error::ModelFiles(w),
            PromptEncoderError::Tokenizer(t) => Flux2Error::Tokenizer(t),
            PromptEncoderError::Candle(c) => Flux2Error::Candle(c),
        }
    }
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// A local diffusers-layout directory, a hub repo id, or `4B` / `9B`.
    pub model_id: String,
    /// Storage of the transformer's Linear weights.
    pub quantization: Quantization,
    /// Storage of the text encoder's attention and MLP projections (the settings resolve an
    /// unset `TEXT_ENCODER_QUANTIZATION` to `quantization`).
    pub text_encoder_quantization: Quantization,
    pub device: Device,
    /// Compute dtype of all three models (`--dtype`; default bf16 on CUDA, f32 on CPU). Every
    /// dtype runs on the CPU (see docs/numerics.md).
    pub dtype: DType,
    pub hf_token: Option<String>,
    /// Attention backend (`ATTENTION`): `auto` self-checks the compiled fused backends at load.
    pub attention: AttentionChoice,
    /// LoRA adapters: fused at load (`LORAS`) or kept for per-request use (`LORA_PRELOAD`).
    /// One that fails to load is reported in [`Flux2Pipeline::lora_status`], not an error.
    pub loras: Vec<LoraSpec>,
}

/// One generation request.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub prompt: String,
    /// Floored to a multiple of 16.
    pub width: u32,
    /// Floored to a multiple of 16.
    pub height: u32,
    /// 1..=50.
    pub num_steps: u32,
    pub seed: u64,
    /// Used only by non-distilled (base) models, as classifier-free guidance when > 1.
    pub guidance_scale: f32,
    /// Replaces the seeded noise: [1, 128, H/16, W/16], the layout diffusers' `latents=` takes.
    pub latents: Option<Tensor>,
    /// Per-request adapters (`LORA_PRELOAD` names) and their scales; empty: none.
    pub loras: Vec<(String, f64)>,
}

/// Reference images encoded once (VAE mean, normalised, packed), reusable across prompts.
#[derive(Debug, Clone)]
pub struct ReferenceLatents {
    /// [1, N_ref, 128], or `None` when no image was given.
    tokens: Option<Tensor>,
    /// Position ids [N_ref, 4]: (10·(i+1), row, col, 0).
    ids: Option<Tensor>,
    count: usize,
}

impl ReferenceLatents {
    /// Number of reference images.
    pub fn len(&self) -> usize {
        self.count
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    /// The packed reference tokens [1, N_ref, 128] in the compute dtype (`None` without images).
    pub fn tokens(&self) -> Option<&Tensor> {
        self.tokens.as_ref()
    }
    /// Number of reference tokens appended to the sequence.
    pub fn num_tokens(&self) -> usize {
        self.tokens.as_ref().map_or(0, |t| t.dim(1).unwrap_or(0))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTimings {
    pub text_encoder_ms: f64,
    pub denoise_ms: f64,
    pub vae_decode_ms: f64,
}

#[derive(Debug, Clone)]
pub struct Generated {
    pub image: RgbImage,
    pub timings: StageTimings,
}

/// A loaded FLUX.2 [klein] model: text encoder, transformer and VAE on one device.
pub struct Flux2Pipeline {
    model_id: String,
    /// The hub commit the files were read at (`None` for a local directory).
    revision: Option<String>,
    is_distilled: bool,
    text: PromptEncoder,
    transformer: Flux2Transformer2DModel,
    vae: AutoencoderKLFlux2,
    /// Outcome of the load-time attention self-check.
    attention: AttentionReport,
    device: Device,
    dtype: DType,
    /// Embeddings of the empty prompt, CFG's negative: the same for every request, so encoded
    /// once, on first use.
    empty_prompt: OnceLock<Tensor>,
    /// What became of each configured adapter.
    lora_status: Vec<LoraStatus>,
    /// Per-request adapter name -> side-path slot.
    lora_slots: HashMap<String, usize>,
    /// Scales of the side-path adapters during a job.
    active_loras: ActiveLoras,
}

/// Width or height after flooring to a multiple of `multiple` (diffusers resizes silently).
pub fn floor_size(field: &str, value: u32, multiple: u32) -> Result<u32, Flux2Error> {
    let v = value / multiple * multiple;
    if v == 0 {
        return Err(Flux2Error::invalid(
            field,
            format!("{value} is below the minimum {multiple}"),
        ));
    }
    if v > MAX_SIDE {
        return Err(Flux2Error::invalid(
            field,
            format!("{value} exceeds the maximum {MAX_SIDE}"),
        ));
    }
    Ok(v)
}

fn ms_since(t: Instant, device: &Device) -> Result<f64, Flux2Error> {
    device.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// The VAE runs in the compute dtype on every device (bf16 convs on the CPU go through f32, see
/// `nn::conv`).
fn vae_dtype(_device: &Device, dtype: DType) -> DType {
    dtype
}

/// The timestep the transformer gets at σ: diffusers takes t = σ·1000 from the scheduler (f32),
/// casts it to the latents' dtype and divides by 1000 in that dtype; the transformer casts
/// again and multiplies by 1000. Rounded the same way here, so bf16 sees the same t.
fn timestep_value(sigma: f32, dtype: DType) -> f32 {
    let t = sigma * 1000.0;
    match dtype {
        DType::BF16 => (half::bf16::from_f32(t) / half::bf16::from_f32(1000.0)).to_f32(),
        DType::F16 => (half::f16::from_f32(t) / half::f16::from_f32(1000.0)).to_f32(),
        _ => t / 1000.0,
    }
}

/// Position ids (t, row, col, 0) of an h×w token grid, row-major.
fn grid_ids(t: f32, h: usize, w: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mut v = Vec::with_capacity(h * w * 4);
    for r in 0..h {
        for c in 0..w {
            v.extend_from_slice(&[t, r as f32, c as f32, 0.0]);
        }
    }
    Tensor::from_vec(v, (h * w, 4), device)
}

/// Text position ids (0, 0, 0, l).
fn text_ids(len: usize, device: &Device) -> candle_core::Result<Tensor> {
    let v: Vec<f32> = (0..len).flat_map(|l| [0.0, 0.0, 0.0, l as f32]).collect();
    Tensor::from_vec(v, (len, 4), device)
}

impl Flux2Pipeline {
    pub fn load(opts: &LoadOptions) -> Result<Self, Flux2Error> {
        let files = ModelFiles::open(&opts.model_id, opts.hf_token.clone())?;
        // Everything is fetched first, with progress in the log and /health, so a slow first
        // start shows what it waits for instead of stalling inside a component's load.
        files.prefetch()?;
        Self::from_files(&files, opts)
    }

    /// Loads from already-resolved model files.
    pub fn from_files(files: &ModelFiles, opts: &LoadOptions) -> Result<Self, Flux2Error> {
        let device = opts.device.clone();
        let dtype = opts.dtype;
        let index = files.model_index()?;
        let tcfg = files.transformer_config()?;
        tcfg.validate().map_err(|m| WeightsError::BadFile {
            file: "transformer/config.json".into(),
            message: m,
        })?;
        if device.is_cpu() {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let params = files.transformer_parameters().unwrap_or(0);
            if let Some(w) = crate::device::choice::cpu_time_warning(params, 1024, 4, threads) {
                tracing::warn!("{w}");
            }
        }
        let vcfg: AutoencoderKLFlux2Config = files.read_json("vae/config.json")?;
        let te_cfg = files.text_encoder_config().ok();
        let resolver = KeyResolver::new(BaseLinears::new(
            &tcfg,
            te_cfg.as_ref(),
            format!(
                "{}: transformer D={} with {} double / {} single blocks",
                files.id(),
                tcfg.inner_dim(),
                tcfg.num_layers,
                tcfg.num_single_layers
            ),
        ));
        let (loaded, lora_status) = lora::load_all(&opts.loras, &resolver, opts.hf_token.clone());
        let fused: Vec<_> = loaded
            .iter()
            .filter(|(s, _)| s.mode == LoraMode::Fused)
            .map(|(s, a)| (a.clone(), s.scale))
            .collect();
        let fuse = |component: Component| {
            let list = fused.clone();
            move |vb: VarBuilder<'static>| {
                if list.is_empty() {
                    vb
                } else {
                    lora::fused_var_builder(vb, component, list.clone())
                }
            }
        };
        let text = PromptEncoder::load_wrapped(
            files,
            dtype,
            &device,
            opts.text_encoder_quantization,
            &fuse(Component::TextEncoder),
        )?;
        if text.output_dim() != tcfg.joint_attention_dim {
            return Err(WeightsError::BadFile {
                file: "transformer/config.json".into(),
                message: format!(
                    "joint_attention_dim {} does not match the text encoder's 3 x hidden = {}",
                    tcfg.joint_attention_dim,
                    text.output_dim()
                ),
            }
            .into());
        }
        let (tvb, _format) = files.transformer_var_builder(dtype, &device)?;
        let tvb = fuse(Component::Transformer)(tvb);
        let mut transformer = Flux2Transformer2DModel::new(&tcfg, tvb, opts.quantization)?;
        let per_request: Vec<_> = loaded
            .iter()
            .filter(|(s, _)| s.mode == LoraMode::PerRequest)
            .map(|(_, a)| a.clone())
            .collect();
        let active_loras = ActiveLoras::new(per_request.len());
        let mut lora_slots = HashMap::new();
        for (slot, adapter) in per_request.iter().enumerate() {
            for (name, linear) in transformer.linears_mut() {
                if let Some(pair) = adapter.pair(Component::Transformer, &name) {
                    linear.push_side_lora(SideLora::new(
                        slot,
                        pair,
                        dtype,
                        &device,
                        active_loras.clone(),
                    )?);
                }
            }
            lora_slots.insert(adapter.name.clone(), slot);
        }
        let plan = CheckPlan {
            shapes: model_check_shapes(
                tcfg.num_attention_heads,
                tcfg.attention_head_dim,
                MAX_LENGTH,
                MAX_SIDE,
            ),
            dtype,
            iters: ATTENTION_CHECK_ITERS,
        };
        let (attention, attention_report) =
            select(&opts.attention, &compiled_backends(&device), &plan, &device)?;
        transformer.set_attention(attention);
        let vvb = files.component_var_builder("vae", vae_dtype(&device, dtype), &device)?;
        let vae = AutoencoderKLFlux2::new(&vcfg, vvb)?;
        if 4 * vcfg.latent_channels != tcfg.in_channels {
            return Err(WeightsError::BadFile {
                file: "vae/config.json".into(),
                message: format!(
                    "4 x latent_channels = {} but the transformer takes {} channels",
                    4 * vcfg.latent_channels,
                    tcfg.in_channels
                ),
            }
            .into());
        }
        Ok(Self {
            model_id: files.id().to_string(),
            revision: files.revision().map(str::to_string),
            is_distilled: index.is_distilled,
            text,
            transformer,
            vae,
            attention: attention_report,
            device,
            dtype,
            empty_prompt: OnceLock::new(),
            lora_status,
            lora_slots,
            active_loras,
        })
    }

    /// Every configured adapter and whether it loaded (for /health).
    pub fn lora_status(&self) -> &[LoraStatus] {
        &self.lora_status
    }

    /// Names a request may put in `loras` (the per-request adapters that loaded).
    pub fn per_request_loras(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lora_slots.keys().cloned().collect();
        v.sort();
        v
    }

    /// Checks `loras` and maps it to side-path slots.
    fn lora_slots_for(&self, loras: &[(String, f64)]) -> Result<Vec<(usize, f64)>, Flux2Error> {
        use crate::limits::{LORA_SCALE_MAX, LORA_SCALE_MIN, MAX_LORAS_PER_REQUEST};
        if loras.len() > MAX_LORAS_PER_REQUEST {
            return Err(Flux2Error::invalid(
                "loras",
                format!("{} adapters, at most {MAX_LORAS_PER_REQUEST}", loras.len()),
            ));
        }
        loras
            .iter()
            .map(|(name, scale)| {
                if !scale.is_finite() || !(LORA_SCALE_MIN..=LORA_SCALE_MAX).contains(scale) {
                    return Err(Flux2Error::invalid(
                        "loras",
                        format!(
                            "scale {scale} of '{name}' is outside {LORA_SCALE_MIN}..={LORA_SCALE_MAX}"
                        ),
                    ));
                }
                self.lora_slots
                    .get(name)
                    .map(|&slot| (slot, *scale))
                    .ok_or_else(|| {
                        Flux2Error::invalid(
                            "loras",
                            format!(
                                "unknown adapter '{name}' (preloaded: [{}])",
                                self.per_request_loras().join(", ")
                            ),
                        )
                    })
            })
            .collect()
    }

    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// The hub commit every model file was read at (`None` for a local directory).
    pub fn revision(&self) -> Option<&str> {
        self.revision.as_deref()
    }

    /// Distilled models (klein 4B/9B) run without CFG; base models use CFG when guidance > 1.
    pub fn is_distilled(&self) -> bool {
        self.is_distilled
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Which attention backend the DiT uses and how each candidate did in the self-check.
    pub fn attention_report(&self) -> &AttentionReport {
        &self.attention
    }

    /// Pixels per latent token side (16 for FLUX.2: VAE ×8 and the 2×2 patchify).
    pub fn multiple_of(&self) -> u32 {
        (self.vae.config().scale_factor() * 2) as u32
    }

    pub fn text_encoder(&self) -> &PromptEncoder {
        &self.text
    }

    pub fn transformer(&self) -> &Flux2Transformer2DModel {
        &self.transformer
    }

    pub fn vae(&self) -> &AutoencoderKLFlux2 {
        &self.vae
    }

    /// Validates and VAE-encodes up to 16 reference images (see [`reference`]).
    pub fn encode_references(&self, images: &[RgbImage]) -> Result<ReferenceLatents, Flux2Error> {
        if images.len() > reference::MAX_REFERENCES {
            return Err(ReferenceError::TooMany {
                count: images.len(),
                max: reference::MAX_REFERENCES,
            }
            .into());
        }
        for (i, img) in images.iter().enumerate() {
            reference::check(i, img)?;
        }
        let mut tokens = Vec::with_capacity(images.len());
        let mut ids = Vec::with_capacity(images.len());
        for (i, img) in images.iter().enumerate() {
            let x = reference::preprocess(img, self.multiple_of(), &self.device)?
                .to_dtype(self.vae_dtype())?;
            let z = self.vae.encode_normalized(&x)?;
            let (_, _, h, w) = z.dims4()?;
            tokens.push(pack(&z)?.to_dtype(self.dtype)?);
            ids.push(grid_ids(REF_T_SCALE * (i + 1) as f32, h, w, &self.device)?);
        }
        if tokens.is_empty() {
            return Ok(ReferenceLatents {
                tokens: None,
                ids: None,
                count: 0,
            });
        }
        Ok(ReferenceLatents {
            tokens: Some(Tensor::cat(&tokens, 1)?),
            ids: Some(Tensor::cat(&ids, 0)?),
            count: images.len(),
        })
    }

    fn vae_dtype(&self) -> DType {
        vae_dtype(&self.device, self.dtype)
    }

    /// Prompt embeddings [1, 512, joint_attention_dim] as the transformer takes them.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Tensor, Flux2Error> {
        Ok(self.text.encode(&[prompt])?)
    }

    fn empty_prompt_embeds(&self) -> Result<Tensor, Flux2Error> {
        if let Some(t) = self.empty_prompt.get() {
            return Ok(t.clone());
        }
        let t = self.encode_prompt("")?;
        Ok(self.empty_prompt.get_or_init(|| t).clone())
    }

    pub fn generate(
        &self,
        p: &GenerateParams,
        refs: Option<&ReferenceLatents>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Generated, Flux2Error> {
        let m = self.multiple_of();
        let width = floor_size("width", p.width, m)?;
        let height = floor_size("height", p.height, m)?;
        if p.num_steps == 0 || p.num_steps > scheduler::MAX_STEPS {
            return Err(Flux2Error::invalid(
                "num_steps",
                format!("{} is outside 1..={}", p.num_steps, scheduler::MAX_STEPS),
            ));
        }
        if !p.guidance_scale.is_finite() {
            return Err(Flux2Error::invalid(
                "guidance_scale",
                "must be a finite number",
            ));
        }
        let (lh, lw) = ((height / m) as usize, (width / m) as usize);
        let channels = self.transformer.config().in_channels;
        let noise = match &p.latents {
            Some(l) => {
                if l.dims() != [1, channels, lh, lw] {
                    return Err(Flux2Error::invalid(
                        "latents",
                        format!(
                            "shape {:?}, expected [1, {channels}, {lh}, {lw}] for {width}x{height}",
                            l.dims()
                        ),
                    ));
                }
                l.to_device(&self.device)?.to_dtype(self.dtype)?
            }
            None => {
                rng::randn(p.seed, (1, channels, lh, lw), &self.device)?.to_dtype(self.dtype)?
            }
        };
        let cfg = p.guidance_scale > 1.0 && !self.is_distilled;
        let slots = self.lora_slots_for(&p.loras)?;
        // Side-path adapters are on for this job only (the guard turns them off on every exit).
        let _loras = self.active_loras.activate(&slots);

        let t0 = Instant::now();
        let embeds = self.encode_prompt(&p.prompt)?;
        let neg = if cfg {
            Some(self.empty_prompt_embeds()?)
        } else {
            None
        };
        let text_encoder_ms = ms_since(t0, &self.device)?;

        let t1 = Instant::now();
        let latents = self.denoise(
            &noise,
            &embeds,
            neg.as_ref(),
            p.guidance_scale,
            p.num_steps as usize,
            refs,
            cancelled,
        )?;
        let denoise_ms = ms_since(t1, &self.device)?;

        let t2 = Instant::now();
        let image = self.decode(&latents, lh, lw)?;
        let vae_decode_ms = ms_since(t2, &self.device)?;
        Ok(Generated {
            image,
            timings: StageTimings {
                text_encoder_ms,
                denoise_ms,
                vae_decode_ms,
            },
        })
    }

    /// The denoising loop on unpacked noise [1, 128, h, w]; returns the final packed tokens.
    #[allow(clippy::too_many_arguments)]
    pub fn denoise(
        &self,
        noise: &Tensor,
        embeds: &Tensor,
        negative: Option<&Tensor>,
        guidance_scale: f32,
        num_steps: usize,
        refs: Option<&ReferenceLatents>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Tensor, Flux2Error> {
        let (_, _, lh, lw) = noise.dims4()?;
        let n = lh * lw;
        let mut latents = pack(&noise.to_dtype(self.dtype)?)?;
        let img_ids = grid_ids(0.0, lh, lw, &Device::Cpu)?;
        let (ref_tokens, img_ids) = match refs.and_then(|r| r.tokens.as_ref().zip(r.ids.as_ref())) {
            Some((t, ids)) => (
                Some(t.to_dtype(self.dtype)?),
                Tensor::cat(&[&img_ids, &ids.to_device(&Device::Cpu)?], 0)?,
            ),
            None => (None, img_ids),
        };
        let txt_ids = text_ids(embeds.dim(1)?, &Device::Cpu)?;
        let rope = self.transformer.rope(&txt_ids, &img_ids)?;
        if let Some(neg) = negative
            && neg.dim(1)? != embeds.dim(1)?
        {
            return Err(Flux2Error::invalid(
                "negative prompt",
                format!("{} tokens, the prompt has {}", neg.dim(1)?, embeds.dim(1)?),
            ));
        }
        let cfg_embeds = match negative {
            Some(neg) => Some(Tensor::cat(
                &[&neg.to_dtype(self.dtype)?, &embeds.to_dtype(self.dtype)?],
                0,
            )?),
            None => None,
        };
        let sigmas = scheduler::sigmas(num_steps, n);
        for i in 0..num_steps {
            if cancelled() {
                return Err(Flux2Error::Cancelled);
            }
            let ts = timestep_value(sigmas[i], self.dtype);
            let input = match &ref_tokens {
                Some(r) => Tensor::cat(&[&latents, r], 1)?,
                None => latents.clone(),
            };
            let v = match &cfg_embeds {
                // CFG: one batched pass over [uncond, cond] (BFL batches it the same way).
                Some(both) => {
                    let timestep = Tensor::new(&[ts, ts], &self.device)?;
                    let input = Tensor::cat(&[&input, &input], 0)?;
                    let out = self
                        .transformer
                        .forward_with_rope(&input, both, &timestep, &rope)?
                        .narrow(1, 0, n)?;
                    let (vn, vc) = (out.narrow(0, 0, 1)?, out.narrow(0, 1, 1)?);
                    (&vn + ((vc - &vn)? * guidance_scale as f64)?)?
                }
                None => {
                    let timestep = Tensor::new(&[ts], &self.device)?;
                    self.transformer
                        .forward_with_rope(&input, embeds, &timestep, &rope)?
                        .narrow(1, 0, n)?
                }
            };
            latents = scheduler::euler_step(&latents, &v, sigmas[i], sigmas[i + 1])?;
        }
        Ok(latents)
    }

    /// Packed tokens [1, h·w, 128] → RGB image, pixels round(clamp(x/2 + 0.5, 0, 1)·255).
    pub fn decode(&self, tokens: &Tensor, lh: usize, lw: usize) -> Result<RgbImage, Flux2Error> {
        let z = unpack(tokens, lh, lw)?.to_dtype(self.vae_dtype())?;
        let x = self.vae.decode_normalized(&z)?;
        Ok(to_image(&x)?)
    }
}

/// [1, 3, H, W] in about [−1, 1] → RGB8, as diffusers' postprocess (numpy rounds half to even).
pub fn to_image(x: &Tensor) -> candle_core::Result<RgbImage> {
    let (_, c, h, w) = x.dims4()?;
    if c != 3 {
        candle_core::bail!("decoded image has {c} channels, expected 3");
    }
    let v = x
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .squeeze(0)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let plane = h * w;
    let mut buf = vec![0u8; 3 * plane];
    for i in 0..plane {
        for ch in 0..3 {
            let y = (v[ch * plane + i] / 2.0 + 0.5).clamp(0.0, 1.0);
            buf[i * 3 + ch] = (y * 255.0).round_ties_even() as u8;
        }
    }
    Ok(RgbImage::from_raw(w as u32, h as u32, buf).expect("buffer size"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_floored_and_bounded() {
        assert_eq!(floor_size("width", 1024, 16).unwrap(), 1024);
        assert_eq!(floor_size("width", 1039, 16).unwrap(), 1024);
        assert_eq!(floor_size("height", 40, 16).unwrap(), 32);
        let e = floor_size("height", 15, 16).unwrap_err().to_string();
        assert!(e.contains("height") && e.contains("16"), "{e}");
        let e = floor_size("width", 5000, 16).unwrap_err().to_string();
        assert!(e.contains("width") && e.contains("4096"), "{e}");
    }

    #[test]
    fn ids_follow_diffusers() -> candle_core::Result<()> {
        let g = grid_ids(10.0, 2, 3, &Device::Cpu)?.to_vec2::<f32>()?;
        assert_eq!(g[4], vec![10.0, 1.0, 1.0, 0.0]);
        let t = text_ids(5, &Device::Cpu)?.to_vec2::<f32>()?;
        assert_eq!(t[3], vec![0.0, 0.0, 0.0, 3.0]);
        Ok(())
    }

    #[test]
    fn pixels_round_half_to_even_like_numpy() -> candle_core::Result<()> {
        // x = -1 → 0, x = 1 → 255, beyond is clamped.
        let x = Tensor::new(&[-1.5f32, -1.0, 0.0, 1.0, 3.0, 0.5], &Device::Cpu)?
            .reshape((1, 3, 1, 2))?;
        let img = to_image(&x)?;
        assert_eq!(img.get_pixel(0, 0).0, [0, 128, 255]);
        assert_eq!(img.get_pixel(1, 0).0, [0, 255, 191]);
        Ok(())
    }

    #[test]
    fn pipeline_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Flux2Pipeline>();
        assert_send::<ReferenceLatents>();
    }
}
