//! The real model backends the server runs: the FLUX.2 pipeline and Real-ESRGAN.

use candle_core::Device;
use image::RgbImage;

use super::{BackendLoader, EngineError, ImageBackend, Upscale, UpscaleBackend};
use crate::config::ServeArgs;
use crate::upscale::{UpscaleError, Upscaler, UpscalerOptions};

/// Placeholder until the FLUX.2 pipeline is merged: loading fails with a clear message, so the
/// server reports `unhealthy` and never serves an image it did not really generate.
pub struct Unavailable;

impl ImageBackend for Unavailable {
    type References = ();

    fn encode_references(&self, _: &[RgbImage]) -> Result<(), EngineError> {
        Err(EngineError::NotLoaded)
    }

    fn generate(
        &self,
        _: &super::ItemParams,
        _: Option<&()>,
        _: &dyn Fn() -> bool,
    ) -> Result<RgbImage, EngineError> {
        Err(EngineError::NotLoaded)
    }
}

pub fn flux_loader(_args: &ServeArgs, _device: &Device) -> Option<BackendLoader<Unavailable>> {
    Some(Box::new(|| {
        Err(EngineError::ModelFiles(
            "this build has no FLUX.2 pipeline yet".into(),
        ))
    }))
}

impl From<UpscaleError> for EngineError {
    fn from(e: UpscaleError) -> Self {
        let msg = e.to_string();
        match e {
            UpscaleError::InvalidInput { .. } => EngineError::InvalidInput(msg),
            UpscaleError::WeightsMissing { .. }
            | UpscaleError::BadWeights { .. }
            | UpscaleError::Download { .. }
            | UpscaleError::Checksum { .. }
            | UpscaleError::Io { .. } => EngineError::ModelFiles(msg),
            UpscaleError::OutOfMemory { .. } | UpscaleError::Candle(_) => EngineError::Device(msg),
        }
    }
}

/// Real-ESRGAN, loaded per request on the worker's device.
pub struct RealEsrgan {
    pub options: UpscalerOptions,
    pub device: Device,
}

impl UpscaleBackend for RealEsrgan {
    type Upscaler = Upscaler;

    fn load(&self) -> Result<Upscaler, EngineError> {
        Ok(Upscaler::load(&self.options, &self.device)?)
    }
}

impl Upscale for Upscaler {
    fn upscale(&self, image: &RgbImage, scale: u32) -> Result<RgbImage, EngineError> {
        Ok(Upscaler::upscale(self, image, scale)?)
    }
}

/// The upscaler backend the server configuration asks for.
pub fn upscaler(args: &ServeArgs, device: &Device) -> RealEsrgan {
    RealEsrgan {
        options: UpscalerOptions {
            model: args.upscaler_model,
            weights_dir: args.upscaler_dir(),
            weights_file: args.upscaler_weights.clone(),
            tile: args.upscale_tile,
            tile_pad: 10,
            allow_download: args.upscaler_allow_download,
        },
        device: device.clone(),
    }
}
