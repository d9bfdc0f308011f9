//! `imagegen upscale`.

/// Arguments of `imagegen upscale`.
#[derive(Debug, clap::Args)]
pub struct UpscaleArgs {}

pub fn run(_args: UpscaleArgs) -> anyhow::Result<()> {
    anyhow::bail!("imagegen upscale is not implemented yet")
}
