//! Request and response bodies: the API's types and their OpenAPI schemas. Bounds and defaults
//! live in [`crate::limits`]; `api::openapi` writes them into the schema, `api::validation`
//! enforces them.

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::io::OutputFormat;

/// A reference image shared by every prompt of a request.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ReferenceImage {
    /// http(s) URL of a PNG, JPEG or WebP image.
    pub url: String,
    /// Accepted (0.0-2.0) for compatibility and ignored, as in the original service.
    pub weight: f64,
}

/// `POST /generate` body.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct GenerateRequest {
    /// 1-20 prompts; one image each.
    pub prompts: Vec<String>,
    /// Presigned S3 PUT URLs, one per prompt (same length as `prompts`).
    pub upload_urls: Vec<String>,
    /// 0-16 reference images used for every prompt.
    pub images: Vec<ReferenceImage>,
    /// Output width before upscaling; floored to a multiple of 16.
    pub width: u32,
    /// Output height before upscaling; floored to a multiple of 16.
    pub height: u32,
    pub num_steps: u32,
    /// Validated (0-20) and ignored: the klein models are guidance-distilled.
    pub guidance_scale: f64,
    /// Base seed; item i uses seed + i. Random (OS entropy, 0..=2^32-2) when absent.
    pub seed: Option<u64>,
    /// Upscale factor applied to every image: 2 or 4.
    pub upscale: Option<u32>,
    #[schema(value_type = String, example = "png")]
    pub output_format: OutputFormat,
    /// LoRA adapters preloaded at start-up (`LORA_PRELOAD`) to apply to this request, each with
    /// its scale; default none. An unknown name is a 422. Adapters fused at start-up (`LORAS`)
    /// are always on and cannot be named here.
    pub loras: Vec<LoraRef>,
}

/// One per-request LoRA adapter.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct LoraRef {
    /// Name given in `LORA_PRELOAD` (listed by /health under `loras`).
    pub name: String,
    /// Strength; 1.0 when absent. Negative values subtract the adapter.
    pub scale: f64,
}

/// `POST /upscale` body.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct UpscaleRequest {
    pub image_url: String,
    pub upload_url: String,
    /// 2 or 4 (default 4).
    pub scale: u32,
    #[schema(value_type = String, example = "png")]
    pub output_format: OutputFormat,
}

/// One image of a `/generate` response. On failure only index, success and error are set.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, ToSchema)]
pub struct GenerateResult {
    pub index: usize,
    pub success: bool,
    pub error: Option<String>,
    /// The upload URL before its `?`.
    pub output_url: Option<String>,
    /// Actual output size (after flooring to /16 and upscaling).
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub seed: Option<u64>,
    pub timing_inference_ms: Option<u64>,
    pub timing_upscale_ms: Option<u64>,
    pub timing_upload_ms: Option<u64>,
}

impl GenerateResult {
    pub fn failed(index: usize, error: impl Into<String>) -> Self {
        Self {
            index,
            success: false,
            error: Some(error.into()),
            output_url: None,
            width: None,
            height: None,
            seed: None,
            timing_inference_ms: None,
            timing_upscale_ms: None,
            timing_upload_ms: None,
        }
    }
}

/// `POST /generate` response (HTTP 200 whenever the request was valid and accepted).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, ToSchema)]
pub struct GenerateResponse {
    /// True only if every item succeeded.
    pub success: bool,
    pub results: Vec<GenerateResult>,
    pub timing_total_ms: u64,
}

/// `POST /upscale` response. On failure only success and error are set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize, ToSchema)]
pub struct UpscaleResponse {
    pub success: bool,
    pub error: Option<String>,
    pub output_url: Option<String>,
    pub input_width: Option<u32>,
    pub input_height: Option<u32>,
    pub output_width: Option<u32>,
    pub output_height: Option<u32>,
    pub scale: Option<u32>,
    pub timing_download_ms: Option<u64>,
    pub timing_load_ms: Option<u64>,
    pub timing_upscale_ms: Option<u64>,
    pub timing_upload_ms: Option<u64>,
    pub timing_total_ms: Option<u64>,
}

impl UpscaleResponse {
    pub fn failed(error: impl Into<String>) -> Self {
        Self {
            success: false,
            error: Some(error.into()),
            ..Default::default()
        }
    }
}

/// `GET /health` (always HTTP 200).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, ToSchema)]
pub struct HealthResponse {
    /// `healthy` (model loaded), `downloading` (fetching model files; see `download`),
    /// `loading`, or `unhealthy` (not loaded: PRELOAD_MODELS=false or the load failed; see
    /// `error`).
    pub status: String,
    /// Model download progress while `status` is `downloading`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub download: Option<crate::flux2::weights::DownloadSnapshot>,
    pub flux_loaded: bool,
    /// True when the service computes on a CUDA GPU.
    pub gpu_available: bool,
    pub gpu_name: Option<String>,
    /// Total memory of the GPU in GiB (2 decimals).
    pub gpu_memory_gb: Option<f64>,
    /// Memory in use on the whole GPU in GiB as nvidia-smi reports it (all processes; not
    /// PyTorch-allocated memory as in the original).
    pub gpu_memory_used_gb: Option<f64>,
    pub model_id: String,
    /// The hub commit every model file was read at (null for a local directory, or before the
    /// model has loaded).
    pub model_revision: Option<String>,
    /// Transformer weight storage (`QUANTIZATION`).
    pub quantization: String,
    /// Text encoder projection storage (`TEXT_ENCODER_QUANTIZATION`, else `QUANTIZATION`).
    pub text_encoder_quantization: String,
    /// Compute dtype (`DTYPE`: `f32`, `bf16` or `f16`; default bf16 on CUDA, f32 on CPU).
    pub dtype: String,
    pub version: String,
    /// Jobs waiting for the GPU worker.
    pub queue_depth: usize,
    pub queue_capacity: usize,
    /// Why the model is not loaded, when its load failed.
    pub error: Option<String>,
    /// Attention backend the DiT uses and each candidate's load-time self-check (ok, time,
    /// max error, why not used); absent until the model has loaded.
    pub attention: Option<crate::flux2::attention::AttentionReport>,
    /// Configured LoRA adapters (`LORAS` fused, `LORA_PRELOAD` per request): name, source, mode,
    /// `loaded` or `failed` with the error; empty until the model has loaded.
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    pub loras: Vec<crate::flux2::lora::LoraStatus>,
    /// Access control: `none` (open: no API key configured) or `api_key`.
    pub auth: String,
    /// Operator warnings, e.g. a CPU-only binary on a machine with a GPU it cannot use.
    pub warnings: Vec<String>,
}

/// `GET /`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RootResponse {
    pub name: &'static str,
    pub version: &'static str,
    pub endpoints: Vec<&'static str>,
}

/// One validation error, as FastAPI reports it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ValidationDetail {
    #[serde(rename = "type")]
    pub kind: String,
    #[schema(value_type = Vec<Object>)]
    pub loc: Vec<Value>,
    pub msg: String,
    #[schema(value_type = Object)]
    pub input: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub ctx: Option<Value>,
}

/// The 422 body: `{"detail": [...]}`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ValidationErrorBody {
    pub detail: Vec<ValidationDetail>,
}

/// Other errors: `{"detail": "..."}` plus, for a full queue, its depth and capacity.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queue: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}
