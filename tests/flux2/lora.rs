//! LoRA adapters against diffusers (`load_lora_weights` + `set_adapters` with a non-unit scale,
//! `fuse_lora`) on the tiny model: per-layer merged weights and the end-to-end image, for each
//! key layout, fused at load and through the per-request side path, on f32, int8 and fp8 bases.
//! Fixtures: scripts/parity/make_lora_fixtures.py → tests/fixtures/flux2/lora/.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use imagegen::flux2::Quantization;
use imagegen::flux2::lora::{
    BaseLinears, Component, KeyResolver, LoraAdapter, LoraMode, LoraSpec, fused_var_builder,
};
use imagegen::flux2::pipeline::{Flux2Error, Flux2Pipeline, GenerateParams, LoadOptions};
use imagegen::flux2::transformer::Flux2TransformerConfig;
use imagegen::flux2::weights::{ModelFiles, bfl_var_builder};

use crate::common::{compare_images, dit_fixture, flux2_fixtures, load_safetensors, max_abs_diff};

const FORMATS: [&str; 3] = ["diffusers", "kohya", "bfl"];

fn lora_dir() -> PathBuf {
    flux2_fixtures().join("lora")
}

fn tiny() -> PathBuf {
    flux2_fixtures().join("tiny-model")
}

fn meta() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(lora_dir().join("lora.json")).unwrap()).unwrap()
}

fn scale(fmt: &str) -> f64 {
    meta()["scales"][fmt].as_f64().unwrap()
}

fn resolver() -> KeyResolver {
    let files = ModelFiles::local(&tiny()).unwrap();
    let tcfg: Flux2TransformerConfig = files.read_json("transformer/config.json").unwrap();
    let te = files.text_encoder_config().unwrap();
    KeyResolver::new(BaseLinears::new(&tcfg, Some(&te), "tiny-model"))
}

fn adapter(fmt: &str) -> LoraAdapter {
    let path = lora_dir().join(format!("{fmt}.safetensors"));
    LoraAdapter::load(fmt, &path, fmt, &resolver()).unwrap()
}

fn spec(fmt: &str, mode: LoraMode) -> LoraSpec {
    LoraSpec {
        name: fmt.into(),
        source: lora_dir()
            .join(format!("{fmt}.safetensors"))
            .display()
            .to_string(),
        scale: scale(fmt),
        mode,
    }
}

fn opts(loras: Vec<LoraSpec>, q: Quantization) -> LoadOptions {
    LoadOptions {
        model_id: tiny().display().to_string(),
        quantization: q,
        text_encoder_quantization: Quantization::None,
        device: Device::Cpu,
        dtype: DType::F32,
        hf_token: None,
        attention: Default::default(),
        loras,
    }
}

fn never() -> bool {
    false
}

fn t2i_params(loras: Vec<(String, f64)>) -> GenerateParams {
    let c = &meta()["case"];
    let latents = load_safetensors(dit_fixture("pipe_t2i.safetensors"))["latents"].clone();
    GenerateParams {
        prompt: c["prompt"].as_str().unwrap().into(),
        width: c["width"].as_u64().unwrap() as u32,
        height: c["height"].as_u64().unwrap() as u32,
        num_steps: c["steps"].as_u64().unwrap() as u32,
        seed: 0,
        guidance_scale: 1.0,
        latents: Some(latents),
        loras,
    }
}

fn reference_png(fmt: &str) -> RgbImage {
    image::open(lora_dir().join(format!("{fmt}.png")))
        .unwrap()
        .to_rgb8()
}

fn base_png() -> RgbImage {
    image::open(dit_fixture("pipe_t2i.png")).unwrap().to_rgb8()
}

/// Fraction of pixels within 1 level, asserted ≥ 99.9 %, and the worst difference.
fn assert_image_matches(got: &RgbImage, want: &RgbImage, what: &str) {
    let (frac, worst) = compare_images(got, want);
    eprintln!(
        "{what}: pixels within 1 level {:.4}%, max diff {worst}",
        frac * 100.0
    );
    assert!(
        frac >= 0.999,
        "{what}: only {frac} of pixels within 1 level"
    );
}

fn mean_abs_diff(a: &RgbImage, b: &RgbImage) -> f64 {
    let n = a.as_raw().len() as f64;
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y) as f64)
        .sum::<f64>()
        / n
}

/// `name -> merged @ probe` from a fixture, and the probes by input width.
fn merged_probes(fmt: &str) -> (HashMap<String, Tensor>, HashMap<usize, Tensor>) {
    let t = load_safetensors(lora_dir().join(format!("{fmt}_out.safetensors")));
    let mut merged = HashMap::new();
    let mut probes = HashMap::new();
    for (k, v) in t {
        if let Some(n) = k.strip_prefix("merged.") {
            merged.insert(n.to_string(), v);
        } else if let Some(i) = k.strip_prefix("probe.") {
            probes.insert(i.parse().unwrap(), v);
        }
    }
    (merged, probes)
}

/// Every Linear diffusers changes, and only those, is targeted; the fused weight of each equals
/// diffusers' fuse_lora result (compared through fixed random probes).
#[test]
fn merged_weights_match_diffusers_per_layer_in_every_layout() {
    let files = ModelFiles::local(&tiny()).unwrap();
    for fmt in FORMATS {
        let a = Arc::new(adapter(fmt));
        let (merged, probes) = merged_probes(fmt);
        let targets: BTreeSet<String> = a
            .pairs
            .keys()
            .filter(|(c, _)| *c == Component::Transformer)
            .map(|(_, n)| n.clone())
            .collect();
        let want: BTreeSet<String> = merged.keys().cloned().collect();
        assert_eq!(
            targets, want,
            "{fmt}: targeted Linears differ from diffusers'"
        );
        let base = files
            .component_var_builder("transformer", DType::F32, &Device::Cpu)
            .unwrap();
        let vb = fused_var_builder(base, Component::Transformer, vec![(a, scale(fmt))]);
        let mut worst = 0f32;
        for (name, want) in &merged {
            let (out, _) = want.dims2().unwrap();
            let inp = probes
                .keys()
                .copied()
                .find(|&i| vb.get((out, i), &format!("{name}.weight")).is_ok());
            let inp = inp.unwrap_or_else(|| panic!("{fmt}: {name}: no probe fits"));
            let w = vb.get((out, inp), &format!("{name}.weight")).unwrap();
            let got = w.matmul(&probes[&inp]).unwrap();
            worst = worst.max(max_abs_diff(&got, want));
        }
        eprintln!(
            "{fmt}: {} Linears, merged-weight max abs error {worst:e}",
            merged.len()
        );
        assert!(worst < 1e-5, "{fmt}: merged weights differ by {worst}");
    }
}

/// A LoRA that also changes the Qwen3 text encoder is fused there too (diffusers' Flux2 loader
/// has none; the reference is the merge formula in float64).
#[test]
fn text_encoder_lora_is_fused_into_the_qwen3_weights() {
    let a = Arc::new(adapter("te"));
    assert_eq!(a.targets_in(Component::TextEncoder), 15);
    assert_eq!(a.targets_in(Component::Transformer), 2);
    let (merged, probes) = merged_probes("te");
    let files = ModelFiles::local(&tiny()).unwrap();
    let base = files
        .component_var_builder("text_encoder", DType::F32, &Device::Cpu)
        .unwrap();
    let vb = fused_var_builder(base.clone(), Component::TextEncoder, vec![(a, scale("te"))]);
    let mut worst = 0f32;
    for (name, want) in &merged {
        let (out, _) = want.dims2().unwrap();
        let inp = probes
            .keys()
            .copied()
            .find(|&i| base.get((out, i), &format!("{name}.weight")).is_ok())
            .unwrap();
        let w = vb.get((out, inp), &format!("{name}.weight")).unwrap();
        worst = worst.max(max_abs_diff(&w.matmul(&probes[&inp]).unwrap(), want));
        // and the base weight really differs (the check would pass on a no-op otherwise)
        let b = base.get((out, inp), &format!("{name}.weight")).unwrap();
        assert!(max_abs_diff(&b.matmul(&probes[&inp]).unwrap(), want) > 1e-2);
    }
    eprintln!("text encoder: merged-weight max abs error {worst:e}");
    assert!(worst < 1e-5, "{worst}");
    // In the pipeline, the text encoder's output changes with the adapter fused.
    let base_p = Flux2Pipeline::load(&opts(vec![], Quantization::None)).unwrap();
    let te_p =
        Flux2Pipeline::load(&opts(vec![spec("te", LoraMode::Fused)], Quantization::None)).unwrap();
    assert_eq!(te_p.lora_status()[0].text_encoder_targets, 15);
    let e0 = base_p.encode_prompt("a red fox").unwrap();
    let e1 = te_p.encode_prompt("a red fox").unwrap();
    assert!(max_abs_diff(&e0, &e1) > 1e-3);
}

/// `LORAS` (fused at load), each layout: the image is diffusers' within 1 level on 99.9 %.
#[test]
fn fused_lora_matches_diffusers_end_to_end_in_every_layout() {
    for fmt in FORMATS {
        let p = Flux2Pipeline::load(&opts(vec![spec(fmt, LoraMode::Fused)], Quantization::None))
            .unwrap();
        let st = &p.lora_status()[0];
        assert_eq!(
            (st.status.as_str(), st.mode),
            ("loaded", LoraMode::Fused),
            "{st:?}"
        );
        let out = p.generate(&t2i_params(vec![]), None, &never).unwrap();
        assert_image_matches(&out.image, &reference_png(fmt), &format!("fused {fmt}"));
        // the adapter visibly changes the image (so the match above proves it is applied)
        assert!(mean_abs_diff(&out.image, &base_png()) > 5.0);
    }
}

/// `LORA_PRELOAD` + a request's `loras`: the side path matches diffusers for each layout, a
/// request without `loras` gets the base image, and an unknown name is an input error.
#[test]
fn per_request_side_path_matches_diffusers_and_leaves_other_requests_alone() {
    let p = Flux2Pipeline::load(&opts(
        FORMATS
            .iter()
            .map(|f| spec(f, LoraMode::PerRequest))
            .collect(),
        Quantization::None,
    ))
    .unwrap();
    assert_eq!(p.per_request_loras(), vec!["bfl", "diffusers", "kohya"]);
    for fmt in FORMATS {
        let out = p
            .generate(&t2i_params(vec![(fmt.into(), scale(fmt))]), None, &never)
            .unwrap();
        assert_image_matches(&out.image, &reference_png(fmt), &format!("side path {fmt}"));
        // the next request, without adapters, is the base model again
        let plain = p.generate(&t2i_params(vec![]), None, &never).unwrap();
        assert_image_matches(
            &plain.image,
            &base_png(),
            &format!("after {fmt}: no adapter"),
        );
    }
    let err = p
        .generate(&t2i_params(vec![("nope".into(), 1.0)]), None, &never)
        .unwrap_err();
    assert!(matches!(err, Flux2Error::InvalidInput { ref field, .. } if field == "loras"));
    assert!(err.to_string().contains("unknown adapter 'nope'"), "{err}");
    let err = p
        .generate(&t2i_params(vec![("bfl".into(), 9.0)]), None, &never)
        .unwrap_err();
    assert!(err.to_string().contains("scale 9"), "{err}");
    // the failed requests left nothing switched on
    let plain = p.generate(&t2i_params(vec![]), None, &never).unwrap();
    assert_image_matches(&plain.image, &base_png(), "after errors: no adapter");
}

/// int8 and fp8 bases: fused before quantising, or the side path over the quantised base; both
/// stay within the bounds the quantised pipeline keeps without LoRA (tests/flux2/pipeline.rs).
#[test]
fn lora_on_int8_and_fp8_bases_stays_close_to_diffusers() {
    for (q, max_mean, min_within8) in [
        (Quantization::Int8, 1.0, 0.999),
        (Quantization::Fp8, 4.0, 0.8),
    ] {
        for mode in [LoraMode::Fused, LoraMode::PerRequest] {
            let p = Flux2Pipeline::load(&opts(vec![spec("kohya", mode)], q)).unwrap();
            let loras = match mode {
                LoraMode::Fused => vec![],
                LoraMode::PerRequest => vec![("kohya".to_string(), scale("kohya"))],
            };
            let out = p.generate(&t2i_params(loras), None, &never).unwrap();
            let want = reference_png("kohya");
            let mean = mean_abs_diff(&out.image, &want);
            let within8 = out
                .image
                .as_raw()
                .iter()
                .zip(want.as_raw())
                .filter(|(a, b)| a.abs_diff(**b) <= 8)
                .count() as f64
                / want.as_raw().len() as f64;
            eprintln!("{q} {mode:?}: mean abs diff {mean:.3}, within 8 levels {within8:.4}");
            assert!(mean <= max_mean && within8 >= min_within8, "{q} {mode:?}");
            // closer to the LoRA reference than to the base image
            assert!(
                mean < mean_abs_diff(&out.image, &base_png()) / 2.0,
                "{q} {mode:?}"
            );
        }
    }
}

/// A BFL fp8 file with QUANTIZATION=fp8 keeps its stored fp8 Linears, except those a fused
/// adapter targets: those are dequantised, fused and re-quantised with per-row scales.
#[test]
fn fused_lora_on_a_bfl_fp8_file_requantises_only_the_targeted_linears() {
    let (base, fp8) = bfl_var_builder(
        &flux2_fixtures().join("flux-2-klein-tiny-fp8.safetensors"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert!(fp8);
    let a = Arc::new(adapter("bfl"));
    let s = scale("bfl");
    let vb = fused_var_builder(base.clone(), Component::Transformer, vec![(a.clone(), s)]);
    let d = 48;
    let get_raw = |vb: &candle_nn::VarBuilder, name: &str| {
        let q = vb
            .get_with_hints_dtype(
                (d, d),
                &format!("{name}.weight#fp8"),
                candle_nn::Init::Const(0.),
                DType::F8E4M3,
            )
            .unwrap();
        let sc = vb
            .get_with_hints_dtype(
                (d, 1),
                &format!("{name}.weight#fp8_scale"),
                candle_nn::Init::Const(0.),
                DType::F32,
            )
            .unwrap();
        q.to_dtype(DType::F32).unwrap().broadcast_mul(&sc).unwrap()
    };
    // targeted: ≈ dequantised + delta, within fp8 rounding
    let name = "transformer_blocks.1.attn.add_k_proj";
    let fused = get_raw(&vb, name);
    let want = (base.get((d, d), &format!("{name}.weight")).unwrap()
        + a.pair(Component::Transformer, name)
            .unwrap()
            .delta(s, &Device::Cpu)
            .unwrap())
    .unwrap();
    let rel = max_abs_diff(&fused, &want) / crate::common::max_abs(&want);
    assert!(
        rel < 1.0 / 16.0,
        "fp8 re-quantised fused weight off by {rel}"
    );
    assert!(max_abs_diff(&fused, &get_raw(&base, name)) > 1e-3);
    // untargeted: the file's fp8 values and scales exactly (the "te" adapter changes only
    // transformer_blocks.0.attn.to_q and single_transformer_blocks.1.attn.to_out)
    let te = Arc::new(adapter("te"));
    let vb = fused_var_builder(base.clone(), Component::Transformer, vec![(te, 1.0)]);
    assert_eq!(
        max_abs_diff(&get_raw(&vb, name), &get_raw(&base, name)),
        0.0
    );
    let q = "transformer_blocks.0.attn.to_q";
    assert!(max_abs_diff(&get_raw(&vb, q), &get_raw(&base, q)) > 1e-3);
}

/// A broken `LORAS` entry (missing file, wrong base model) is reported and the model serves
/// without it; the working one next to it is still fused.
#[test]
fn a_bad_adapter_is_reported_and_the_model_still_serves() {
    let dir = tempfile::tempdir().unwrap();
    // A LoRA for a wider model: lora_A is [4, 64] where the tiny x_embedder takes 128 inputs.
    let bad: HashMap<String, Tensor> = [
        (
            "transformer.x_embedder.lora_A.weight".to_string(),
            Tensor::zeros((4, 64), DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            "transformer.x_embedder.lora_B.weight".to_string(),
            Tensor::zeros((48, 4), DType::F32, &Device::Cpu).unwrap(),
        ),
    ]
    .into_iter()
    .collect();
    let bad_path = dir.path().join("wide.safetensors");
    candle_core::safetensors::save(&bad, &bad_path).unwrap();
    let mk = |name: &str, path: &Path| LoraSpec {
        name: name.into(),
        source: path.display().to_string(),
        scale: 1.0,
        mode: LoraMode::Fused,
    };
    let p = Flux2Pipeline::load(&opts(
        vec![
            mk("missing", &dir.path().join("nope.safetensors")),
            mk("wide", &bad_path),
            spec("diffusers", LoraMode::Fused),
        ],
        Quantization::None,
    ))
    .unwrap();
    let st = p.lora_status();
    assert_eq!(st[0].status, "failed");
    assert!(
        st[0].error.as_deref().unwrap().contains("no such file"),
        "{st:?}"
    );
    assert_eq!(st[1].status, "failed");
    let e = st[1].error.as_deref().unwrap();
    assert!(
        e.contains("transformer.x_embedder.lora_A.weight")
            && e.contains("[4, 64]")
            && e.contains("expected [rank, 128]")
            && e.contains("tiny-model"),
        "{e}"
    );
    assert_eq!(st[2].status, "loaded");
    let out = p.generate(&t2i_params(vec![]), None, &never).unwrap();
    assert_image_matches(
        &out.image,
        &reference_png("diffusers"),
        "with two bad adapters",
    );
}
