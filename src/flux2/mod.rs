//! FLUX.2 [klein] in candle: Qwen3 text encoder, DiT, VAE, flow-matching schedule, pipeline.
