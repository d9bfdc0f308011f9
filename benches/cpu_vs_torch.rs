//! candle against PyTorch on the CPU, interleaved in one command so both see the same machine:
//! for every case, A B then B A, round after round, same thread count, after a warm-up. The load
//! average is recorded, and the CPU time other processes took during every round is measured
//! (machine busy time minus ours and the worker's): the table says when the machine was busy.
//! Run with `make bench-cpu` (needs the parity venv for PyTorch); writes target/bench/cpu_vs_torch.{md,json}.
//!
//! Flags after `--`: `--threads N` (2), `--rounds N` (5), `--cases a,b` (all), `--python PATH`.
//! Random weights: timing only.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use imagegen::cli::bench::versus::{self, Machine, Pair};
use imagegen::flux2::Quantization;
use imagegen::flux2::text_encoder::Qwen3TextEncoder;
use imagegen::flux2::transformer::{Flux2Transformer2DModel, Flux2TransformerConfig};
use imagegen::flux2::vae::{AutoencoderKLFlux2, AutoencoderKLFlux2Config};
use imagegen::upscale::rrdbnet::{RrdbConfig, RrdbNet};

mod support;

type Run = Box<dyn Fn()>;

/// The candle side of each case; shapes mirrored in benches/cpu_vs_torch_worker.py.
fn build(case: &str) -> Run {
    let dev = Device::Cpu;
    match case {
        "dit_forward" => {
            let (heads, double, single, joint, grid, text) = (6, 2, 4, 1536, 16, 128);
            let cfg: Flux2TransformerConfig = serde_json::from_value(serde_json::json!({
                "num_layers": double, "num_single_layers": single, "attention_head_dim": 128,
                "num_attention_heads": heads, "joint_attention_dim": joint,
            }))
            .unwrap();
            let make =
                |vb: support::Weights| Flux2Transformer2DModel::new(&cfg, vb, Quantization::None);
            let model = make(support::plain_weights(DType::F32, &dev, make)).unwrap();
            let n = grid * grid;
            let x = Tensor::randn(0f32, 1.0, (1, n, 128), &dev).unwrap();
            let ctx = Tensor::randn(0f32, 1.0, (1, text, joint), &dev).unwrap();
            let t = Tensor::new(&[0.5f32], &dev).unwrap();
            let img: Vec<f32> = (0..n)
                .flat_map(|i| [0.0, (i / grid) as f32, (i % grid) as f32, 0.0])
                .collect();
            let img = Tensor::from_vec(img, (n, 4), &dev).unwrap();
            let txt: Vec<f32> = (0..text).flat_map(|l| [0.0, 0.0, 0.0, l as f32]).collect();
            let txt = Tensor::from_vec(txt, (text, 4), &dev).unwrap();
            Box::new(move || {
                model.forward(&x, &ctx, &t, &img, &txt).unwrap();
            })
        }
        "vae_decode_128" | "vae_decode_512" => {
            let (blocks, latent) = if case == "vae_decode_128" {
                (vec![64, 128, 256, 256], 16)
            } else {
                (vec![128, 256, 512, 512], 64)
            };
            let cfg: AutoencoderKLFlux2Config =
                serde_json::from_value(serde_json::json!({ "block_out_channels": blocks }))
                    .unwrap();
            let make = |vb: support::Weights| AutoencoderKLFlux2::new(&cfg, vb);
            let vae = make(support::plain_weights(DType::F32, &dev, make)).unwrap();
            let z = Tensor::randn(0f32, 1.0, (1, 32, latent, latent), &dev).unwrap();
            Box::new(move || {
                vae.decode(&z).unwrap();
            })
        }
        "text_encoder" => {
            let (hidden, layers, seq) = (1024, 6, 512);
            let cfg = serde_json::from_value(serde_json::json!({
                "vocab_size": 4096, "hidden_size": hidden, "intermediate_size": hidden * 3,
                "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 8,
                "head_dim": hidden / 16, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0
            }))
            .unwrap();
            let outputs = [2, 4, 6];
            let make = |vb: support::Weights| {
                Qwen3TextEncoder::with_options(&cfg, &outputs, vb, seq, Quantization::None)
            };
            let enc = make(support::plain_weights(DType::F32, &dev, make)).unwrap();
            let ids: Vec<u32> = (0..seq as u32).map(|i| i % 4096).collect();
            let mask: Vec<u32> = (0..seq).map(|i| u32::from(i < 40)).collect();
            let ids = Tensor::from_vec(ids, (1, seq), &dev).unwrap();
            let mask = Tensor::from_vec(mask, (1, seq), &dev).unwrap();
            Box::new(move || {
                enc.forward(&ids, &mask).unwrap();
            })
        }
        "x4plus_64" => {
            let make = |vb: support::Weights| RrdbNet::new(&RrdbConfig::x4plus(), vb);
            let net = make(support::plain_weights(DType::F32, &dev, make)).unwrap();
            let x = Tensor::rand(0f32, 1.0, (1, 3, 64, 64), &dev).unwrap();
            Box::new(move || {
                net.forward(&x).unwrap();
            })
        }
        other => panic!("unknown case {other}"),
    }
}

/// The targets for candle / PyTorch.
fn target(case: &str) -> Option<f64> {
    match case {
        "dit_forward" => Some(1.2),
        "vae_decode_128" | "vae_decode_512" => Some(1.5),
        _ => None,
    }
}

struct Torch {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    version: String,
}

impl Torch {
    fn start(python: &str, threads: usize) -> Torch {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/cpu_vs_torch_worker.py"
        );
        let mut child = Command::new(python)
            .args([script, "--threads", &threads.to_string()])
            .env("OMP_NUM_THREADS", threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{python}: {e} (make parity-venv, or pass --python)"));
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut t = Torch {
            child,
            stdin,
            stdout,
            version: String::new(),
        };
        let ready = t.line();
        t.version = ready.strip_prefix("ready ").unwrap_or(&ready).to_string();
        t
    }

    fn line(&mut self) -> String {
        let mut s = String::new();
        self.stdout.read_line(&mut s).unwrap();
        assert!(!s.is_empty(), "the PyTorch worker exited");
        s.trim().to_string()
    }

    fn ask(&mut self, msg: &str) -> String {
        writeln!(self.stdin, "{msg}").unwrap();
        self.stdin.flush().unwrap();
        self.line()
    }
}

impl Drop for Torch {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

fn load() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| versus::parse_loadavg(&t))
        .unwrap_or(f64::NAN)
}

/// Clock ticks a second of /proc's CPU times (USER_HZ: 100 on every Linux this runs on).
const USER_HZ: f64 = 100.0;

/// The machine's busy ticks and this process's plus the worker's.
fn ticks(worker: u32) -> versus::Ticks {
    let read = |path: String| std::fs::read_to_string(path).unwrap_or_default();
    let pid = |p: String| versus::parse_pid_stat_ticks(&read(p)).unwrap_or(0);
    versus::Ticks {
        machine_busy: versus::parse_proc_stat_busy(&read("/proc/stat".into())).unwrap_or(0),
        ours: pid("/proc/self/stat".into()) + pid(format!("/proc/{worker}/stat")),
    }
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench targets without `--bench`: nothing to time.
        eprintln!("cpu_vs_torch: run with `make bench-cpu` (cargo bench --bench cpu_vs_torch)");
        return;
    }
    let threads: usize = flag(&args, "--threads").map_or(2, |s| s.parse().unwrap());
    let rounds: usize = flag(&args, "--rounds").map_or(5, |s| s.parse().unwrap());
    // Before candle's first op: its GEMMs and rayon's pool read this once.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    // The service binary's CPU pool setting, so the bench measures what ships.
    unsafe { imagegen::device::tune_cpu_pools() };
    let cases: Vec<String> = flag(&args, "--cases")
        .unwrap_or_else(|| {
            "dit_forward,vae_decode_128,vae_decode_512,text_encoder,x4plus_64".into()
        })
        .split(',')
        .map(str::to_string)
        .collect();
    let python = flag(&args, "--python").unwrap_or_else(|| {
        let venv = std::env::var("PARITY_VENV").unwrap_or_else(|_| ".venv-parity".into());
        format!("{}/{venv}/bin/python", env!("CARGO_MANIFEST_DIR"))
    });
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut machine = Machine {
        cpu: std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| versus::parse_cpu_model(&t))
            .unwrap_or_else(|| "unknown CPU".into()),
        cores,
        threads,
        load_samples: vec![load()],
        foreign_cores: Vec::new(),
    };
    let mut torch = Torch::start(&python, threads);
    let mut pairs = Vec::new();
    for case in &cases {
        eprintln!("{case}: building both sides, warming up");
        let candle = build(case);
        assert_eq!(torch.ask(&format!("setup {case}")), "ok");
        candle();
        torch.ask(&format!("run {case}"));
        let mut pair = Pair {
            case: case.clone(),
            target_ratio: target(case),
            ..Pair::default()
        };
        for round in 0..rounds {
            let (t0, before) = (Instant::now(), ticks(torch.child.id()));
            let time_candle = |pair: &mut Pair| {
                let t = Instant::now();
                candle();
                pair.candle_ms.push(t.elapsed().as_secs_f64() * 1e3);
            };
            let mut time_torch = |pair: &mut Pair| {
                let ms: f64 = torch.ask(&format!("run {case}")).parse().unwrap();
                pair.torch_ms.push(ms);
            };
            // A B, then B A: neither side always runs on a machine the other just warmed.
            if round % 2 == 0 {
                time_candle(&mut pair);
                time_torch(&mut pair);
            } else {
                time_torch(&mut pair);
                time_candle(&mut pair);
            }
            machine.load_samples.push(load());
            let after = ticks(torch.child.id());
            let wall = t0.elapsed().as_secs_f64();
            machine
                .foreign_cores
                .push(versus::foreign_cores(before, after, wall, USER_HZ));
        }
        eprintln!(
            "{case}: candle {:?} ms, torch {:?} ms",
            versus::spread(&pair.candle_ms).map(|s| s.median),
            versus::spread(&pair.torch_ms).map(|s| s.median)
        );
        pairs.push(pair);
    }
    let table = versus::table(&pairs, &machine, &torch.version);
    if machine.loaded() {
        eprintln!("WARNING: other processes used more than half the cores; the table is marked");
    }
    println!("{table}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cpu_vs_torch.md"), &table).unwrap();
    let json = serde_json::json!({ "machine": machine, "torch": torch.version, "pairs": pairs });
    std::fs::write(
        dir.join("cpu_vs_torch.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
}
