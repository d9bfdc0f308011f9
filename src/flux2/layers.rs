//! Building blocks shared by the FLUX.2 models.

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

    pub(crate) fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }
}

/// Scaled dot-product attention over [B, H, S, d] inputs, no mask; returns [B, S, H·d].
///
/// The 1/√d scale is applied to `q` rather than to the scores: q has d elements per row, the
/// scores kv_len, so this saves a full read and write of the score matrix, the largest tensor
/// the models make.
pub(crate) fn chunked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    max_scores: usize,
) -> Result<Tensor> {
    let d = q.dim(3)?;
    chunked_attention_prescaled(&(q * (1.0 / (d as f64).sqrt()))?, k, v, max_scores)
}

/// [`chunked_attention`] for a `q` that already carries the 1/√d scale (the DiT folds it into
/// its f32 RoPE pass, so it costs no extra rounding).
///
/// Query rows are processed in chunks so that at most about `max_scores` attention scores exist
/// at once: the full score matrix of a 1024² image would not fit in memory. Softmax is row-wise,
/// so chunking does not change the result.
pub(crate) fn chunked_attention_prescaled(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    max_scores: usize,
) -> Result<Tensor> {
    let (b, h, s, d) = q.dims4()?;
    let q = q.contiguous()?;
    let kt = k.t()?.contiguous()?;
    let v = v.contiguous()?;
    let kv_len = kt.dim(3)?;
    let rows = (max_scores / (b * h * kv_len).max(1)).clamp(1, s);
    let mut outs = Vec::with_capacity(s.div_ceil(rows));
    let mut start = 0;
    while start < s {
        let n = rows.min(s - start);
        let scores = q.narrow(2, start, n)?.matmul(&kt)?;
        outs.push(candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?);
        start += n;
    }
    let out = if outs.len() == 1 {
        outs.pop().expect("one chunk")
    } else {
        Tensor::cat(&outs, 2)?
    };
    out.transpose(1, 2)?.reshape((b, s, h * d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn naive(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (b, h, s, d) = q.dims4()?;
        let w = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? / (d as f64).sqrt())?)?;
        w.matmul(v)?.transpose(1, 2)?.reshape((b, s, h * d))
    }

    #[test]
    fn chunked_attention_equals_one_shot() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 37, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, 2, 37, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, 2, 37, 8), &dev)?;
        let a = chunked_attention(&q, &k, &v, 1 << 28)?;
        let n = naive(&q, &k, &v)?;
        let err = (a - &n)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(err < 1e-6, "{err}");
        // 2·37·8 scores per chunk → 8 query rows per chunk, 5 chunks.
        let c = chunked_attention(&q, &k, &v, 2 * 37 * 8)?;
        let err = (c - &n)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(err < 1e-6, "{err}");
        Ok(())
    }
}
