//! The model arguments `serve`, `generate` and `bench` share (model, token, weight storage,
//! device, compute dtype): one clap struct flattened into each command, so a flag or variable
//! means the same thing everywhere and is parsed in one place.

use candle_core::{DType, Device};

use crate::device::{DeviceKind, default_dtype};
use crate::flux2::Quantization;

pub use crate::limits::DEFAULT_MODEL_ID;

/// Floating-point dtype the models compute in (`--dtype` / `DTYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    F32,
    Bf16,
    F16,
}

impl ComputeDtype {
    pub fn dtype(self) -> DType {
        match self {
            ComputeDtype::F32 => DType::F32,
            ComputeDtype::Bf16 => DType::BF16,
            ComputeDtype::F16 => DType::F16,
        }
    }
}

/// Lower-case name of a float dtype as `--dtype` spells it (`f32`, `bf16`, `f16`).
pub fn dtype_name(dtype: DType) -> String {
    format!("{dtype:?}").to_lowercase()
}

/// Arguments shared by `serve`, `generate` and `bench` (`#[command(flatten)]`).
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// FLUX.2 model: `4B`, `9B`, a hub repo id, or a local directory in the diffusers layout.
    #[arg(long = "model-id", visible_alias = "model", env = "MODEL_ID", default_value = DEFAULT_MODEL_ID)]
    pub model_id: String,

    /// Hugging Face token; needed only for gated repos (the 9B model). Never logged.
    #[arg(long, env = "HUGGING_FACE_TOKEN", hide_env_values = true)]
    pub hf_token: Option<String>,

    /// Alias of HUGGING_FACE_TOKEN, used when that is unset.
    #[arg(
        long = "hf-token-alias",
        env = "HF_TOKEN",
        hide = true,
        hide_env_values = true
    )]
    pub hf_token_alias: Option<String>,

    /// Transformer weight storage: `none`, `fp8` or `int8`. Anything else stops startup.
    #[arg(long, env = "QUANTIZATION", default_value = "none", value_parser = parse_quantization)]
    pub quantization: Quantization,

    /// Text encoder projection storage: `none`, `fp8` or `int8`; unset follows QUANTIZATION.
    /// Anything else stops startup.
    #[arg(long, env = "TEXT_ENCODER_QUANTIZATION",
          value_parser = crate::flux2::quant::parse_text_encoder_quantization)]
    pub text_encoder_quantization: Option<Quantization>,

    /// Compute device.
    #[arg(long, env = "DEVICE", value_enum, default_value_t = DeviceKind::Auto)]
    pub device: DeviceKind,

    /// Compute dtype: `f32`, `bf16` or `f16`; unset: bf16 on CUDA, f32 on CPU. Every dtype runs
    /// on the CPU too (slowly), which is how the bf16 numerics are tested without a GPU.
    #[arg(long, env = "DTYPE", value_enum)]
    pub dtype: Option<ComputeDtype>,

    /// Attention backend: `auto` (self-check the compiled fused backends at model load, use the
    /// fastest that passes, else `naive`), `naive`, or a backend name (refuses to start if that
    /// backend is absent or fails its self-check).
    #[arg(long, env = "ATTENTION", default_value = "auto",
          value_parser = crate::flux2::attention::parse_attention)]
    pub attention: crate::flux2::attention::AttentionChoice,
}

impl ModelArgs {
    /// HUGGING_FACE_TOKEN, else HF_TOKEN; empty strings count as unset.
    pub fn token(&self) -> Option<String> {
        [&self.hf_token, &self.hf_token_alias]
            .into_iter()
            .flatten()
            .find(|t| !t.trim().is_empty())
            .cloned()
    }

    /// The model id in its one spelling ([`crate::flux2::weights::canonical_model_id`]): what
    /// the loader opens, the logs print and /health reports.
    pub fn resolved_model_id(&self) -> String {
        crate::flux2::weights::canonical_model_id(&self.model_id)
    }

    /// `TEXT_ENCODER_QUANTIZATION`, else `QUANTIZATION`: whoever picks fp8 to fit a smaller
    /// card expects the whole model to shrink.
    pub fn resolved_text_encoder_quantization(&self) -> Quantization {
        self.text_encoder_quantization.unwrap_or(self.quantization)
    }

    /// `--dtype`, else the device's default (bf16 on CUDA, f32 on CPU).
    pub fn resolved_dtype(&self, device: &Device) -> DType {
        self.dtype
            .map_or_else(|| default_dtype(device), ComputeDtype::dtype)
    }

    /// [`Self::resolved_dtype`] knowing only whether the device is a GPU.
    pub fn resolved_dtype_on(&self, cuda: bool) -> DType {
        match self.dtype {
            Some(d) => d.dtype(),
            None if cuda => DType::BF16,
            None => DType::F32,
        }
    }
}

fn parse_quantization(s: &str) -> Result<Quantization, String> {
    s.parse()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Bare {
        #[command(flatten)]
        model: ModelArgs,
    }

    fn parse(args: &[&str]) -> Result<ModelArgs, clap::Error> {
        <Bare as clap::Parser>::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
            .map(|b| b.model)
    }

    #[test]
    fn dtype_defaults_to_the_device_and_the_flag_overrides_it() {
        let a = parse(&[]).unwrap();
        if std::env::var_os("DTYPE").is_none() {
            assert_eq!(a.resolved_dtype(&Device::Cpu), DType::F32);
            assert_eq!(a.resolved_dtype_on(true), DType::BF16);
        }
        for (flag, want) in [
            ("f32", DType::F32),
            ("bf16", DType::BF16),
            ("f16", DType::F16),
        ] {
            let a = parse(&["--dtype", flag]).unwrap();
            assert_eq!(a.resolved_dtype(&Device::Cpu), want, "{flag}");
            assert_eq!(a.resolved_dtype_on(true), want, "{flag}");
            assert_eq!(dtype_name(want), flag);
        }
    }

    #[test]
    fn unknown_dtype_is_an_error_naming_the_choices() {
        let text = parse(&["--dtype", "fp8"]).unwrap_err().to_string();
        assert!(
            text.contains("fp8") && text.contains("f32, bf16, f16"),
            "{text}"
        );
    }

    #[test]
    fn model_and_model_id_are_the_same_flag() {
        assert_eq!(parse(&["--model", "9B"]).unwrap().model_id, "9B");
        assert_eq!(parse(&["--model-id", "x/y"]).unwrap().model_id, "x/y");
    }
}
