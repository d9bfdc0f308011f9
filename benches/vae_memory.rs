//! Peak heap and wall time of the FLUX.2 VAE decoder and the x4plus upsampling head, candle's
//! plain ops against the memory-lean layers (`imagegen::nn`), side by side on the CPU in f32.
//!
//! RANDOM WEIGHTS: the real architectures (FLUX.2 VAE: block_out_channels [128, 256, 512, 512],
//! 2 layers per block, 32 groups, 32 latent channels; RealESRGAN_x4plus) with random values;
//! memory and time do not depend on the values. `make bench-vae-memory`.
//! `VAE_MEMORY_SIZES=256,512,1024` picks the decode sizes (default 256,512; empty: none).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use imagegen::flux2::vae::{AutoencoderKLFlux2, AutoencoderKLFlux2Config};
use imagegen::nn::LeanBudget;
use imagegen::upscale::rrdbnet::{RrdbConfig, RrdbNet};

#[path = "../tests/common/meter.rs"]
mod meter;
use meter::{Meter, mib, peak_above_live};
mod support;

#[global_allocator]
static GLOBAL: Meter = Meter;

struct Row {
    case: String,
    plain: (usize, f64),
    lean: (usize, f64),
    max_diff: f32,
}

/// Runs `f` on the plain and the lean model (same input, same weights): peak, seconds, and the
/// largest output difference.
fn side_by_side(case: String, plain: impl Fn() -> Tensor, lean: impl Fn() -> Tensor) -> Row {
    let timed = |f: &dyn Fn() -> Tensor| {
        let t = Instant::now();
        let (y, peak) = peak_above_live(f);
        (y, peak, t.elapsed().as_secs_f64())
    };
    let (y_plain, p_peak, p_s) = timed(&plain);
    let (y_lean, l_peak, l_s) = timed(&lean);
    let max_diff = (y_plain - y_lean)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let row = Row {
        case,
        plain: (p_peak, p_s),
        lean: (l_peak, l_s),
        max_diff,
    };
    eprintln!("done: {}", row.case);
    row
}

fn main() {
    let dev = Device::Cpu;
    let sizes: Vec<usize> = std::env::var("VAE_MEMORY_SIZES")
        .unwrap_or_else(|_| "256,512".into())
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse()
                .expect("VAE_MEMORY_SIZES: comma-separated sides")
        })
        .collect();
    let lean_budget = LeanBudget::DEFAULT;
    println!(
        "# VAE decode and x4plus head: plain vs lean (CPU, f32, RANDOM WEIGHTS, {} threads)\n",
        candle_core::utils::get_num_threads()
    );
    println!(
        "Lean budget: {} MiB im2col per conv band, {} MiB f32 per GroupNorm chunk. Peak = heap \
         high-water mark above what was live before the call (weights and input excluded).\n",
        lean_budget.im2col_bytes >> 20,
        lean_budget.norm_bytes >> 20
    );

    print_cuda_estimate(lean_budget);

    let cfg: AutoencoderKLFlux2Config = serde_json::from_value(serde_json::json!({})).unwrap();
    let w = support::plain_tensors(DType::F32, &Device::Cpu, |vb| {
        AutoencoderKLFlux2::new(&cfg, vb).map(|_| ())
    })
    .unwrap();
    let vae = |lean| {
        let vb = VarBuilder::from_tensors(w.clone(), DType::F32, &dev);
        AutoencoderKLFlux2::with_budget(&cfg, vb, lean).unwrap()
    };
    let (plain, lean) = (vae(LeanBudget::PLAIN), vae(lean_budget));
    drop(w);
    let mut rows = Vec::new();
    for side in sizes {
        let z = Tensor::randn(0f32, 1.0, (1, 32, side / 8, side / 8), &dev).unwrap();
        rows.push(side_by_side(
            format!("VAE decode {side}²"),
            || plain.decode(&z).unwrap(),
            || lean.decode(&z).unwrap(),
        ));
    }
    drop((plain, lean));

    // One upscaler tile as the service runs it (tile 256 + 2 × 10 padding): trunk features
    // [1, 64, 276, 276] through the ×4 head (conv_up1, conv_up2 at 552² and 1104², conv_hr,
    // conv_last). The 23-block trunk runs at 276² and is untouched by the lean layers.
    let rcfg = RrdbConfig::x4plus();
    let w = support::plain_tensors(DType::F32, &Device::Cpu, |vb| {
        RrdbNet::new(&rcfg, vb).map(|_| ())
    })
    .unwrap();
    let rrdb = |lean| {
        let vb = VarBuilder::from_tensors(w.clone(), DType::F32, &dev);
        RrdbNet::with_budget(&rcfg, vb, lean).unwrap()
    };
    let (plain, lean) = (rrdb(LeanBudget::PLAIN), rrdb(lean_budget));
    let feat = Tensor::randn(0f32, 1.0, (1, 64, 276, 276), &dev).unwrap();
    rows.push(side_by_side(
        "x4plus head, one 276² tile → 1104²".into(),
        || plain.upsample_head(feat.clone()).unwrap(),
        || lean.upsample_head(feat.clone()).unwrap(),
    ));

    println!(
        "\n## Measured (CPU, f32, random weights)\n\n| case | plain peak MiB | lean peak MiB | lean/plain | plain s | lean s | lean/plain | max abs diff |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.1} | {:.1} | {:.2} | {:.1e} |",
            r.case,
            mib(r.plain.0),
            mib(r.lean.0),
            r.lean.0 as f64 / r.plain.0 as f64,
            r.plain.1,
            r.lean.1,
            r.lean.1 / r.plain.1,
            r.max_diff
        );
    }
}

/// COMPUTED, NOT MEASURED: a first-order model of the bytes candle's CUDA path allocates in
/// bf16 on top of the weights, per op, for the FLUX.2 VAE. Plain = the code before the lean
/// layers (im2col + GEMM + NCHW copy per conv, candle_nn GroupNorm, materialised upsample,
/// shadowed intermediates kept alive); lean = `imagegen::nn` with `budget`. Counts full-size
/// activations and the dominant transients; ignores the mid attention (at 1/8 resolution) and
/// allocator rounding.
struct CudaModel {
    lean: bool,
    budget: LeanBudget,
}

const BF16: usize = 2;

fn t(c: usize, side: usize) -> usize {
    c * side * side * BF16
}

impl CudaModel {
    /// GroupNorm + SiLU of an `x`-byte tensor: peak extra bytes, output included.
    fn gn_silu(&self, x: usize) -> usize {
        if !self.lean || self.budget.norm_bytes >= 2 * x {
            // f32 copy, centred and normalised (2x each), then bf16 normalised, scaled, shifted.
            9 * x
        } else {
            // Output, plus a chunk's f32 copy, centred values and their squares.
            x + 3 * self.budget.norm_bytes
        }
    }

    /// Lean GroupNorm statistics pass over an `x`-byte tensor: a chunk's f32 copy, centred
    /// values and their squares.
    fn gn_stats(&self, x: usize) -> usize {
        3 * self.budget.norm_bytes.min(2 * x)
    }

    /// Lean rows per band of a k×k conv ci at output side `side`; `None` when one band covers
    /// the image (then the plain op runs).
    fn band_rows(&self, ci: usize, k: usize, side: usize) -> Option<usize> {
        let row = t(ci, side) * k * k / side;
        let rows = (self.budget.im2col_bytes / row).clamp(1, side);
        (self.lean && rows < side).then_some(rows)
    }

    /// Lean `conv(SiLU(GroupNorm(x)))`, 3×3 stride 1 (`LeanConv2d::forward_norm_silu`): peak
    /// extra bytes, output included. Phases: the statistics pass (before the output exists);
    /// per band, the normalisation of its input rows (f32 copy, centred and divided, then bf16
    /// normalised, scaled, shifted and SiLU: at most 6 band inputs in bf16 units); the conv.
    fn conv_norm_silu(&self, ci: usize, co: usize, side: usize) -> usize {
        let x = t(ci, side);
        match self.band_rows(ci, 3, side) {
            None => self
                .gn_silu(x)
                .max(x + self.conv(ci, co, 3, side, 1, false)),
            Some(rows) => {
                let band_in = (rows + 2) * x / side;
                let y = t(co, side);
                (self.gn_stats(x))
                    .max(y + 6 * band_in)
                    .max(self.conv(ci, co, 3, side, 1, false))
            }
        }
    }

    /// Lean `conv(x) + acc` for a 1×1 conv, banded sums written into `acc` in place
    /// (`LeanConv2d::forward_add`): peak extra bytes beyond `acc`.
    fn conv1x1_add(&self, ci: usize, co: usize, side: usize) -> usize {
        let y = t(co, side);
        match self.band_rows(ci, 1, side) {
            None => self.conv(ci, co, 1, side, 1, false) + y,
            Some(rows) => self.conv(ci, co, 1, side, 1, false) - y + rows * y / side,
        }
    }

    /// k×k conv ci → co with output side `side` (input side `side·stride`, or `side/2` fused
    /// upsampled): peak extra bytes, output included.
    fn conv(&self, ci: usize, co: usize, k: usize, side: usize, stride: usize, up2: bool) -> usize {
        let (x_conv, y) = (t(ci, side), t(co, side));
        let col = x_conv * k * k; // im2col: one k²·ci column per output pixel
        let row = col / side;
        let rows = (self.budget.im2col_bytes / row).clamp(1, side);
        if !self.lean || rows >= side {
            // im2col, GEMM result and its NCHW copy; the materialised upsampled or padded input.
            let input_copy = if up2 || stride == 2 {
                t(ci, side * stride)
            } else {
                0
            };
            return col + 2 * y + input_copy;
        }
        // Output, plus per band: its padded input rows (and their half-resolution source
        // upsampled; an unpadded 1×1 band is a view), the im2col, the GEMM result and its NCHW
        // copy.
        let band_in = (rows * stride + k) * t(ci, side * stride) / (side * stride);
        let copies = usize::from(k > 1) + usize::from(up2);
        let band_out = rows * y / side;
        y + band_in * copies + rows * row + 2 * band_out
    }

    /// Resnet ci → co at `side`, input held by the caller: the peak over its ops.
    fn resnet(&self, ci: usize, co: usize, side: usize) -> usize {
        let (x, y) = (t(ci, side), t(co, side));
        if self.lean {
            // The normalised inputs exist per band only; conv1's output lives through conv2;
            // the shortcut conv adds into conv2's output in place, the identity one allocates
            // the sum.
            let residual = if ci != co {
                x + y + self.conv1x1_add(ci, co, side)
            } else {
                x + 2 * y
            };
            return (x + self.conv_norm_silu(ci, co, side))
                .max(x + y + self.conv_norm_silu(co, co, side))
                .max(residual);
        }
        // Plain keeps GroupNorm's output and SiLU's output alive through the conv (temporaries
        // of one expression) and conv1's output through conv2 (a shadowed binding).
        let (n1, h1) = if self.lean { (x, 0) } else { (2 * x, y) };
        let mut peaks = vec![
            x + self.gn_silu(x),
            x + n1 + self.conv(ci, co, 3, side, 1, false),
            x + y + self.gn_silu(y),
            x + h1 + y * if self.lean { 1 } else { 2 } + self.conv(co, co, 3, side, 1, false),
        ];
        if ci != co {
            peaks.push(x + y + h1 + self.conv(ci, co, 1, side, 1, false));
        }
        peaks.into_iter().max().unwrap()
    }

    fn decoder(&self, n: usize) -> usize {
        let rev = [512, 512, 256, 128];
        let mut side = n / 8;
        let mut peaks = vec![self.conv(32, 512, 3, side, 1, false)];
        peaks.push(self.resnet(512, 512, side));
        let mut c_prev = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            peaks.push(self.resnet(c_prev, c, side));
            peaks.push(self.resnet(c, c, side));
            if i + 1 < rev.len() {
                peaks.push(t(c, side) + self.conv(c, c, 3, 2 * side, 1, true));
                side *= 2;
            }
            c_prev = c;
        }
        let x = t(128, n);
        if self.lean {
            peaks.push(x + self.conv_norm_silu(128, 3, n));
        } else {
            peaks.push(x + self.gn_silu(x));
            peaks.push(x + 2 * x + self.conv(128, 3, 3, n, 1, false));
        }
        peaks.into_iter().max().unwrap()
    }

    fn encoder(&self, n: usize) -> usize {
        let ch = [128, 256, 512, 512];
        let mut side = n;
        let mut peaks = vec![t(3, n) + self.conv(3, 128, 3, n, 1, false)];
        let mut c_in = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            peaks.push(self.resnet(c_in, c, side));
            peaks.push(self.resnet(c, c, side));
            if i + 1 < ch.len() {
                side /= 2;
                peaks.push(t(c, 2 * side) + self.conv(c, c, 3, side, 2, false));
            }
            c_in = c;
        }
        peaks.into_iter().max().unwrap()
    }
}

fn print_cuda_estimate(budget: LeanBudget) {
    let gb = |b: usize| b as f64 / 1e9;
    let plain = CudaModel {
        lean: false,
        budget,
    };
    let lean = CudaModel { lean: true, budget };
    println!("## COMPUTED, NOT MEASURED: CUDA bf16 model (peak GB above the weights)\n");
    println!("| case | plain GB | lean GB | lean/plain |");
    println!("|---|---:|---:|---:|");
    for n in [512, 1024, 1280] {
        let (p, l) = (plain.decoder(n), lean.decoder(n));
        println!(
            "| VAE decode {n}² | {:.2} | {:.2} | {:.2} |",
            gb(p),
            gb(l),
            l as f64 / p as f64
        );
    }
    for n in [768, 1024] {
        let (p, l) = (plain.encoder(n), lean.encoder(n));
        println!(
            "| VAE encode {n}² reference | {:.2} | {:.2} | {:.2} |",
            gb(p),
            gb(l),
            l as f64 / p as f64
        );
    }
}
