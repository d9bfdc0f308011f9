//! Peak heap and wall time of the FLUX.2 VAE decoder and the x4plus upsampling head, candle's
//! plain ops against the memory-lean layers (`imagegen::nn`), side by side on the CPU in f32.
//!
//! RANDOM WEIGHTS: the real architectures (FLUX.2 VAE: block_out_channels [128, 256, 512, 512],
//! 2 layers per block, 32 groups, 32 latent channels; RealESRGAN_x4plus) with random values;
//! memory and time do not depend on the values. `make bench-vae-memory`.
//! `VAE_MEMORY_SIZES=256,512,1024` picks the decode sizes (default 256,512).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use imagegen::flux2::vae::{AutoencoderKLFlux2, AutoencoderKLFlux2Config};
use imagegen::nn::LeanBudget;
use imagegen::upscale::rrdbnet::{RrdbConfig, RrdbNet};

#[path = "../tests/common/meter.rs"]
mod meter;
use meter::{Meter, mib, peak_above_live, random_weights};

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

    let cfg: AutoencoderKLFlux2Config = serde_json::from_value(serde_json::json!({})).unwrap();
    let w = random_weights(DType::F32, |vb| {
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
    let w = random_weights(DType::F32, |vb| RrdbNet::new(&rcfg, vb).map(|_| ())).unwrap();
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
        "| case | plain peak MiB | lean peak MiB | lean/plain | plain s | lean s | lean/plain | max abs diff |"
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
