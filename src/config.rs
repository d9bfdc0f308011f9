//! Server configuration: every flag is also an environment variable (`--help` documents both).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use crate::flux2::Quantization;
use crate::flux2::lora::{LoraList, LoraMode, LoraSpec, parse_specs};
pub use crate::model_args::DEFAULT_MODEL_ID;
use crate::model_args::ModelArgs;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Arguments of `imagegen serve` (also what the binary does with no subcommand).
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,

    /// Port to listen on.
    #[arg(long, env = "PORT", default_value_t = 7000)]
    pub port: u16,

    /// Model, token, weight storage, device and dtype (shared with `generate` and `bench`).
    #[command(flatten)]
    pub model: ModelArgs,

    /// Load the FLUX model at startup. `false`, `0` or `no` skip it: /generate then answers 503,
    /// /upscale still works.
    #[arg(long, env = "PRELOAD_MODELS", default_value = "true", action = clap::ArgAction::Set,
          value_parser = parse_preload)]
    pub preload_models: bool,

    /// Log filter: a level (`info`, `debug`, ...) or a tracing-subscriber directive.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log format: `text` or `json` (one JSON object per line).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Jobs (generate or upscale requests) that may wait for the GPU worker; more get 503.
    #[arg(long, env = "QUEUE_SIZE", default_value_t = crate::limits::DEFAULT_QUEUE_SIZE, value_parser = clap::value_parser!(u32).range(1..))]
    pub queue_size: u32,

    /// Requests that may download their input images at once (before taking a queue place);
    /// more get 503 with Retry-After.
    #[arg(long, env = "MAX_CONCURRENT_DOWNLOADS", default_value_t = crate::limits::DEFAULT_MAX_CONCURRENT_DOWNLOADS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_downloads: u32,

    /// Seconds suggested to clients in `Retry-After` on a 503 (queue or download stage full,
    /// model not loaded, device lost).
    #[arg(long, env = "RETRY_AFTER_SECS", default_value_t = crate::limits::DEFAULT_RETRY_AFTER_SECS)]
    pub retry_after_secs: u64,

    /// Largest accepted request body, in bytes.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 2 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Total time one download (reference image, /upscale input) may take, in seconds: one
    /// deadline across every redirect hop and the body.
    #[arg(long, env = "DOWNLOAD_TIMEOUT_SECS", default_value_t = crate::limits::DEFAULT_DOWNLOAD_TIMEOUT_SECS)]
    pub download_timeout_secs: u64,

    /// Largest downloaded file, in bytes.
    #[arg(long, env = "MAX_DOWNLOAD_BYTES", default_value_t = 50_000_000)]
    pub max_download_bytes: u64,

    /// Largest decoded input image, in pixels (width x height), checked before decoding.
    #[arg(long, env = "MAX_INPUT_PIXELS", default_value_t = 4096 * 4096)]
    pub max_input_pixels: u64,

    /// Redirects followed per download; each hop is re-checked.
    #[arg(long, env = "MAX_REDIRECTS", default_value_t = 5)]
    pub max_redirects: u32,

    /// Allow downloads and uploads to loopback, private, link-local and unique-local addresses
    /// (off by default: server-side request forgery guard).
    #[arg(long, env = "ALLOW_PRIVATE_URLS", default_value_t = false, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_private_urls: bool,

    /// Timeout of each upload attempt, in seconds.
    #[arg(long, env = "UPLOAD_TIMEOUT_SECS", default_value_t = crate::limits::DEFAULT_UPLOAD_TIMEOUT_SECS)]
    pub upload_timeout_secs: u64,

    /// Total time one upload may take over all its attempts and backoff waits, in seconds.
    #[arg(long, env = "UPLOAD_DEADLINE_SECS", default_value_t = crate::limits::DEFAULT_UPLOAD_DEADLINE_SECS)]
    pub upload_deadline_secs: u64,

    /// Retries of an upload after a connection error or a 5xx answer (never after a 4xx).
    #[arg(long, env = "UPLOAD_RETRIES", default_value_t = 3)]
    pub upload_retries: u32,

    /// First retry delay in milliseconds; doubles on each retry.
    #[arg(long, env = "UPLOAD_RETRY_BASE_MS", default_value_t = 500)]
    pub upload_retry_base_ms: u64,

    /// Seconds to finish in-flight work after SIGTERM/SIGINT before cancelling it.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,

    /// Seconds to keep accepting requests after SIGTERM/SIGINT while `/ready` answers 503 (lets a
    /// load balancer notice before the listener closes); new jobs get 503 meanwhile.
    #[arg(long, env = "SHUTDOWN_DRAIN_DELAY_SECS", default_value_t = 0)]
    pub shutdown_drain_delay_secs: u64,

    /// Free GPU memory the CUDA pool may keep cached between jobs, in MiB; after every job (a
    /// /generate batch, an /upscale) the rest goes back to the driver.
    #[arg(long, env = "GPU_POOL_KEEP_MIB", default_value_t = crate::limits::DEFAULT_GPU_POOL_KEEP_MIB)]
    pub gpu_pool_keep_mib: u64,

    /// Real-ESRGAN weights cache folder (default `~/.cache/realesrgan`).
    #[arg(long, env = "UPSCALER_WEIGHTS_DIR")]
    pub upscaler_weights_dir: Option<PathBuf>,

    /// A specific Real-ESRGAN weights file (.pth, .safetensors or ncnn .param/.bin).
    #[arg(long, env = "UPSCALER_WEIGHTS")]
    pub upscaler_weights: Option<PathBuf>,

    /// Real-ESRGAN network: `x4plus` (the original's), `x2plus` or `general-x4v3`.
    #[arg(long, env = "UPSCALER_MODEL", default_value = "x4plus", value_parser = parse_upscale_model)]
    pub upscaler_model: crate::upscale::UpscaleModel,

    /// Tile size of the upscaler (0 = whole image at once).
    #[arg(long, env = "UPSCALE_TILE", default_value_t = 256)]
    pub upscale_tile: u32,

    /// Download missing upscaler weights from the official release.
    #[arg(long, env = "UPSCALER_ALLOW_DOWNLOAD", default_value_t = true, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub upscaler_allow_download: bool,

    /// API keys callers must present (`Authorization: Bearer <key>` or `X-API-Key: <key>`) on
    /// /generate and /upscale, comma-separated. Unset with no API_KEYS_FILE: the service is
    /// open to anyone who can reach the port. Never logged.
    #[arg(long, env = "API_KEYS", hide_env_values = true)]
    pub api_keys: Option<Secret>,

    /// A file of API keys, one a line (`#` comments); re-read on SIGHUP and when it changes.
    /// Adds to API_KEYS. A file that cannot be read at start-up stops start-up.
    #[arg(long, env = "API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,

    /// How often the key file is checked for changes, in seconds.
    #[arg(long, env = "API_KEYS_POLL_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub api_keys_poll_secs: u64,

    /// Require a key for /metrics too (when keys are configured).
    #[arg(long, env = "PROTECT_METRICS", default_value_t = false, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub protect_metrics: bool,

    /// Require a key for /docs and /openapi.json too (when keys are configured).
    #[arg(long, env = "PROTECT_DOCS", default_value_t = false, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub protect_docs: bool,

    /// Requests per minute each key may make to the protected routes (429 with Retry-After
    /// beyond it); unset: no limit.
    #[arg(long, env = "RATE_LIMIT_PER_KEY")]
    pub rate_limit_per_key: Option<NonZeroU32>,

    /// LoRA adapters fused into the weights at start-up, always on:
    /// `name=path[:scale], name=hf:owner/repo/file.safetensors[:scale]` (docs/lora.md). One that
    /// fails to load is logged and shown in /health; the model serves without it.
    #[arg(long, env = "LORAS", default_value = "",
          value_parser = |s: &str| parse_specs("LORAS", s, LoraMode::Fused).map(LoraList))]
    pub loras: LoraList,

    /// LoRA adapters loaded at start-up but kept unfused; a request turns them on with
    /// `loras: [{name, scale}]` (same syntax as LORAS; the scale part is ignored).
    #[arg(long, env = "LORA_PRELOAD", default_value = "",
          value_parser = |s: &str| parse_specs("LORA_PRELOAD", s, LoraMode::PerRequest).map(LoraList))]
    pub lora_preload: LoraList,
}

/// A configured secret: never printed, not even by `Debug`.
#[derive(Clone, Default)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "Secret(empty)"
        } else {
            "Secret(<redacted>)"
        })
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

impl ServeArgs {
    /// The serve arguments from the environment alone, for a bare `imagegen` invocation.
    pub fn parse_from_env() -> Self {
        #[derive(clap::Parser)]
        struct Bare {
            #[command(flatten)]
            serve: ServeArgs,
        }
        <Bare as clap::Parser>::parse_from(["imagegen"]).serve
    }

    /// Parses arguments as `imagegen serve ARGS...` would (environment included); for tests.
    pub fn try_parse_from<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        /// Later flags override earlier ones (tests add to a base set).
        #[derive(clap::Parser)]
        #[command(args_override_self = true)]
        struct Bare {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let args = std::iter::once(std::ffi::OsString::from("imagegen"))
            .chain(args.into_iter().map(Into::into));
        <Bare as clap::Parser>::try_parse_from(args).map(|b| b.serve)
    }

    /// HUGGING_FACE_TOKEN, else HF_TOKEN (see [`ModelArgs::token`]).
    pub fn token(&self) -> Option<String> {
        self.model.token()
    }

    pub fn resolved_model_id(&self) -> String {
        self.model.resolved_model_id()
    }

    pub fn resolved_text_encoder_quantization(&self) -> Quantization {
        self.model.resolved_text_encoder_quantization()
    }

    pub fn download_timeout(&self) -> Duration {
        Duration::from_secs(self.download_timeout_secs)
    }

    pub fn upload_timeout(&self) -> Duration {
        Duration::from_secs(self.upload_timeout_secs)
    }

    pub fn upload_deadline(&self) -> Duration {
        Duration::from_secs(self.upload_deadline_secs)
    }

    /// What access control needs of the configuration.
    pub fn auth_config(&self) -> crate::api::auth::AuthConfig {
        crate::api::auth::AuthConfig {
            keys: self.api_keys.clone(),
            keys_file: self.api_keys_file.clone(),
            rate_limit_per_key: self.rate_limit_per_key,
        }
    }

    /// The upscaler cache folder: the flag, else `~/.cache/realesrgan`.
    /// Every configured adapter: `LORAS` (fused) then `LORA_PRELOAD` (per request). A name in
    /// both is kept once, fused.
    pub fn lora_specs(&self) -> Vec<LoraSpec> {
        let mut v = self.loras.0.clone();
        for s in &self.lora_preload.0 {
            if !v.iter().any(|f| f.name == s.name) {
                v.push(s.clone());
            }
        }
        v
    }

    pub fn upscaler_dir(&self) -> PathBuf {
        self.upscaler_weights_dir
            .clone()
            .unwrap_or_else(crate::upscale::default_cache_dir)
    }
}

/// The original's rule: after lowercasing, `false`, `0` and `no` disable preloading; anything else
/// enables it.
fn parse_preload(s: &str) -> Result<bool, String> {
    Ok(!matches!(s.to_lowercase().as_str(), "false" | "0" | "no"))
}

fn parse_upscale_model(s: &str) -> Result<crate::upscale::UpscaleModel, String> {
    s.parse()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_quantization_is_an_error_naming_the_choices() {
        let err = ServeArgs::try_parse_from(["--quantization", "fp4"]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("fp4"), "{text}");
        assert!(text.contains("none, fp8, int8"), "{text}");
    }

    #[test]
    fn text_encoder_quantization_follows_quantization_unless_set() {
        use Quantization as Q;
        let te = |flags: &[&str]| {
            ServeArgs::try_parse_from(flags)
                .unwrap()
                .resolved_text_encoder_quantization()
        };
        assert_eq!(te(&["--quantization", "none"]), Q::None);
        assert_eq!(te(&["--quantization", "fp8"]), Q::Fp8);
        assert_eq!(te(&["--quantization", "int8"]), Q::Int8);
        for (flag, want) in [("none", Q::None), ("fp8", Q::Fp8), ("int8", Q::Int8)] {
            for q in ["none", "fp8", "int8"] {
                let got = te(&["--quantization", q, "--text-encoder-quantization", flag]);
                assert_eq!(
                    got, want,
                    "QUANTIZATION={q} TEXT_ENCODER_QUANTIZATION={flag}"
                );
            }
        }
    }

    #[test]
    fn invalid_text_encoder_quantization_is_an_error_naming_the_variable() {
        let err = ServeArgs::try_parse_from(["--text-encoder-quantization", "bf16"]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("invalid TEXT_ENCODER_QUANTIZATION 'bf16'"),
            "{text}"
        );
        assert!(text.contains("none, fp8, int8"), "{text}");
    }

    #[test]
    fn lora_settings_parse_and_a_name_in_both_is_fused_once() {
        let args = ServeArgs::try_parse_from([
            "--loras",
            "a=/x/a.safetensors:0.5, b=hf:o/r/b.safetensors",
            "--lora-preload",
            "c=/x/c.safetensors,a=/x/other.safetensors",
        ])
        .unwrap();
        let specs = args.lora_specs();
        let names: Vec<(&str, LoraMode)> =
            specs.iter().map(|s| (s.name.as_str(), s.mode)).collect();
        assert_eq!(
            names,
            [
                ("a", LoraMode::Fused),
                ("b", LoraMode::Fused),
                ("c", LoraMode::PerRequest)
            ]
        );
        assert_eq!(specs[0].scale, 0.5);
        assert!(
            ServeArgs::try_parse_from(Vec::<String>::new())
                .unwrap()
                .lora_specs()
                .is_empty()
        );
        let err = ServeArgs::try_parse_from(["--loras", "a=x:7"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("LORAS: adapter 'a' scale 7 is outside -4..=4"),
            "{err}"
        );
    }

    #[test]
    fn preload_follows_the_original_rule() {
        for (v, want) in [
            ("false", false),
            ("NO", false),
            ("0", false),
            ("yes", true),
            ("x", true),
        ] {
            let a = ServeArgs::try_parse_from(["--preload-models", v]).unwrap();
            assert_eq!(a.preload_models, want, "{v}");
        }
    }

    #[test]
    fn api_keys_never_appear_in_debug_output() {
        let a = ServeArgs::try_parse_from(["--api-keys", "sk-very-secret,sk-other"]).unwrap();
        assert_eq!(
            a.api_keys.as_ref().unwrap().expose(),
            "sk-very-secret,sk-other"
        );
        let text = format!("{a:?}");
        assert!(!text.contains("sk-very-secret"), "{text}");
    }

    #[test]
    fn every_spelling_of_a_klein_model_id_normalises_to_one_that_the_loader_agrees_with() {
        use crate::flux2::weights::{ModelSource, REPO_4B, REPO_9B, resolve_model_id};
        let cases = [
            ("4B", REPO_4B),
            ("4b", REPO_4B),
            (" 4B ", REPO_4B),
            ("black-forest-labs/flux.2-klein-4b", REPO_4B),
            ("9b", REPO_9B),
            ("BLACK-FOREST-LABS/FLUX.2-KLEIN-9B", REPO_9B),
            ("someone/other-model", "someone/other-model"),
        ];
        for (given, want) in cases {
            let a = ServeArgs::try_parse_from(["--model-id", given]).unwrap();
            let shown = a.resolved_model_id();
            assert_eq!(shown, want, "{given:?}");
            // What config, logs and /health show is exactly what the loader opens.
            assert_eq!(
                resolve_model_id(given).unwrap(),
                ModelSource::Hub(shown),
                "{given:?}"
            );
        }
    }
}
