//! One FLUX.2 transformer forward and one VAE decode on CPU (f32) at a mid-size config with random
//! weights (timing only). Compare with `benches/flux2_torch.py` on the same machine and thread
//! count: `make bench-flux2-cpu`. Without `--bench` (criterion's test mode under
//! `cargo test --all-targets`) a tiny config keeps the single pass fast.

use std::time::Duration;

use candle_core::{DType, Device, Tensor};
mod support;
use criterion::{Criterion, criterion_group, criterion_main};
use imagegen::flux2::Quantization;
use imagegen::flux2::transformer::{Flux2Transformer2DModel, Flux2TransformerConfig};
use imagegen::flux2::vae::{AutoencoderKLFlux2, AutoencoderKLFlux2Config};

/// Mid-size shapes, mirrored in benches/flux2_torch.py.
struct Shapes {
    heads: usize,
    double: usize,
    single: usize,
    joint: usize,
    grid: usize,
    text: usize,
    vae_blocks: Vec<usize>,
    latent: usize,
}

fn shapes(bench_mode: bool) -> Shapes {
    if bench_mode {
        Shapes {
            heads: 6,
            double: 2,
            single: 4,
            joint: 1536,
            grid: 16,
            text: 128,
            vae_blocks: vec![64, 128, 256, 256],
            latent: 16,
        }
    } else {
        Shapes {
            heads: 1,
            double: 1,
            single: 1,
            joint: 64,
            grid: 2,
            text: 4,
            vae_blocks: vec![32, 32, 32, 32],
            latent: 2,
        }
    }
}

fn bench(c: &mut Criterion) {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let s = shapes(bench_mode);
    let dev = Device::Cpu;
    let tcfg: Flux2TransformerConfig = serde_json::from_value(serde_json::json!({
        "num_layers": s.double, "num_single_layers": s.single, "attention_head_dim": 128,
        "num_attention_heads": s.heads, "joint_attention_dim": s.joint,
    }))
    .unwrap();
    let build = |vb: support::Weights| Flux2Transformer2DModel::new(&tcfg, vb, Quantization::None);
    let model = build(support::plain_weights(DType::F32, &dev, build)).unwrap();
    let n = s.grid * s.grid;
    let x = Tensor::randn(0f32, 1.0, (1, n, 128), &dev).unwrap();
    let ctx = Tensor::randn(0f32, 1.0, (1, s.text, s.joint), &dev).unwrap();
    let t = Tensor::new(&[0.5f32], &dev).unwrap();
    let img_ids: Vec<f32> = (0..n)
        .flat_map(|i| [0.0, (i / s.grid) as f32, (i % s.grid) as f32, 0.0])
        .collect();
    let img_ids = Tensor::from_vec(img_ids, (n, 4), &dev).unwrap();
    let txt_ids: Vec<f32> = (0..s.text)
        .flat_map(|l| [0.0, 0.0, 0.0, l as f32])
        .collect();
    let txt_ids = Tensor::from_vec(txt_ids, (s.text, 4), &dev).unwrap();

    let vcfg: AutoencoderKLFlux2Config =
        serde_json::from_value(serde_json::json!({ "block_out_channels": s.vae_blocks })).unwrap();
    let build = |vb: support::Weights| AutoencoderKLFlux2::new(&vcfg, vb);
    let vae = build(support::plain_weights(DType::F32, &dev, build)).unwrap();
    let z = Tensor::randn(0f32, 1.0, (1, 32, s.latent, s.latent), &dev).unwrap();
    eprintln!(
        "candle flux2: D={} ({}+{} blocks), {n} image + {} text tokens; VAE {:?} decode {}x{} -> {}px; {} threads",
        tcfg.inner_dim(),
        s.double,
        s.single,
        s.text,
        s.vae_blocks,
        s.latent,
        s.latent,
        s.latent * 8,
        candle_core::utils::get_num_threads()
    );

    let mut g = c.benchmark_group("flux2_cpu");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g.bench_function("transformer_forward_f32", |b| {
        b.iter(|| model.forward(&x, &ctx, &t, &img_ids, &txt_ids).unwrap())
    });
    g.bench_function("vae_decode_f32", |b| b.iter(|| vae.decode(&z).unwrap()));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
