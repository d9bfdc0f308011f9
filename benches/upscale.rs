//! RealESRGAN_x4plus forward on CPU (f32), random weights (timing only; same FLOPs as the real
//! network). Compare with `benches/upscale_torch.py` run on the same machine: `make bench-upscale`.
//! `UPSCALE_BENCH_SIZE` sets the square input side (default 256: about 2.4 TFLOP per pass, i.e.
//! minutes on a small CPU; use 64 on a 2-core box).

use std::time::Duration;

use candle_core::{DType, Device, Module, Tensor};
mod support;
use criterion::{Criterion, criterion_group, criterion_main};
use imagegen::upscale::rrdbnet::{RrdbConfig, RrdbNet};

fn bench(c: &mut Criterion) {
    // `cargo test --all-targets` runs this binary without `--bench` (criterion's test mode, one
    // pass): keep that pass tiny so `make test` does not spend minutes here.
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let size: usize = match std::env::var("UPSCALE_BENCH_SIZE")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(s) => s,
        None if bench_mode => 256,
        None => 8,
    };
    let dev = Device::Cpu;
    let build = |vb: support::Weights| RrdbNet::new(&RrdbConfig::x4plus(), vb);
    let net = build(support::plain_weights(DType::F32, &dev, build)).unwrap();
    let x = Tensor::rand(0f32, 1.0, (1, 3, size, size), &dev).unwrap();
    eprintln!(
        "candle x4plus forward, input {size}x{size}, {} threads",
        candle_core::utils::get_num_threads()
    );
    let mut g = c.benchmark_group("upscale");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(1));
    g.bench_function(format!("x4plus_forward_cpu_f32_{size}x{size}"), |b| {
        b.iter(|| net.forward(&x).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
