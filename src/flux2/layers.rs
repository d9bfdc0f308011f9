//! Building blocks shared by the text encoder and the DiT.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// RMSNorm with a learned `weight` (Qwen3's layer and QK norms, the DiT's QK norms), through
/// candle's fused kernel, which needs a contiguous input.
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub(crate) fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps: eps as f32,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }
}
