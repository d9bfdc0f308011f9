//! Matrix products that take reduced-precision inputs on every device.
//!
//! candle's CPU gemm has no bf16 kernel (`matmul` fails with "unsupported dtype BF16"). PyTorch's
//! CPU bf16 matmul (oneDNN) and cuBLAS both multiply bf16 inputs with f32 accumulation and round
//! the result to bf16 once; on the CPU we do exactly that by upcasting: a bf16×bf16 product is
//! exact in f32, so only the order of the f32 additions differs. Every other dtype/device pair
//! goes straight to candle's `matmul`, so f32 results are unchanged to the bit.

use candle_core::{DType, Result, Tensor};

/// Whether `t` needs the f32 detour: bf16 on the CPU.
fn cpu_bf16(t: &Tensor) -> bool {
    t.dtype() == DType::BF16 && t.device().is_cpu()
}

/// `a.matmul(b)`, bf16 on the CPU via f32 accumulation and one rounding.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if cpu_bf16(a) || cpu_bf16(b) {
        return a
            .to_dtype(DType::F32)?
            .matmul(&b.to_dtype(DType::F32)?)?
            .to_dtype(a.dtype());
    }
    a.matmul(b)
}

/// `a.broadcast_matmul(b)` with [`matmul`]'s bf16 handling.
pub fn broadcast_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if cpu_bf16(a) || cpu_bf16(b) {
        return a
            .to_dtype(DType::F32)?
            .broadcast_matmul(&b.to_dtype(DType::F32)?)?
            .to_dtype(a.dtype());
    }
    a.broadcast_matmul(b)
}

/// The product left in f32 whatever the input dtype: attention scores feed an f32 softmax, and
/// PyTorch's fused attention never rounds them to bf16 in between. f32 inputs give exactly
/// `a.matmul(b)`.
pub fn matmul_f32(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dtype() == DType::F32 && b.dtype() == DType::F32 {
        return a.matmul(b);
    }
    if a.device().is_cpu() {
        return a.to_dtype(DType::F32)?.matmul(&b.to_dtype(DType::F32)?);
    }
    // On CUDA cuBLAS accumulates bf16 products in f32 already; the output is rounded to bf16
    // by candle's kernel, then widened.
    a.matmul(b)?.to_dtype(DType::F32)
}

/// `candle_nn::Linear::forward`; bf16 on the CPU runs in f32 with the bias added before the one
/// rounding (PyTorch's CPU addmm).
pub fn linear(l: &candle_nn::Linear, x: &Tensor) -> Result<Tensor> {
    use candle_core::Module;
    if !cpu_bf16(x) {
        return l.forward(x);
    }
    let y = x
        .to_dtype(DType::F32)?
        .broadcast_matmul(&l.weight().to_dtype(DType::F32)?.t()?)?;
    match l.bias() {
        Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
        None => y,
    }
    .to_dtype(x.dtype())
}

/// `candle_nn::Conv2d::forward`. On the CPU, f32 and bf16 (one group, dilation 1) run in
/// [`super::cpu_conv::conv2d_f32`], which gives candle's values faster; bf16, which candle's
/// CPU conv lacks, runs in f32 with the bias added before the one rounding.
pub fn conv2d(c: &candle_nn::Conv2d, x: &Tensor) -> Result<Tensor> {
    use candle_core::Module;
    let cfg = c.config();
    let supported = matches!(x.dtype(), DType::F32 | DType::BF16)
        && x.device().is_cpu()
        && cfg.groups == 1
        && cfg.dilation == 1;
    if !supported {
        return c.forward(x);
    }
    let packed = super::cpu_conv::PackedConv::new(c.weight(), c.bias())?;
    super::cpu_conv::conv2d_packed(
        &x.to_dtype(DType::F32)?,
        &packed,
        cfg.stride,
        super::Pad::uniform(cfg.padding),
    )?
    .to_dtype(x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn bf16_on_cpu_is_the_f32_product_rounded_once() -> Result<()> {
        let a = Tensor::randn(0f32, 1.0, (3, 70), &Device::Cpu)?.to_dtype(DType::BF16)?;
        let b = Tensor::randn(0f32, 1.0, (70, 5), &Device::Cpu)?.to_dtype(DType::BF16)?;
        let got = matmul(&a, &b)?;
        assert_eq!(got.dtype(), DType::BF16);
        let want = a
            .to_dtype(DType::F64)?
            .matmul(&b.to_dtype(DType::F64)?)?
            .to_dtype(DType::BF16)?;
        // The f32 sum of 70 exact products differs from the f64 one far below bf16's step.
        let got = got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let want = want.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let exact = got.iter().zip(&want).filter(|(g, w)| g == w).count();
        assert!(exact >= got.len() - 1, "{got:?} vs {want:?}");
        let s = matmul_f32(&a, &b)?;
        assert_eq!(s.dtype(), DType::F32);
        Ok(())
    }

    #[test]
    fn f32_is_candles_matmul_to_the_bit() -> Result<()> {
        let a = Tensor::randn(0f32, 1.0, (2, 4, 9), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 1.0, (2, 9, 3), &Device::Cpu)?;
        let want = a.matmul(&b)?.flatten_all()?.to_vec1::<f32>()?;
        for got in [matmul(&a, &b)?, matmul_f32(&a, &b)?] {
            assert_eq!(got.flatten_all()?.to_vec1::<f32>()?, want);
        }
        Ok(())
    }
}
