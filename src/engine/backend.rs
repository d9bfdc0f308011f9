//! What the GPU worker needs from the models, as two small traits. The real implementations
//! (FLUX.2 pipeline, Real-ESRGAN) live in [`super::models`]; tests may supply their own.

use image::RgbImage;

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

/// A failure inside the worker, by cause (the cause names the metrics label).
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
    /// Device or numerical failure (including out of memory).
    #[error("{0}")]
    Device(String),
    /// The FLUX model is not loaded.
    #[error("Model not loaded")]
    NotLoaded,
    /// The worker panicked or stopped; a bug.
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
            EngineError::Device(_) => "device",
            EngineError::NotLoaded => "not_loaded",
            EngineError::Internal(_) => "internal",
        }
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

    /// Every configured LoRA adapter and whether it loaded (empty: none configured).
    fn lora_status(&self) -> Vec<crate::flux2::lora::LoraStatus> {
        Vec::new()
    }
}

/// Builds the upscaler when a request needs it; it is dropped when that request is done, so its
/// memory goes back to the device between requests.
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
