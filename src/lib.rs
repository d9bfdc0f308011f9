//! imagegen: FLUX.2 [klein] image generation and Real-ESRGAN upscaling behind an HTTP API.
//!
//! Data flows one way: request → validate (`api`) → queue → GPU worker (`engine`, which owns the
//! `flux2` pipeline and the `upscale` networks) → encode and upload (`io`) → response.

pub mod api;
pub mod cli;
pub mod config;
pub mod device;
pub mod engine;
pub mod flux2;
pub mod io;
pub mod limits;
pub mod model_args;
pub mod nn;
pub mod telemetry;
pub mod upscale;
