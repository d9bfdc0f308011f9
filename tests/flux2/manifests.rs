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

use crate::common::{is_encoder_projection, is_loaded_encoder_tensor, stored_weight_bytes};

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

/// The device bytes of the weights of 4B and 9B under each weight setting, counted exactly from
/// the real checkpoints' shapes: the transformer's 2-D tensors are all Linears (`QLinear`), the
/// text encoder loads the embedding and layers 0..26 and quantizes their q/k/v/o and
/// gate/up/down projections, the VAE stays dense. Dense = bf16 (2 bytes, the CUDA dtype);
/// quantized = 1 byte per weight plus an f32 scale per output row (fp8 and int8 alike).
/// `tests/flux2/text.rs` checks the encoder part of this rule against the loaded tiny model.
///
/// These are weight bytes, not GPU peaks: activations, the dequantized copy of the layer in
/// flight, and allocator slack come on top. The table is in docs/benchmarks.md; this test fails
/// if the two disagree (`-- --nocapture` prints it).
fn shapes(m: &BTreeMap<String, Vec<usize>>) -> Vec<(&str, &[usize])> {
    m.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect()
}

#[test]
fn computed_weight_bytes_match_the_documented_table() {
    let (_, mut vae) = manifest("vae.json");
    vae.remove("bn.num_batches_tracked");
    let vae = stored_weight_bytes(shapes(&vae), |_, _| false, false, 2);
    let mut table = String::from(
        "| model | QUANTIZATION | TEXT_ENCODER_QUANTIZATION | transformer GB | text encoder GB | VAE GB | GPU total GB | GPU total bytes | host GB (embedding table) |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    let gb = |b: u64| format!("{:.2}", b as f64 / 1e9);
    for (model, transformer, encoder) in [
        ("4B", "transformer-4b.json", "qwen3-4b.json"),
        ("9B", "transformer-9b.json", "qwen3-8b.json"),
    ] {
        let (_, t) = manifest(transformer);
        let (_, e) = manifest(encoder);
        // The embedding table stays in host memory (text_encoder.rs); the rest is on the GPU.
        let (embedding, e): (Vec<_>, Vec<_>) = shapes(&e)
            .into_iter()
            .filter(|(n, _)| is_loaded_encoder_tensor(n))
            .partition(|(n, _)| n.contains("embed_tokens"));
        let host = stored_weight_bytes(embedding, |_, _| false, false, 2);
        for (tq, teq) in [(false, false), (false, true), (true, false), (true, true)] {
            let tb = stored_weight_bytes(shapes(&t), |_, s| s.len() == 2, tq, 2);
            let eb = stored_weight_bytes(e.clone(), is_encoder_projection, teq, 2);
            let name = |q: bool| if q { "fp8" } else { "none" };
            table += &format!(
                "| {model} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                name(tq),
                name(teq),
                gb(tb),
                gb(eb),
                gb(vae),
                gb(tb + eb + vae),
                tb + eb + vae,
                gb(host)
            );
        }
    }
    println!("{table}");
    let doc = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/benchmarks.md"),
    )
    .unwrap();
    assert!(
        doc.contains(&table),
        "docs/benchmarks.md lacks the computed table:\n{table}"
    );
}
