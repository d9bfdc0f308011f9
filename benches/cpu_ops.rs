//! The DiT bench's hot CPU ops one by one: its GEMM shapes (Linear layout, `x · Wᵀ`) and its
//! attention's two products and softmax, candle's softmax against `nn::softmax` interleaved in
//! one process. `make bench-cpu-ops` runs this, then benches/cpu_ops_torch.py (PyTorch's
//! counterparts at the same threads), and prints the load average before each.
//!
//! What it answers: whether a gap in `make bench-cpu`'s whole-model ratio comes from the GEMM
//! kernel itself (it does not: at these shapes candle's gemm matches PyTorch's MKL within a few
//! per cent) or from the ops around it.

use std::time::Instant;

use candle_core::{Device, Tensor};

/// Median of 30 calls after 5 warm-up calls, best of 3 such sets, in ms.
fn time(f: &dyn Fn()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..3 {
        for _ in 0..5 {
            f();
        }
        let mut ts: Vec<f64> = (0..30)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        ts.sort_by(f64::total_cmp);
        best = best.min(ts[15]);
    }
    best
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("cpu_ops: run with `make bench-cpu-ops`");
        return;
    }
    let dev = Device::Cpu;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "candle CPU ops, RAYON_NUM_THREADS={}, load average {}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    // (tokens, in, out) of the bench DiT's Linears: qkv, one stream's out, the MLP up/down, the
    // text stream, the single block's fused qkv+MLP and its output.
    for (m, k, n) in [
        (384, 768, 2304),
        (256, 768, 768),
        (384, 768, 9216),
        (384, 3072, 768),
        (128, 1536, 768),
        (384, 5376, 768),
    ] {
        let x = Tensor::randn(0f32, 1.0, (1, m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let ms = time(&|| {
            x.broadcast_matmul(&w.t().unwrap()).unwrap();
        });
        let gflops = 2.0 * (m * k * n) as f64 / ms / 1e6;
        println!("gemm {m}x{k}x{n}: {ms:.3} ms ({gflops:.0} GFLOP/s)");
    }
    let q = Tensor::randn(0f32, 1.0, (1, 6, 384, 128), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (1, 6, 384, 128), &dev).unwrap();
    let scores = q.matmul(&k.t().unwrap()).unwrap();
    println!(
        "attention q·kᵀ 6x384x384x128: {:.3} ms",
        time(&|| {
            q.matmul(&k.t().unwrap()).unwrap();
        })
    );
    println!(
        "attention p·v 6x384x384x128: {:.3} ms",
        time(&|| {
            scores.matmul(&k).unwrap();
        })
    );
    // Interleaved: candle's softmax, ours, candle's, ours.
    let (mut theirs, mut ours) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        theirs.push(time(&|| {
            candle_nn::ops::softmax_last_dim(&scores).unwrap();
        }));
        ours.push(time(&|| {
            imagegen::nn::softmax::softmax_last_dim(&scores).unwrap();
        }));
    }
    let (t, o) = (
        theirs.iter().copied().fold(f64::MAX, f64::min),
        ours.iter().copied().fold(f64::MAX, f64::min),
    );
    println!(
        "softmax 6x384x384: candle_nn {t:.3} ms, nn::softmax {o:.3} ms ({:.1}x faster)",
        t / o
    );
}
