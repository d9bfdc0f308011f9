//! `imagegen bench`: the original's benchmark tables (load, memory at rest, text-to-image sizes,
//! multi-reference stress, upscale), each after a warm-up, as the median of several runs with
//! the peak device memory and the stage split; printed as markdown, optionally written as JSON
//! in the schema `benches/diffusers_baseline.py` also writes (`benches/compare.py` joins them).

pub mod cases;
pub mod harness;
pub mod memory;
pub mod random;
pub mod report;
pub mod versus;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device};
use image::RgbImage;

use self::cases::Case;
use self::harness::skipped;
use self::memory::MemProbe;
use self::random::RandomBackend;
use self::report::{CaseResult, Report, Stages};
use crate::flux2::pipeline::{Flux2Pipeline, GenerateParams, LoadOptions, StageTimings};
use crate::flux2::weights::ModelFiles;
use crate::model_args::{ModelArgs, dtype_name};
use crate::upscale::rrdbnet::{RrdbConfig, RrdbNet};
use crate::upscale::{Network, UpscaleModel, Upscaler, UpscalerOptions};

/// Arguments of `imagegen bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Model, token, weight storage, device and dtype (shared with `serve` and `generate`).
    #[command(flatten)]
    pub model: ModelArgs,

    /// Build the architecture with RANDOM weights instead of loading any: `4B`, `9B`, or a model
    /// directory whose config.json files (and tokenizer) define it. Timing and memory match real
    /// weights; the images are noise.
    #[arg(long, value_name = "4B|9B|DIR")]
    pub random_weights: Option<String>,

    /// Tokenizer folder for `--random-weights 4B|9B` (any Qwen-style tokenizer.json: the text
    /// encoder always sees 512 tokens).
    #[arg(long, default_value = "tests/fixtures/flux2/tiny-model/tokenizer")]
    pub tokenizer: PathBuf,

    /// Comma-separated cases: ids (`load`, `t2i-WxH`, `refsN-WxH`, `upscale-x4plus-S`), prefixes
    /// ending in `*` (`t2i-*`), or `all`.
    #[arg(long, default_value = "all")]
    pub cases: String,

    /// Timed runs per case (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,

    /// Untimed warm-up runs per case.
    #[arg(long, default_value_t = 1)]
    pub warmup: u32,

    /// Denoising steps.
    #[arg(long, default_value_t = 4)]
    pub steps: u32,

    /// Seed of every run.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,

    /// Side of the square reference images of the `refsN-…` cases (at least 64).
    #[arg(long, default_value_t = 768)]
    pub ref_size: u32,

    /// Real-ESRGAN x4plus weights for the upscale case; with `--random-weights` and no file the
    /// upscaler is random too.
    #[arg(long, env = "UPSCALER_WEIGHTS")]
    pub upscaler_weights: Option<PathBuf>,

    /// Write the JSON report here.
    #[arg(long)]
    pub json_out: Option<PathBuf>,

    /// Write the markdown table here (it is always printed to stdout).
    #[arg(long)]
    pub md_out: Option<PathBuf>,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let cases = cases::select(&args.cases).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        args.ref_size >= 64,
        "--ref-size {} is below the minimum 64",
        args.ref_size
    );
    let device = args.model.device.open()?;
    let dtype = args.model.resolved_dtype(&device);
    let probe = MemProbe::new(&device)?;
    let random = args.random_weights.is_some();
    if random {
        eprintln!("RANDOM WEIGHTS: timings and memory only; the images are noise.");
    }
    let mut report = Report {
        implementation: "imagegen".into(),
        implementation_version: env!("CARGO_PKG_VERSION").into(),
        weights: if random { "random" } else { "real" }.into(),
        model: args
            .random_weights
            .clone()
            .unwrap_or_else(|| args.model.model_id.clone()),
        quantization: args.model.quantization.to_string(),
        text_encoder_quantization: args.model.resolved_text_encoder_quantization().to_string(),
        dtype: dtype_name(dtype),
        device: if device.is_cuda() { "cuda" } else { "cpu" }.into(),
        device_name: device_name(&device),
        num_steps: args.steps,
        warmup: args.warmup,
        runs: args.runs,
        started_at: now_rfc3339(),
        attention: None,
        cases: vec![],
    };

    // Load (also memory at rest). Every other case needs the pipeline, so a failed load ends
    // the run with that one row.
    let _ = device.synchronize();
    probe.reset_peak();
    let t = Instant::now();
    let loaded = load_pipeline(&args, &device, dtype);
    let _ = device.synchronize();
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let (pipeline, fabricated) = match loaded {
        Ok(p) => p,
        Err(e) => {
            let mut row = skipped("load", format!("{e:#}"));
            row.status = "failed".into();
            report.cases.push(row);
            return finish(&args, &report);
        }
    };
    let attention = pipeline.attention_report();
    eprintln!(
        "attention: {} (requested {}; {})",
        attention.selected,
        attention.requested,
        serde_json::to_string(attention)?
    );
    report.attention = Some(attention.clone());
    if let Some((tensors, params)) = fabricated {
        eprintln!("RANDOM WEIGHTS: fabricated {tensors} tensors, {params} parameters");
    }
    if cases.contains(&Case::Load) {
        report.cases.push(CaseResult {
            case: "load".into(),
            status: "ok".into(),
            error: None,
            runs_ms: vec![load_ms],
            median_ms: Some(load_ms),
            stages: Stages::default(),
            peak_mem_bytes: probe.peak_bytes(),
            mem_after_bytes: probe.in_use_bytes(),
        });
        write_json(&args, &report)?;
    }

    let mut upscaler: Option<Result<Upscaler, String>> = None;
    let mut line = crate::cli::progress::ProgressLine::new("bench");
    let total = cases.len() as u64;
    for (done, case) in cases.iter().copied().enumerate() {
        let name = case.to_string();
        line.update(done as u64, total, &format!("case {name}"));
        let result = match case {
            Case::Load => continue,
            Case::T2i { w, h } => {
                let params = gen_params(&args, w, h);
                harness::measure(&name, args.warmup, args.runs, &device, &probe, || {
                    let g = pipeline.generate(&params, None, &|| false)?;
                    Ok(stages_of(&g.timings, None))
                })
            }
            Case::Refs { n, w, h } => {
                let images: Vec<RgbImage> = (0..n)
                    .map(|i| pattern_image(args.ref_size, i, args.seed))
                    .collect();
                let params = gen_params(&args, w, h);
                harness::measure(&name, args.warmup, args.runs, &device, &probe, || {
                    let t = Instant::now();
                    let refs = pipeline.encode_references(&images)?;
                    device.synchronize()?;
                    let enc = t.elapsed().as_secs_f64() * 1e3;
                    let g = pipeline.generate(&params, Some(&refs), &|| false)?;
                    Ok(stages_of(&g.timings, Some(enc)))
                })
            }
            Case::UpscaleX4 { side } => {
                let up = upscaler.get_or_insert_with(|| {
                    load_upscaler(&args, &device).map_err(|e| format!("{e:#}"))
                });
                match up {
                    Err(e) => skipped(&name, e.clone()),
                    Ok(up) => {
                        let img = pattern_image(side, 0, args.seed);
                        harness::measure(&name, args.warmup, args.runs, &device, &probe, || {
                            let t = Instant::now();
                            up.upscale(&img, 4)?;
                            Ok(Stages {
                                upscale_ms: Some(t.elapsed().as_secs_f64() * 1e3),
                                ..Default::default()
                            })
                        })
                    }
                }
            }
        };
        eprintln!(
            "{name}: {} {}",
            result.status,
            result
                .median_ms
                .map_or_else(String::new, |m| format!("{m:.1} ms"))
        );
        report.cases.push(result);
        // Written after every case, so a run cut short by a time limit keeps what it measured.
        write_json(&args, &report)?;
    }
    line.update(total, total, "done");
    finish(&args, &report)
}

/// The pipeline and, with random weights, how many tensors and parameters were fabricated.
type Loaded = (Flux2Pipeline, Option<(usize, u64)>);

fn load_pipeline(args: &BenchArgs, device: &Device, dtype: DType) -> anyhow::Result<Loaded> {
    let opts = LoadOptions {
        model_id: args.model.model_id.clone(),
        quantization: args.model.quantization,
        text_encoder_quantization: args.model.resolved_text_encoder_quantization(),
        device: device.clone(),
        dtype,
        hf_token: args.model.token(),
        attention: args.model.attention.clone(),
        loras: Vec::new(),
    };
    let Some(spec) = &args.random_weights else {
        return Ok((Flux2Pipeline::load(&opts)?, None));
    };
    // The architecture comes from config files: a preset under benches/configs (compiled in)
    // or a model directory. The tokenizer comes from the model directory if it has one.
    let dir = ScratchDir::new()?;
    let (src, tok): (Option<&Path>, PathBuf) = match spec.as_str() {
        "4B" | "4b" => {
            write_preset(dir.path(), &PRESET_4B)?;
            (None, args.tokenizer.clone())
        }
        "9B" | "9b" => {
            write_preset(dir.path(), &PRESET_9B)?;
            (None, args.tokenizer.clone())
        }
        other => {
            let p = Path::new(other);
            anyhow::ensure!(
                p.join("transformer/config.json").is_file(),
                "--random-weights {other}: expected 4B, 9B or a model directory with transformer/config.json"
            );
            (Some(p), p.join("tokenizer"))
        }
    };
    if let Some(src) = src {
        for f in [
            "model_index.json",
            "transformer/config.json",
            "text_encoder/config.json",
            "vae/config.json",
            "scheduler/scheduler_config.json",
        ] {
            let to = dir.path().join(f);
            std::fs::create_dir_all(to.parent().expect("file in a folder"))?;
            if src.join(f).is_file() {
                std::fs::copy(src.join(f), to)?;
            }
        }
    }
    std::fs::create_dir_all(dir.path().join("tokenizer"))?;
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        if tok.join(f).is_file() {
            std::fs::copy(tok.join(f), dir.path().join("tokenizer").join(f))?;
        }
    }
    anyhow::ensure!(
        dir.path().join("tokenizer/tokenizer.json").is_file(),
        "random weights need a tokenizer: {} has no tokenizer.json (see --tokenizer)",
        tok.display()
    );
    // A bf16 checkpoint has no fp8 scale tensors.
    let backend = RandomBackend::new(&[".weight_scale", ".scale_weight", ".input_scale"])
        .drawing_on(&opts.device);
    let b = backend.clone();
    let files = ModelFiles::local(dir.path())?
        .with_weights_from(Arc::new(move |dt, dev| b.var_builder(dt, dev)));
    let pipeline = Flux2Pipeline::from_files(&files, &opts)?;
    Ok((pipeline, Some(backend.fabricated())))
}

/// A private temporary folder, removed on drop (tempfile is only a dev-dependency).
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> std::io::Result<Self> {
        let p = std::env::temp_dir().join(format!(
            "imagegen-bench-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&p)?;
        Ok(Self(p))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Config files of a preset, compiled in so the binary benches 4B/9B anywhere.
struct Preset {
    files: [(&'static str, &'static str); 5],
}

const PRESET_4B: Preset = Preset {
    files: [
        (
            "model_index.json",
            include_str!("../../benches/configs/klein-4b/model_index.json"),
        ),
        (
            "transformer/config.json",
            include_str!("../../benches/configs/klein-4b/transformer/config.json"),
        ),
        (
            "text_encoder/config.json",
            include_str!("../../benches/configs/klein-4b/text_encoder/config.json"),
        ),
        (
            "vae/config.json",
            include_str!("../../benches/configs/klein-4b/vae/config.json"),
        ),
        (
            "scheduler/scheduler_config.json",
            include_str!("../../benches/configs/klein-4b/scheduler/scheduler_config.json"),
        ),
    ],
};

const PRESET_9B: Preset = Preset {
    files: [
        (
            "model_index.json",
            include_str!("../../benches/configs/klein-9b/model_index.json"),
        ),
        (
            "transformer/config.json",
            include_str!("../../benches/configs/klein-9b/transformer/config.json"),
        ),
        (
            "text_encoder/config.json",
            include_str!("../../benches/configs/klein-9b/text_encoder/config.json"),
        ),
        (
            "vae/config.json",
            include_str!("../../benches/configs/klein-9b/vae/config.json"),
        ),
        (
            "scheduler/scheduler_config.json",
            include_str!("../../benches/configs/klein-9b/scheduler/scheduler_config.json"),
        ),
    ],
};

fn write_preset(dir: &Path, preset: &Preset) -> anyhow::Result<()> {
    for (name, text) in preset.files {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().expect("file in a folder"))?;
        std::fs::write(p, text)?;
    }
    Ok(())
}

/// x4plus from `--upscaler-weights` or the default cache; with `--random-weights` and no file,
/// a random-weight x4plus (same network, same cost).
fn load_upscaler(args: &BenchArgs, device: &Device) -> anyhow::Result<Upscaler> {
    if args.random_weights.is_some() && args.upscaler_weights.is_none() {
        let dtype = if device.is_cuda() {
            DType::F16
        } else {
            DType::F32
        };
        let vb = RandomBackend::new(&[]).var_builder(dtype, device);
        let net = Network::Rrdb(Box::new(RrdbNet::new(&RrdbConfig::x4plus(), vb)?));
        return Ok(Upscaler::from_network(net, device, 256, 10)?);
    }
    let opts = UpscalerOptions {
        model: UpscaleModel::X4Plus,
        weights_dir: crate::upscale::default_cache_dir(),
        weights_file: args.upscaler_weights.clone(),
        tile: 256,
        tile_pad: 10,
        allow_download: false,
    };
    Upscaler::load(&opts, device)
        .map_err(|e| anyhow::anyhow!("{e} (pass --upscaler-weights, or use --random-weights)"))
}

fn gen_params(args: &BenchArgs, w: u32, h: u32) -> GenerateParams {
    GenerateParams {
        prompt: "A beautiful sunset over mountains".into(),
        width: w,
        height: h,
        num_steps: args.steps,
        seed: args.seed,
        guidance_scale: 1.0,
        latents: None,
        loras: Vec::new(),
    }
}

fn stages_of(t: &StageTimings, encode_refs_ms: Option<f64>) -> Stages {
    Stages {
        encode_refs_ms,
        text_encoder_ms: Some(t.text_encoder_ms),
        denoise_ms: Some(t.denoise_ms),
        vae_decode_ms: Some(t.vae_decode_ms),
        upscale_ms: None,
    }
}

/// A deterministic, non-trivial RGB image (shifted gradients plus noise), `i` varying it.
fn pattern_image(side: u32, i: u32, seed: u64) -> RgbImage {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(i as u64 + 1);
    RgbImage::from_fn(side, side, |x, y| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let n = (state >> 59) as u32; // 0..32
        image::Rgb([
            ((x + 37 * i + n) % 256) as u8,
            ((y + 91 * i + n) % 256) as u8,
            (((x + y) / 2 + 13 * i + n) % 256) as u8,
        ])
    })
}

fn device_name(device: &Device) -> String {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return d
            .cuda_stream()
            .context()
            .name()
            .unwrap_or_else(|e| format!("cuda ({e})"));
    }
    let _ = device;
    "cpu".into()
}

/// UTC now as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days; no date crate needed).
fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn write_json(args: &BenchArgs, report: &Report) -> anyhow::Result<()> {
    if let Some(p) = &args.json_out {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(p, serde_json::to_string_pretty(report)? + "\n")?;
    }
    Ok(())
}

/// Prints the table, writes the files; an error if any case failed (after writing them).
fn finish(args: &BenchArgs, report: &Report) -> anyhow::Result<()> {
    let md = report.to_markdown();
    println!("{md}");
    write_json(args, report)?;
    if let Some(p) = &args.md_out {
        std::fs::write(p, &md)?;
    }
    let failed: Vec<&str> = report
        .cases
        .iter()
        .filter(|c| c.status == "failed")
        .map(|c| c.case.as_str())
        .collect();
    anyhow::ensure!(
        failed.is_empty(),
        "{} case(s) failed: {}",
        failed.len(),
        failed.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_timestamp_format() {
        let s = now_rfc3339();
        assert_eq!(s.len(), 20, "{s}");
        assert!(
            s.starts_with("20") && s.ends_with('Z') && &s[10..11] == "T",
            "{s}"
        );
    }

    #[test]
    fn presets_parse_as_the_loaders_configs() {
        use crate::flux2::transformer::Flux2TransformerConfig;
        for (preset, hidden) in [(&PRESET_4B, 3072), (&PRESET_9B, 4096)] {
            let t: Flux2TransformerConfig = serde_json::from_str(preset.files[1].1).unwrap();
            t.validate().unwrap();
            assert_eq!(t.inner_dim(), hidden);
            let q: crate::flux2::config::Qwen3Config =
                serde_json::from_str(preset.files[2].1).unwrap();
            q.validate().unwrap();
            assert_eq!(3 * q.hidden_size, t.joint_attention_dim);
        }
    }
}
