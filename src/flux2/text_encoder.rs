//! Qwen3 as FLUX.2-klein's text encoder: the residual stream after decoder layers 9, 18 and 27
//! (HF `hidden_states[9/18/27]`, no final norm), concatenated per token.
//!
//! Only the layers up to the deepest one used are loaded and run (27 of Qwen3-4B/8B's 36), and
//! no `model.norm` or `lm_head`. Pads are kept: causal + key-padding mask, positions 0..L-1 for
//! every slot, and the pad slots' states are part of the output, as diffusers feeds them to the
//! DiT.
//!
//! The attention and MLP projections may be stored quantized (`TEXT_ENCODER_QUANTIZATION`, see
//! [`super::quant`]): for 9B they are 5.2 of the 5.8 billion parameters loaded.

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder, embedding};

use super::config::Qwen3Config;
use super::layers::RmsNorm;
use super::quant::{QLinear, Quantization, linear_no_bias};
use super::tokenizer::{PromptTokenizer, TokenizerError};
use super::weights::{ModelFiles, WeightsError};

/// `Flux2KleinPipeline` `text_encoder_out_layers`.
pub const OUTPUT_LAYERS: [usize; 3] = [9, 18, 27];

/// Half-split ("rotate_half") RoPE tables, computed in f32 like transformers and cast once.
#[derive(Debug, Clone)]
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    fn new(
        head_dim: usize,
        theta: f64,
        max_len: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / (theta.powf(2.0 * i as f64 / head_dim as f64) as f32))
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, head_dim / 2), dev)?;
        let pos = Tensor::arange(0u32, max_len as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((max_len, 1))?;
        let freqs = pos.broadcast_mul(&inv_freq)?;
        Ok(Self {
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
        })
    }

    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let seq_len = x.dim(2)?;
        let cos = self.cos.narrow(0, 0, seq_len)?;
        let sin = self.sin.narrow(0, 0, seq_len)?;
        candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: QLinear,
    k_proj: QLinear,
    v_proj: QLinear,
    o_proj: QLinear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &Qwen3Config, vb: VarBuilder, q: Quantization) -> Result<Self> {
        let hd = cfg.head_dim();
        let (h, nq, nkv) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
        );
        Ok(Self {
            q_proj: linear_no_bias(h, nq * hd, vb.pp("q_proj"), q)?,
            k_proj: linear_no_bias(h, nkv * hd, vb.pp("k_proj"), q)?,
            v_proj: linear_no_bias(h, nkv * hd, vb.pp("v_proj"), q)?,
            o_proj: linear_no_bias(nq * hd, h, vb.pp("o_proj"), q)?,
            q_norm: RmsNorm::new(hd, cfg.rms_norm_eps, vb.pp("q_norm"))?,
            k_norm: RmsNorm::new(hd, cfg.rms_norm_eps, vb.pp("k_norm"))?,
            num_heads: nq,
            num_kv_heads: nkv,
            head_dim: hd,
        })
    }

    /// `mask`: additive f32 `[B, 1, L, L]` (0 or -inf).
    fn forward(&self, x: &Tensor, mask: &Tensor, rope: &Rotary) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let split = |t: Tensor, n: usize| t.reshape((b, l, n, self.head_dim));
        // Per-head RMSNorm on q and k before RoPE (Qwen3's QK-norm).
        let q = self
            .q_norm
            .forward(&split(self.q_proj.forward(x)?, self.num_heads)?)?
            .transpose(1, 2)?;
        let k = self
            .k_norm
            .forward(&split(self.k_proj.forward(x)?, self.num_kv_heads)?)?
            .transpose(1, 2)?;
        let v = split(self.v_proj.forward(x)?, self.num_kv_heads)?.transpose(1, 2)?;
        let q = rope.apply(&q)?;
        let k = rope.apply(&k)?;
        let groups = self.num_heads / self.num_kv_heads;
        let k = repeat_kv(k, groups)?;
        let v = repeat_kv(v.contiguous()?, groups)?;

        let scale = 1.0 / (self.head_dim as f64).sqrt();
        // Scores in f32 (PyTorch's attention keeps them there); bit-identical for f32 inputs.
        let scores =
            (crate::nn::matmul::matmul_f32(&q.contiguous()?, &k.t()?.contiguous()?)? * scale)?;
        // Mask and softmax in f32: pad keys get exactly zero weight in any compute dtype.
        let probs = crate::nn::softmax::softmax_last_dim(
            &scores.to_dtype(DType::F32)?.broadcast_add(mask)?,
        )?
        .to_dtype(v.dtype())?;
        let out = crate::nn::matmul::matmul(&probs, &v)?; // [B, H, L, hd]
        let out = out
            .transpose(1, 2)?
            .reshape((b, l, self.num_heads * self.head_dim))?;
        self.o_proj.forward(&out)
    }
}

/// GQA: each kv head serves `n` consecutive query heads (transformers' `repeat_kv`).
fn repeat_kv(x: Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x);
    }
    let (b, h, l, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, h, n, l, d))?
        .reshape((b, h * n, l, d))
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: QLinear,
    up_proj: QLinear,
    down_proj: QLinear,
}

impl Mlp {
    fn new(cfg: &Qwen3Config, vb: VarBuilder, q: Quantization) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: linear_no_bias(h, i, vb.pp("gate_proj"), q)?,
            up_proj: linear_no_bias(h, i, vb.pp("up_proj"), q)?,
            down_proj: linear_no_bias(i, h, vb.pp("down_proj"), q)?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = crate::nn::silu(&self.gate_proj.forward(x)?)?;
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(cfg: &Qwen3Config, vb: VarBuilder, q: Quantization) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::new(cfg, vb.pp("self_attn"), q)?,
            mlp: Mlp::new(cfg, vb.pp("mlp"), q)?,
            input_layernorm: RmsNorm::new(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("input_layernorm"),
            )?,
            post_attention_layernorm: RmsNorm::new(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
        })
    }

    fn projections(&self) -> [&QLinear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    fn forward(&self, x: &Tensor, mask: &Tensor, rope: &Rotary) -> Result<Tensor> {
        let h = (x + self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, mask, rope)?)?;
        &h + self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&h)?)?
    }
}

/// The truncated Qwen3 stack; `vb` is the text encoder component root (names `model.*`).
#[derive(Debug, Clone)]
pub struct Qwen3TextEncoder {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    rope: Rotary,
    output_layers: Vec<usize>,
    hidden_size: usize,
}

impl Qwen3TextEncoder {
    /// Loads the layers needed for [`OUTPUT_LAYERS`], projections in the compute dtype.
    pub fn new(cfg: &Qwen3Config, vb: VarBuilder, max_len: usize) -> Result<Self> {
        Self::with_options(cfg, &OUTPUT_LAYERS, vb, max_len, Quantization::None)
    }

    /// As [`Self::new`], with the attention and MLP projections stored as `quant` asks.
    pub fn new_quantized(
        cfg: &Qwen3Config,
        vb: VarBuilder,
        max_len: usize,
        quant: Quantization,
    ) -> Result<Self> {
        Self::with_options(cfg, &OUTPUT_LAYERS, vb, max_len, quant)
    }

    /// The general constructor: `output_layers` are HF `hidden_states` indices (0 = embeddings,
    /// k = after layer k), `max_len` bounds the sequence length (RoPE table size), `quant` the
    /// projections' storage.
    pub fn with_options(
        cfg: &Qwen3Config,
        output_layers: &[usize],
        vb: VarBuilder,
        max_len: usize,
        quant: Quantization,
    ) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let deepest = output_layers.iter().copied().max().unwrap_or(0);
        if output_layers.is_empty() || deepest > cfg.num_hidden_layers {
            candle_core::bail!(
                "text encoder output layers {output_layers:?} need {deepest} layers, the config has {}",
                cfg.num_hidden_layers
            );
        }
        let vb = vb.pp("model");
        // The embedding table is only gathered from (512 rows per prompt out of 151 936): it
        // stays in host memory, which saves its 0.78 GB (Qwen3-4B) or 1.24 GB (Qwen3-8B) of
        // device memory; only the gathered [B, L, hidden] rows cross to the device.
        let embed_tokens = embedding(
            cfg.vocab_size,
            cfg.hidden_size,
            vb.pp("embed_tokens").set_device(Device::Cpu),
        )?;
        let layers = (0..deepest)
            .map(|i| DecoderLayer::new(cfg, vb.pp(format!("layers.{i}")), quant))
            .collect::<Result<Vec<_>>>()?;
        let rope = Rotary::new(
            cfg.head_dim(),
            cfg.rope_theta(),
            max_len,
            vb.dtype(),
            vb.device(),
        )?;
        Ok(Self {
            embed_tokens,
            layers,
            rope,
            output_layers: output_layers.to_vec(),
            hidden_size: cfg.hidden_size,
        })
    }

    /// Width of the output per token: `len(output_layers) * hidden_size` (7680 for 4B).
    pub fn output_dim(&self) -> usize {
        self.output_layers.len() * self.hidden_size
    }

    /// Number of decoder layers actually loaded.
    pub fn num_layers_loaded(&self) -> usize {
        self.layers.len()
    }

    /// How the projections are stored, read off the loaded layers; `None` if they differ (or
    /// no layer is loaded).
    pub fn quantization(&self) -> Option<Quantization> {
        let mut qs = self
            .layers
            .iter()
            .flat_map(|l| l.projections())
            .map(QLinear::quantization);
        let first = qs.next()?;
        qs.all(|q| q == first).then_some(first)
    }

    /// Bytes of every weight held: embeddings and norms in the compute dtype, projections as
    /// stored. All but the embedding table (in host memory) are on the compute device.
    pub fn weight_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mut n = bytes(self.embed_tokens.embeddings());
        for l in &self.layers {
            n += l
                .projections()
                .iter()
                .map(|p| p.storage_bytes())
                .sum::<usize>();
            for norm in [
                &l.input_layernorm,
                &l.post_attention_layernorm,
                &l.self_attn.q_norm,
                &l.self_attn.k_norm,
            ] {
                n += bytes(norm.weight());
            }
        }
        n
    }

    /// `input_ids`, `attention_mask`: `[B, L]` integer tensors (mask 1 = token, 0 = pad).
    /// Returns `[B, L, len(output_layers) * hidden]` in the model dtype.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        let device = self.rope.cos.device();
        let mask = build_mask(attention_mask, b, l, device)?;
        let mut x = self
            .embed_tokens
            .forward(&input_ids.to_device(&Device::Cpu)?)?
            .to_device(device)?;
        // Only the requested depths are kept alive, not every layer's output.
        let mut states: Vec<Option<Tensor>> = vec![None; self.output_layers.len()];
        let mut keep = |depth: usize, x: &Tensor| {
            for (slot, &k) in self.output_layers.iter().enumerate() {
                if k == depth {
                    states[slot] = Some(x.clone());
                }
            }
        };
        keep(0, &x);
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &mask, &self.rope)?;
            keep(i + 1, &x);
        }
        let states: Vec<Tensor> = states.into_iter().map(|s| s.expect("filled")).collect();
        // [B, L, 3, h] -> [B, L, 3h]: per token, [layer 9 | layer 18 | layer 27].
        Tensor::cat(&states, D::Minus1)
    }
}

/// Additive `[B, 1, L, L]` f32 mask: causal, plus no query may attend to a pad key (a pad
/// query included, even to itself), as transformers builds it.
fn build_mask(attention_mask: &Tensor, b: usize, l: usize, dev: &Device) -> Result<Tensor> {
    let keep: Vec<u32> = attention_mask
        .to_dtype(DType::U32)?
        .flatten_all()?
        .to_vec1()?;
    let mut m = vec![0f32; b * l * l];
    for bi in 0..b {
        for i in 0..l {
            let row = &mut m[(bi * l + i) * l..(bi * l + i + 1) * l];
            for (j, v) in row.iter_mut().enumerate() {
                if j > i || keep[bi * l + j] == 0 {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, l, l), dev)
}

#[derive(Debug, thiserror::Error)]
pub enum PromptEncoderError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Tokenizer + truncated Qwen3: prompts in, `[B, 512, 3 * hidden]` prompt embeddings out, as
/// `Flux2KleinPipeline.encode_prompt` produces them.
pub struct PromptEncoder {
    tokenizer: PromptTokenizer,
    encoder: Qwen3TextEncoder,
}

impl PromptEncoder {
    /// Loads `tokenizer/` (tokenizer.json, else vocab.json + merges.txt) and `text_encoder/`
    /// of a diffusers-layout model, projections in `dtype`.
    pub fn load(
        files: &ModelFiles,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, PromptEncoderError> {
        Self::load_quantized(files, dtype, device, Quantization::None)
    }

    /// As [`Self::load`], with the encoder's projections stored as `quant` asks.
    pub fn load_quantized(
        files: &ModelFiles,
        dtype: DType,
        device: &Device,
        quant: Quantization,
    ) -> std::result::Result<Self, PromptEncoderError> {
        Self::load_wrapped(files, dtype, device, quant, &|vb| vb)
    }

    /// As [`Self::load_quantized`], with the encoder's weights read through `wrap` (LoRA
    /// fusion, `lora::fused_var_builder`).
    pub fn load_wrapped(
        files: &ModelFiles,
        dtype: DType,
        device: &Device,
        quant: Quantization,
        wrap: &dyn Fn(VarBuilder<'static>) -> VarBuilder<'static>,
    ) -> std::result::Result<Self, PromptEncoderError> {
        let has = |f: &str| files.contains(&format!("tokenizer/{f}"));
        let tokenizer = if !has("tokenizer.json") && has("vocab.json") && has("merges.txt") {
            PromptTokenizer::from_vocab_merges(
                &files.get("tokenizer/vocab.json")?,
                &files.get("tokenizer/merges.txt")?,
                &files.get("tokenizer/tokenizer_config.json")?,
            )?
        } else {
            let tok_cfg = if has("tokenizer_config.json") {
                Some(files.get("tokenizer/tokenizer_config.json")?)
            } else {
                None
            };
            PromptTokenizer::from_files(
                &files.get("tokenizer/tokenizer.json")?,
                tok_cfg.as_deref(),
            )?
        };
        let cfg = files.text_encoder_config()?;
        let vb = wrap(files.component_var_builder("text_encoder", dtype, device)?);
        let encoder = Qwen3TextEncoder::new_quantized(&cfg, vb, tokenizer.max_length(), quant)?;
        Ok(Self { tokenizer, encoder })
    }

    pub fn encoder(&self) -> &Qwen3TextEncoder {
        &self.encoder
    }

    /// Width of the embeddings per token (the DiT's `joint_attention_dim`).
    pub fn output_dim(&self) -> usize {
        self.encoder.output_dim()
    }

    /// `[B, 512, 3 * hidden]` in the model dtype, one row per prompt.
    pub fn encode(&self, prompts: &[&str]) -> std::result::Result<Tensor, PromptEncoderError> {
        // Token ids stay on the host, where the embedding table is.
        let (ids, mask) = self.tokenizer.encode_batch(prompts, &Device::Cpu)?;
        Ok(self.encoder.forward(&ids, &mask)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_is_causal_and_hides_pad_keys() {
        let am = Tensor::new(&[[1u32, 1, 0]], &Device::Cpu).unwrap();
        let m: Vec<Vec<f32>> = build_mask(&am, 1, 3, &Device::Cpu)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(
            m,
            vec![vec![0., inf, inf], vec![0., 0., inf], vec![0., 0., inf]]
        );
    }

    #[test]
    fn repeat_kv_repeats_each_head_consecutively() {
        let x = Tensor::arange(0f32, 4., &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 2, 1))
            .unwrap();
        let r: Vec<f32> = repeat_kv(x, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(r, vec![0., 1., 0., 1., 2., 3., 2., 3.]);
    }
}
