//! FLUX.2 [klein] in candle: Qwen3 text encoder, DiT, VAE, flow-matching schedule, pipeline.
//!
//! Module names mirror the diffusers components; `VarBuilder` paths mirror checkpoint names.

pub mod attention;
pub mod config;
mod layers;
pub mod lora;
pub mod pipeline;
pub mod quant;
pub mod reference;
pub mod rng;
pub mod scheduler;
pub mod text_encoder;
pub mod tokenizer;
pub mod transformer;
pub mod vae;
pub mod weights;

pub use quant::Quantization;
