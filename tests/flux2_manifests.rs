//! The transformer and VAE request exactly the tensor names and shapes of the real FLUX.2
//! [klein] 4B / 9B checkpoints (manifests dumped from diffusers on the meta device by
//! scripts/parity/make_manifests.py), so real weights load the first time.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device};
use imagegen::flux2::Quantization;
use imagegen::flux2::transformer::{Flux2Transformer2DModel, Flux2TransformerConfig};
use imagegen::flux2::vae::{AutoencoderKLFlux2, AutoencoderKLFlux2Config};
use imagegen::flux2::weights::recording_var_builder;

fn manifest(name: &str) -> (serde_json::Value, BTreeMap<String, Vec<usize>>) {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/flux2/manifests")
        .join(name);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let tensors = serde_json::from_value(v["tensors"].clone()).unwrap();
    (v["config"].clone(), tensors)
}

fn diff(
    requested: &BTreeMap<String, Vec<usize>>,
    real: &BTreeMap<String, Vec<usize>>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (k, s) in requested {
        match real.get(k) {
            None => out.push(format!("requested but not in checkpoint: {k} {s:?}")),
            Some(r) if r != s => out.push(format!(
                "shape mismatch {k}: requested {s:?}, checkpoint {r:?}"
            )),
            _ => {}
        }
    }
    for k in real.keys().filter(|k| !requested.contains_key(*k)) {
        out.push(format!("in checkpoint but never loaded: {k}"));
    }
    out
}

#[test]
fn transformer_requests_exactly_the_real_4b_and_9b_tensors() {
    for name in ["transformer-4b.json", "transformer-9b.json"] {
        let (cfg, real) = manifest(name);
        let cfg: Flux2TransformerConfig = serde_json::from_value(cfg).unwrap();
        let (vb, log) = recording_var_builder(DType::BF16, &Device::Cpu);
        Flux2Transformer2DModel::new(&cfg, vb, Quantization::None).unwrap();
        let requested = log.lock().unwrap().clone();
        let d = diff(&requested, &real);
        assert!(d.is_empty(), "{name}:\n{}", d.join("\n"));
        assert!(
            requested.len() > 100,
            "{name}: only {} tensors",
            requested.len()
        );
    }
}

#[test]
fn vae_requests_exactly_the_real_tensors() {
    let (cfg, mut real) = manifest("vae.json");
    // BatchNorm's step counter is never used at inference.
    real.remove("bn.num_batches_tracked");
    let cfg: AutoencoderKLFlux2Config = serde_json::from_value(cfg).unwrap();
    let (vb, log) = recording_var_builder(DType::F32, &Device::Cpu);
    AutoencoderKLFlux2::new(&cfg, vb).unwrap();
    let requested = log.lock().unwrap().clone();
    let d = diff(&requested, &real);
    assert!(d.is_empty(), "vae:\n{}", d.join("\n"));
}
