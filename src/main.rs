//! The `imagegen` binary: `serve` (default), `generate`, `upscale`, `bench`, `download`.

use clap::{Parser, Subcommand};
use imagegen::cli::{bench, download, generate, upscale};
use imagegen::config::ServeArgs;

#[derive(Debug, Parser)]
#[command(
    name = "imagegen",
    version,
    about = "FLUX.2 [klein] image generation service"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP server (the default).
    Serve(ServeArgs),
    /// Generate one image from a prompt (and optional reference images).
    Generate(generate::GenerateArgs),
    /// Upscale one image with Real-ESRGAN.
    Upscale(upscale::UpscaleArgs),
    /// Benchmark generation and upscaling; prints markdown and JSON.
    Bench(bench::BenchArgs),
    /// Pre-fetch a model's files into the hub cache (resumable, with progress).
    Download(download::DownloadArgs),
}

fn main() -> anyhow::Result<()> {
    // SAFETY: first thing in main, before any thread is spawned.
    unsafe { imagegen::device::tune_cpu_pools() };
    let cli = Cli::parse();
    match cli.command {
        None => serve(ServeArgs::parse_from_env()),
        Some(Command::Serve(args)) => serve(args),
        Some(Command::Generate(args)) => generate::run(args),
        Some(Command::Upscale(args)) => upscale::run(args),
        Some(Command::Bench(args)) => bench::run(args),
        Some(Command::Download(args)) => download::run(args),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(imagegen::api::serve(args))
}
