//! GroupNorm (optionally fused with SiLU) computed a few groups at a time.
//!
//! candle_nn's GroupNorm casts the whole input to f32 and keeps its centred copy, the
//! normalised copy and the affine results alive together: ~3.2 GB of transients on a
//! `[1, 256, 1024, 1024]` bf16 tensor. Here the same op sequence runs per chunk of groups
//! (statistics never cross groups), each chunk written into one preallocated output, so the f32
//! temporaries are bounded by the chunk budget.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct LeanGroupNorm {
    plain: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    channels: usize,
    eps: f64,
    norm_bytes: usize,
}

/// Loads `weight` and `bias` exactly as `candle_nn::group_norm` does.
pub fn lean_group_norm(
    groups: usize,
    channels: usize,
    eps: f64,
    norm_bytes: usize,
    vb: VarBuilder,
) -> Result<LeanGroupNorm> {
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    LeanGroupNorm::new(weight, bias, groups, eps, norm_bytes)
}

impl LeanGroupNorm {
    pub fn new(
        weight: Tensor,
        bias: Tensor,
        groups: usize,
        eps: f64,
        norm_bytes: usize,
    ) -> Result<Self> {
        let channels = weight.dims1()?;
        Ok(Self {
            plain: candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?,
            weight,
            bias,
            groups,
            channels,
            eps,
            norm_bytes,
        })
    }

    /// The same layer with another chunk budget (`usize::MAX`: candle_nn's GroupNorm).
    pub fn with_budget(mut self, norm_bytes: usize) -> Self {
        self.norm_bytes = norm_bytes;
        self
    }

    /// GroupNorm of `x` [B, C, ...].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false)
    }

    /// SiLU(GroupNorm(x)), as the VAE's resnets and output heads use it.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true)
    }

    /// Groups per chunk so a chunk's f32 copy stays within budget (at least one group).
    fn chunk_groups(&self, x: &Tensor) -> usize {
        let per_group = x.elem_count() / self.groups * DType::F32.size_in_bytes();
        (self.norm_bytes / per_group.max(1)).clamp(1, self.groups)
    }

    fn run(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        self.check(x)?;
        let dims = x.dims();
        let gc = self.chunk_groups(x);
        // Half-precision inputs always take the chunked path: candle's GroupNorm rounds the
        // normalised values before the affine; PyTorch applies weight and bias in f32 and
        // rounds once, and so does `chunk`.
        if gc >= self.groups && internal_dtype(x.dtype()) == x.dtype() {
            let y = self.plain.forward(x)?;
            return if silu { super::silu(&y) } else { Ok(y) };
        }
        let b = dims[0];
        let hidden = x.elem_count() / (b * self.groups);
        let cpg = self.channels / self.groups;
        let spatial = hidden / cpg;
        let xg = x.reshape((b, self.groups, hidden))?;
        let out = Tensor::zeros((b, self.groups, hidden), x.dtype(), x.device())?;
        for g0 in (0..self.groups).step_by(gc) {
            let n = gc.min(self.groups - g0);
            let y = self.chunk(&xg.narrow(1, g0, n)?.contiguous()?, g0 * cpg, spatial)?;
            let y = if silu { super::silu(&y)? } else { y };
            out.slice_set(&y.reshape((b, n, hidden))?, 1, g0)?;
        }
        out.reshape(dims)
    }

    /// Per-group mean and `sqrt(var + eps)` of `x` [B, C, ...], chunk by chunk with exactly
    /// the ops of [`Self::forward`], for normalising slices of `x` later
    /// ([`Self::silu_rows`]) without the full-size normalised tensor.
    pub fn stats(&self, x: &Tensor) -> Result<GroupNormStats> {
        self.check(x)?;
        let b = x.dims()[0];
        let hidden = x.elem_count() / (b * self.groups);
        let xg = x.reshape((b, self.groups, hidden))?;
        let gc = self.chunk_groups(x);
        let (mut means, mut denoms) = (Vec::new(), Vec::new());
        for g0 in (0..self.groups).step_by(gc) {
            let n = gc.min(self.groups - g0);
            let xc = xg.narrow(1, g0, n)?.contiguous()?;
            let x = xc.to_dtype(internal_dtype(xc.dtype()))?;
            let mean_x = (x.sum_keepdim(2)? / hidden as f64)?;
            let x = x.broadcast_sub(&mean_x)?;
            let norm_x = (x.sqr()?.sum_keepdim(2)? / hidden as f64)?;
            denoms.push((norm_x + self.eps)?.sqrt()?);
            means.push(mean_x);
        }
        Ok(GroupNormStats {
            mean: Tensor::cat(&means, 1)?,
            denom: Tensor::cat(&denoms, 1)?,
        })
    }

    /// SiLU(GroupNorm(x)) of `rows` [B, C, r, W], a slice of rows of the `x` whose `stats` are
    /// given: every element goes through the same element-wise ops as in
    /// [`Self::forward_silu`], so the values are the same to the bit.
    pub fn silu_rows(&self, stats: &GroupNormStats, rows: &Tensor) -> Result<Tensor> {
        self.check(rows)?;
        let dims = rows.dims();
        let b = dims[0];
        let x_dtype = rows.dtype();
        let x_normed = {
            let x = rows.to_dtype(internal_dtype(x_dtype))?;
            let x = x.reshape((b, self.groups, x.elem_count() / (b * self.groups)))?;
            x.broadcast_sub(&stats.mean)?.broadcast_div(&stats.denom)?
        };
        let mut w_dims = vec![1; dims.len()];
        w_dims[1] = self.channels;
        let internal = internal_dtype(x_dtype);
        let y = x_normed
            .reshape(dims)?
            .broadcast_mul(&self.weight.to_dtype(internal)?.reshape(w_dims.as_slice())?)?
            .broadcast_add(&self.bias.to_dtype(internal)?.reshape(w_dims.as_slice())?)?
            .to_dtype(x_dtype)?;
        super::silu(&y)
    }

    fn check(&self, x: &Tensor) -> Result<()> {
        let dims = x.dims();
        if dims.len() < 3 || dims[1] != self.channels {
            candle_core::bail!(
                "LeanGroupNorm: expected [B, {}, ...], got {dims:?}",
                self.channels
            );
        }
        Ok(())
    }

    /// candle_nn's GroupNorm op for op on `xc` [B, n, hidden] (groups starting at channel `c0`),
    /// so the result is the same to the bit.
    fn chunk(&self, xc: &Tensor, c0: usize, spatial: usize) -> Result<Tensor> {
        let (b, n, hidden) = xc.dims3()?;
        let x_dtype = xc.dtype();
        let internal = internal_dtype(x_dtype);
        // Scoped so the f32 copy and the centred values are freed as soon as they are used.
        let x_normed = {
            let x = {
                let x = xc.to_dtype(internal)?;
                let mean_x = (x.sum_keepdim(2)? / hidden as f64)?;
                x.broadcast_sub(&mean_x)?
            };
            let norm_x = (x.sqr()?.sum_keepdim(2)? / hidden as f64)?;
            x.broadcast_div(&(norm_x + self.eps)?.sqrt()?)?
        };
        let c = n * hidden / spatial;
        // Affine in the internal dtype, one rounding (PyTorch's half-precision GroupNorm).
        let w = self
            .weight
            .narrow(0, c0, c)?
            .to_dtype(internal)?
            .reshape((1, c, 1))?;
        let bias = self
            .bias
            .narrow(0, c0, c)?
            .to_dtype(internal)?
            .reshape((1, c, 1))?;
        x_normed
            .reshape((b, c, spatial))?
            .broadcast_mul(&w)?
            .broadcast_add(&bias)?
            .to_dtype(x_dtype)
    }
}

/// The per-group statistics of one input (from [`LeanGroupNorm::stats`]), `[B, G, 1]` each in
/// the f32 (or wider) dtype GroupNorm computes in.
#[derive(Debug, Clone)]
pub struct GroupNormStats {
    mean: Tensor,
    denom: Tensor,
}

/// candle_nn's GroupNorm computes half-precision inputs in f32.
fn internal_dtype(x: DType) -> DType {
    match x {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::conv::tests::bits;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        assert_eq!(a.dims(), b.dims());
        (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar()
    }

    /// Every chunk size (1 group to all but one, uneven last chunks included), with and without
    /// SiLU, f32 and bf16, batch 2, against candle_nn's f32 GroupNorm (+ silu), rounded once for
    /// bf16; and the statistics
    /// pass plus per-row-slice normalisation the fused conv uses, bitwise, on several slices.
    #[test]
    fn chunked_group_norm_equals_candle_group_norm() -> Result<()> {
        let randn = crate::nn::conv::tests::randn;
        let (groups, channels) = (6, 12);
        for dtype in [DType::F32, DType::BF16] {
            let x = ((randn(&[2, channels, 5, 7], 1)? * 2.0)? + 0.5)?.to_dtype(dtype)?;
            let w = randn(&[channels], 2)?.to_dtype(dtype)?;
            let b = randn(&[channels], 3)?.to_dtype(dtype)?;
            // bf16 as PyTorch computes it: normalised and scaled in f32, rounded once, then
            // SiLU in f32, rounded once.
            let f32 = |t: &Tensor| t.to_dtype(DType::F32);
            let reference = candle_nn::GroupNorm::new(f32(&w)?, f32(&b)?, channels, groups, 1e-6)?;
            let want = reference.forward(&f32(&x)?)?.to_dtype(dtype)?;
            let want_silu = f32(&want)?.silu()?.to_dtype(dtype)?;
            let gn = LeanGroupNorm::new(w, b, groups, 1e-6, usize::MAX)?;
            assert_eq!(max_diff(&gn.forward(&x)?, &want)?, 0.0);
            let group_bytes = x.elem_count() / groups * 4;
            for gc in 1..groups {
                let lean = gn.clone().with_budget(gc * group_bytes);
                assert_eq!(lean.chunk_groups(&x), gc);
                let d = max_diff(&lean.forward(&x)?, &want)?;
                let ds = max_diff(&lean.forward_silu(&x)?, &want_silu)?;
                // Same ops on the same group data: identical, not merely close.
                assert_eq!((d, ds), (0.0, 0.0), "{dtype:?}, {gc} groups/chunk");
            }
            // Statistics (any chunking) then any slice of rows: the same rows, to the bit.
            for gc in 1..=groups {
                let lean = gn.clone().with_budget(gc * group_bytes);
                let stats = lean.stats(&x)?;
                for (r0, n) in [(0, 5), (0, 1), (2, 1), (1, 3), (4, 1)] {
                    let got = lean.silu_rows(&stats, &x.narrow(2, r0, n)?)?;
                    let want = want_silu.narrow(2, r0, n)?;
                    assert!(
                        bits(&got)? == bits(&want)?,
                        "{dtype:?}, {gc} groups/chunk, rows {r0}+{n}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn rejects_wrong_channel_count() -> Result<()> {
        let dev = Device::Cpu;
        let gn = LeanGroupNorm::new(
            Tensor::ones(4, DType::F32, &dev)?,
            Tensor::zeros(4, DType::F32, &dev)?,
            2,
            1e-6,
            0,
        )?;
        assert!(
            gn.forward(&Tensor::zeros((1, 6, 2, 2), DType::F32, &dev)?)
                .is_err()
        );
        Ok(())
    }
}
