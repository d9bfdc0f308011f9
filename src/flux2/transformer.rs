//! `Flux2Transformer2DModel`: the FLUX.2 [klein] DiT (diffusers layout and names).
//!
//! Shared modulation (three model-level Linears), double-stream blocks with joint [txt, img]
//! attention, parallel single-stream blocks, 4-axis interleaved RoPE, SwiGLU, no biases, no mask.

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::attention::Attention;
use super::layers::RmsNorm;
use super::quant::{QLinear, Quantization, linear_no_bias};

fn default_patch() -> usize {
    1
}
fn default_in() -> usize {
    128
}
fn default_tgc() -> usize {
    256
}
fn default_mlp() -> f64 {
    3.0
}
fn default_axes() -> Vec<usize> {
    vec![32, 32, 32, 32]
}
fn default_theta() -> f64 {
    2000.0
}
fn default_eps() -> f64 {
    1e-6
}

/// `transformer/config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Flux2TransformerConfig {
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    #[serde(default = "default_in")]
    pub in_channels: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    pub num_layers: usize,
    pub num_single_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    #[serde(default = "default_tgc")]
    pub timestep_guidance_channels: usize,
    #[serde(default = "default_mlp")]
    pub mlp_ratio: f64,
    #[serde(default = "default_axes")]
    pub axes_dims_rope: Vec<usize>,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default)]
    pub guidance_embeds: bool,
}

impl Flux2TransformerConfig {
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }
    pub fn mlp_hidden(&self) -> usize {
        (self.inner_dim() as f64 * self.mlp_ratio) as usize
    }
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }
    /// Rejects configurations this implementation does not cover, naming the key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.patch_size != 1 {
            return Err(format!(
                "patch_size {} (only 1 is supported)",
                self.patch_size
            ));
        }
        if self.guidance_embeds {
            return Err("guidance_embeds true (FLUX.2-dev is not supported, only klein)".into());
        }
        if self.axes_dims_rope.iter().sum::<usize>() != self.attention_head_dim
            || self.axes_dims_rope.iter().any(|d| d % 2 != 0)
        {
            return Err(format!(
                "axes_dims_rope {:?} must be even and sum to attention_head_dim {}",
                self.axes_dims_rope, self.attention_head_dim
            ));
        }
        Ok(())
    }
}

impl Flux2TransformerConfig {
    /// The config of a BFL single-file checkpoint, recovered from its tensor shapes (as sd.cpp
    /// does): hidden and context width from `txt_in`, head dim from a key norm, block counts from
    /// the largest indices, MLP ratio from `img_mlp.0`. RoPE axes are head_dim/4 each with θ 2000,
    /// as in every klein model. `shapes` yields (name, shape) with any `model.diffusion_model.`
    /// prefix already removed.
    pub fn from_bfl_shapes<'a>(
        shapes: impl IntoIterator<Item = (&'a str, &'a [usize])>,
    ) -> std::result::Result<Self, String> {
        let mut map = std::collections::HashMap::new();
        let (mut double, mut single) = (0usize, 0usize);
        for (name, shape) in shapes {
            let block = |prefix: &str| {
                name.strip_prefix(prefix)
                    .and_then(|r| r.split('.').next())
                    .and_then(|i| i.parse::<usize>().ok())
            };
            if let Some(i) = block("double_blocks.") {
                double = double.max(i + 1);
            }
            if let Some(i) = block("single_blocks.") {
                single = single.max(i + 1);
            }
            map.insert(name.to_string(), shape.to_vec());
        }
        let get = |n: &str| {
            map.get(n)
                .ok_or_else(|| format!("tensor {n} missing from the BFL file"))
        };
        let txt_in = get("txt_in.weight")?;
        let img_in = get("img_in.weight")?;
        let head_dim = get("double_blocks.0.img_attn.norm.key_norm.scale")?[0];
        let mlp_in = get("double_blocks.0.img_mlp.0.weight")?;
        let (d, ctx) = (txt_in[0], txt_in[1]);
        if head_dim == 0 || d % head_dim != 0 || head_dim % 8 != 0 {
            return Err(format!(
                "hidden size {d} and head dim {head_dim} are inconsistent"
            ));
        }
        Ok(Self {
            patch_size: 1,
            in_channels: img_in[1],
            out_channels: None,
            num_layers: double,
            num_single_layers: single,
            attention_head_dim: head_dim,
            num_attention_heads: d / head_dim,
            joint_attention_dim: ctx,
            timestep_guidance_channels: get("time_in.in_layer.weight")?[1],
            mlp_ratio: (mlp_in[0] / 2) as f64 / d as f64,
            axes_dims_rope: vec![head_dim / 4; 4],
            rope_theta: 2000.0,
            eps: 1e-6,
            guidance_embeds: map.contains_key("guidance_in.in_layer.weight"),
        })
    }
}

/// RoPE cos/sin tables for one sequence, [S, head_dim/2] each, in the compute dtype.
#[derive(Debug, Clone)]
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    /// Tables for position ids `[S, n_axes]` (any dtype), built on the CPU from f32 positions
    /// with f64 angles (as diffusers does) and stored in f32.
    pub fn new(ids: &Tensor, axes: &[usize], theta: f64, device: &Device) -> Result<Self> {
        let ids = ids
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .to_vec2::<f32>()?;
        let half: usize = axes.iter().sum::<usize>() / 2;
        let mut cos = Vec::with_capacity(ids.len() * half);
        let mut sin = Vec::with_capacity(ids.len() * half);
        for row in &ids {
            if row.len() != axes.len() {
                candle_core::bail!(
                    "position ids have {} axes, config has {}",
                    row.len(),
                    axes.len()
                );
            }
            for (axis, &dim) in axes.iter().enumerate() {
                let pos = row[axis] as f64;
                for j in 0..dim / 2 {
                    let freq = 1.0 / theta.powf((2 * j) as f64 / dim as f64);
                    let a = pos * freq;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        let s = ids.len();
        Ok(Self {
            cos: Tensor::from_vec(cos, (s, half), &Device::Cpu)?.to_device(device)?,
            sin: Tensor::from_vec(sin, (s, half), &Device::Cpu)?.to_device(device)?,
        })
    }

    /// Sequence concatenation (diffusers concatenates the text and image tables as [txt, img]).
    pub fn cat(parts: &[&Rope]) -> Result<Self> {
        let cos: Vec<&Tensor> = parts.iter().map(|r| &r.cos).collect();
        let sin: Vec<&Tensor> = parts.iter().map(|r| &r.sin).collect();
        Ok(Self {
            cos: Tensor::cat(&cos, 0)?,
            sin: Tensor::cat(&sin, 0)?,
        })
    }

    /// Interleaved-pair rotation of `x` [B, H, S, d], computed in f32.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        self.rotate_f32(x)?.to_dtype(x.dtype())
    }

    /// [`Self::apply`] for queries: also multiplies by the attention's 1/√d while still in f32,
    /// so [`Attention::forward`] never has to scale the (much larger) score matrix.
    fn apply_query(&self, x: &Tensor) -> Result<Tensor> {
        let d = x.dim(3)?;
        (self.rotate_f32(x)? * (1.0 / (d as f64).sqrt()))?.to_dtype(x.dtype())
    }

    fn rotate_f32(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::rotary_emb::rope_i(&x.to_dtype(DType::F32)?.contiguous()?, &self.cos, &self.sin)
    }
}

/// LayerNorm without affine parameters, through the fused kernel.
#[derive(Debug, Clone)]
struct PlainLayerNorm {
    ones: Tensor,
    zeros: Tensor,
    eps: f32,
}

impl PlainLayerNorm {
    fn new(dim: usize, eps: f64, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self {
            ones: Tensor::ones(dim, dtype, device)?,
            zeros: Tensor::zeros(dim, dtype, device)?,
            eps: eps as f32,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::layer_norm(&x.contiguous()?, &self.ones, &self.zeros, self.eps)
    }
}

/// (shift, scale, gate), each [B, 1, D].
#[derive(Debug, Clone)]
struct ModParams {
    shift: Tensor,
    scale: Tensor,
    gate: Tensor,
}

impl ModParams {
    fn modulate(&self, x: &Tensor) -> Result<Tensor> {
        x.broadcast_mul(&(&self.scale + 1.0)?)?
            .broadcast_add(&self.shift)
    }
    fn gated(&self, residual: &Tensor, out: &Tensor) -> Result<Tensor> {
        residual + out.broadcast_mul(&self.gate)?
    }
}

/// `double_stream_modulation_*` / `single_stream_modulation`: Linear(SiLU(temb)) chunked in
/// (shift, scale, gate) triples.
#[derive(Debug, Clone)]
struct Modulation {
    linear: QLinear,
    sets: usize,
}

impl Modulation {
    fn new(dim: usize, sets: usize, vb: VarBuilder, q: Quantization) -> Result<Self> {
        Ok(Self {
            linear: linear_no_bias(dim, 3 * sets * dim, vb.pp("linear"), q)?,
            sets,
        })
    }
    fn forward(&self, silu_temb: &Tensor) -> Result<Vec<ModParams>> {
        let m = self.linear.forward(silu_temb)?.unsqueeze(1)?;
        let chunks = m.chunk(3 * self.sets, D::Minus1)?;
        Ok(chunks
            .chunks(3)
            .map(|c| ModParams {
                shift: c[0].clone(),
                scale: c[1].clone(),
                gate: c[2].clone(),
            })
            .collect())
    }
}

/// SwiGLU feed-forward: `linear_in` to [gate | up], SiLU(gate)·up, `linear_out`.
#[derive(Debug, Clone)]
struct FeedForward {
    linear_in: QLinear,
    linear_out: QLinear,
}

fn swiglu(x: &Tensor) -> Result<Tensor> {
    let c = x.chunk(2, D::Minus1)?;
    crate::nn::silu(&c[0])? * &c[1]
}

impl FeedForward {
    fn new(dim: usize, hidden: usize, vb: VarBuilder, q: Quantization) -> Result<Self> {
        Ok(Self {
            linear_in: linear_no_bias(dim, 2 * hidden, vb.pp("linear_in"), q)?,
            linear_out: linear_no_bias(hidden, dim, vb.pp("linear_out"), q)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_out
            .forward(&swiglu(&self.linear_in.forward(x)?)?)
    }
}

/// [B, S, H·d] → [B, H, S, d] with per-head RMSNorm.
fn heads(x: &Tensor, n_heads: usize, norm: &RmsNorm) -> Result<Tensor> {
    let (b, s, _) = x.dims3()?;
    let x = x.reshape((b, s, n_heads, ()))?;
    norm.forward(&x)?.transpose(1, 2)?.contiguous()
}

fn heads_plain(x: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (b, s, _) = x.dims3()?;
    x.reshape((b, s, n_heads, ()))?
        .transpose(1, 2)?
        .contiguous()
}

#[derive(Debug, Clone)]
struct DoubleBlock {
    to_q: QLinear,
    to_k: QLinear,
    to_v: QLinear,
    to_out: QLinear,
    add_q: QLinear,
    add_k: QLinear,
    add_v: QLinear,
    to_add_out: QLinear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    norm_added_q: RmsNorm,
    norm_added_k: RmsNorm,
    ff: FeedForward,
    ff_context: FeedForward,
    n_heads: usize,
}

impl DoubleBlock {
    fn new(cfg: &Flux2TransformerConfig, vb: VarBuilder, q: Quantization) -> Result<Self> {
        let d = cfg.inner_dim();
        let hd = cfg.attention_head_dim;
        let a = vb.pp("attn");
        Ok(Self {
            to_q: linear_no_bias(d, d, a.pp("to_q"), q)?,
            to_k: linear_no_bias(d, d, a.pp("to_k"), q)?,
            to_v: linear_no_bias(d, d, a.pp("to_v"), q)?,
            to_out: linear_no_bias(d, d, a.pp("to_out").pp("0"), q)?,
            add_q: linear_no_bias(d, d, a.pp("add_q_proj"), q)?,
            add_k: linear_no_bias(d, d, a.pp("add_k_proj"), q)?,
            add_v: linear_no_bias(d, d, a.pp("add_v_proj"), q)?,
            to_add_out: linear_no_bias(d, d, a.pp("to_add_out"), q)?,
            norm_q: RmsNorm::new(hd, cfg.eps, a.pp("norm_q"))?,
            norm_k: RmsNorm::new(hd, cfg.eps, a.pp("norm_k"))?,
            norm_added_q: RmsNorm::new(hd, cfg.eps, a.pp("norm_added_q"))?,
            norm_added_k: RmsNorm::new(hd, cfg.eps, a.pp("norm_added_k"))?,
            ff: FeedForward::new(d, cfg.mlp_hidden(), vb.pp("ff"), q)?,
            ff_context: FeedForward::new(d, cfg.mlp_hidden(), vb.pp("ff_context"), q)?,
            n_heads: cfg.num_attention_heads,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        mod_img: &[ModParams],
        mod_txt: &[ModParams],
        ln: &PlainLayerNorm,
        rope: &Rope,
        attention: &Attention,
    ) -> Result<(Tensor, Tensor)> {
        let l = txt.dim(1)?;
        let n = img.dim(1)?;
        let h = mod_img[0].modulate(&ln.forward(img)?)?;
        let c = mod_txt[0].modulate(&ln.forward(txt)?)?;
        let q = heads(&self.to_q.forward(&h)?, self.n_heads, &self.norm_q)?;
        let k = heads(&self.to_k.forward(&h)?, self.n_heads, &self.norm_k)?;
        let v = heads_plain(&self.to_v.forward(&h)?, self.n_heads)?;
        let qc = heads(&self.add_q.forward(&c)?, self.n_heads, &self.norm_added_q)?;
        let kc = heads(&self.add_k.forward(&c)?, self.n_heads, &self.norm_added_k)?;
        let vc = heads_plain(&self.add_v.forward(&c)?, self.n_heads)?;
        let q = rope.apply_query(&Tensor::cat(&[&qc, &q], 2)?)?;
        let k = rope.apply(&Tensor::cat(&[&kc, &k], 2)?)?;
        let v = Tensor::cat(&[&vc, &v], 2)?;
        let attn = attention.forward(&q, &k, &v)?;
        let attn_txt = attn.narrow(1, 0, l)?;
        let attn_img = attn.narrow(1, l, n)?;

        let img = mod_img[0].gated(img, &self.to_out.forward(&attn_img)?)?;
        let ff = self.ff.forward(&mod_img[1].modulate(&ln.forward(&img)?)?)?;
        let img = mod_img[1].gated(&img, &ff)?;

        let txt = mod_txt[0].gated(txt, &self.to_add_out.forward(&attn_txt)?)?;
        let ff = self
            .ff_context
            .forward(&mod_txt[1].modulate(&ln.forward(&txt)?)?)?;
        let txt = mod_txt[1].gated(&txt, &ff)?;
        Ok((img, txt))
    }
}

#[derive(Debug, Clone)]
struct SingleBlock {
    to_qkv_mlp: QLinear,
    to_out: QLinear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    n_heads: usize,
    dim: usize,
    mlp_hidden: usize,
}

impl SingleBlock {
    fn new(cfg: &Flux2TransformerConfig, vb: VarBuilder, q: Quantization) -> Result<Self> {
        let d = cfg.inner_dim();
        let f = cfg.mlp_hidden();
        let a = vb.pp("attn");
        Ok(Self {
            to_qkv_mlp: linear_no_bias(d, 3 * d + 2 * f, a.pp("to_qkv_mlp_proj"), q)?,
            to_out: linear_no_bias(d + f, d, a.pp("to_out"), q)?,
            norm_q: RmsNorm::new(cfg.attention_head_dim, cfg.eps, a.pp("norm_q"))?,
            norm_k: RmsNorm::new(cfg.attention_head_dim, cfg.eps, a.pp("norm_k"))?,
            n_heads: cfg.num_attention_heads,
            dim: d,
            mlp_hidden: f,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        m: &ModParams,
        ln: &PlainLayerNorm,
        rope: &Rope,
        attention: &Attention,
    ) -> Result<Tensor> {
        let (d, f) = (self.dim, self.mlp_hidden);
        let h = m.modulate(&ln.forward(x)?)?;
        let p = self.to_qkv_mlp.forward(&h)?;
        let q = heads(&p.narrow(2, 0, d)?, self.n_heads, &self.norm_q)?;
        let k = heads(&p.narrow(2, d, d)?, self.n_heads, &self.norm_k)?;
        let v = heads_plain(&p.narrow(2, 2 * d, d)?, self.n_heads)?;
        let attn = attention.forward(&rope.apply_query(&q)?, &rope.apply(&k)?, &v)?;
        let mlp = swiglu(&p.narrow(2, 3 * d, 2 * f)?)?;
        let out = self.to_out.forward(&Tensor::cat(&[&attn, &mlp], 2)?)?;
        m.gated(x, &out)
    }
}

/// exp(−ln(10000)·i / half) for i < half = channels / 2, computed in f32 as diffusers does.
fn time_freqs(channels: usize, device: &Device) -> Result<Tensor> {
    let half = channels / 2;
    let ln_p = (10000f64).ln() as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((-ln_p * i as f32) / half as f32).exp())
        .collect();
    Tensor::from_vec(freqs, (1, half), device)
}

/// The FLUX.2 [klein] transformer.
#[derive(Debug, Clone)]
pub struct Flux2Transformer2DModel {
    cfg: Flux2TransformerConfig,
    x_embedder: QLinear,
    context_embedder: QLinear,
    time_linear_1: QLinear,
    time_linear_2: QLinear,
    mod_img: Modulation,
    mod_txt: Modulation,
    mod_single: Modulation,
    double: Vec<DoubleBlock>,
    single: Vec<SingleBlock>,
    norm_out_linear: QLinear,
    proj_out: QLinear,
    ln: PlainLayerNorm,
    /// Frequencies of [`Self::time_proj`], [1, channels/2] f32; the same at every step.
    time_freqs: Tensor,
    /// Attention backend of every block (`naive` until [`Self::set_attention`]).
    attention: Attention,
    dtype: DType,
    device: Device,
}

impl Flux2Transformer2DModel {
    pub fn new(cfg: &Flux2TransformerConfig, vb: VarBuilder, q: Quantization) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            candle_core::bail!("unsupported transformer config: {e}");
        }
        let d = cfg.inner_dim();
        let te = vb.pp("time_guidance_embed").pp("timestep_embedder");
        // A checkpoint that stores its block Linears as scaled fp8 (BFL fp8 files) stores the
        // others (embedders, modulation, output) in bf16 on purpose; with QUANTIZATION=fp8 they
        // are kept as stored, as every loader of those files does, instead of being
        // re-quantised on top (2.4x the reference's error on the tiny model, docs/numerics.md).
        let stored_fp8 = q == Quantization::Fp8
            && vb
                .pp("transformer_blocks")
                .pp(0)
                .pp("attn")
                .pp("to_q")
                .contains_tensor(&format!("weight{}", super::weights::RAW_FP8_SUFFIX));
        let q_outer = if stored_fp8 { Quantization::None } else { q };
        let double = (0..cfg.num_layers)
            .map(|i| DoubleBlock::new(cfg, vb.pp("transformer_blocks").pp(i), q))
            .collect::<Result<Vec<_>>>()?;
        let single = (0..cfg.num_single_layers)
            .map(|i| SingleBlock::new(cfg, vb.pp("single_transformer_blocks").pp(i), q))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            x_embedder: linear_no_bias(cfg.in_channels, d, vb.pp("x_embedder"), q_outer)?,
            context_embedder: linear_no_bias(
                cfg.joint_attention_dim,
                d,
                vb.pp("context_embedder"),
                q_outer,
            )?,
            time_linear_1: linear_no_bias(
                cfg.timestep_guidance_channels,
                d,
                te.pp("linear_1"),
                q_outer,
            )?,
            time_linear_2: linear_no_bias(d, d, te.pp("linear_2"), q_outer)?,
            mod_img: Modulation::new(d, 2, vb.pp("double_stream_modulation_img"), q_outer)?,
            mod_txt: Modulation::new(d, 2, vb.pp("double_stream_modulation_txt"), q_outer)?,
            mod_single: Modulation::new(d, 1, vb.pp("single_stream_modulation"), q_outer)?,
            double,
            single,
            norm_out_linear: linear_no_bias(d, 2 * d, vb.pp("norm_out").pp("linear"), q_outer)?,
            proj_out: linear_no_bias(d, cfg.out_channels(), vb.pp("proj_out"), q_outer)?,
            ln: PlainLayerNorm::new(d, cfg.eps, vb.dtype(), vb.device())?,
            time_freqs: time_freqs(cfg.timestep_guidance_channels, vb.device())?,
            attention: Attention::naive(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Flux2TransformerConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Uses `attention` in every block (chosen by the load-time self-check,
    /// [`super::attention::select`]).
    pub fn set_attention(&mut self, attention: Attention) {
        self.attention = attention;
    }

    pub fn attention(&self) -> &Attention {
        &self.attention
    }

    /// Every Linear under its diffusers module name (the LoRA side path attaches by name).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut QLinear)> {
        let te = "time_guidance_embed.timestep_embedder";
        let mut out: Vec<(String, &mut QLinear)> = vec![
            ("x_embedder".into(), &mut self.x_embedder),
            ("context_embedder".into(), &mut self.context_embedder),
            (format!("{te}.linear_1"), &mut self.time_linear_1),
            (format!("{te}.linear_2"), &mut self.time_linear_2),
            (
                "double_stream_modulation_img.linear".into(),
                &mut self.mod_img.linear,
            ),
            (
                "double_stream_modulation_txt.linear".into(),
                &mut self.mod_txt.linear,
            ),
            (
                "single_stream_modulation.linear".into(),
                &mut self.mod_single.linear,
            ),
            ("norm_out.linear".into(), &mut self.norm_out_linear),
            ("proj_out".into(), &mut self.proj_out),
        ];
        for (i, b) in self.double.iter_mut().enumerate() {
            let p = format!("transformer_blocks.{i}");
            out.extend([
                (format!("{p}.attn.to_q"), &mut b.to_q),
                (format!("{p}.attn.to_k"), &mut b.to_k),
                (format!("{p}.attn.to_v"), &mut b.to_v),
                (format!("{p}.attn.to_out.0"), &mut b.to_out),
                (format!("{p}.attn.add_q_proj"), &mut b.add_q),
                (format!("{p}.attn.add_k_proj"), &mut b.add_k),
                (format!("{p}.attn.add_v_proj"), &mut b.add_v),
                (format!("{p}.attn.to_add_out"), &mut b.to_add_out),
                (format!("{p}.ff.linear_in"), &mut b.ff.linear_in),
                (format!("{p}.ff.linear_out"), &mut b.ff.linear_out),
                (
                    format!("{p}.ff_context.linear_in"),
                    &mut b.ff_context.linear_in,
                ),
                (
                    format!("{p}.ff_context.linear_out"),
                    &mut b.ff_context.linear_out,
                ),
            ]);
        }
        for (i, b) in self.single.iter_mut().enumerate() {
            let p = format!("single_transformer_blocks.{i}.attn");
            out.push((format!("{p}.to_qkv_mlp_proj"), &mut b.to_qkv_mlp));
            out.push((format!("{p}.to_out"), &mut b.to_out));
        }
        out
    }

    /// RoPE tables for `[txt, img]`; constant over the denoising loop, so built once.
    pub fn rope(&self, txt_ids: &Tensor, img_ids: &Tensor) -> Result<Rope> {
        let axes = &self.cfg.axes_dims_rope;
        let t = Rope::new(txt_ids, axes, self.cfg.rope_theta, &self.device)?;
        let i = Rope::new(img_ids, axes, self.cfg.rope_theta, &self.device)?;
        Rope::cat(&[&t, &i])
    }

    /// 256-channel sinusoid of 1000·t, cosine first (diffusers `Timesteps(flip_sin_to_cos)`).
    fn time_proj(&self, timestep: &Tensor) -> Result<Tensor> {
        let t = (timestep.to_dtype(self.dtype)? * 1000.0)?;
        let a = t
            .to_dtype(DType::F32)?
            .unsqueeze(1)?
            .broadcast_mul(&self.time_freqs)?;
        Tensor::cat(&[a.cos()?, a.sin()?], 1)?.to_dtype(self.dtype)
    }

    /// Full forward with precomputed RoPE tables (see [`Self::rope`]).
    ///
    /// `hidden_states` [B, N, in], `encoder_hidden_states` [B, L, joint], `timestep` [B] (σ in
    /// [0, 1]); returns [B, N, out].
    pub fn forward_with_rope(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: &Tensor,
        timestep: &Tensor,
        rope: &Rope,
    ) -> Result<Tensor> {
        let hidden_states = hidden_states.to_dtype(self.dtype)?;
        let encoder_hidden_states = encoder_hidden_states.to_dtype(self.dtype)?;
        let proj = self.time_proj(timestep)?;
        let temb = self
            .time_linear_2
            .forward(&crate::nn::silu(&self.time_linear_1.forward(&proj)?)?)?;
        let silu_temb = crate::nn::silu(&temb)?;
        let mod_img = self.mod_img.forward(&silu_temb)?;
        let mod_txt = self.mod_txt.forward(&silu_temb)?;
        let mod_single = self.mod_single.forward(&silu_temb)?;

        let mut img = self.x_embedder.forward(&hidden_states)?;
        let mut txt = self.context_embedder.forward(&encoder_hidden_states)?;
        let l = txt.dim(1)?;
        let n = img.dim(1)?;
        if rope.cos.dim(0)? != l + n {
            candle_core::bail!(
                "rope tables cover {} positions, sequence has {}",
                rope.cos.dim(0)?,
                l + n
            );
        }
        for block in &self.double {
            (img, txt) = block.forward(
                &img,
                &txt,
                &mod_img,
                &mod_txt,
                &self.ln,
                rope,
                &self.attention,
            )?;
        }
        let mut x = Tensor::cat(&[&txt, &img], 1)?;
        for block in &self.single {
            x = block.forward(&x, &mod_single[0], &self.ln, rope, &self.attention)?;
        }
        let x = x.narrow(1, l, n)?;
        let emb = self.norm_out_linear.forward(&silu_temb)?.unsqueeze(1)?;
        let c = emb.chunk(2, D::Minus1)?;
        let (scale, shift) = (&c[0], &c[1]);
        let y = self
            .ln
            .forward(&x)?
            .broadcast_mul(&(scale + 1.0)?)?
            .broadcast_add(shift)?;
        self.proj_out.forward(&y)
    }

    /// diffusers-style forward: `img_ids` [N, 4], `txt_ids` [L, 4].
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: &Tensor,
        timestep: &Tensor,
        img_ids: &Tensor,
        txt_ids: &Tensor,
    ) -> Result<Tensor> {
        let rope = self.rope(txt_ids, img_ids)?;
        self.forward_with_rope(hidden_states, encoder_hidden_states, timestep, &rope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_tables_follow_diffusers_frequencies() -> Result<()> {
        let ids = Tensor::new(&[[0f32, 2.0, 0.0, 511.0]], &Device::Cpu)?;
        let r = Rope::new(&ids, &[4, 4, 8, 8], 2000.0, &Device::Cpu)?;
        let cos = r.cos.to_vec2::<f32>()?;
        // axis 1 (pairs 2..4) at position 2: freq 2000^(-2j/4), j = 0, 1
        assert!((cos[0][2] - 2f32.cos()).abs() < 1e-6);
        assert!((cos[0][3] - (2.0 / 2000f64.sqrt()).cos() as f32).abs() < 1e-6);
        // axis 3 (pairs 8..12) at position 511, j = 1: 511 · 2000^(-2/8)
        let a = 511.0 * 2000f64.powf(-0.25);
        assert!((cos[0][9] - a.cos() as f32).abs() < 1e-6);
        assert_eq!(cos[0][0], 1.0);
        Ok(())
    }
}
