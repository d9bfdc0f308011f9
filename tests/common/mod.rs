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
