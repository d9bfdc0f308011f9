//! Conv2d in horizontal bands of output rows, optionally fused with a nearest 2× upsample.
//!
//! Each band slices only the input rows it reads (plus the kernel's halo), pads them explicitly
//! where the band touches the image border, and runs candle's unpadded conv on that slice: every
//! output element sees exactly the inputs and zeros it would in the unbanded conv. Bands are
//! written into one preallocated output with `slice_set`, so no band list and concatenated copy
//! coexist.

use candle_core::{DType, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::{LeanGroupNorm, cpu_conv};

/// Zero padding per side (the encoder's downsamplers pad only bottom and right).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pad {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

impl Pad {
    pub fn uniform(p: usize) -> Self {
        Self {
            top: p,
            bottom: p,
            left: p,
            right: p,
        }
    }

    fn as_uniform(&self) -> Option<usize> {
        (self.top == self.bottom && self.left == self.right && self.top == self.left)
            .then_some(self.top)
    }
}

/// A conv2d (square kernel, dilation 1, one group, optional bias) whose im2col is bounded.
#[derive(Debug, Clone)]
pub struct LeanConv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    pad: Pad,
    im2col_bytes: usize,
    /// Applied per band, so the pre-activation output never exists at full size.
    leaky_relu: Option<f64>,
}

/// Loads `weight` and `bias` exactly as `candle_nn::conv2d` does (same names, shapes, init).
pub fn lean_conv2d(
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    pad: Pad,
    im2col_bytes: usize,
    vb: VarBuilder,
) -> Result<LeanConv2d> {
    let cfg = Conv2dConfig {
        stride,
        ..Default::default()
    };
    let c = candle_nn::conv2d(c_in, c_out, k, cfg, vb)?;
    LeanConv2d::new(
        c.weight().clone(),
        c.bias().cloned(),
        stride,
        pad,
        im2col_bytes,
    )
}

impl LeanConv2d {
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        pad: Pad,
        im2col_bytes: usize,
    ) -> Result<Self> {
        let (_, _, kh, kw) = weight.dims4()?;
        if kh != kw || stride == 0 {
            candle_core::bail!("LeanConv2d: square kernels and stride ≥ 1 only ({kh}×{kw})");
        }
        if [pad.top, pad.bottom, pad.left, pad.right]
            .iter()
            .any(|&p| p >= kh)
        {
            // A band could then lie entirely in the padding.
            candle_core::bail!("LeanConv2d: padding {pad:?} must be smaller than the kernel {kh}");
        }
        Ok(Self {
            weight,
            bias,
            stride,
            pad,
            im2col_bytes,
            leaky_relu: None,
        })
    }

    /// Follows the conv with a leaky ReLU of `slope` (in [0, 1]).
    pub fn with_leaky_relu(mut self, slope: f64) -> Self {
        self.leaky_relu = Some(slope);
        self
    }

    /// The same layer with another im2col budget (`usize::MAX`: candle's plain conv).
    pub fn with_budget(mut self, im2col_bytes: usize) -> Self {
        self.im2col_bytes = im2col_bytes;
        self
    }

    fn k(&self) -> usize {
        self.weight.dims()[2]
    }

    /// The conv of `x` [B, C_in, H, W].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        self.run(x, h, w, false, None, None)
    }

    /// The conv of `norm.forward_silu(x)`, without the full-size normalised tensor: the group
    /// statistics come from one chunked pass over `x`, then each band normalises only the input
    /// rows it reads. Same bands and the same element-wise ops as the unfused pair, so the same
    /// values to the bit.
    pub fn forward_norm_silu(&self, x: &Tensor, norm: &LeanGroupNorm) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        self.run(x, h, w, false, Some(norm), None)
    }

    /// `self.forward(x) + acc`. Banded, the sum is written into `acc`'s storage band by band
    /// (no third full-size tensor), so `acc` must be a tensor no one else reads afterwards
    /// (e.g. a conv output about to be shadowed). Crate-private for that reason: the VAE's
    /// resnet shortcut is its one caller.
    pub(crate) fn forward_add(&self, x: &Tensor, acc: Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        self.run(x, h, w, false, None, Some(acc))
    }

    /// The conv of `x` upsampled 2× (nearest), without materialising the upsampled tensor.
    pub fn forward_up2(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        self.run(x, 2 * h, 2 * w, true, None, None)
    }

    /// Output rows per band so one band's im2col stays within budget (at least one row).
    fn band_rows(&self, x: &Tensor, h_out: usize, w_out: usize) -> Result<usize> {
        let (b, c_in, _, _) = x.dims4()?;
        let k = self.k();
        let row_bytes = b * w_out * k * k * c_in * x.dtype().size_in_bytes();
        Ok((self.im2col_bytes / row_bytes.max(1)).clamp(1, h_out.max(1)))
    }

    /// `h`, `w`: the (virtual, if `up2`) input size the conv sees; `norm`: SiLU(GroupNorm) applied
    /// to the input first; `acc`: added to the output (in place when banded).
    fn run(
        &self,
        x: &Tensor,
        h: usize,
        w: usize,
        up2: bool,
        norm: Option<&LeanGroupNorm>,
        acc: Option<Tensor>,
    ) -> Result<Tensor> {
        let (k, s, p) = (self.k(), self.stride, self.pad);
        let (hp, wp) = (p.top + h + p.bottom, p.left + w + p.right);
        if hp < k || wp < k {
            candle_core::bail!("LeanConv2d: input {h}×{w} smaller than the kernel {k}");
        }
        let (h_out, w_out) = ((hp - k) / s + 1, (wp - k) / s + 1);
        let rows = self.band_rows(x, h_out, w_out)?;
        if up2 && norm.is_some() {
            candle_core::bail!("LeanConv2d: no fused GroupNorm with the fused upsample");
        }
        if rows >= h_out {
            let x = match (up2, norm) {
                (true, _) => x.upsample_nearest2d(h, w)?,
                (false, Some(norm)) => norm.forward_silu(x)?,
                (false, None) => x.clone(),
            };
            let y = self.plain(&x)?;
            return match acc {
                Some(acc) => y + acc,
                None => Ok(y),
            };
        }
        let stats = norm.map(|n| n.stats(x)).transpose()?;
        let (b, _, _, _) = x.dims4()?;
        let c_out = self.weight.dims()[0];
        let add = acc.is_some();
        let out = match acc {
            Some(acc) => {
                if acc.dims() != [b, c_out, h_out, w_out] || !acc.is_contiguous() {
                    candle_core::bail!("LeanConv2d: cannot add {:?} in place", acc.dims());
                }
                acc
            }
            None => Tensor::zeros((b, c_out, h_out, w_out), x.dtype(), x.device())?,
        };
        let packed = self.cpu_packed(x)?;
        for r0 in (0..h_out).step_by(rows) {
            let r1 = (r0 + rows).min(h_out);
            // Padded-input rows [lo, hi) feed output rows [r0, r1); shift to unpadded rows.
            let lo = (r0 * s) as isize - p.top as isize;
            let hi = ((r1 - 1) * s + k) as isize - p.top as isize;
            let (src_lo, src_hi) = (lo.max(0) as usize, hi.min(h as isize) as usize);
            // Scoped so only the band's input outlives this statement.
            let band = {
                let src = if up2 {
                    up2_rows(x, src_lo, src_hi)?
                } else {
                    x.narrow(2, src_lo, src_hi - src_lo)?
                };
                let src = match (norm, &stats) {
                    (Some(norm), Some(stats)) => norm.silu_rows(stats, &src)?,
                    _ => src,
                };
                let band_pad = Pad {
                    top: (src_lo as isize - lo) as usize,
                    bottom: (hi - src_hi as isize) as usize,
                    ..p
                };
                (src, band_pad)
            };
            let y = self.conv_bias(&band.0, band.1, packed.as_ref())?;
            drop(band);
            let y = match self.leaky_relu {
                Some(slope) => leaky_relu_lean(&y, slope)?,
                None => y,
            };
            let y = if add {
                (y + out.narrow(2, r0, r1 - r0)?)?
            } else {
                y
            };
            out.slice_set(&y, 2, r0)?;
        }
        Ok(out)
    }

    /// candle_nn's `Conv2d::forward` (explicitly padded first when the padding is not uniform)
    /// and `candle_nn::ops::leaky_relu`.
    fn plain(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv_bias(x, self.pad, self.cpu_packed(x)?.as_ref())?;
        match self.leaky_relu {
            Some(slope) => candle_nn::ops::leaky_relu(&y, slope),
            None => Ok(y),
        }
    }

    /// The packed weight for [`cpu_conv`] when `x` takes that path (f32 or bf16 on the CPU),
    /// built once per call so the bands share it.
    fn cpu_packed(&self, x: &Tensor) -> Result<Option<cpu_conv::PackedConv>> {
        if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::BF16) {
            return cpu_conv::PackedConv::new(&self.weight, self.bias.as_ref()).map(Some);
        }
        Ok(None)
    }

    /// conv2d + bias with zero padding `pad`. With `packed` (f32 and bf16 on the CPU) it runs in
    /// [`cpu_conv`] (candle's values, without its NHWC and scatter passes, padding read in
    /// place); bf16, which candle's CPU conv lacks, is computed in f32 and rounded once after
    /// the bias, as PyTorch's CPU bf16 conv (oneDNN: f32 accumulation, bias in f32) does.
    fn conv_bias(
        &self,
        x: &Tensor,
        pad: Pad,
        packed: Option<&cpu_conv::PackedConv>,
    ) -> Result<Tensor> {
        if let Some(packed) = packed {
            let y = cpu_conv::conv2d_packed(&x.to_dtype(DType::F32)?, packed, self.stride, pad)?;
            return y.to_dtype(x.dtype());
        }
        let y = match pad.as_uniform() {
            Some(p) => x.conv2d(&self.weight, p, self.stride, 1, 1)?,
            None => x
                .pad_with_zeros(3, pad.left, pad.right)?
                .pad_with_zeros(2, pad.top, pad.bottom)?
                .conv2d(&self.weight, 0, self.stride, 1, 1)?,
        };
        self.add_bias(y)
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(bias) => y.broadcast_add(&bias.reshape((1, bias.dims1()?, 1, 1))?),
            None => Ok(y),
        }
    }
}

/// `max(x, slope·x)`: for slope in [0, 1] the same values as candle_nn's
/// `max(x, 0) + min(x, 0)·slope` (x ≥ 0: x + 0; x < 0: 0 + slope·x, both exact), with one
/// temporary instead of five.
pub fn leaky_relu_lean(x: &Tensor, slope: f64) -> Result<Tensor> {
    x.maximum(&(x * slope)?)
}

/// Rows [lo, hi) of `x` upsampled 2× (nearest), from the half-resolution rows they repeat.
fn up2_rows(x: &Tensor, lo: usize, hi: usize) -> Result<Tensor> {
    let (_, _, _, w) = x.dims4()?;
    let (slo, shi) = (lo / 2, (hi - 1) / 2 + 1);
    x.narrow(2, slo, shi - slo)?
        .upsample_nearest2d(2 * (shi - slo), 2 * w)?
        .narrow(2, lo - 2 * slo, hi - lo)
}

/// Bytes of the im2col buffer candle's CUDA conv2d would allocate for this conv unbanded
/// (`B·H_out·W_out × k²·C_in` elements): for computed GPU estimates.
pub fn im2col_bytes(
    b: usize,
    c_in: usize,
    h_out: usize,
    w_out: usize,
    k: usize,
    dtype: DType,
) -> usize {
    b * h_out * w_out * k * k * c_in * dtype.size_in_bytes()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::Device;

    /// Deterministic values in [−1, 1) (candle's CPU rng cannot be seeded).
    pub(crate) fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        assert_eq!(a.dims(), b.dims());
        (a - b)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_dtype(DType::F32)?
            .to_scalar()
    }

    /// Budget giving `rows` output rows per band for this input.
    fn budget_for_rows(x: &Tensor, c_in: usize, k: usize, w_out: usize, rows: usize) -> usize {
        let (b, _, _, _) = x.dims4().unwrap();
        rows * b * w_out * k * k * c_in * 4
    }

    struct Case {
        k: usize,
        stride: usize,
        pad: Pad,
        h: usize,
        w: usize,
    }

    fn cases() -> Vec<Case> {
        let asym = Pad {
            top: 0,
            bottom: 1,
            left: 0,
            right: 1,
        };
        vec![
            Case {
                k: 3,
                stride: 1,
                pad: Pad::uniform(1),
                h: 13,
                w: 11,
            },
            Case {
                k: 3,
                stride: 2,
                pad: Pad::uniform(1),
                h: 13,
                w: 11,
            },
            Case {
                k: 3,
                stride: 2,
                pad: asym,
                h: 14,
                w: 10,
            },
            Case {
                k: 3,
                stride: 2,
                pad: asym,
                h: 13,
                w: 9,
            },
            Case {
                k: 3,
                stride: 1,
                pad: Pad::uniform(0),
                h: 9,
                w: 7,
            },
            Case {
                k: 1,
                stride: 1,
                pad: Pad::uniform(0),
                h: 13,
                w: 11,
            },
            Case {
                k: 1,
                stride: 2,
                pad: Pad::uniform(0),
                h: 13,
                w: 11,
            },
        ]
    }

    /// Every band size from one row to the whole image minus one (so uneven last bands too),
    /// batch 2, against candle's conv2d on the explicitly padded input.
    #[test]
    fn banded_conv_equals_candle_conv2d() -> Result<()> {
        let (c_in, c_out) = (5, 6);
        let (mut worst, mut exact, mut total) = (0f32, 0, 0);
        for (i, c) in cases().into_iter().enumerate() {
            let x = randn(&[2, c_in, c.h, c.w], i as u64)?;
            let wgt = randn(&[c_out, c_in, c.k, c.k], 100 + i as u64)?;
            let bias = randn(&[c_out], 200 + i as u64)?;
            let want = x
                .pad_with_zeros(3, c.pad.left, c.pad.right)?
                .pad_with_zeros(2, c.pad.top, c.pad.bottom)?
                .conv2d(&wgt, 0, c.stride, 1, 1)?
                .broadcast_add(&bias.reshape((1, c_out, 1, 1))?)?;
            let (_, _, h_out, w_out) = want.dims4()?;
            let conv = LeanConv2d::new(wgt, Some(bias), c.stride, c.pad, usize::MAX)?;
            assert_eq!(max_diff(&conv.forward(&x)?, &want)?, 0.0, "plain, case {i}");
            for rows in 1..h_out {
                let budget = budget_for_rows(&x, c_in, c.k, w_out, rows);
                let lean = conv.clone().with_budget(budget);
                assert_eq!(lean.band_rows(&x, h_out, w_out)?, rows);
                let d = max_diff(&lean.forward(&x)?, &want)?;
                assert!(d <= 1e-6, "case {i}, {rows} rows/band: max |Δ| {d}");
                worst = worst.max(d);
                exact += usize::from(d == 0.0);
                total += 1;
            }
        }
        // Reported rather than required: a band's GEMM may block its reduction differently from
        // the whole image's, which moves the last bit of some f32 sums.
        eprintln!("banded conv: {exact}/{total} band sizes bitwise equal, worst max |Δ| {worst:e}");
        Ok(())
    }

    #[test]
    fn fused_upsample_conv_equals_upsample_then_conv() -> Result<()> {
        let (c_in, c_out) = (4, 3);
        for (i, (k, h, w)) in [(3, 7, 5), (3, 6, 9), (1, 5, 4)].into_iter().enumerate() {
            let pad = Pad::uniform(k / 2);
            let x = randn(&[2, c_in, h, w], 10 + i as u64)?;
            let wgt = randn(&[c_out, c_in, k, k], 20 + i as u64)?;
            let bias = randn(&[c_out], 30 + i as u64)?;
            let want = candle_nn::Conv2d::new(
                wgt.clone(),
                Some(bias.clone()),
                Conv2dConfig {
                    padding: k / 2,
                    ..Default::default()
                },
            );
            let want = candle_nn::Module::forward(&want, &x.upsample_nearest2d(2 * h, 2 * w)?)?;
            let conv = LeanConv2d::new(wgt, Some(bias), 1, pad, usize::MAX)?;
            assert_eq!(max_diff(&conv.forward_up2(&x)?, &want)?, 0.0);
            for rows in 1..2 * h {
                let budget = budget_for_rows(&x, c_in, k, 2 * w, rows);
                let d = max_diff(&conv.clone().with_budget(budget).forward_up2(&x)?, &want)?;
                assert!(d <= 1e-6, "case {i}, {rows} rows/band: max |Δ| {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn lean_leaky_relu_is_bitwise_candles() -> Result<()> {
        let x = (randn(&[3, 1000], 5)? * 10.0)?;
        let x = Tensor::cat(&[x, Tensor::zeros((3, 1), DType::F32, &Device::Cpu)?], 1)?;
        for dtype in [DType::F32, DType::BF16] {
            let x = x.to_dtype(dtype)?;
            let (a, b) = (
                leaky_relu_lean(&x, 0.2)?.to_dtype(DType::F32)?,
                candle_nn::ops::leaky_relu(&x, 0.2)?.to_dtype(DType::F32)?,
            );
            let bits = |t: &Tensor| -> Result<Vec<u32>> {
                Ok(t.flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .map(|v| v.to_bits())
                    .collect())
            };
            assert_eq!(bits(&a)?, bits(&b)?, "{dtype:?}");
        }
        Ok(())
    }

    #[test]
    fn banded_conv_with_leaky_relu_equals_conv_then_leaky_relu() -> Result<()> {
        let x = randn(&[1, 4, 9, 6], 40)?;
        let wgt = randn(&[5, 4, 3, 3], 41)?;
        let bias = randn(&[5], 42)?;
        let bare = LeanConv2d::new(wgt, Some(bias), 1, Pad::uniform(1), usize::MAX)?;
        let lrelu = |t: Tensor| candle_nn::ops::leaky_relu(&t, 0.2);
        let (want, want_up) = (lrelu(bare.forward(&x)?)?, lrelu(bare.forward_up2(&x)?)?);
        let conv = bare.with_leaky_relu(0.2);
        assert_eq!(max_diff(&conv.forward(&x)?, &want)?, 0.0, "plain");
        for rows in 1..9 {
            let lean = conv.clone().with_budget(budget_for_rows(&x, 4, 3, 6, rows));
            let d = max_diff(&lean.forward(&x)?, &want)?;
            let d_up = max_diff(&lean.forward_up2(&x)?, &want_up)?;
            assert!(
                d.max(d_up) <= 1e-6,
                "{rows} rows/band: max |Δ| {d}, up2 {d_up}"
            );
        }
        Ok(())
    }

    /// The f32 bit patterns of `t`, for bitwise comparisons.
    pub(crate) fn bits(t: &Tensor) -> Result<Vec<u32>> {
        Ok(t.to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|v| v.to_bits())
            .collect())
    }

    /// Fused SiLU(GroupNorm) + conv against `LeanGroupNorm::forward_silu` then
    /// `LeanConv2d::forward` with the same budgets: f32 and f16 (candle's CPU matmul has no
    /// bf16; the bf16 normalisation is checked in group_norm's tests), batch 2, every band size from
    /// one row to the whole image minus one, GroupNorm statistics in one chunk and in
    /// one-group chunks, uniform and asymmetric padding, stride 1 and 2. Bitwise equal: the
    /// bands see the same rows, and every element goes through the same element-wise ops.
    #[test]
    fn fused_group_norm_silu_conv_is_bitwise_unfused() -> Result<()> {
        let (groups, c_in, c_out) = (3, 6, 5);
        let mut checked = 0;
        for dtype in [DType::F32, DType::F16] {
            for (i, c) in cases().into_iter().enumerate() {
                let x = ((randn(&[2, c_in, c.h, c.w], 300 + i as u64)? * 3.0)? + 0.7)?;
                let x = x.to_dtype(dtype)?;
                let wgt = randn(&[c_out, c_in, c.k, c.k], 400 + i as u64)?.to_dtype(dtype)?;
                let bias = randn(&[c_out], 500 + i as u64)?.to_dtype(dtype)?;
                let gw = randn(&[c_in], 600 + i as u64)?.to_dtype(dtype)?;
                let gb = randn(&[c_in], 700 + i as u64)?.to_dtype(dtype)?;
                let conv = LeanConv2d::new(wgt, Some(bias), c.stride, c.pad, usize::MAX)?;
                let (_, _, h_out, w_out) = conv.forward(&x)?.dims4()?;
                let group_bytes = x.elem_count() / groups * 4;
                for norm_bytes in [usize::MAX, group_bytes] {
                    let gn = LeanGroupNorm::new(gw.clone(), gb.clone(), groups, 1e-6, norm_bytes)?;
                    let n = gn.forward_silu(&x)?;
                    for rows in 1..=h_out {
                        let budget = match rows {
                            r if r == h_out => usize::MAX,
                            r => {
                                budget_for_rows(&x, c_in, c.k, w_out, r) / 4 * dtype.size_in_bytes()
                            }
                        };
                        let lean = conv.clone().with_budget(budget);
                        let want = lean.forward(&n)?;
                        let got = lean.forward_norm_silu(&x, &gn)?;
                        assert_eq!(got.dims(), want.dims());
                        assert!(
                            bits(&got)? == bits(&want)?,
                            "{dtype:?}, case {i}, norm budget {norm_bytes}, {rows} rows/band"
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 100);
        Ok(())
    }

    /// `forward_add` (in place per band) against `forward(x) + acc`, bitwise, every band size.
    #[test]
    fn banded_conv_add_is_bitwise_conv_plus_acc() -> Result<()> {
        for dtype in [DType::F32, DType::F16] {
            let x = randn(&[2, 4, 7, 5], 50)?.to_dtype(dtype)?;
            let wgt = randn(&[3, 4, 1, 1], 51)?.to_dtype(dtype)?;
            let bias = randn(&[3], 52)?.to_dtype(dtype)?;
            let acc = randn(&[2, 3, 7, 5], 53)?.to_dtype(dtype)?;
            let conv = LeanConv2d::new(wgt, Some(bias), 1, Pad::uniform(0), usize::MAX)?;
            for rows in 1..=7 {
                let budget = match rows {
                    7 => usize::MAX,
                    r => budget_for_rows(&x, 4, 1, 5, r) / 4 * dtype.size_in_bytes(),
                };
                let lean = conv.clone().with_budget(budget);
                let want = (lean.forward(&x)? + &acc)?;
                let got = lean.forward_add(&x, acc.copy()?)?;
                assert!(bits(&got)? == bits(&want)?, "{dtype:?}, {rows} rows/band");
            }
            let wrong = Tensor::zeros((2, 3, 6, 5), dtype, &Device::Cpu)?;
            assert!(
                conv.clone()
                    .with_budget(budget_for_rows(&x, 4, 1, 5, 2))
                    .forward_add(&x, wrong)
                    .is_err()
            );
        }
        Ok(())
    }

    #[test]
    fn rejects_padding_as_large_as_the_kernel() {
        let w = Tensor::zeros((2, 2, 1, 1), DType::F32, &Device::Cpu).unwrap();
        assert!(LeanConv2d::new(w, None, 1, Pad::uniform(1), 0).is_err());
    }
}
