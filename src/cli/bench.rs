//! `imagegen bench`: the original's benchmark tables (load, memory at rest, text-to-image sizes,
//! multi-reference stress, upscale), each after a warm-up, as the median of several runs with
//! the peak device memory and the stage split; printed as markdown, optionally written as JSON
//! in the schema `benches/diffusers_baseline.py` also writes (`benches/compare.py` joins them).

pub mod cases;
pub mod harness;
pub mod memory;
pub mod random;
pub mod report;

use std::path::PathBuf;

use crate::device::DeviceKind;
use crate::flux2::Quantization;

/// Arguments of `imagegen bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Model: `4B`, `9B`, a hub repo id or a local directory (diffusers layout).
    #[arg(long, env = "MODEL_ID", default_value = "4B")]
    pub model: String,

    /// Build the architecture with RANDOM weights instead of loading any: `4B`, `9B`, or a model
    /// directory whose config.json files (and tokenizer) define it. Timing and memory match real
    /// weights; the images are noise.
    #[arg(long, value_name = "4B|9B|DIR")]
    pub random_weights: Option<String>,

    /// Tokenizer folder for `--random-weights 4B|9B` (any Qwen-style tokenizer.json: the text
    /// encoder always sees 512 tokens).
    #[arg(long, default_value = "tests/fixtures/flux2/tiny-model/tokenizer")]
    pub tokenizer: PathBuf,

    /// Transformer weight storage: none, fp8 or int8.
    #[arg(long, env = "QUANTIZATION", default_value = "none")]
    pub quantization: Quantization,

    /// Compute device.
    #[arg(long, value_enum, default_value_t = DeviceKind::Auto)]
    pub device: DeviceKind,

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

    /// Seed of the first run.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,

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
    let _cases = cases::select(&args.cases).map_err(anyhow::Error::msg)?;
    anyhow::bail!("imagegen bench: the FLUX.2 pipeline is not merged into this branch yet")
}
