//! BFL's single-file transformer (`flux-2-klein-*.safetensors`, optionally fp8 with scales),
//! served under diffusers names so the model code knows one naming only.

use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

use super::WeightsError;
use crate::flux2::transformer::Flux2TransformerConfig;

/// The transformer config read off the tensor shapes of a BFL file that ships without
/// `transformer/config.json`; `name` is the file as the model lists it (for errors).
pub(super) fn config_from_shapes(
    path: &Path,
    name: &str,
) -> Result<Flux2TransformerConfig, WeightsError> {
    // SAFETY: read-only memory map of a model file (only the header is read here).
    let st = unsafe { MmapedSafetensors::new(path)? };
    let shapes: Vec<(String, Vec<usize>)> = st
        .tensors()
        .iter()
        .map(|(n, v)| {
            let n = n.strip_prefix("model.diffusion_model.").unwrap_or(n);
            (n.to_string(), v.shape().to_vec())
        })
        .collect();
    Flux2TransformerConfig::from_bfl_shapes(shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice())))
        .map_err(|message| WeightsError::BadFile {
            file: name.to_string(),
            message,
        })
}

/// A `VarBuilder` that serves a BFL-format single-file transformer under diffusers names:
/// fused qkv split into q/k/v, `linear1`/`linear2` and `*.scale` renamed, the final layer's
/// [shift; scale] rows swapped to diffusers' [scale; shift], and fp8 weights multiplied by their
/// `weight_scale` (or `scale_weight`). A `model.diffusion_model.` prefix is accepted. Returns
/// whether the file had scaled (fp8) weights.
pub fn bfl_var_builder(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(VarBuilder<'static>, bool), WeightsError> {
    // SAFETY: read-only memory map of a model file.
    let st = unsafe { MmapedSafetensors::new(path)? };
    let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    let prefix = if names
        .iter()
        .any(|n| n == "model.diffusion_model.img_in.weight")
    {
        "model.diffusion_model.".to_string()
    } else if names.iter().any(|n| n == "img_in.weight") {
        String::new()
    } else {
        return Err(WeightsError::BadFile {
            file: path.display().to_string(),
            message: "not a BFL FLUX.2 transformer (no img_in.weight)".into(),
        });
    };
    let fp8 = names
        .iter()
        .any(|n| n.ends_with(".weight_scale") || n.ends_with(".scale_weight"));
    let backend = BflBackend { st, prefix };
    Ok((
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone()),
        fp8,
    ))
}

/// Suffixes under which the BFL backend serves an fp8 Linear's stored values and per-row scales
/// unchanged (`<layer>.weight` + suffix), so `quant::linear_no_bias` with `Quantization::Fp8`
/// keeps the file's exact fp8 weights instead of re-quantizing dequantized ones.
pub const RAW_FP8_SUFFIX: &str = "#fp8";
pub const RAW_FP8_SCALE_SUFFIX: &str = "#fp8_scale";

/// How one diffusers tensor is made from the BFL file.
#[derive(Debug, Clone, PartialEq, Eq)]
enum BflSource {
    Direct(String),
    /// Part `index` of `parts` equal chunks along dim 0 (fused qkv).
    Chunk(String, usize, usize),
    /// Rows [a; b] become [b; a] (final layer modulation).
    SwapHalves(String),
}

impl BflSource {
    /// The BFL tensor name.
    fn bfl(&self) -> &str {
        match self {
            Self::Direct(b) | Self::Chunk(b, _, _) | Self::SwapHalves(b) => b,
        }
    }

    /// The rows of BFL tensor `t` (or of its per-row scales) that make up the diffusers tensor.
    fn select_rows(&self, t: Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Direct(_) => Ok(t),
            Self::Chunk(b, i, n) => {
                let rows = t.dim(0)?;
                if !rows.is_multiple_of(*n) {
                    candle_core::bail!("{b}: {rows} rows do not split into {n}");
                }
                t.narrow(0, i * rows / n, rows / n)?.contiguous()
            }
            Self::SwapHalves(_) => {
                let half = t.dim(0)? / 2;
                Tensor::cat(&[t.narrow(0, half, half)?, t.narrow(0, 0, half)?], 0)
            }
        }
    }
}

/// Which rows of a BFL tensor make up a diffusers tensor (public view of [`BflSource`], for
/// mapping BFL-named LoRA modules the same way the weights are mapped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BflRows {
    All,
    /// Part `.0` of `.1` equal chunks along dim 0.
    Chunk(usize, usize),
    /// Rows [a; b] become [b; a].
    SwapHalves,
}

/// The BFL tensor a diffusers transformer tensor is read from, and which of its rows.
pub fn bfl_rows_of(diffusers_name: &str) -> Option<(String, BflRows)> {
    Some(match bfl_source(diffusers_name)? {
        BflSource::Direct(b) => (b, BflRows::All),
        BflSource::Chunk(b, i, n) => (b, BflRows::Chunk(i, n)),
        BflSource::SwapHalves(b) => (b, BflRows::SwapHalves),
    })
}

/// diffusers name -> BFL source (the inverse of diffusers' single-file converter).
fn bfl_source(name: &str) -> Option<BflSource> {
    use BflSource::*;
    let top = [
        ("x_embedder.weight", "img_in.weight"),
        ("context_embedder.weight", "txt_in.weight"),
        (
            "time_guidance_embed.timestep_embedder.linear_1.weight",
            "time_in.in_layer.weight",
        ),
        (
            "time_guidance_embed.timestep_embedder.linear_2.weight",
            "time_in.out_layer.weight",
        ),
        (
            "time_guidance_embed.guidance_embedder.linear_1.weight",
            "guidance_in.in_layer.weight",
        ),
        (
            "time_guidance_embed.guidance_embedder.linear_2.weight",
            "guidance_in.out_layer.weight",
        ),
        (
            "double_stream_modulation_img.linear.weight",
            "double_stream_modulation_img.lin.weight",
        ),
        (
            "double_stream_modulation_txt.linear.weight",
            "double_stream_modulation_txt.lin.weight",
        ),
        (
            "single_stream_modulation.linear.weight",
            "single_stream_modulation.lin.weight",
        ),
        ("proj_out.weight", "final_layer.linear.weight"),
    ];
    if let Some((_, b)) = top.iter().find(|(d, _)| *d == name) {
        return Some(Direct(b.to_string()));
    }
    if name == "norm_out.linear.weight" {
        return Some(SwapHalves("final_layer.adaLN_modulation.1.weight".into()));
    }
    if let Some(rest) = name.strip_prefix("transformer_blocks.") {
        let (i, within) = rest.split_once('.')?;
        let p = format!("double_blocks.{i}.");
        let src = match within {
            "attn.to_q.weight" => Chunk(p + "img_attn.qkv.weight", 0, 3),
            "attn.to_k.weight" => Chunk(p + "img_attn.qkv.weight", 1, 3),
            "attn.to_v.weight" => Chunk(p + "img_attn.qkv.weight", 2, 3),
            "attn.add_q_proj.weight" => Chunk(p + "txt_attn.qkv.weight", 0, 3),
            "attn.add_k_proj.weight" => Chunk(p + "txt_attn.qkv.weight", 1, 3),
            "attn.add_v_proj.weight" => Chunk(p + "txt_attn.qkv.weight", 2, 3),
            "attn.norm_q.weight" => Direct(p + "img_attn.norm.query_norm.scale"),
            "attn.norm_k.weight" => Direct(p + "img_attn.norm.key_norm.scale"),
            "attn.norm_added_q.weight" => Direct(p + "txt_attn.norm.query_norm.scale"),
            "attn.norm_added_k.weight" => Direct(p + "txt_attn.norm.key_norm.scale"),
            "attn.to_out.0.weight" => Direct(p + "img_attn.proj.weight"),
            "attn.to_add_out.weight" => Direct(p + "txt_attn.proj.weight"),
            "ff.linear_in.weight" => Direct(p + "img_mlp.0.weight"),
            "ff.linear_out.weight" => Direct(p + "img_mlp.2.weight"),
            "ff_context.linear_in.weight" => Direct(p + "txt_mlp.0.weight"),
            "ff_context.linear_out.weight" => Direct(p + "txt_mlp.2.weight"),
            _ => return None,
        };
        return Some(src);
    }
    if let Some(rest) = name.strip_prefix("single_transformer_blocks.") {
        let (i, within) = rest.split_once('.')?;
        let p = format!("single_blocks.{i}.");
        let src = match within {
            "attn.to_qkv_mlp_proj.weight" => Direct(p + "linear1.weight"),
            "attn.to_out.weight" => Direct(p + "linear2.weight"),
            "attn.norm_q.weight" => Direct(p + "norm.query_norm.scale"),
            "attn.norm_k.weight" => Direct(p + "norm.key_norm.scale"),
            _ => return None,
        };
        return Some(src);
    }
    None
}

struct BflBackend {
    st: MmapedSafetensors,
    prefix: String,
}

impl BflBackend {
    fn has(&self, bfl: &str) -> bool {
        self.st.get(&format!("{}{bfl}", self.prefix)).is_ok()
    }

    /// The `weight_scale` / `scale_weight` tensor name of a BFL weight, if it has one.
    fn scale_name(&self, bfl: &str) -> Option<String> {
        let base = format!("{}{bfl}", self.prefix);
        let base = base.strip_suffix(".weight")?;
        [
            format!("{base}.weight_scale"),
            format!("{base}.scale_weight"),
        ]
        .into_iter()
        .find(|n| self.st.get(n).is_ok())
    }

    /// F8E4M3 values (`#fp8`) or `[out, 1]` f32 scales (`#fp8_scale`) of a scaled fp8 weight.
    fn get_raw_fp8(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        let (weight, want_scale) = match name.strip_suffix(RAW_FP8_SCALE_SUFFIX) {
            Some(w) => (w, true),
            None => (name.strip_suffix(RAW_FP8_SUFFIX).unwrap_or(name), false),
        };
        let src = bfl_source(weight)
            .ok_or_else(|| candle_core::Error::msg(format!("no BFL tensor maps to {weight}")))?;
        let (BflSource::Direct(b) | BflSource::Chunk(b, _, _)) = &src else {
            candle_core::bail!("{weight}: no raw fp8 form");
        };
        let scale_name = self
            .scale_name(b)
            .ok_or_else(|| candle_core::Error::msg(format!("{b} has no fp8 scale")))?;
        // Sliced on the host: copying fp8 rows on the GPU needs candle's fp8 copy kernel, which
        // compute_80 builds lack (they have the fp8 casts, the only fp8 kernels used later).
        let raw = self.st.load(&format!("{}{b}", self.prefix), &Device::Cpu)?;
        if raw.dtype() != DType::F8E4M3 {
            candle_core::bail!("{b} is {:?}, not F8E4M3", raw.dtype());
        }
        let rows = src.select_rows(raw)?.to_device(dev)?;
        if !want_scale {
            return Ok(rows);
        }
        let out = rows.dim(0)?;
        let s = self.st.load(&scale_name, dev)?.to_dtype(DType::F32)?;
        let full_rows = match &src {
            BflSource::Chunk(_, _, n) => out * n,
            _ => out,
        };
        let s = match s.elem_count() {
            1 => s.flatten_all()?.broadcast_as((out, 1))?.contiguous()?,
            k if k == full_rows => src.select_rows(s.reshape((full_rows, 1))?)?,
            k => candle_core::bail!("{scale_name}: {k} elements, expected 1 or {full_rows}"),
        };
        Ok(s)
    }

    fn has_raw_fp8(&self, name: &str) -> bool {
        let weight = name
            .strip_suffix(RAW_FP8_SCALE_SUFFIX)
            .or_else(|| name.strip_suffix(RAW_FP8_SUFFIX));
        match weight.and_then(bfl_source) {
            Some(BflSource::Direct(b) | BflSource::Chunk(b, _, _)) => {
                self.scale_name(&b).is_some()
                    && self
                        .st
                        .get(&format!("{}{b}", self.prefix))
                        .is_ok_and(|v| DType::try_from(v.dtype()).ok() == Some(DType::F8E4M3))
            }
            _ => false,
        }
    }

    /// Loads a BFL tensor in f32 with its fp8 scale applied, if it has one.
    fn load_dequantized(&self, bfl: &str, dev: &Device) -> candle_core::Result<Tensor> {
        let full = format!("{}{bfl}", self.prefix);
        let t32 = self.st.load(&full, dev)?.to_dtype(DType::F32)?;
        let Some(scale_name) = self.scale_name(bfl) else {
            return Ok(t32);
        };
        let s = self.st.load(&scale_name, dev)?.to_dtype(DType::F32)?;
        let out = t32.dim(0)?;
        let s = match s.elem_count() {
            1 => s.flatten_all()?.reshape((1, 1))?,
            n if n == out => s.reshape((out, 1))?,
            n => candle_core::bail!("{full}: scale has {n} elements, expected 1 or {out}"),
        };
        t32.broadcast_mul(&s)
    }
}

impl SimpleBackend for BflBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "shape mismatch for {name} (from the BFL file): expected {s:?}, got {:?}",
                t.shape()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if name.ends_with(RAW_FP8_SUFFIX) || name.ends_with(RAW_FP8_SCALE_SUFFIX) {
            // Served as stored; the caller asks for the matching dtype.
            return self.get_raw_fp8(name, dev);
        }
        let src = bfl_source(name)
            .ok_or_else(|| candle_core::Error::msg(format!("no BFL tensor maps to {name}")))?;
        src.select_rows(self.load_dequantized(src.bfl(), dev)?)?
            .to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        if name.ends_with(RAW_FP8_SUFFIX) || name.ends_with(RAW_FP8_SCALE_SUFFIX) {
            return self.has_raw_fp8(name);
        }
        bfl_source(name).is_some_and(|src| self.has(src.bfl()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    #[test]
    fn bfl_mapping_covers_the_block_names() {
        assert_eq!(
            bfl_source("transformer_blocks.3.attn.add_v_proj.weight"),
            Some(BflSource::Chunk(
                "double_blocks.3.txt_attn.qkv.weight".into(),
                2,
                3
            ))
        );
        assert_eq!(
            bfl_source("single_transformer_blocks.11.attn.norm_k.weight"),
            Some(BflSource::Direct(
                "single_blocks.11.norm.key_norm.scale".into()
            ))
        );
        assert_eq!(
            bfl_source("norm_out.linear.weight"),
            Some(BflSource::SwapHalves(
                "final_layer.adaLN_modulation.1.weight".into()
            ))
        );
        assert_eq!(bfl_source("transformer_blocks.0.attn.unknown.weight"), None);
    }

    #[derive(serde::Deserialize)]
    struct Manifest {
        tensors: std::collections::BTreeMap<String, Vec<usize>>,
    }

    fn manifest(name: &str) -> Manifest {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/flux2/manifests")
            .join(format!("{name}.json"));
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    /// Every diffusers tensor of the real transformers has a BFL source of the right shape,
    /// and every tensor of the real BFL file is used.
    #[test]
    fn bfl_mapping_covers_the_real_4b_and_9b_checkpoints() {
        for variant in ["transformer-4b", "transformer-9b"] {
            let diffusers = manifest(variant).tensors;
            let bfl = manifest(&format!("{variant}-bfl")).tensors;
            let mut used = BTreeSet::new();
            for (name, shape) in &diffusers {
                let src = bfl_source(name).unwrap_or_else(|| panic!("{variant}: {name} unmapped"));
                let (b, want) = match &src {
                    BflSource::Direct(b) | BflSource::SwapHalves(b) => (b, shape.clone()),
                    BflSource::Chunk(b, _, n) => {
                        let mut s = shape.clone();
                        s[0] *= n;
                        (b, s)
                    }
                };
                assert_eq!(bfl.get(b), Some(&want), "{variant}: {name} <- {b}");
                used.insert(b.clone());
            }
            let unused: Vec<_> = bfl.keys().filter(|k| !used.contains(*k)).collect();
            assert!(
                unused.is_empty(),
                "{variant}: BFL tensors never loaded: {unused:?}"
            );
        }
    }
}
