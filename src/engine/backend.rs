//! What the GPU worker needs from the models, as two small traits. The real implementations
//! (FLUX.2 pipeline, Real-ESRGAN) live in [`super::models`]; tests may supply their own.

use image::RgbImage;

use crate::device::fault::DeviceFault;

/// One image to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemParams {
    pub prompt: String,
    pub width: u32,
    pub height: u32,
    pub num_steps: u32,
    pub seed: u64,
    pub guidance_scale: f32,
    /// Per-request LoRA adapters (preloaded names) and scales.
    pub loras: Vec<(String, f64)>,
}

/// A failure inside the worker, by cause. The cause decides what the service does (retry
/// later, fail the item, stop taking work) and how `api::errors` maps it to HTTP; it also names
/// the metrics label.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// The request is valid JSON but the model cannot take it (names the field and limit).
    #[error("{0}")]
    InvalidInput(String),
    /// The client went away or the server is shutting down.
    #[error("cancelled")]
    Cancelled,
    /// Weights or config files missing or unreadable (names the file and the fix).
    #[error("{0}")]
    ModelFiles(String),
    /// A device allocation failed: this request was too large for the memory left; the device
    /// is fine and smaller work can still run.
    #[error("out of device memory: {0}")]
    OutOfMemory(String),
    /// The device (its CUDA context) is unusable; nothing more can run in this process.
    #[error("device lost: {0}")]
    DeviceLost(String),
    /// The FLUX model is not loaded.
    #[error("Model not loaded")]
    NotLoaded,
    /// The configuration asks for something this device cannot give (a forced attention backend
    /// that is absent or fails its self-check): the process must not serve, so it exits.
    #[error("refusing to start: {0}")]
    Refused(String),
    /// A bug: a tensor error that is not a device fault, a panic, a stopped worker.
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    /// A stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::InvalidInput(_) => "invalid_input",
            EngineError::Cancelled => "cancelled",
            EngineError::ModelFiles(_) => "model_files",
            EngineError::OutOfMemory(_) => "out_of_memory",
            EngineError::DeviceLost(_) => "device_lost",
            EngineError::NotLoaded => "not_loaded",
            EngineError::Refused(_) => "refused",
            EngineError::Internal(_) => "internal",
        }
    }

    /// A tensor/device error by what it means ([`DeviceFault`]); `message` is what to show.
    pub fn from_tensor(e: &candle_core::Error, message: String) -> Self {
        match DeviceFault::of(e) {
            Some(DeviceFault::OutOfMemory) => EngineError::OutOfMemory(message),
            Some(DeviceFault::Lost) => EngineError::DeviceLost(message),
            None => EngineError::Internal(message),
        }
    }

    /// Errors about the server rather than the request's items: when every item of a request
    /// fails with one of these, the request as a whole answers with its HTTP status.
    pub fn is_server_side(&self) -> bool {
        matches!(self, EngineError::NotLoaded | EngineError::DeviceLost(_))
    }
}

/// The text-to-image model, owned by the worker thread.
pub trait ImageBackend: Send + 'static {
    /// Reference images encoded once per request and reused for each of its prompts.
    type References;

    fn encode_references(&self, images: &[RgbImage]) -> Result<Self::References, EngineError>;

    /// `cancelled` is polled between denoising steps.
    fn generate(
        &self,
        item: &ItemParams,
        refs: Option<&Self::References>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<RgbImage, EngineError>;

    /// The attention backend chosen at load and each candidate's self-check (None: the backend
    /// has no attention, as in tests).
    fn attention_report(&self) -> Option<crate::flux2::attention::AttentionReport> {
        None
    }

    /// The model revision (hub commit) the weights were read at, for /health.
    fn model_revision(&self) -> Option<String> {
        None
    }

    /// Every configured LoRA adapter and whether it loaded (empty: none configured).
    fn lora_status(&self) -> Vec<crate::flux2::lora::LoraStatus> {
        Vec::new()
    }
}

/// Builds the upscaler when a request needs it; it is dropped when that request is done, and the
/// worker's [`DeviceMemory::after_job`] then hands what it used back to the driver (see
/// [`DeviceMemory`] for what the service promises).
pub trait UpscaleBackend: Send + 'static {
    type Upscaler: Upscale;

    fn load(&self) -> Result<Self::Upscaler, EngineError>;
}

pub trait Upscale {
    /// `scale` is 2 or 4.
    fn upscale(&self, image: &RgbImage, scale: u32) -> Result<RgbImage, EngineError>;
}

/// A backend for servers that have no upscaler configured (and for tests of the FLUX side).
#[derive(Debug, Clone, Default)]
pub struct NoUpscaler;

impl UpscaleBackend for NoUpscaler {
    type Upscaler = NoUpscaler;

    fn load(&self) -> Result<NoUpscaler, EngineError> {
        Err(EngineError::ModelFiles(
            "no upscaler is configured in this server".into(),
        ))
    }
}

impl Upscale for NoUpscaler {
    fn upscale(&self, _: &RgbImage, _: u32) -> Result<RgbImage, EngineError> {
        Err(EngineError::ModelFiles(
            "no upscaler is configured in this server".into(),
        ))
    }
}

/// What the worker does with device memory once a job is over. The promise (docs/operations.md,
/// "GPU memory"): during a job, freed device memory stays in the CUDA pool and is reused (the
/// pool's release threshold is unlimited, so the hundreds of temporaries of each denoising step
/// are pool hits); after every job (a /generate batch, an /upscale) the pool is trimmed to
/// `GPU_POOL_KEEP_MIB`, so a large request or an upscale does not leave its peak reserved:
/// between jobs the process holds its weights plus at most that much cached memory.
pub trait DeviceMemory: Send + 'static {
    /// Called on the worker thread after each job, whatever its outcome. `job` is `generate`
    /// or `upscale`.
    fn after_job(&self, job: &'static str);
}

/// The CPU (and tests that do not look): nothing to give back.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoDeviceMemory;

impl DeviceMemory for NoDeviceMemory {
    fn after_job(&self, _: &'static str) {}
}

impl DeviceMemory for Box<dyn DeviceMemory> {
    fn after_job(&self, job: &'static str) {
        (**self).after_job(job)
    }
}
