//! `imagegen bench`.

/// Arguments of `imagegen bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {}

pub fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("imagegen bench is not implemented yet")
}
