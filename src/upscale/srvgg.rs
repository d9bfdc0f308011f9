//! `SRVGGNetCompact` (realesr-general-x4v3, realesr-animevideov3): a plain conv+PReLU stack
//! that predicts a residual on top of the nearest-upsampled input.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, PReLU, VarBuilder};

use super::rrdbnet::conv3x3;

/// Hyper-parameters of `SRVGGNetCompact` with `act_type='prelu'` (the official weights).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvggConfig {
    pub num_in_ch: usize,
    pub num_out_ch: usize,
    pub num_feat: usize,
    pub num_conv: usize,
    pub upscale: usize,
}

impl SrvggConfig {
    /// realesr-general-x4v3.
    pub fn general_x4v3() -> Self {
        Self {
            num_in_ch: 3,
            num_out_ch: 3,
            num_feat: 64,
            num_conv: 32,
            upscale: 4,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SrvggNetCompact {
    cfg: SrvggConfig,
    /// `body.{2i}` convolutions and `body.{2i+1}` PReLUs, in ModuleList order.
    layers: Vec<(Conv2d, Option<PReLU>)>,
}

impl SrvggNetCompact {
    pub fn new(cfg: &SrvggConfig, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("body");
        let nf = cfg.num_feat;
        let mut layers = Vec::with_capacity(cfg.num_conv + 2);
        for i in 0..=cfg.num_conv {
            let in_c = if i == 0 { cfg.num_in_ch } else { nf };
            let conv = conv3x3(in_c, nf, vb.pp(2 * i))?;
            let act = candle_nn::prelu(Some(nf), vb.pp(2 * i + 1))?;
            layers.push((conv, Some(act)));
        }
        let out_c = cfg.num_out_ch * cfg.upscale * cfg.upscale;
        let last = conv3x3(nf, out_c, vb.pp(2 * cfg.num_conv + 2))?;
        layers.push((last, None));
        Ok(Self {
            cfg: cfg.clone(),
            layers,
        })
    }

    pub fn config(&self) -> &SrvggConfig {
        &self.cfg
    }
}

impl Module for SrvggNetCompact {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut out = x.clone();
        for (conv, act) in &self.layers {
            out = crate::nn::matmul::conv2d(conv, &out)?;
            if let Some(act) = act {
                out = act.forward(&out)?;
            }
        }
        let r = self.cfg.upscale;
        let out = candle_nn::ops::pixel_shuffle(&out, r)?;
        let (_, _, h, w) = x.dims4()?;
        out + x.upsample_nearest2d(h * r, w * r)?
    }
}
