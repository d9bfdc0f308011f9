//! Parity of the FLUX.2 DiT, VAE, schedule and reference preprocessing with diffusers (f32, CPU),
//! on the tiny random-weight model. Fixtures: scripts/parity/make_dit_fixtures.py.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use imagegen::flux2::Quantization;
use imagegen::flux2::reference;
use imagegen::flux2::scheduler;
use imagegen::flux2::transformer::{Flux2Transformer2DModel, Flux2TransformerConfig};
use imagegen::flux2::vae::{AutoencoderKLFlux2, AutoencoderKLFlux2Config, pack, patchify};

use crate::common::{dit_fixture, flux2_fixtures, load_safetensors, max_abs_diff};

fn model_dir() -> PathBuf {
    flux2_fixtures().join("tiny-model")
}

fn load(name: &str) -> HashMap<String, Tensor> {
    load_safetensors(dit_fixture(name))
}

fn vb_for(dir: &Path) -> VarBuilder<'static> {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu).unwrap() }
}

/// `config.json` of a tiny-model component.
fn config<T: serde::de::DeserializeOwned>(component: &str) -> T {
    let path = model_dir().join(component).join("config.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn transformer(q: Quantization) -> Flux2Transformer2DModel {
    let cfg: Flux2TransformerConfig = config("transformer");
    Flux2Transformer2DModel::new(&cfg, vb_for(&model_dir().join("transformer")), q).unwrap()
}

fn vae() -> AutoencoderKLFlux2 {
    let cfg: AutoencoderKLFlux2Config = config("vae");
    AutoencoderKLFlux2::new(&cfg, vb_for(&model_dir().join("vae"))).unwrap()
}

/// The transformer on `hidden_states` with the fixture's prompt, ids and timestep `t_name`.
fn run_transformer(
    model: &Flux2Transformer2DModel,
    f: &HashMap<String, Tensor>,
    hidden_states: &Tensor,
    t_name: &str,
) -> Tensor {
    model
        .forward(
            hidden_states,
            &f["encoder_hidden_states"],
            &f[t_name],
            &f["img_ids"],
            &f["txt_ids"],
        )
        .unwrap()
}

#[test]
fn schedule_matches_diffusers() {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dit_fixture("schedule.json")).unwrap())
            .unwrap();
    let mut worst = 0f64;
    for c in cases.as_array().unwrap() {
        let n = c["steps"].as_u64().unwrap() as usize;
        let seq = c["image_seq_len"].as_u64().unwrap() as usize;
        let mu = c["mu"].as_f64().unwrap();
        assert!(
            (scheduler::compute_empirical_mu(seq, n) - mu).abs() < 1e-9,
            "mu for {n} steps, seq {seq}"
        );
        let want: Vec<f64> = c["sigmas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let got = scheduler::sigmas(n, seq);
        assert_eq!(got.len(), want.len(), "{n} steps");
        for (g, w) in got.iter().zip(&want) {
            worst = worst.max((*g as f64 - w).abs());
        }
    }
    eprintln!("schedule max abs error {worst:e}");
    assert!(worst < 1e-6, "schedule error {worst}");
}

#[test]
fn transformer_matches_diffusers() {
    let f = load("transformer.safetensors");
    let model = transformer(Quantization::None);
    for name in ["a", "b"] {
        let out = run_transformer(&model, &f, &f["hidden_states"], &format!("timestep_{name}"));
        let want = &f[&format!("output_{name}")];
        let err = max_abs_diff(&out, want);
        eprintln!("transformer case {name}: max abs error {err:e}");
        assert!(err < 1e-4, "transformer case {name}: {err}");
    }
    // Sensitivity: the reference tokens (T = 10) influence the noise tokens' output.
    let hs = &f["hidden_states"];
    let refs_zeroed = Tensor::cat(
        &[
            hs.narrow(1, 0, 12).unwrap(),
            hs.narrow(1, 12, 6).unwrap().zeros_like().unwrap(),
        ],
        1,
    )
    .unwrap();
    let moved = run_transformer(&model, &f, &refs_zeroed, "timestep_a");
    let delta = max_abs_diff(
        &moved.narrow(1, 0, 12).unwrap(),
        &f["output_a"].narrow(1, 0, 12).unwrap(),
    );
    assert!(
        delta > 1e-2,
        "reference tokens do not affect the output ({delta})"
    );
}

#[test]
fn vae_matches_diffusers() {
    let f = load("vae.safetensors");
    let vae = vae();
    let mean = vae.encode_mean(&f["image"]).unwrap();
    let e1 = max_abs_diff(&mean, &f["mean"]);
    let normed = vae.encode_normalized(&f["image"]).unwrap();
    let e2 = max_abs_diff(&normed, &f["normalized"]);
    let dec = vae.decode(&f["z"]).unwrap();
    let e3 = max_abs_diff(&dec, &f["decoded"]);
    eprintln!("vae: mean {e1:e}, normalized {e2:e}, decoded {e3:e}");
    assert!(e1 < 1e-4 && e2 < 1e-4 && e3 < 1e-4, "{e1} {e2} {e3}");
    // normalize/denormalize and patchify/pack round trips.
    let back = vae.normalize(&vae.denormalize(&normed).unwrap()).unwrap();
    assert!(max_abs_diff(&back, &normed) < 1e-5);
    assert_eq!(
        pack(&patchify(&mean).unwrap()).unwrap().dims(),
        &[1, 6, 128]
    );
}

#[test]
fn lanczos_resize_matches_pil() {
    let src = image::open(dit_fixture("resize_src.png"))
        .unwrap()
        .to_rgb8();
    let f = load("resize.safetensors");
    for (key, want) in &f {
        let (w, h) = key.split_once('x').unwrap();
        let (w, h): (u32, u32) = (w.parse().unwrap(), h.parse().unwrap());
        let got = reference::lanczos_resize(&src, w, h);
        let want: Vec<u8> = want.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let diff = got
            .as_raw()
            .iter()
            .zip(&want)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(diff, 0, "{key}: {diff} bytes differ from PIL");
    }
}

/// The BFL single-file layouts (f32 and fp8 with scales) of the same tiny transformer, served
/// under diffusers names by `weights::bfl_var_builder`, give the diffusers output.
#[test]
fn transformer_from_bfl_single_files_matches_diffusers() {
    let f = load("transformer.safetensors");
    let cfg: Flux2TransformerConfig = config("transformer");
    for (file, tol) in [
        ("flux-2-klein-tiny.safetensors", 1e-4f32),
        ("flux-2-klein-tiny-fp8.safetensors", 0.2),
    ] {
        let (vb, _) = imagegen::flux2::weights::bfl_var_builder(
            &flux2_fixtures().join(file),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let model = Flux2Transformer2DModel::new(&cfg, vb, Quantization::None).unwrap();
        let out = run_transformer(&model, &f, &f["hidden_states"], "timestep_a");
        let err = max_abs_diff(&out, &f["output_a"]);
        eprintln!("{file}: max abs error {err:e}");
        assert!(err < tol, "{file}: {err}");
    }
}

/// Weight-only quantization of every transformer Linear stays close to the f32 output.
#[test]
fn quantized_transformer_stays_close() {
    let f = load("transformer.safetensors");
    // fp8 e4m3 keeps 3 mantissa bits, int8 about 7: outputs are ~3.5 in magnitude.
    for (q, tol) in [(Quantization::Fp8, 0.3f32), (Quantization::Int8, 0.1)] {
        let out = run_transformer(&transformer(q), &f, &f["hidden_states"], "timestep_a");
        let err = max_abs_diff(&out, &f["output_a"]);
        eprintln!("quantization {q}: max abs error {err:e}");
        assert!(err < tol && err > 0.0, "{q}: {err}");
    }
}
