//! Softmax over the last dimension, fast on the CPU.
//!
//! candle's CPU softmax calls the scalar `expf` once per element and divides every element by
//! the sum: on the DiT bench's attention scores (6 × 384 × 384 f32) it takes 1.5 ms where
//! PyTorch's vectorised kernel takes 0.28 ms. Here the exponential is a polynomial the compiler
//! vectorises (Cody–Waite range reduction, then the degree-5 minimax polynomial of the Cephes
//! library, ≤ 2 ulp on the range that matters), sums are taken in 8 lanes, and rows are scaled by
//! one reciprocal. Keys masked with −∞ get exactly 0, as with `expf`. Everything that is not f32
//! on the CPU goes to candle's op unchanged.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `candle_nn::ops::softmax_last_dim`, with the fast kernel for contiguous f32 on the CPU.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 && x.device().is_cpu() && x.rank() > 0 {
        return x.contiguous()?.apply_op1_no_bwd(&FastSoftmax);
    }
    candle_nn::ops::softmax_last_dim(x)
}

/// Below this, e^x is 0 in f32 (smallest normal, 2^-126, is e^-87.34).
const EXP_LOW: f32 = -87.336_55;
/// Above this, e^x overflows f32.
const EXP_HIGH: f32 = 88.376_26;

/// e^x to about 2 ulp for x in [EXP_LOW, EXP_HIGH]; 0 below (−∞ included), NaN for NaN.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4; // ln 2 split so that n·LN2_HI is exact for |n| ≤ 128
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(EXP_LOW, EXP_HIGH);
    let n = (xc * std::f32::consts::LOG2_E).round_ties_even();
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * z + r + 1.0;
    // n ∈ [−126, 127]: 2^n is a normal float built from its exponent bits.
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < EXP_LOW { 0.0 } else { y * scale }
}

const LANES: usize = 8;

#[inline(always)]
fn row_max(src: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let chunks = src.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            m[i] = if c[i] > m[i] { c[i] } else { m[i] };
        }
    }
    let mut max = m.into_iter().fold(f32::NEG_INFINITY, f32::max);
    for &v in tail {
        max = max.max(v);
    }
    max
}

#[inline(always)]
fn softmax_row(src: &[f32], dst: &mut [f32]) {
    let max = row_max(src);
    let mut acc = [0f32; LANES];
    let mut d_chunks = dst.chunks_exact_mut(LANES);
    let mut s_chunks = src.chunks_exact(LANES);
    for (d, s) in (&mut d_chunks).zip(&mut s_chunks) {
        for i in 0..LANES {
            d[i] = exp(s[i] - max);
            acc[i] += d[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (d, &s) in d_chunks
        .into_remainder()
        .iter_mut()
        .zip(s_chunks.remainder())
    {
        *d = exp(s - max);
        sum += *d;
    }
    let inv = 1.0 / sum;
    for d in dst.iter_mut() {
        *d *= inv;
    }
}

#[inline(always)]
fn softmax_rows(src: &[f32], dst: &mut [f32], row: usize) {
    for (s, d) in src.chunks_exact(row).zip(dst.chunks_exact_mut(row)) {
        softmax_row(s, d);
    }
}

fn softmax_rows_dispatch(src: &[f32], dst: &mut [f32], row: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { avx2::softmax_rows(src, dst, row) };
    }
    softmax_rows(src, dst, row)
}

/// The same kernel in AVX2 + FMA intrinsics, 8 lanes at a time (the compiler does not vectorise
/// the scalar one by itself).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{EXP_HIGH, EXP_LOW, LANES, exp};

    /// [`super::exp`] on 8 lanes, with fused multiply-adds.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp8(x: __m256) -> __m256 {
        // max/min return their second operand when one is NaN: NaN goes through.
        let xc = _mm256_min_ps(
            _mm256_set1_ps(EXP_HIGH),
            _mm256_max_ps(_mm256_set1_ps(EXP_LOW), x),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), xc);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        let y = _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
        let below = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(EXP_LOW));
        _mm256_blendv_ps(y, _mm256_setzero_ps(), below)
    }

    #[target_feature(enable = "avx2,fma")]
    fn lanes(v: __m256) -> [f32; LANES] {
        let mut out = [0f32; LANES];
        // SAFETY: `out` holds 8 f32.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
        out
    }

    #[target_feature(enable = "avx2,fma")]
    fn softmax_row(src: &[f32], dst: &mut [f32]) {
        let full = src.len() / LANES * LANES;
        let (body, tail) = src.split_at(full);
        let (dbody, dtail) = dst.split_at_mut(full);
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        for c in body.chunks_exact(LANES) {
            // SAFETY: `c` holds 8 f32.
            m = _mm256_max_ps(m, unsafe { _mm256_loadu_ps(c.as_ptr()) });
        }
        let max = lanes(m)
            .into_iter()
            .chain(tail.iter().copied())
            .fold(f32::NEG_INFINITY, f32::max);
        let vmax = _mm256_set1_ps(max);
        let mut acc = _mm256_setzero_ps();
        for (s, d) in body.chunks_exact(LANES).zip(dbody.chunks_exact_mut(LANES)) {
            // SAFETY: `s` and `d` hold 8 f32 each.
            let e = exp8(_mm256_sub_ps(unsafe { _mm256_loadu_ps(s.as_ptr()) }, vmax));
            unsafe { _mm256_storeu_ps(d.as_mut_ptr(), e) };
            acc = _mm256_add_ps(acc, e);
        }
        let mut sum: f32 = lanes(acc).iter().sum();
        for (d, &s) in dtail.iter_mut().zip(tail) {
            *d = exp(s - max);
            sum += *d;
        }
        let inv_sum = 1.0 / sum;
        let inv = _mm256_set1_ps(inv_sum);
        for d in dbody.chunks_exact_mut(LANES) {
            // SAFETY: `d` holds 8 f32.
            unsafe {
                let scaled = _mm256_mul_ps(_mm256_loadu_ps(d.as_ptr()), inv);
                _mm256_storeu_ps(d.as_mut_ptr(), scaled);
            }
        }
        for d in dtail {
            *d *= inv_sum;
        }
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax_rows(src: &[f32], dst: &mut [f32], row: usize) {
        for (s, d) in src.chunks_exact(row).zip(dst.chunks_exact_mut(row)) {
            softmax_row(s, d);
        }
    }
}

/// Rows per parallel task: enough elements that a task outweighs its scheduling.
fn rows_per_task(row: usize) -> usize {
    (16_384 / row.max(1)).max(1)
}

struct FastSoftmax;

impl CustomOp1 for FastSoftmax {
    fn name(&self) -> &'static str {
        "fast-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("fast softmax takes f32")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("fast softmax takes a contiguous input")
        };
        let src = &data[start..end];
        let row = *layout.dims().last().unwrap_or(&1);
        let mut dst = vec![0f32; src.len()];
        if row > 0 {
            let task = rows_per_task(row) * row;
            src.par_chunks(task)
                .zip(dst.par_chunks_mut(task))
                .for_each(|(s, d)| softmax_rows_dispatch(s, d, row));
        }
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_of_the_true_value() {
        let mut worst = 0;
        let mut x = EXP_LOW;
        while x <= 0.0 {
            let want = (x as f64).exp() as f32;
            worst = worst.max(ulps(exp(x), want));
            x += 1.3e-4;
        }
        for x in [0.5f32, 1.0, 10.0, 50.0, 88.0] {
            worst = worst.max(ulps(exp(x), (x as f64).exp() as f32));
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    /// The AVX2 kernel's exponential (fused multiply-adds, so not the scalar one's bits) holds
    /// the same bound, lane by lane, on CPUs that have it.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_exp_is_within_two_ulp_of_the_true_value() {
        use std::arch::x86_64::*;
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            eprintln!("no AVX2/FMA on this CPU: the scalar kernel runs, tested above");
            return;
        }
        let mut xs: Vec<f32> = (0..)
            .map(|i| EXP_LOW + i as f32 * 1.3e-4)
            .take_while(|&x| x <= 0.0)
            .collect();
        xs.extend([
            0.0,
            0.5,
            10.0,
            88.0,
            -100.0,
            f32::NEG_INFINITY,
            f32::NAN,
            -0.0,
        ]);
        while !xs.len().is_multiple_of(LANES) {
            xs.push(0.0);
        }
        let mut worst = 0;
        for c in xs.chunks_exact(LANES) {
            let mut out = [0f32; LANES];
            // SAFETY: AVX2 and FMA were detected; `c` and `out` hold 8 f32 each.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), avx2::exp8(_mm256_loadu_ps(c.as_ptr()))) };
            for (&x, &y) in c.iter().zip(&out) {
                match x {
                    x if x.is_nan() => assert!(y.is_nan()),
                    x if x < EXP_LOW => assert_eq!(y, 0.0, "exp({x})"),
                    x => worst = worst.max(ulps(y, (x as f64).exp() as f32)),
                }
            }
        }
        assert!(worst <= 2, "worst error {worst} ulp");
    }

    /// Against candle's op (scalar expf, division) on attention-like rows, row lengths that do
    /// and do not fill the 8 lanes, masked (−∞) keys and one row of equal scores.
    #[test]
    fn matches_candle_softmax_and_zeroes_masked_keys() -> Result<()> {
        let dev = Device::Cpu;
        for (rows, len) in [(37, 384), (5, 13), (3, 1), (64, 8)] {
            let x = (Tensor::randn(0f32, 4.0, (1, rows, len), &dev)?).contiguous()?;
            let got = softmax_last_dim(&x)?;
            let want = candle_nn::ops::softmax_last_dim(&x)?;
            let err = (&got - &want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(err <= 1e-6, "{rows}x{len}: max abs error {err}");
            let sums = got.sum(2)?.flatten_all()?.to_vec1::<f32>()?;
            assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
        }
        let mask = Tensor::new(
            &[[0f32, f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY, 2.0]],
            &dev,
        )?;
        let p = softmax_last_dim(&mask)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!((p[1], p[3]), (0.0, 0.0));
        let flat = softmax_last_dim(&Tensor::ones((1, 10), DType::F32, &dev)?)?;
        assert!(
            flat.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .all(|v| (v - 0.1).abs() < 1e-7)
        );
        // A transposed (non-contiguous) input gives the softmax of its logical rows.
        let t = Tensor::randn(0f32, 1.0, (9, 6), &dev)?.t()?;
        let err = (softmax_last_dim(&t)? - candle_nn::ops::softmax_last_dim(&t.contiguous()?)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(err <= 1e-6, "{err}");
        Ok(())
    }
}
