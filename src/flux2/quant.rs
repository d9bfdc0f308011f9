//! Linear layers whose weights may be stored quantized (`QUANTIZATION=none|fp8|int8` for the
//! transformer, `TEXT_ENCODER_QUANTIZATION` for the Qwen3 text encoder's projections).
//!
//! The original service quantized only the transformer (TorchAO weight-only); quantizing the
//! encoder too is what lets 9B fit a 24 GB card. Embeddings, norms and the VAE stay in the
//! compute dtype.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// How Linear weights are stored on the device.
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
        Self::parse_setting("QUANTIZATION", s)
    }
}

impl Quantization {
    /// Parses the value of the setting `name`; the error names the setting and the choices.
    pub fn parse_setting(name: &str, s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(Quantization::None),
            "fp8" => Ok(Quantization::Fp8),
            "int8" => Ok(Quantization::Int8),
            other => Err(format!(
                "invalid {name} '{other}': expected one of none, fp8, int8"
            )),
        }
    }
}

/// clap value parser of `TEXT_ENCODER_QUANTIZATION` / `--text-encoder-quantization`.
pub fn parse_text_encoder_quantization(s: &str) -> std::result::Result<Quantization, String> {
    Quantization::parse_setting("TEXT_ENCODER_QUANTIZATION", s)
}

/// Largest finite F8E4M3 value.
const FP8_MAX: f32 = 448.0;
/// Int8 weights use the symmetric range [-127, 127].
const INT8_MAX: f32 = 127.0;
/// Int8 values are stored as `q + 128` in U8: candle has no I8 dtype, and U8 converts to every
/// float dtype on CPU and CUDA.
const INT8_OFFSET: f64 = 128.0;

#[derive(Debug, Clone)]
enum Weight {
    Dense(Tensor),
    /// `[out, in]` F8E4M3 and `[out, 1]` f32 scale: w = q * scale.
    Fp8 {
        q: Tensor,
        scale: Tensor,
    },
    /// `[out, in]` U8 holding q + 128, and `[out, 1]` f32 scale: w = q * scale.
    Int8 {
        q: Tensor,
        scale: Tensor,
    },
}

/// A bias-free linear layer (every FLUX.2 transformer linear is bias-free) whose weight may be
/// stored quantized with a per-output-channel absmax scale and dequantized at each forward.
#[derive(Debug, Clone)]
pub struct QLinear {
    weight: Weight,
    /// Unfused per-request LoRA pairs (`LORA_PRELOAD`), added when their adapter is active.
    side: Vec<super::lora::SideLora>,
}

/// Loads `{vb}.weight` of shape `[out_dim, in_dim]` and stores it as `quant` asks. With `Fp8`
/// and a checkpoint that already holds this weight as scaled fp8 (BFL fp8 files, see
/// `weights::RAW_FP8_SUFFIX`), the stored fp8 values and scales are kept as they are.
pub fn linear_no_bias(
    in_dim: usize,
    out_dim: usize,
    vb: VarBuilder,
    quant: Quantization,
) -> Result<QLinear> {
    use super::weights::{RAW_FP8_SCALE_SUFFIX, RAW_FP8_SUFFIX};
    let raw = format!("weight{RAW_FP8_SUFFIX}");
    let raw_scale = format!("weight{RAW_FP8_SCALE_SUFFIX}");
    if quant == Quantization::Fp8 && vb.contains_tensor(&raw) {
        let hints = candle_nn::Init::Const(0.);
        let q = vb.get_with_hints_dtype((out_dim, in_dim), &raw, hints, DType::F8E4M3)?;
        let scale = vb.get_with_hints_dtype((out_dim, 1), &raw_scale, hints, DType::F32)?;
        return Ok(QLinear {
            weight: Weight::Fp8 { q, scale },
            side: Vec::new(),
        });
    }
    let weight = vb.get((out_dim, in_dim), "weight")?;
    QLinear::from_weight(weight, quant)
}

impl QLinear {
    /// Quantizes a dense `[out, in]` weight.
    pub fn from_weight(weight: Tensor, quant: Quantization) -> Result<Self> {
        let weight = match quant {
            Quantization::None => Weight::Dense(weight),
            Quantization::Fp8 => {
                let (q, scale) = quantize_fp8(&weight)?;
                Weight::Fp8 { q, scale }
            }
            Quantization::Int8 => {
                let (q, scale) = quantize_int8(&weight)?;
                Weight::Int8 { q, scale }
            }
        };
        Ok(Self {
            weight,
            side: Vec::new(),
        })
    }

    /// Adds an unfused LoRA pair, applied while its adapter is active.
    pub fn push_side_lora(&mut self, side: super::lora::SideLora) {
        self.side.push(side);
    }

    /// Number of side-path LoRA pairs this Linear carries.
    pub fn side_loras(&self) -> usize {
        self.side.len()
    }

    pub fn quantization(&self) -> Quantization {
        match self.weight {
            Weight::Dense(_) => Quantization::None,
            Weight::Fp8 { .. } => Quantization::Fp8,
            Weight::Int8 { .. } => Quantization::Int8,
        }
    }

    /// Bytes the stored weight takes: values plus per-row f32 scales when quantized.
    pub fn storage_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match &self.weight {
            Weight::Dense(w) => bytes(w),
            Weight::Fp8 { q, scale } | Weight::Int8 { q, scale } => bytes(q) + bytes(scale),
        }
    }

    /// The weight as used by forward, `[out, in]` in `dtype`.
    pub fn dequantized_weight(&self, dtype: DType) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => w.to_dtype(dtype),
            Weight::Fp8 { q, scale } => q.to_dtype(dtype)?.broadcast_mul(&scale.to_dtype(dtype)?),
            Weight::Int8 { q, scale } => q
                .to_dtype(dtype)?
                .affine(1.0, -INT8_OFFSET)?
                .broadcast_mul(&scale.to_dtype(dtype)?),
        }
    }
}

/// Per-row absmax / `max`, with all-zero rows given scale 1 (their values quantize to 0).
fn row_scales(w: &Tensor, max: f32) -> Result<Tensor> {
    let absmax = w.abs()?.max_keepdim(1)?;
    let is_zero = absmax.eq(0f32)?;
    let scale = (absmax / max as f64)?;
    is_zero.where_cond(&Tensor::ones_like(&scale)?, &scale)
}

/// `[out, in]` -> (F8E4M3 values, `[out, 1]` f32 scales).
pub fn quantize_fp8(w: &Tensor) -> Result<(Tensor, Tensor)> {
    let w = w.to_dtype(DType::F32)?;
    let scale = row_scales(&w, FP8_MAX)?;
    let q = w
        .broadcast_div(&scale)?
        .clamp(-FP8_MAX, FP8_MAX)?
        .to_dtype(DType::F8E4M3)?;
    Ok((q, scale))
}

/// `[out, in]` -> (U8 values q + 128 with q in [-127, 127], `[out, 1]` f32 scales).
pub fn quantize_int8(w: &Tensor) -> Result<(Tensor, Tensor)> {
    let w = w.to_dtype(DType::F32)?;
    let scale = row_scales(&w, INT8_MAX)?;
    let q = w
        .broadcast_div(&scale)?
        .round()?
        .clamp(-INT8_MAX, INT8_MAX)?
        .affine(1.0, INT8_OFFSET)?
        .to_dtype(DType::U8)?;
    Ok((q, scale))
}

impl Module for QLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = match &self.weight {
            Weight::Dense(w) => w.clone(),
            _ => self.dequantized_weight(x.dtype())?,
        };
        let mut y = crate::nn::matmul::broadcast_matmul(x, &w.t()?)?;
        for side in &self.side {
            if let Some(d) = side.forward(x)? {
                y = (y + d)?;
            }
        }
        Ok(y)
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
        let err = parse_text_encoder_quantization("bf16").unwrap_err();
        assert_eq!(
            err,
            "invalid TEXT_ENCODER_QUANTIZATION 'bf16': expected one of none, fp8, int8"
        );
        assert_eq!(
            parse_text_encoder_quantization("int8"),
            Ok(Quantization::Int8)
        );
    }

    #[test]
    fn storage_bytes_count_values_and_scales() {
        let w = Tensor::randn(0f32, 1.0, (6, 10), &Device::Cpu).unwrap();
        let bytes = |q| QLinear::from_weight(w.clone(), q).unwrap().storage_bytes();
        assert_eq!(bytes(Quantization::None), 6 * 10 * 4);
        assert_eq!(bytes(Quantization::Fp8), 6 * 10 + 6 * 4);
        assert_eq!(bytes(Quantization::Int8), 6 * 10 + 6 * 4);
    }

    use candle_core::Device;

    /// Random weights with rows of very different magnitudes, so per-row scaling matters.
    fn weights(out: usize, inp: usize) -> Tensor {
        let w = Tensor::randn(0f32, 1.0, (out, inp), &Device::Cpu).unwrap();
        let row_gain: Vec<f32> = (0..out).map(|i| 10f32.powf(i as f32 / 8.0 - 2.0)).collect();
        w.broadcast_mul(&Tensor::from_vec(row_gain, (out, 1), &Device::Cpu).unwrap())
            .unwrap()
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Per element: |w - deq| <= |w| * rel + row_scale * abs_units.
    fn check_bound(w: &Tensor, q: &QLinear, scale: &Tensor, rel: f64, abs_units: f64) {
        let deq = q.dequantized_weight(DType::F32).unwrap();
        let err = (w - &deq).unwrap().abs().unwrap();
        let bound = (w.abs().unwrap() * rel)
            .unwrap()
            .broadcast_add(&(scale * abs_units).unwrap())
            .unwrap();
        let excess = max_abs(&(err - bound).unwrap().relu().unwrap());
        assert_eq!(excess, 0.0, "quantization error above the bound");
    }

    #[test]
    fn fp8_roundtrip_error_is_within_e4m3_precision() {
        let w = weights(32, 64);
        let q = QLinear::from_weight(w.clone(), Quantization::Fp8).unwrap();
        let (_, scale) = quantize_fp8(&w).unwrap();
        // e4m3: 3 mantissa bits -> relative rounding error <= 2^-4; subnormal spacing 2^-9.
        check_bound(&w, &q, &scale, 1.0 / 16.0, 1.0 / 1024.0);
        // and it is really quantized: the error is not zero
        let deq = q.dequantized_weight(DType::F32).unwrap();
        assert!(max_abs(&(&w - &deq).unwrap()) > 0.0);
    }

    #[test]
    fn int8_roundtrip_error_is_half_a_step() {
        let w = weights(32, 64);
        let q = QLinear::from_weight(w.clone(), Quantization::Int8).unwrap();
        let (qv, scale) = quantize_int8(&w).unwrap();
        assert_eq!(qv.dtype(), DType::U8);
        check_bound(&w, &q, &scale, 0.0, 0.5 + 1e-4);
        // the absmax of each row maps to +-127 exactly
        let qi = qv
            .to_dtype(DType::F32)
            .unwrap()
            .affine(1.0, -128.0)
            .unwrap();
        let row_max: Vec<f32> = qi.abs().unwrap().max(1).unwrap().to_vec1().unwrap();
        assert!(row_max.iter().all(|&m| m == 127.0), "{row_max:?}");
    }

    #[test]
    fn quantized_linear_output_is_close_to_f32() {
        let w = Tensor::randn(0f32, 0.05, (48, 96), &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 7, 96), &Device::Cpu).unwrap();
        let dense = QLinear::from_weight(w.clone(), Quantization::None).unwrap();
        let want = dense.forward(&x).unwrap();
        let norm = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt()
        };
        // Relative Frobenius error: fp8 <= 4 %, int8 <= 1 % (measured ~2.5 % and ~0.5 %).
        for (quant, tol) in [(Quantization::Fp8, 0.04f32), (Quantization::Int8, 0.01)] {
            let q = QLinear::from_weight(w.clone(), quant).unwrap();
            assert_eq!(q.quantization(), quant);
            let got = q.forward(&x).unwrap();
            let rel = norm(&(&got - &want).unwrap()) / norm(&want);
            eprintln!("{quant}: relative error {rel}");
            assert!(rel < tol && rel > 0.0, "{quant}: relative error {rel}");
        }
    }

    #[test]
    fn zero_rows_stay_zero() {
        let w = Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap();
        for quant in [Quantization::Fp8, Quantization::Int8] {
            let q = QLinear::from_weight(w.clone(), quant).unwrap();
            assert_eq!(max_abs(&q.dequantized_weight(DType::F32).unwrap()), 0.0);
        }
    }
}
