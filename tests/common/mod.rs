//! Helpers shared by the integration tests; each test binary pulls them in with `mod common;`.

// Every test binary compiles its own copy and uses only some of these.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::RgbImage;

/// `tests/fixtures/<sub>` in this crate.
pub fn fixtures(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(sub)
}

/// `tests/fixtures/flux2`: the tiny random-weight model and its reference outputs.
pub fn flux2_fixtures() -> PathBuf {
    fixtures("flux2")
}

/// A file of `tests/fixtures/flux2/dit`: the diffusers reference outputs.
pub fn dit_fixture(name: &str) -> PathBuf {
    flux2_fixtures().join("dit").join(name)
}

/// All tensors of a safetensors fixture, on the CPU.
pub fn load_safetensors(path: impl AsRef<Path>) -> HashMap<String, Tensor> {
    let path = path.as_ref();
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Largest absolute element of `t`, as f32.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Largest absolute element-wise difference of two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    max_abs(&(a - b).unwrap())
}

/// (fraction of pixels whose channels are all within 1 level, max level difference) of two
/// images of the same size.
pub fn compare_images(a: &RgbImage, b: &RgbImage) -> (f64, u8) {
    assert_eq!(a.dimensions(), b.dimensions(), "image sizes differ");
    let mut ok = 0usize;
    let mut worst = 0u8;
    for (pa, pb) in a.pixels().zip(b.pixels()) {
        let d =
            pa.0.iter()
                .zip(pb.0)
                .map(|(x, y)| x.abs_diff(y))
                .max()
                .unwrap();
        worst = worst.max(d);
        ok += usize::from(d <= 1);
    }
    (ok as f64 / (a.width() * a.height()) as f64, worst)
}

/// Bytes of weights as imagegen holds them on the device: a quantized Linear `[out, in]` takes
/// one byte per weight plus an f32 scale per output row; every other tensor (and every Linear
/// when `quantized` is false) `dense` bytes per element.
pub fn stored_weight_bytes<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>,
    is_linear: impl Fn(&str, &[usize]) -> bool,
    quantized: bool,
    dense: u64,
) -> u64 {
    tensors
        .into_iter()
        .map(|(name, shape)| {
            let n: u64 = shape.iter().map(|&d| d as u64).product();
            if quantized && is_linear(name, shape) {
                n + 4 * shape[0] as u64
            } else {
                n * dense
            }
        })
        .sum()
}

/// Qwen3 decoder layers the text encoder loads (0..26 of 36: FLUX.2 reads layer 27's output).
pub const ENCODER_LAYERS: usize = 27;

/// The Qwen3 checkpoint tensors the text encoder loads: the embedding and layers 0..26.
pub fn is_loaded_encoder_tensor(name: &str) -> bool {
    name == "model.embed_tokens.weight" || encoder_layer(name).is_some_and(|i| i < ENCODER_LAYERS)
}

/// The encoder's quantizable Linears: the 2-D tensors of the decoder layers (q/k/v/o and
/// gate/up/down projections; the norms are 1-D).
pub fn is_encoder_projection(name: &str, shape: &[usize]) -> bool {
    encoder_layer(name).is_some() && shape.len() == 2
}

fn encoder_layer(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}
