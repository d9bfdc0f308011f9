//! Qwen3 text-encoder forward on CPU (f32) at a mid-size config, zero weights (timing only: the
//! FLOPs are those of real weights). Baseline: `benches/text_encoder_torch.py`, same config,
//! tokens and thread count, run side by side by `make bench-text-encoder`.
//! Config: hidden 1024, 16 q / 8 kv heads x 64, MLP 3072, 6 layers (outputs 2, 4, 6), 1 x 512
//! tokens (40 real + pads). `TE_BENCH_LAYERS` overrides the layer count.
//! The `_fp8` / `_int8` runs store the projections quantized (`TEXT_ENCODER_QUANTIZATION`), so
//! their ratio to the plain run is the cost of dequantizing each weight at every forward.

use std::time::Duration;

use candle_core::{DType, Device, Tensor};
mod support;
use criterion::{Criterion, criterion_group, criterion_main};
use imagegen::flux2::Quantization;
use imagegen::flux2::config::Qwen3Config;
use imagegen::flux2::text_encoder::Qwen3TextEncoder;

fn bench(c: &mut Criterion) {
    // `cargo test --all-targets` runs this without `--bench` (one pass): keep it tiny there.
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let layers: usize = std::env::var("TE_BENCH_LAYERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if bench_mode { 6 } else { 2 });
    let (hidden, seq) = if bench_mode { (1024, 512) } else { (64, 32) };
    let cfg: Qwen3Config = serde_json::from_value(serde_json::json!({
        "vocab_size": 4096, "hidden_size": hidden, "intermediate_size": hidden * 3,
        "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": hidden / 16, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0
    }))
    .unwrap();
    let dev = Device::Cpu;
    let outputs: Vec<usize> = (1..=3).map(|k| k * layers / 3).filter(|&k| k > 0).collect();
    let build =
        |vb: support::Weights, q| Qwen3TextEncoder::with_options(&cfg, &outputs, vb, seq, q);
    let weights = support::plain_weights(DType::F32, &dev, |vb| build(vb, Quantization::None));
    let enc = |q| build(weights.clone(), q).unwrap();
    let real = seq.min(40);
    let ids: Vec<u32> = (0..seq as u32).map(|i| i % 4096).collect();
    let mask: Vec<u32> = (0..seq).map(|i| u32::from(i < real)).collect();
    let ids = Tensor::from_vec(ids, (1, seq), &dev).unwrap();
    let mask = Tensor::from_vec(mask, (1, seq), &dev).unwrap();
    eprintln!(
        "candle Qwen3 encoder: hidden {hidden}, {layers} layers, {seq} tokens, {} threads",
        candle_core::utils::get_num_threads()
    );
    let mut g = c.benchmark_group("text_encoder");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for (q, suffix) in [
        (Quantization::None, ""),
        (Quantization::Fp8, "_fp8"),
        (Quantization::Int8, "_int8"),
    ] {
        let enc = enc(q);
        g.bench_function(
            format!("qwen3_h{hidden}_l{layers}_t{seq}_cpu_f32{suffix}"),
            |b| b.iter(|| enc.forward(&ids, &mask).unwrap()),
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
