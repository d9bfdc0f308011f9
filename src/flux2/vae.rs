//! `AutoencoderKLFlux2`: the FLUX.2 VAE (diffusers layout and names).
//!
//! The classic KL autoencoder (mean only on encode) plus 1×1 quant convs, 2×2 patchify to 128
//! channels and BatchNorm running-statistics normalisation of the patchified latents.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder};
use serde::Deserialize;

use super::layers::chunked_attention;
use crate::nn::conv::lean_conv2d;
use crate::nn::group_norm::lean_group_norm;
use crate::nn::matmul;
use crate::nn::{LeanBudget, LeanConv2d, LeanGroupNorm, Pad};

fn d_ch3() -> usize {
    3
}
fn d_blocks() -> Vec<usize> {
    vec![128, 256, 512, 512]
}
fn d_layers() -> usize {
    2
}
fn d_latent() -> usize {
    32
}
fn d_groups() -> usize {
    32
}
fn d_true() -> bool {
    true
}
fn d_bn_eps() -> f64 {
    1e-4
}

/// `vae/config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct AutoencoderKLFlux2Config {
    #[serde(default = "d_ch3")]
    pub in_channels: usize,
    #[serde(default = "d_ch3")]
    pub out_channels: usize,
    #[serde(default = "d_blocks")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub layers_per_block: usize,
    #[serde(default = "d_latent")]
    pub latent_channels: usize,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
    #[serde(default = "d_bn_eps")]
    pub batch_norm_eps: f64,
    /// Set only by the optional FLUX.2 small decoder, which is not supported.
    #[serde(default)]
    pub decoder_block_out_channels: Option<Vec<usize>>,
}

impl AutoencoderKLFlux2Config {
    /// Pixels per latent pixel (8 for the real VAE): 2^(number of blocks − 1).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }
}

const RESNET_EPS: f64 = 1e-6;

/// The 1×1 quant convs at latent resolution: small, so candle's plain conv.
fn conv1x1(i: usize, o: usize, vb: VarBuilder) -> Result<Conv2d> {
    candle_nn::conv2d(i, o, 1, Conv2dConfig::default(), vb)
}

/// Every other conv runs in im2col-bounded bands (see [`crate::nn`]).
fn conv(
    i: usize,
    o: usize,
    k: usize,
    stride: usize,
    pad: Pad,
    lean: LeanBudget,
    vb: VarBuilder,
) -> Result<LeanConv2d> {
    lean_conv2d(i, o, k, stride, pad, lean.im2col_bytes, vb)
}

fn conv3(i: usize, o: usize, lean: LeanBudget, vb: VarBuilder) -> Result<LeanConv2d> {
    conv(i, o, 3, 1, Pad::uniform(1), lean, vb)
}

fn norm(groups: usize, c: usize, lean: LeanBudget, vb: VarBuilder) -> Result<LeanGroupNorm> {
    lean_group_norm(groups, c, RESNET_EPS, lean.norm_bytes, vb)
}

#[derive(Debug, Clone)]
struct Resnet {
    norm1: LeanGroupNorm,
    conv1: LeanConv2d,
    norm2: LeanGroupNorm,
    conv2: LeanConv2d,
    shortcut: Option<LeanConv2d>,
}

impl Resnet {
    fn new(i: usize, o: usize, groups: usize, lean: LeanBudget, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: norm(groups, i, lean, vb.pp("norm1"))?,
            conv1: conv3(i, o, lean, vb.pp("conv1"))?,
            norm2: norm(groups, o, lean, vb.pp("norm2"))?,
            conv2: conv3(o, o, lean, vb.pp("conv2"))?,
            shortcut: (i != o)
                .then(|| conv(i, o, 1, 1, Pad::uniform(0), lean, vb.pp("conv_shortcut")))
                .transpose()?,
        })
    }
}

impl Module for Resnet {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // At 1024² one full-size tensor is up to 512 MB in bf16: the normalised inputs exist
        // only per conv band, each intermediate is dropped as soon as the next exists, and the
        // shortcut conv adds into conv2's output in place.
        let h = {
            let h1 = self.conv1.forward_norm_silu(x, &self.norm1)?;
            self.conv2.forward_norm_silu(&h1, &self.norm2)?
        };
        match &self.shortcut {
            Some(s) => s.forward_add(x, h),
            None => x + h,
        }
    }
}

/// Single-head spatial self-attention of the mid block, with residual.
#[derive(Debug, Clone)]
struct MidAttention {
    group_norm: LeanGroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

/// Query rows per attention chunk: bounds the score matrix at large resolutions (1024² has
/// 16384 tokens).
const ATTN_CHUNK: usize = 4096;

impl MidAttention {
    fn new(c: usize, groups: usize, lean: LeanBudget, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            group_norm: norm(groups, c, lean, vb.pp("group_norm"))?,
            to_q: candle_nn::linear(c, c, vb.pp("to_q"))?,
            to_k: candle_nn::linear(c, c, vb.pp("to_k"))?,
            to_v: candle_nn::linear(c, c, vb.pp("to_v"))?,
            to_out: candle_nn::linear(c, c, vb.pp("to_out").pp("0"))?,
        })
    }
}

impl Module for MidAttention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = matmul::linear(&self.to_q, &n)?.unsqueeze(1)?;
        let k = matmul::linear(&self.to_k, &n)?.unsqueeze(1)?;
        let v = matmul::linear(&self.to_v, &n)?.unsqueeze(1)?;
        let attn = chunked_attention(&q, &k, &v, b * ATTN_CHUNK * h * w)?;
        let o = matmul::linear(&self.to_out, &attn)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
        x + o
    }
}

#[derive(Debug, Clone)]
struct MidBlock {
    res0: Resnet,
    attn: Option<MidAttention>,
    res1: Resnet,
}

impl MidBlock {
    fn new(c: usize, groups: usize, attn: bool, lean: LeanBudget, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            res0: Resnet::new(c, c, groups, lean, vb.pp("resnets").pp("0"))?,
            attn: attn
                .then(|| MidAttention::new(c, groups, lean, vb.pp("attentions").pp("0")))
                .transpose()?,
            res1: Resnet::new(c, c, groups, lean, vb.pp("resnets").pp("1"))?,
        })
    }
}

impl Module for MidBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.res0.forward(x)?;
        if let Some(a) = &self.attn {
            h = a.forward(&h)?;
        }
        self.res1.forward(&h)
    }
}

/// `n` resnets (`resnets.{j}`), the first taking `c_in` channels, the rest `c_out`.
fn resnets(
    c_in: usize,
    c_out: usize,
    n: usize,
    groups: usize,
    lean: LeanBudget,
    vb: VarBuilder,
) -> Result<Vec<Resnet>> {
    (0..n)
        .map(|j| {
            let i = if j == 0 { c_in } else { c_out };
            Resnet::new(i, c_out, groups, lean, vb.pp(j))
        })
        .collect()
}

#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<Resnet>,
    down: Option<LeanConv2d>,
}

#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: LeanConv2d,
    down: Vec<DownBlock>,
    mid: MidBlock,
    norm_out: LeanGroupNorm,
    conv_out: LeanConv2d,
}

/// diffusers' downsampler pads right and bottom only, then convolves with stride 2.
const DOWN_PAD: Pad = Pad {
    top: 0,
    bottom: 1,
    left: 0,
    right: 1,
};

impl Encoder {
    fn new(cfg: &AutoencoderKLFlux2Config, lean: LeanBudget, vb: VarBuilder) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let mut down = Vec::new();
        let mut c_in = ch[0];
        for (i, &c_out) in ch.iter().enumerate() {
            let vbb = vb.pp("down_blocks").pp(i);
            down.push(DownBlock {
                resnets: resnets(
                    c_in,
                    c_out,
                    cfg.layers_per_block,
                    g,
                    lean,
                    vbb.pp("resnets"),
                )?,
                down: (i + 1 < ch.len())
                    .then(|| {
                        let vbd = vbb.pp("downsamplers.0.conv");
                        conv(c_out, c_out, 3, 2, DOWN_PAD, lean, vbd)
                    })
                    .transpose()?,
            });
            c_in = c_out;
        }
        let top = *ch.last().unwrap_or(&ch[0]);
        Ok(Self {
            conv_in: conv3(cfg.in_channels, ch[0], lean, vb.pp("conv_in"))?,
            down,
            mid: MidBlock::new(
                top,
                g,
                cfg.mid_block_add_attention,
                lean,
                vb.pp("mid_block"),
            )?,
            norm_out: norm(g, top, lean, vb.pp("conv_norm_out"))?,
            conv_out: conv3(top, 2 * cfg.latent_channels, lean, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for b in &self.down {
            for r in &b.resnets {
                h = r.forward(&h)?;
            }
            if let Some(d) = &b.down {
                h = d.forward(&h)?;
            }
        }
        let h = self.mid.forward(&h)?;
        self.conv_out.forward_norm_silu(&h, &self.norm_out)
    }
}

#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<Resnet>,
    /// Applied to the 2× nearest-upsampled input, fused (see [`LeanConv2d::forward_up2`]).
    up: Option<LeanConv2d>,
}

#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: LeanConv2d,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: LeanGroupNorm,
    conv_out: LeanConv2d,
}

impl Decoder {
    fn new(cfg: &AutoencoderKLFlux2Config, lean: LeanBudget, vb: VarBuilder) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let mut up = Vec::new();
        let mut c_prev = rev[0];
        for (i, &c_out) in rev.iter().enumerate() {
            let vbb = vb.pp("up_blocks").pp(i);
            up.push(UpBlock {
                resnets: resnets(
                    c_prev,
                    c_out,
                    cfg.layers_per_block + 1,
                    g,
                    lean,
                    vbb.pp("resnets"),
                )?,
                up: (i + 1 < rev.len())
                    .then(|| conv3(c_out, c_out, lean, vbb.pp("upsamplers.0.conv")))
                    .transpose()?,
            });
            c_prev = c_out;
        }
        let bottom = cfg.block_out_channels[0];
        Ok(Self {
            conv_in: conv3(cfg.latent_channels, rev[0], lean, vb.pp("conv_in"))?,
            mid: MidBlock::new(
                rev[0],
                g,
                cfg.mid_block_add_attention,
                lean,
                vb.pp("mid_block"),
            )?,
            up,
            norm_out: norm(g, bottom, lean, vb.pp("conv_norm_out"))?,
            conv_out: conv3(bottom, cfg.out_channels, lean, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(z)?)?;
        for b in &self.up {
            for r in &b.resnets {
                h = r.forward(&h)?;
            }
            if let Some(u) = &b.up {
                h = u.forward_up2(&h)?;
            }
        }
        self.conv_out.forward_norm_silu(&h, &self.norm_out)
    }
}

/// The FLUX.2 VAE with its latent transforms.
#[derive(Debug, Clone)]
pub struct AutoencoderKLFlux2 {
    cfg: AutoencoderKLFlux2Config,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    bn_mean: Tensor,
    bn_std: Tensor,
}

impl AutoencoderKLFlux2 {
    /// With the default [`LeanBudget`]: bounded conv and GroupNorm transients.
    pub fn new(cfg: &AutoencoderKLFlux2Config, vb: VarBuilder) -> Result<Self> {
        Self::with_budget(cfg, vb, LeanBudget::DEFAULT)
    }

    /// `LeanBudget::PLAIN` runs candle's unbanded ops (the same values, more memory).
    pub fn with_budget(
        cfg: &AutoencoderKLFlux2Config,
        vb: VarBuilder,
        lean: LeanBudget,
    ) -> Result<Self> {
        if cfg.block_out_channels.is_empty() {
            candle_core::bail!("vae config: block_out_channels is empty");
        }
        if let Some(d) = &cfg.decoder_block_out_channels
            && d != &cfg.block_out_channels
        {
            candle_core::bail!(
                "vae config: decoder_block_out_channels {d:?} (the FLUX.2 small decoder) is not supported"
            );
        }
        let lc = cfg.latent_channels;
        let c = 4 * lc;
        let bn = vb.pp("bn");
        // Statistics stay in f32 whatever the model dtype: they divide the latents.
        // Read as f32 from the file, not through the model dtype.
        let f32_stat =
            |name| bn.get_with_hints_dtype(c, name, candle_nn::Init::Const(0.), DType::F32);
        let mean = f32_stat("running_mean")?;
        let var = f32_stat("running_var")?;
        let std = (var + cfg.batch_norm_eps)?.sqrt()?;
        Ok(Self {
            encoder: Encoder::new(cfg, lean, vb.pp("encoder"))?,
            decoder: Decoder::new(cfg, lean, vb.pp("decoder"))?,
            quant_conv: cfg
                .use_quant_conv
                .then(|| conv1x1(2 * lc, 2 * lc, vb.pp("quant_conv")))
                .transpose()?,
            post_quant_conv: cfg
                .use_post_quant_conv
                .then(|| conv1x1(lc, lc, vb.pp("post_quant_conv")))
                .transpose()?,
            bn_mean: mean.reshape((1, c, 1, 1))?,
            bn_std: std.reshape((1, c, 1, 1))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &AutoencoderKLFlux2Config {
        &self.cfg
    }

    /// Posterior mean [B, latent, H/f, W/f] of images [B, 3, H, W] in [−1, 1].
    pub fn encode_mean(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.encoder.forward(x)?;
        if let Some(q) = &self.quant_conv {
            h = matmul::conv2d(q, &h)?;
        }
        h.narrow(1, 0, self.cfg.latent_channels)
    }

    /// Images in about [−1, 1] from latents [B, latent, h, w].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => matmul::conv2d(p, z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    /// Encode, patchify and normalise: the latents the transformer sees, [B, 4·latent, h/2, w/2].
    pub fn encode_normalized(&self, x: &Tensor) -> Result<Tensor> {
        let z = patchify(&self.encode_mean(x)?)?;
        self.normalize(&z)
    }

    /// (z − running_mean) / √(running_var + eps), per patchified channel.
    pub fn normalize(&self, z: &Tensor) -> Result<Tensor> {
        let dt = z.dtype();
        z.to_dtype(DType::F32)?
            .broadcast_sub(&self.bn_mean.to_device(z.device())?)?
            .broadcast_div(&self.bn_std.to_device(z.device())?)?
            .to_dtype(dt)
    }

    pub fn denormalize(&self, z: &Tensor) -> Result<Tensor> {
        let dt = z.dtype();
        z.to_dtype(DType::F32)?
            .broadcast_mul(&self.bn_std.to_device(z.device())?)?
            .broadcast_add(&self.bn_mean.to_device(z.device())?)?
            .to_dtype(dt)
    }

    /// De-normalise, unpatchify and decode patchified latents [B, 4·latent, h, w].
    pub fn decode_normalized(&self, z: &Tensor) -> Result<Tensor> {
        self.decode(&unpatchify(&self.denormalize(z)?)?)
    }
}

/// [B, C, H, W] → [B, 4C, H/2, W/2], channel c·4 + py·2 + px.
pub fn patchify(z: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = z.dims4()?;
    z.reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 1, 3, 5, 2, 4))?
        .reshape((b, c * 4, h / 2, w / 2))
}

/// Inverse of [`patchify`].
pub fn unpatchify(z: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = z.dims4()?;
    z.reshape((b, c / 4, 2, 2, h, w))?
        .permute((0, 1, 4, 2, 5, 3))?
        .reshape((b, c / 4, h * 2, w * 2))
}

/// [B, C, H, W] → [B, H·W, C] tokens, row-major.
pub fn pack(z: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = z.dims4()?;
    z.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()
}

/// Inverse of [`pack`].
pub fn unpack(tokens: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, c) = tokens.dims3()?;
    tokens.transpose(1, 2)?.reshape((b, c, h, w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn patchify_channel_order_and_roundtrip() -> Result<()> {
        let dev = Device::Cpu;
        let z = Tensor::arange(0f32, 2.0 * 4.0 * 6.0, &dev)?.reshape((1, 2, 4, 6))?;
        let p = patchify(&z)?;
        assert_eq!(p.dims(), &[1, 8, 2, 3]);
        // channel c·4 + py·2 + px at (i, j) = z[c, 2i + py, 2j + px]
        let pv = p.squeeze(0)?.to_vec3::<f32>()?;
        let zv = z.squeeze(0)?.to_vec3::<f32>()?;
        for c in 0..2 {
            for py in 0..2 {
                for px in 0..2 {
                    for i in 0..2 {
                        for j in 0..3 {
                            assert_eq!(
                                pv[c * 4 + py * 2 + px][i][j],
                                zv[c][2 * i + py][2 * j + px]
                            );
                        }
                    }
                }
            }
        }
        let back = unpatchify(&p)?;
        assert_eq!(
            back.flatten_all()?.to_vec1::<f32>()?,
            z.flatten_all()?.to_vec1::<f32>()?
        );
        let t = pack(&p)?;
        assert_eq!(t.dims(), &[1, 6, 8]);
        // token index = row·W + col
        assert_eq!(t.get(0)?.get(4)?.get(5)?.to_scalar::<f32>()?, pv[5][1][1]);
        let u = unpack(&t, 2, 3)?;
        assert_eq!(
            u.flatten_all()?.to_vec1::<f32>()?,
            p.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }
}
