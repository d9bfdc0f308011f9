//! FLUX.2 [klein] in candle: Qwen3 text encoder, DiT, VAE, flow-matching schedule, pipeline.
//!
//! Module names mirror the diffusers components; `VarBuilder` paths mirror checkpoint names.

pub mod quant;

pub use quant::Quantization;
