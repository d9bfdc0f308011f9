//! Per-step cost of the per-request LoRA side path on CPU (f32): one transformer forward with a
//! rank-r adapter on **every** Linear (the worst case) switched on, against the same model with
//! it off (= the base model, = a fused adapter). Rounds are interleaved (off, on, on, off, …)
//! after a warm-up; the 1-minute load average is sampled before and after, and the result is
//! marked when it was above half the cores. `make bench-lora` (`LORA_BENCH_RANK`, default 16;
//! `LORA_BENCH_ROUNDS`, default 6). Without `--bench` (cargo test --all-targets) a tiny config
//! runs one round so the bench is known to work. Writes target/bench/lora_cpu.md.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
mod support;
use imagegen::flux2::Quantization;
use imagegen::flux2::lora::{
    ActiveLoras, BaseLinears, Component, LoraAdapter, LoraFormat, LoraPair, SideLora,
};
use imagegen::flux2::transformer::{Flux2Transformer2DModel, Flux2TransformerConfig};

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let rank = env("LORA_BENCH_RANK", 16);
    let rounds = if bench_mode {
        env("LORA_BENCH_ROUNDS", 6)
    } else {
        1
    };
    // The mid-size shapes of benches/flux2_cpu.rs (D = 768, 2 double + 4 single blocks, 256
    // image and 128 text tokens); tiny in test mode.
    let (heads, double, single, joint, grid, text) = if bench_mode {
        (6, 2, 4, 1536, 16, 128)
    } else {
        (1, 1, 1, 64, 2, 4)
    };
    let dev = Device::Cpu;
    let cfg: Flux2TransformerConfig = serde_json::from_value(serde_json::json!({
        "num_layers": double, "num_single_layers": single, "attention_head_dim": 128,
        "num_attention_heads": heads, "joint_attention_dim": joint,
    }))
    .unwrap();
    let build = |vb: support::Weights| Flux2Transformer2DModel::new(&cfg, vb, Quantization::None);
    let mut model = build(support::plain_weights(DType::F32, &dev, build)).unwrap();

    // A random adapter on every Linear of the model.
    let base = BaseLinears::new(&cfg, None, "bench");
    let mut pairs = BTreeMap::new();
    for (name, &(out, inp)) in &base.transformer {
        let down = Tensor::randn(0f32, 1.0 / (inp as f32).sqrt(), (rank, inp), &dev).unwrap();
        let up = Tensor::randn(0f32, 0.1, (out, rank), &dev).unwrap();
        pairs.insert(
            (Component::Transformer, name.clone()),
            LoraPair {
                down,
                up,
                alpha_over_rank: 1.0,
            },
        );
    }
    let adapter = LoraAdapter {
        name: "bench".into(),
        source: "random".into(),
        format: LoraFormat::Diffusers,
        pairs,
    };
    let active = ActiveLoras::new(1);
    let mut attached = 0;
    for (name, linear) in model.linears_mut() {
        if let Some(p) = adapter.pair(Component::Transformer, &name) {
            linear.push_side_lora(SideLora::new(0, p, DType::F32, &dev, active.clone()).unwrap());
            attached += 1;
        }
    }
    assert_eq!(
        attached,
        base.transformer.len(),
        "every Linear carries the adapter"
    );

    let n = grid * grid;
    let x = Tensor::randn(0f32, 1.0, (1, n, 128), &dev).unwrap();
    let ctx = Tensor::randn(0f32, 1.0, (1, text, joint), &dev).unwrap();
    let t = Tensor::new(&[0.5f32], &dev).unwrap();
    let img_ids: Vec<f32> = (0..n)
        .flat_map(|i| [0.0, (i / grid) as f32, (i % grid) as f32, 0.0])
        .collect();
    let img_ids = Tensor::from_vec(img_ids, (n, 4), &dev).unwrap();
    let txt_ids: Vec<f32> = (0..text).flat_map(|l| [0.0, 0.0, 0.0, l as f32]).collect();
    let txt_ids = Tensor::from_vec(txt_ids, (text, 4), &dev).unwrap();
    let rope = model.rope(&txt_ids, &img_ids).unwrap();

    let step = |on: bool| {
        let _g = active.activate(if on { &[(0, 1.0)] } else { &[] });
        let t0 = Instant::now();
        let y = model.forward_with_rope(&x, &ctx, &t, &rope).unwrap();
        y.sum_all().unwrap().to_scalar::<f32>().unwrap();
        t0.elapsed().as_secs_f64() * 1e3
    };
    // warm-up, and the adapter must change the output (or the timing proves nothing)
    let y_off = {
        let _g = active.activate(&[]);
        model.forward_with_rope(&x, &ctx, &t, &rope).unwrap()
    };
    let y_on = {
        let _g = active.activate(&[(0, 1.0)]);
        model.forward_with_rope(&x, &ctx, &t, &rope).unwrap()
    };
    let changed = (y_on - &y_off)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(changed > 1e-4, "the side path changed nothing");

    let load_before = loadavg();
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        // A B B A: each order equally often, so a drift in machine load cancels.
        let order = if r % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for o in order {
            let ms = step(o);
            if o { on.push(ms) } else { off.push(ms) }
        }
    }
    let load_after = loadavg();
    let (m_off, m_on) = (median(&mut off), median(&mut on));
    let ratios: Vec<f64> = on.iter().zip(&off).map(|(a, b)| a / b).collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = candle_core::utils::get_num_threads();
    let busy = load_before.max(load_after) > cores as f64 / 2.0;
    let params: usize = base.transformer.values().map(|(o, i)| o * i).sum();
    let lora_params: usize = base.transformer.values().map(|(o, i)| rank * (o + i)).sum();
    let report = format!(
        "# LoRA side path, per-step cost on CPU (f32)\n\n\
         transformer D = {}, {double} double + {single} single blocks, {n} image + {text} text tokens, \
         adapter rank {rank} on all {attached} Linears ({:.2} % of their parameters)\n\n\
         | | median ms / forward (step) |\n|---|---|\n\
         | adapter off (= base = fused) | {m_off:.1} |\n| adapter on (side path) | {m_on:.1} |\n\n\
         ratio on/off: median {:.3} (per round: {}), {rounds} interleaved rounds after warm-up, \
         {threads} threads on {cores} cores, load average {load_before:.2} before / {load_after:.2} after{}\n",
        cfg.inner_dim(),
        100.0 * lora_params as f64 / params as f64,
        m_on / m_off,
        ratios
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(", "),
        if busy {
            " — **machine busy (load above half the cores): treat as indicative**"
        } else {
            ""
        }
    );
    println!("{report}");
    if bench_mode {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join("lora_cpu.md"), &report);
    }
}
