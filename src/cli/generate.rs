//! `imagegen generate`: one image from a prompt (and optional reference images) to a PNG.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use candle_core::Device;

use crate::cli::progress::ProgressLine;
use crate::flux2::pipeline::{Flux2Pipeline, GenerateParams, LoadOptions};
use crate::model_args::{ModelArgs, dtype_name};

/// Arguments of `imagegen generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Model, token, weight storage, device and dtype (shared with `serve` and `bench`).
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub prompt: String,
    /// Floored to a multiple of 16.
    #[arg(long, default_value_t = 1024)]
    pub width: u32,
    /// Floored to a multiple of 16.
    #[arg(long, default_value_t = 1024)]
    pub height: u32,
    /// Denoising steps, 1 to 50 (4 for the distilled models).
    #[arg(long, default_value_t = 4)]
    pub steps: u32,
    /// Noise seed; random (and printed) when omitted.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Classifier-free guidance scale; only base (non-distilled) models use it.
    #[arg(long, default_value_t = 1.0)]
    pub guidance: f32,
    /// Reference image (repeat for several, up to 16).
    #[arg(long = "reference")]
    pub references: Vec<PathBuf>,
    /// Safetensors file with one f32 tensor `latents` [1, 128, H/16, W/16] replacing the noise.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Output PNG.
    #[arg(long)]
    pub output: PathBuf,
}

fn load_latents(path: &PathBuf, device: &Device) -> anyhow::Result<candle_core::Tensor> {
    let mut t = candle_core::safetensors::load(path, device)
        .with_context(|| format!("--latents {}: cannot read safetensors", path.display()))?;
    let l = t
        .remove("latents")
        .with_context(|| format!("--latents {}: no tensor named 'latents'", path.display()))?;
    anyhow::ensure!(
        l.dtype() == candle_core::DType::F32,
        "--latents {}: tensor 'latents' is {:?}, expected f32",
        path.display(),
        l.dtype()
    );
    Ok(l)
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let device = args.model.device.open()?;
    let dtype = args.model.resolved_dtype(&device);
    let references = args
        .references
        .iter()
        .map(|p| {
            image::open(p)
                .map(|i| i.to_rgb8())
                .with_context(|| format!("--reference {}: cannot read image", p.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let latents = args
        .latents
        .as_ref()
        .map(|p| load_latents(p, &device))
        .transpose()?;
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });

    let te_quant = args.model.resolved_text_encoder_quantization();
    let t = std::time::Instant::now();
    let pipeline = Flux2Pipeline::load(&LoadOptions {
        model_id: args.model.model_id.clone(),
        quantization: args.model.quantization,
        text_encoder_quantization: te_quant,
        device: device.clone(),
        dtype,
        hf_token: args.model.token(),
        attention: args.model.attention.clone(),
        loras: Vec::new(),
    })?;
    eprintln!(
        "attention: {}",
        serde_json::to_string(pipeline.attention_report())?
    );
    eprintln!(
        "loaded {} on {:?} ({}; transformer {}, text encoder {}) in {:.1}s",
        pipeline.model_id(),
        device,
        dtype_name(dtype),
        args.model.quantization,
        te_quant,
        t.elapsed().as_secs_f64()
    );
    let refs = if references.is_empty() {
        None
    } else {
        Some(pipeline.encode_references(&references)?)
    };
    let params = GenerateParams {
        prompt: args.prompt,
        width: args.width,
        height: args.height,
        num_steps: args.steps,
        seed,
        guidance_scale: args.guidance,
        latents,
        loras: Vec::new(),
    };
    // The pipeline asks "cancelled?" once before each denoising step: the CLI counts steps there.
    let steps = u64::from(args.steps);
    let line = RefCell::new(ProgressLine::new("denoise"));
    let step = Cell::new(0u64);
    let started = std::time::Instant::now();
    let on_step = || {
        let i = step.get();
        let detail = format!("step {i}/{steps}, {:.1} s", started.elapsed().as_secs_f64());
        line.borrow_mut().update(i, steps, &detail);
        step.set(i + 1);
        false
    };
    let out = pipeline.generate(&params, refs.as_ref(), &on_step)?;
    let detail = format!("done, {:.1} s", started.elapsed().as_secs_f64());
    line.borrow_mut().update(steps, steps, &detail);
    out.image
        .save_with_format(&args.output, image::ImageFormat::Png)
        .with_context(|| format!("--output {}: cannot write PNG", args.output.display()))?;
    let t = out.timings;
    eprintln!(
        "wrote {} ({}x{}, seed {seed}): text encoder {:.0} ms, denoise {:.0} ms, VAE decode {:.0} ms",
        args.output.display(),
        out.image.width(),
        out.image.height(),
        t.text_encoder_ms,
        t.denoise_ms,
        t.vae_decode_ms
    );
    Ok(())
}
