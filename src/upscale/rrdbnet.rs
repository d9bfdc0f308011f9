//! BasicSR `RRDBNet` (RealESRGAN_x4plus, RealESRGAN_x2plus, anime_6B).
//!
//! The trunk always upsamples ×4; scale 2 and 1 feed it a pixel-unshuffled input, which is how
//! the official x2plus checkpoint works. Names mirror the BasicSR state dict.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};

use crate::nn::conv::lean_conv2d;
use crate::nn::matmul::conv2d;
use crate::nn::{LeanBudget, LeanConv2d, Pad};

/// Hyper-parameters of `RRDBNet(num_in_ch, num_out_ch, scale, num_feat, num_block, num_grow_ch)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RrdbConfig {
    pub num_in_ch: usize,
    pub num_out_ch: usize,
    pub scale: usize,
    pub num_feat: usize,
    pub num_block: usize,
    pub num_grow_ch: usize,
}

impl RrdbConfig {
    /// RealESRGAN_x4plus.
    pub fn x4plus() -> Self {
        Self {
            num_in_ch: 3,
            num_out_ch: 3,
            scale: 4,
            num_feat: 64,
            num_block: 23,
            num_grow_ch: 32,
        }
    }

    /// RealESRGAN_x2plus (same trunk, pixel-unshuffle input).
    pub fn x2plus() -> Self {
        Self {
            scale: 2,
            ..Self::x4plus()
        }
    }

    /// Pixel-unshuffle factor applied before `conv_first` (1 means none).
    pub fn unshuffle(&self) -> usize {
        match self.scale {
            2 => 2,
            1 => 4,
            _ => 1,
        }
    }
}

pub(crate) fn conv3x3(in_c: usize, out_c: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    candle_nn::conv2d(in_c, out_c, 3, cfg, vb)
}

/// The convs after the trunk run at 2× and 4× resolution (a 1024² image upscaled untiled needs
/// a 19 GB im2col per conv on CUDA), so they run in bands, the upsamples and the leaky ReLUs
/// fused.
fn hr_conv3x3(in_c: usize, out_c: usize, lean: LeanBudget, vb: VarBuilder) -> Result<LeanConv2d> {
    lean_conv2d(in_c, out_c, 3, 1, Pad::uniform(1), lean.im2col_bytes, vb)
}

fn hr_conv3x3_lrelu(
    in_c: usize,
    out_c: usize,
    lean: LeanBudget,
    vb: VarBuilder,
) -> Result<LeanConv2d> {
    Ok(hr_conv3x3(in_c, out_c, lean, vb)?.with_leaky_relu(LRELU_SLOPE))
}

const LRELU_SLOPE: f64 = 0.2;

fn lrelu(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::leaky_relu(x, LRELU_SLOPE)
}

#[derive(Debug, Clone)]
struct ResidualDenseBlock {
    convs: [Conv2d; 5],
}

impl ResidualDenseBlock {
    fn new(num_feat: usize, grow: usize, vb: VarBuilder) -> Result<Self> {
        let c = |i: usize, out: usize| {
            conv3x3(num_feat + (i - 1) * grow, out, vb.pp(format!("conv{i}")))
        };
        Ok(Self {
            convs: [
                c(1, grow)?,
                c(2, grow)?,
                c(3, grow)?,
                c(4, grow)?,
                c(5, num_feat)?,
            ],
        })
    }
}

impl Module for ResidualDenseBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Concatenation order (x, x1, x2, ...) is what the checkpoint's in-channels assume.
        let mut feats = vec![x.clone()];
        for conv in &self.convs[..4] {
            let input = Tensor::cat(&feats, 1)?;
            feats.push(lrelu(&conv2d(conv, &input)?)?);
        }
        let x5 = conv2d(&self.convs[4], &Tensor::cat(&feats, 1)?)?;
        (x5 * 0.2)? + x
    }
}

#[derive(Debug, Clone)]
struct Rrdb {
    rdb: [ResidualDenseBlock; 3],
}

impl Rrdb {
    fn new(num_feat: usize, grow: usize, vb: VarBuilder) -> Result<Self> {
        let r = |i: usize| ResidualDenseBlock::new(num_feat, grow, vb.pp(format!("rdb{i}")));
        Ok(Self {
            rdb: [r(1)?, r(2)?, r(3)?],
        })
    }
}

impl Module for Rrdb {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let out = self.rdb[2].forward(&self.rdb[1].forward(&self.rdb[0].forward(x)?)?)?;
        (out * 0.2)? + x
    }
}

/// The network; `forward` maps `(1, 3, h, w)` in [0,1] to `(1, 3, h·scale, w·scale)`, unclamped.
#[derive(Debug, Clone)]
pub struct RrdbNet {
    cfg: RrdbConfig,
    conv_first: Conv2d,
    body: Vec<Rrdb>,
    conv_body: Conv2d,
    conv_up1: LeanConv2d,
    conv_up2: LeanConv2d,
    conv_hr: LeanConv2d,
    conv_last: LeanConv2d,
}

impl RrdbNet {
    /// With the default [`LeanBudget`] for the high-resolution convs.
    pub fn new(cfg: &RrdbConfig, vb: VarBuilder) -> Result<Self> {
        Self::with_budget(cfg, vb, LeanBudget::DEFAULT)
    }

    /// `LeanBudget::PLAIN` runs candle's plain upsample + conv (same values, more memory).
    pub fn with_budget(cfg: &RrdbConfig, vb: VarBuilder, lean: LeanBudget) -> Result<Self> {
        let u = cfg.unshuffle();
        let nf = cfg.num_feat;
        let conv_first = conv3x3(cfg.num_in_ch * u * u, nf, vb.pp("conv_first"))?;
        let body = (0..cfg.num_block)
            .map(|i| Rrdb::new(nf, cfg.num_grow_ch, vb.pp(format!("body.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            conv_first,
            body,
            conv_body: conv3x3(nf, nf, vb.pp("conv_body"))?,
            conv_up1: hr_conv3x3_lrelu(nf, nf, lean, vb.pp("conv_up1"))?,
            conv_up2: hr_conv3x3_lrelu(nf, nf, lean, vb.pp("conv_up2"))?,
            conv_hr: hr_conv3x3_lrelu(nf, nf, lean, vb.pp("conv_hr"))?,
            conv_last: hr_conv3x3(nf, cfg.num_out_ch, lean, vb.pp("conv_last"))?,
        })
    }

    pub fn config(&self) -> &RrdbConfig {
        &self.cfg
    }
}

impl Module for RrdbNet {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let u = self.cfg.unshuffle();
        let x = if u > 1 {
            candle_nn::ops::pixel_unshuffle(x, u)?
        } else {
            x.clone()
        };
        let first = conv2d(&self.conv_first, &x)?;
        let mut body = first.clone();
        for block in &self.body {
            body = block.forward(&body)?;
        }
        let feat = (first + conv2d(&self.conv_body, &body)?)?;
        drop(body);
        self.upsample_head(feat)
    }
}

impl RrdbNet {
    /// Trunk features `(1, num_feat, h, w)` → the ×4 output: two 2× nearest upsample + conv
    /// steps, then `conv_hr` and `conv_last` at 4× resolution. Public for the memory bench.
    pub fn upsample_head(&self, feat: Tensor) -> Result<Tensor> {
        // Each conv applies its leaky ReLU; reassigning frees each full-resolution
        // intermediate once the next exists.
        let mut feat = self.conv_up1.forward_up2(&feat)?;
        feat = self.conv_up2.forward_up2(&feat)?;
        feat = self.conv_hr.forward(&feat)?;
        self.conv_last.forward(&feat)
    }
}
