//! The real model backends the server runs: the FLUX.2 pipeline and Real-ESRGAN.

use candle_core::Device;
use image::RgbImage;

use super::{BackendLoader, EngineError, ImageBackend, ItemParams, Upscale, UpscaleBackend};
use crate::config::ServeArgs;
use crate::flux2::attention::AttentionReport;
use crate::flux2::pipeline::{
    Flux2Error, Flux2Pipeline, GenerateParams, LoadOptions, ReferenceLatents,
};
use crate::upscale::{UpscaleError, Upscaler, UpscalerOptions};

impl From<Flux2Error> for EngineError {
    fn from(e: Flux2Error) -> Self {
        let msg = e.to_string();
        match e {
            Flux2Error::InvalidInput { .. } | Flux2Error::InvalidReference(_) => {
                EngineError::InvalidInput(msg)
            }
            Flux2Error::ModelFiles(_) | Flux2Error::Tokenizer(_) => EngineError::ModelFiles(msg),
            Flux2Error::Cancelled => EngineError::Cancelled,
            Flux2Error::Candle(c) => EngineError::from_tensor(&c, msg),
            Flux2Error::Attention(_) => EngineError::Refused(msg),
        }
    }
}

/// The FLUX.2 [klein] pipeline.
pub struct Flux {
    pub pipeline: Flux2Pipeline,
}

impl ImageBackend for Flux {
    type References = ReferenceLatents;

    fn encode_references(&self, images: &[RgbImage]) -> Result<ReferenceLatents, EngineError> {
        Ok(self.pipeline.encode_references(images)?)
    }

    fn generate(
        &self,
        item: &ItemParams,
        refs: Option<&ReferenceLatents>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<RgbImage, EngineError> {
        let params = GenerateParams {
            prompt: item.prompt.clone(),
            width: item.width,
            height: item.height,
            num_steps: item.num_steps,
            seed: item.seed,
            guidance_scale: item.guidance_scale,
            latents: None,
            loras: item.loras.clone(),
        };
        let out = self.pipeline.generate(&params, refs, cancelled)?;
        tracing::debug!(
            text_encoder_ms = out.timings.text_encoder_ms,
            denoise_ms = out.timings.denoise_ms,
            vae_decode_ms = out.timings.vae_decode_ms,
            "generated"
        );
        Ok(out.image)
    }

    fn attention_report(&self) -> Option<AttentionReport> {
        Some(self.pipeline.attention_report().clone())
    }

    fn model_revision(&self) -> Option<String> {
        self.pipeline.revision().map(str::to_string)
    }

    fn lora_status(&self) -> Vec<crate::flux2::lora::LoraStatus> {
        self.pipeline.lora_status().to_vec()
    }
}

/// Loads the configured model on the worker thread (the token is passed, never logged).
pub fn flux_loader(args: &ServeArgs, device: &Device) -> Option<BackendLoader<Flux>> {
    let opts = LoadOptions {
        model_id: args.resolved_model_id(),
        quantization: args.model.quantization,
        text_encoder_quantization: args.resolved_text_encoder_quantization(),
        device: device.clone(),
        dtype: args.model.resolved_dtype(device),
        hf_token: args.token(),
        attention: args.model.attention.clone(),
        loras: args.lora_specs(),
    };
    Some(Box::new(move || {
        tracing::info!(
            model_id = %opts.model_id,
            quantization = %opts.quantization,
            text_encoder_quantization = %opts.text_encoder_quantization,
            dtype = ?opts.dtype,
            attention = %opts.attention,
            "Loading FLUX model"
        );
        Ok(Flux {
            pipeline: Flux2Pipeline::load(&opts)?,
        })
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
            UpscaleError::OutOfMemory { .. } => EngineError::OutOfMemory(msg),
            UpscaleError::Candle(c) => EngineError::from_tensor(&c, msg),
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

/// What the server does with device memory after each job: trim the CUDA pool to
/// `GPU_POOL_KEEP_MIB` (see [`super::DeviceMemory`]); nothing on the CPU.
pub fn device_memory(args: &ServeArgs, device: &Device) -> Box<dyn super::DeviceMemory> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        match crate::device::cuda::MemPool::of(d) {
            Ok(pool) => {
                return Box::new(CudaPoolTrim {
                    device: device.clone(),
                    pool,
                    keep_bytes: args.gpu_pool_keep_mib << 20,
                });
            }
            Err(e) => tracing::warn!("CUDA memory pool not trimmed after jobs: {e:#}"),
        }
    }
    let _ = (args, device);
    Box::new(super::NoDeviceMemory)
}

/// Trims the CUDA stream-ordered pool after each job.
#[cfg(feature = "cuda")]
struct CudaPoolTrim {
    device: Device,
    pool: crate::device::cuda::MemPool,
    keep_bytes: u64,
}

#[cfg(feature = "cuda")]
impl super::DeviceMemory for CudaPoolTrim {
    fn after_job(&self, job: &'static str) {
        // Frees are stream-ordered: wait for them before asking what is unused.
        if let Err(e) = self.device.synchronize() {
            tracing::warn!(job, error = %e, "device sync before trimming the pool failed");
            return;
        }
        let before = self.pool.reserved_now();
        match self.pool.trim_to(self.keep_bytes) {
            Ok(()) => tracing::debug!(
                job,
                reserved_before = before,
                reserved_after = self.pool.reserved_now(),
                keep = self.keep_bytes,
                "CUDA pool trimmed after the job"
            ),
            Err(e) => tracing::warn!(job, error = %e, "trimming the CUDA pool failed"),
        }
    }
}
