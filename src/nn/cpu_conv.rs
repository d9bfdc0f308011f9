//! The CPU convolution: NCHW in, NCHW out, im2col by row copies and one GEMM per chunk of
//! output rows.
//!
//! candle 0.11's CPU conv2d (its "tiled" path) first converts the whole input to NHWC on one
//! thread, then per tile of 512 pixels gathers every patch element with bounds checks and
//! scatters each result across all output channel planes. On the VAE decoder that bookkeeping,
//! not the GEMM, was most of the time (docs/benchmarks.md, "CPU profile"). Here each row of a
//! chunk's column matrix, one (kh, kw, c_in) tap, is a run of shifted input rows: plain slice
//! copies, built in parallel. The GEMM `W[C_out, K] · cols[K, rows·W_out]` then yields the chunk
//! already in NCHW order, and the bias is added while it is copied into place.
//!
//! The K order is candle's (kh, kw, c_in), so the products and their summation order are the
//! ones candle's GEMM sees: the output equals candle's conv2d to the bit (tested below).

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use super::conv::Pad;

/// Bytes of the column matrix of one chunk of output rows. Small enough to stay near the
/// caches and to add little to the peak (a chunk is a fraction of a band), large enough that
/// the GEMM's N is in the thousands for the VAE's shapes.
const CHUNK_COLS_BYTES: usize = 8 << 20;

/// A conv's weight and bias in the form the kernel reads: `[C_out, k²·C_in]` in (kh, kw, c_in)
/// order, bias as f32 values. Built once per layer call, so a banded conv packs its weight
/// once, not once per band.
pub struct PackedConv {
    w2d: Tensor,
    bias: Option<Vec<f32>>,
    c_in: usize,
    k: usize,
}

impl PackedConv {
    /// `weight` [C_out, C_in, k, k] (square kernel), `bias` [C_out]; any float dtype, packed as
    /// f32.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        if !weight.device().is_cpu() {
            candle_core::bail!("cpu conv2d: CPU tensors only");
        }
        let (c_out, c_in, kh, kw) = weight.dims4()?;
        if kh != kw {
            candle_core::bail!("cpu conv2d: square kernels only ({kh}×{kw})");
        }
        let w2d = weight
            .to_dtype(DType::F32)?
            .permute((0, 2, 3, 1))?
            .contiguous()?
            .reshape((c_out, kh * kw * c_in))?;
        let bias = bias
            .map(|t| t.to_dtype(DType::F32)?.to_vec1::<f32>())
            .transpose()?;
        if bias.as_ref().is_some_and(|v| v.len() != c_out) {
            candle_core::bail!("cpu conv2d: bias does not have {c_out} values");
        }
        Ok(Self {
            w2d,
            bias,
            c_in,
            k: kh,
        })
    }
}

/// `conv2d(x, weight) + bias` for f32 tensors on the CPU: square `k × k` kernel, `stride`,
/// zero padding `pad` per side, dilation 1, one group.
pub fn conv2d_f32(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: Pad,
) -> Result<Tensor> {
    if weight.dtype() != DType::F32 {
        candle_core::bail!("cpu conv2d: f32 CPU tensors only");
    }
    conv2d_packed(x, &PackedConv::new(weight, bias)?, stride, pad)
}

/// [`conv2d_f32`] with the weight already packed.
pub fn conv2d_packed(x: &Tensor, packed: &PackedConv, stride: usize, pad: Pad) -> Result<Tensor> {
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        candle_core::bail!("cpu conv2d: f32 CPU tensors only");
    }
    let x = x.contiguous()?;
    let (b, c, h, w) = x.dims4()?;
    let (k, w2d, bias) = (packed.k, &packed.w2d, &packed.bias);
    let c_out = w2d.dims()[0];
    if packed.c_in != c || stride == 0 {
        candle_core::bail!(
            "cpu conv2d: input {:?} against weight [{c_out}, {}, {k}, {k}] (stride {stride})",
            x.dims(),
            packed.c_in
        );
    }
    let (hp, wp) = (pad.top + h + pad.bottom, pad.left + w + pad.right);
    if hp < k || wp < k {
        candle_core::bail!("cpu conv2d: input {h}×{w} smaller than the kernel {k}");
    }
    let (h_out, w_out) = ((hp - k) / stride + 1, (wp - k) / stride + 1);
    let taps = k * k * c;
    let pointwise = k == 1 && stride == 1 && pad == Pad::uniform(0);

    let plane_out = h_out * w_out;
    let mut out = vec![0f32; b * c_out * plane_out];
    let rows = if pointwise {
        h_out // the input plane is the column matrix: no copy, one GEMM
    } else {
        (CHUNK_COLS_BYTES / (taps * w_out * 4).max(1)).clamp(1, h_out)
    };
    let geom = Geometry {
        c,
        h,
        w,
        k,
        stride,
        pad,
        w_out,
    };
    for bi in 0..b {
        let image = x.get(bi)?;
        let out_b = &mut out[bi * c_out * plane_out..(bi + 1) * c_out * plane_out];
        for r0 in (0..h_out).step_by(rows) {
            let r1 = (r0 + rows).min(h_out);
            let n = (r1 - r0) * w_out;
            let cols = if pointwise {
                image.reshape((c, h * w))?
            } else {
                let mut cols = vec![0f32; taps * n];
                with_cpu_slice(&image, |src| {
                    cols.par_chunks_mut(n)
                        .enumerate()
                        .for_each(|(row, dst)| geom.fill_row(src, row, r0..r1, dst))
                })?;
                Tensor::from_vec(cols, (taps, n), &Device::Cpu)?
            };
            let y = w2d.matmul(&cols)?;
            drop(cols);
            with_cpu_slice(&y, |ys| {
                out_b
                    .par_chunks_mut(plane_out)
                    .enumerate()
                    .for_each(|(co, plane)| {
                        let dst = &mut plane[r0 * w_out..r1 * w_out];
                        let src = &ys[co * n..(co + 1) * n];
                        match bias {
                            Some(bias) => {
                                let b = bias[co];
                                dst.iter_mut().zip(src).for_each(|(d, s)| *d = s + b);
                            }
                            None => dst.copy_from_slice(src),
                        }
                    })
            })?;
        }
    }
    Tensor::from_vec(out, (b, c_out, h_out, w_out), &Device::Cpu)
}

/// What one column-matrix row needs to know about the input and the conv.
struct Geometry {
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: Pad,
    w_out: usize,
}

impl Geometry {
    /// Column-matrix row `row` (tap (kh, kw) and channel c, in candle's order) for output rows
    /// `ys`: `dst[(y − ys.start)·W_out + x] = input[c, y·s + kh − top, x·s + kw − left]`, zero
    /// outside the input (`dst` arrives zeroed).
    fn fill_row(&self, image: &[f32], row: usize, ys: std::ops::Range<usize>, dst: &mut [f32]) {
        let (tap, ci) = (row / self.c, row % self.c);
        let (ki, kj) = (tap / self.k, tap % self.k);
        let plane = &image[ci * self.h * self.w..(ci + 1) * self.h * self.w];
        // Output columns whose input column lies inside the image.
        let off = kj as isize - self.pad.left as isize;
        let s = self.stride as isize;
        let x_lo = ceil_div(-off, s).max(0) as usize;
        let x_hi = (ceil_div(self.w as isize - off, s).max(0) as usize).min(self.w_out);
        for (ry, y) in ys.enumerate() {
            let iy = (y * self.stride + ki) as isize - self.pad.top as isize;
            if iy < 0 || iy >= self.h as isize || x_lo >= x_hi {
                continue;
            }
            let src = &plane[iy as usize * self.w..(iy as usize + 1) * self.w];
            let d = &mut dst[ry * self.w_out..(ry + 1) * self.w_out];
            let first = (x_lo as isize * s + off) as usize;
            if self.stride == 1 {
                d[x_lo..x_hi].copy_from_slice(&src[first..first + (x_hi - x_lo)]);
            } else {
                d[x_lo..x_hi]
                    .iter_mut()
                    .zip(src[first..].iter().step_by(self.stride))
                    .for_each(|(d, s)| *d = *s);
            }
        }
    }
}

/// ⌈a / b⌉ for b > 0.
fn ceil_div(a: isize, b: isize) -> isize {
    a.div_euclid(b) + (a.rem_euclid(b) != 0) as isize
}

/// Runs `f` on the f32 values of a contiguous CPU tensor, without a copy.
fn with_cpu_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if !t.is_contiguous() {
        candle_core::bail!("cpu conv2d: expected a contiguous tensor");
    }
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => {
            let start = layout.start_offset();
            Ok(f(&cpu.as_slice::<f32>()?[start..start + t.elem_count()]))
        }
        _ => candle_core::bail!("cpu conv2d: expected a CPU tensor"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::conv::tests::randn;

    fn candle(x: &Tensor, w: &Tensor, b: Option<&Tensor>, s: usize, p: Pad) -> Result<Tensor> {
        let x = x
            .pad_with_zeros(3, p.left, p.right)?
            .pad_with_zeros(2, p.top, p.bottom)?;
        let y = x.conv2d(w, 0, s, 1, 1)?;
        match b {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }

    #[test]
    fn equals_candles_conv_to_the_bit() -> Result<()> {
        let asym = Pad {
            top: 0,
            bottom: 1,
            left: 0,
            right: 1,
        };
        // (batch, c_in, c_out, h, w, k, stride, pad): 3×3 same, strided, asymmetric, 1×1,
        // a 1×1 with padding (not the pointwise shortcut) and a wide input.
        let cases = [
            (1, 5, 7, 13, 11, 3, 1, Pad::uniform(1)),
            (2, 4, 3, 13, 11, 3, 2, Pad::uniform(1)),
            (1, 6, 5, 14, 10, 3, 2, asym),
            (1, 3, 4, 9, 7, 3, 1, Pad::uniform(0)),
            (2, 8, 6, 5, 9, 1, 1, Pad::uniform(0)),
            (1, 3, 2, 5, 6, 1, 1, Pad::uniform(0)),
            (1, 16, 8, 40, 300, 3, 1, Pad::uniform(1)),
        ];
        for (i, &(bsz, ci, co, h, w, k, s, p)) in cases.iter().enumerate() {
            let x = randn(&[bsz, ci, h, w], 10 + i as u64)?;
            let wt = randn(&[co, ci, k, k], 20 + i as u64)?;
            let bias = randn(&[co], 30 + i as u64)?;
            for b in [None, Some(&bias)] {
                let ours = conv2d_f32(&x, &wt, b, s, p)?;
                let theirs = candle(&x, &wt, b, s, p)?;
                assert_eq!(ours.dims(), theirs.dims(), "case {i}");
                let (a, t) = (
                    ours.flatten_all()?.to_vec1::<f32>()?,
                    theirs.flatten_all()?.to_vec1::<f32>()?,
                );
                let differing = a.iter().zip(&t).filter(|(a, t)| a.to_bits() != t.to_bits());
                assert_eq!(differing.count(), 0, "case {i} (bias {})", b.is_some());
            }
        }
        Ok(())
    }

    #[test]
    fn chunks_of_rows_give_the_same_output_as_one_chunk() -> Result<()> {
        // 512 channels × 9 taps × 70 columns × 4 B = 1.3 MB a row: 6 rows a chunk, 4 chunks.
        let x = randn(&[1, 512, 22, 70], 1)?;
        let w = randn(&[4, 512, 3, 3], 2)?;
        let ours = conv2d_f32(&x, &w, None, 1, Pad::uniform(1))?;
        let theirs = candle(&x, &w, None, 1, Pad::uniform(1))?;
        let diff = (ours - theirs)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }

    #[test]
    fn rejects_mismatched_channels() {
        let x = randn(&[1, 3, 5, 5], 1).unwrap();
        let w = randn(&[2, 4, 3, 3], 2).unwrap();
        let err = conv2d_f32(&x, &w, None, 1, Pad::uniform(1)).unwrap_err();
        assert!(err.to_string().contains("against weight"), "{err}");
    }
}
