//! Memory-lean building blocks shared by the VAE and the upscalers, and the CPU kernels that
//! candle lacks or runs slowly (bf16 matmul, conv, softmax).
//!
//! candle's conv2d is im2col + GEMM on CUDA: it materialises a `[H_out·W_out, k²·C_in]` column
//! buffer (4.8 GB in bf16 for the VAE decoder's 256-channel convs at 1024²), and its GroupNorm
//! keeps several full-size f32 temporaries alive. The layers here compute the same values in
//! bands of output rows and in chunks of groups, so transient memory is bounded by a
//! [`LeanBudget`] instead of growing with the image. [`LeanBudget::PLAIN`] runs candle's
//! unbanded ops unchanged, so plain and lean can be compared side by side.

pub mod conv;
pub mod cpu_conv;
pub mod group_norm;
pub mod matmul;
pub mod softmax;

pub use conv::{LeanConv2d, Pad};
pub use group_norm::LeanGroupNorm;

/// SiLU. On the CPU, bf16/f16 is computed in f32 and rounded once, as PyTorch's kernel does;
/// candle's CPU kernel rounds the exponential, the sum and the quotient separately.
pub fn silu(x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    use candle_core::DType;
    if matches!(x.dtype(), DType::BF16 | DType::F16) && x.device().is_cpu() {
        return x.to_dtype(DType::F32)?.silu()?.to_dtype(x.dtype());
    }
    x.silu()
}

/// Limits on the transient buffers of one lean op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeanBudget {
    /// Bytes of one conv band's im2col buffer (`rows·W_out × k²·C_in` elements of the input
    /// dtype). Bands are whole output rows, so a single row may exceed it.
    pub im2col_bytes: usize,
    /// Bytes of one GroupNorm chunk in f32 (the dtype its statistics are computed in).
    pub norm_bytes: usize,
}

impl LeanBudget {
    /// No banding or chunking: exactly candle's plain ops.
    pub const PLAIN: Self = Self {
        im2col_bytes: usize::MAX,
        norm_bytes: usize::MAX,
    };

    /// 256 MiB of im2col per band: at 1024² the worst VAE conv (256→256, 3×3) needs 4.8 GB in
    /// bf16, so ~19 bands of ~55 rows. Each band is still a `57k × 2304 × 256` GEMM (67 GFLOP,
    /// hundreds of 128×128 tiles per H100 SM wave), so banding costs no GEMM efficiency, and the
    /// extra launches (a few per band) are microseconds against milliseconds of compute.
    /// 64 MiB f32 per GroupNorm chunk: 2 of the 32 groups of a `[1, 256, 1024, 1024]` tensor, so
    /// ~16 chunks of a handful of element-wise kernels each.
    pub const DEFAULT: Self = Self {
        im2col_bytes: 256 << 20,
        norm_bytes: 64 << 20,
    };
}

impl Default for LeanBudget {
    fn default() -> Self {
        Self::DEFAULT
    }
}
