//! Building blocks shared by the FLUX.2 models.

use candle_core::{DType, Module, Result, Tensor};

use crate::nn::matmul;
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
    /// On the CPU in bf16/f16, candle's kernel rounds the row's RMS to the input dtype and then
    /// divides and scales in it (three roundings, the first shared by the whole row); PyTorch
    /// (diffusers' and transformers' RMSNorm) normalises in f32. There we normalise in f32 and
    /// round once. CUDA's kernel already works in f32; f32 inputs take the fused kernel as is.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        if dt != DType::F32 && x.device().is_cpu() {
            let w = self.weight.to_dtype(DType::F32)?;
            return candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?.contiguous()?, &w, self.eps)?
                .to_dtype(dt);
        }
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
    // On the CPU a bf16 q is scaled in f32 and kept there (the scores are f32 anyway), so the
    // scale adds no rounding, as in PyTorch's attention where it multiplies the f32 scores.
    let q = if q.device().is_cpu() && q.dtype() != DType::F32 {
        q.to_dtype(DType::F32)?
    } else {
        q.clone()
    };
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
        let probs = attention_probs(&q.narrow(2, start, n)?, &kt, v.dtype())?;
        outs.push(matmul::matmul(&probs, &v)?);
        start += n;
    }
    let out = if outs.len() == 1 {
        outs.pop().expect("one chunk")
    } else {
        Tensor::cat(&outs, 2)?
    };
    out.transpose(1, 2)?.reshape((b, s, h * d))
}

/// softmax(q·kᵀ) in `dtype` (the values' dtype). On the CPU the scores and the softmax stay in f32, as in
/// PyTorch's CPU attention kernel (f32 scores and sums, probabilities rounded for the value
/// product): candle's CPU softmax in bf16 would both round every score to 8 bits and sum the
/// exponentials in bf16. On CUDA candle's softmax kernel accumulates in f32 already. The CPU
/// softmax is [`crate::nn::softmax`]'s vectorised one (within 1e-6 of candle's).
fn attention_probs(q: &Tensor, kt: &Tensor, dtype: DType) -> Result<Tensor> {
    if q.device().is_cpu() {
        let scores = matmul::matmul_f32(q, kt)?;
        return crate::nn::softmax::softmax_last_dim(&scores)?.to_dtype(dtype);
    }
    candle_nn::ops::softmax_last_dim(&q.matmul(kt)?)
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
