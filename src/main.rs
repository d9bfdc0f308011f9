//! The `imagegen` binary: `serve` (default), `generate`, `upscale`, `bench`.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("imagegen: not built yet")
}
