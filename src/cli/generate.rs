//! `imagegen generate`.

/// Arguments of `imagegen generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {}

pub fn run(_args: GenerateArgs) -> anyhow::Result<()> {
    anyhow::bail!("imagegen generate is not implemented yet")
}
