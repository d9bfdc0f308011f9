//! FLUX.2 [klein] in candle: Qwen3 text encoder, DiT, VAE, flow-matching schedule, pipeline.
//!
//! Module names mirror the diffusers components; `VarBuilder` paths mirror checkpoint names.

pub mod config;
pub mod quant;
pub mod text_encoder;
pub mod tokenizer;
pub mod weights;

pub use quant::Quantization;
