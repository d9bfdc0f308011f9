//! Every request bound and service default, stated once. Validation, its error messages, the
//! OpenAPI schema (`api::openapi` fills the bounds in from here), the CLI and /health read them
//! from this module, so a limit cannot drift between what is enforced and what is documented.

/// The service version everywhere (/health, `GET /`, OpenAPI, `--version`): Cargo's.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The default model, as in the original service.
pub const DEFAULT_MODEL_ID: &str = "black-forest-labs/FLUX.2-klein-4B";

/// Most prompts (and upload URLs) per `/generate` request.
pub const MAX_PROMPTS: usize = 20;
/// Most reference images per request.
pub const MAX_REFERENCES: usize = 16;
/// Largest seed: seed + 19 (the last item of a full batch) must still fit in 64 bits.
pub const MAX_SEED: u64 = u64::MAX - (MAX_PROMPTS as u64 - 1);

/// Output width/height bounds of `/generate` (before upscaling), in pixels.
pub const MIN_SIZE: u32 = 256;
pub const MAX_SIZE: u32 = 2048;
pub const DEFAULT_SIZE: u32 = 1024;

/// Denoising steps of `/generate`.
pub const MIN_STEPS: u32 = 1;
pub const MAX_STEPS: u32 = 50;
pub const DEFAULT_STEPS: u32 = 4;

/// `guidance_scale`: validated and ignored (the klein models are guidance-distilled).
pub const MAX_GUIDANCE: f64 = 20.0;
pub const DEFAULT_GUIDANCE: f64 = 1.0;

/// A reference image's `weight`: validated and ignored, as in the original.
pub const MAX_REFERENCE_WEIGHT: f64 = 2.0;
pub const DEFAULT_REFERENCE_WEIGHT: f64 = 1.0;

/// Upscale factors `/generate` and `/upscale` accept; `/upscale` defaults to 4.
pub const UPSCALE_FACTORS: [u32; 2] = [2, 4];
pub const DEFAULT_UPSCALE_SCALE: u32 = 4;

/// Largest side the pipeline itself accepts (the CLI and benches go beyond the API's bound).
pub const MAX_PIPELINE_SIDE: u32 = 4096;

/// Requests that may wait for the GPU worker before new ones get 503 (`QUEUE_SIZE`).
pub const DEFAULT_QUEUE_SIZE: u32 = 8;

/// Requests that may fetch their input images (references, /upscale input) at once, before
/// they take a queue place (`MAX_CONCURRENT_DOWNLOADS`); more get 503 with Retry-After.
pub const DEFAULT_MAX_CONCURRENT_DOWNLOADS: u32 = 32;

/// Seconds suggested in `Retry-After` on a 503 (`RETRY_AFTER_SECS`).
pub const DEFAULT_RETRY_AFTER_SECS: u64 = 10;

/// Total seconds one download (reference image, /upscale input) may take, redirects included
/// (`DOWNLOAD_TIMEOUT_SECS`).
pub const DEFAULT_DOWNLOAD_TIMEOUT_SECS: u64 = 60;

/// Seconds each upload attempt may take (`UPLOAD_TIMEOUT_SECS`), and the total one upload may
/// take over all its attempts and backoff waits (`UPLOAD_DEADLINE_SECS`).
pub const DEFAULT_UPLOAD_TIMEOUT_SECS: u64 = 120;
pub const DEFAULT_UPLOAD_DEADLINE_SECS: u64 = 300;

/// Free device memory the CUDA pool may keep cached between jobs, in MiB
/// (`GPU_POOL_KEEP_MIB`); the rest goes back to the driver after every job.
pub const DEFAULT_GPU_POOL_KEEP_MIB: u64 = 2048;

// The bounds agree with each other, checked when the crate compiles.
const _: () = {
    assert!(MIN_SIZE <= DEFAULT_SIZE && DEFAULT_SIZE <= MAX_SIZE);
    assert!(MAX_SIZE <= MAX_PIPELINE_SIDE);
    assert!(MIN_STEPS <= DEFAULT_STEPS && DEFAULT_STEPS <= MAX_STEPS);
    assert!(
        DEFAULT_UPSCALE_SCALE == UPSCALE_FACTORS[0] || DEFAULT_UPSCALE_SCALE == UPSCALE_FACTORS[1]
    );
    // The last item of a full batch uses seed + MAX_PROMPTS - 1.
    assert!(MAX_SEED.checked_add(MAX_PROMPTS as u64 - 1).is_some());
    assert!(MAX_SEED.checked_add(MAX_PROMPTS as u64).is_none());
    // One attempt fits inside the whole upload's deadline.
    assert!(DEFAULT_UPLOAD_TIMEOUT_SECS <= DEFAULT_UPLOAD_DEADLINE_SECS);
};

/// Adapters in `LORAS` and in `LORA_PRELOAD`, each.
pub const MAX_LORAS: usize = 8;
/// Adapters one request may turn on (`loras` field).
pub const MAX_LORAS_PER_REQUEST: usize = 4;
/// Bounds of a LoRA scale, in `LORAS` and per request (negative scales subtract an adapter, as
/// diffusers' `set_adapters` allows).
pub const LORA_SCALE_MIN: f64 = -4.0;
pub const LORA_SCALE_MAX: f64 = 4.0;
