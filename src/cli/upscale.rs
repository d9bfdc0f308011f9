//! `imagegen upscale`: one image file through Real-ESRGAN, as RealESRGANer would (gray stays
//! gray, alpha is upscaled by the network too).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;

use crate::device::DeviceKind;
use crate::upscale::{UpscaleModel, Upscaler, UpscalerOptions, default_cache_dir};

/// Arguments of `imagegen upscale`.
#[derive(Debug, clap::Args)]
pub struct UpscaleArgs {
    /// Input image (PNG, JPEG or WebP).
    #[arg(long)]
    pub input: PathBuf,
    /// Output image; the format follows the extension.
    #[arg(long)]
    pub output: PathBuf,
    /// Output scale: 2 or 4. A 4x model makes 2x by an OpenCV-exact Lanczos-4 downscale.
    #[arg(long, default_value_t = 4)]
    pub scale: u32,
    /// Network: x4plus (RealESRGAN_x4plus), x2plus (needs its file) or general-x4v3 (fast).
    #[arg(long, default_value = "x4plus")]
    pub model: UpscaleModel,
    /// Weights file (.pth, .safetensors or ncnn .param next to its .bin); default: the cache.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Cache folder for weight files.
    #[arg(long, env = "REALESRGAN_CACHE", default_value_os_t = default_cache_dir())]
    pub weights_dir: PathBuf,
    /// Do not download missing weights.
    #[arg(long)]
    pub no_download: bool,
    /// Tile size in input pixels (0 = whole image at once).
    #[arg(long, default_value_t = 256)]
    pub tile: u32,
    /// Context pixels around each tile.
    #[arg(long, default_value_t = 10)]
    pub tile_pad: u32,
    #[arg(long, value_enum, default_value_t = DeviceKind::Auto)]
    pub device: DeviceKind,
}

impl clap::ValueEnum for UpscaleModel {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::X4Plus, Self::X2Plus, Self::GeneralX4V3]
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
}

pub fn run(args: UpscaleArgs) -> anyhow::Result<()> {
    let device = args.device.open()?;
    let img = image::open(&args.input)
        .with_context(|| format!("reading --input {}", args.input.display()))?;
    let opts = UpscalerOptions {
        model: args.model,
        weights_dir: args.weights_dir,
        weights_file: args.weights,
        tile: args.tile,
        tile_pad: args.tile_pad,
        allow_download: !args.no_download,
    };
    let t0 = Instant::now();
    let up = Upscaler::load(&opts, &device)?;
    let t1 = Instant::now();
    // One call does every tile, so the line says when it starts and when it is done.
    let mut line = crate::cli::progress::ProgressLine::new("upscale");
    line.update(
        0,
        1,
        &format!("{}x{} x{}", img.width(), img.height(), args.scale),
    );
    let out = up.upscale_dynamic(&img, args.scale)?;
    line.update(1, 1, &format!("done, {:.1} s", t1.elapsed().as_secs_f64()));
    let t2 = Instant::now();
    out.save(&args.output)
        .with_context(|| format!("writing --output {}", args.output.display()))?;
    eprintln!(
        "{}x{} -> {}x{} with {} ({}) on {:?}: load {:.0} ms, upscale {:.0} ms",
        img.width(),
        img.height(),
        out.width(),
        out.height(),
        args.model.name(),
        up.weights_path().display(),
        device,
        (t1 - t0).as_secs_f64() * 1e3,
        (t2 - t1).as_secs_f64() * 1e3,
    );
    Ok(())
}
