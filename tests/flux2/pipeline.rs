//! End-to-end parity of `Flux2Pipeline` with diffusers' `Flux2KleinPipeline` (f32, CPU) on the
//! tiny random-weight model, plus sensitivity, validation and determinism checks.
//! Fixtures: scripts/parity/make_dit_fixtures.py → tests/fixtures/flux2/dit/pipe_*.

use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use imagegen::flux2::Quantization;
use imagegen::flux2::pipeline::{Flux2Error, Flux2Pipeline, GenerateParams, LoadOptions};
use imagegen::flux2::vae::{unpack, unpatchify};
use imagegen::flux2::weights::ModelFiles;

use crate::common::{compare_images, dit_fixture, flux2_fixtures, load_safetensors, max_abs_diff};

fn opts(model: &Path) -> LoadOptions {
    LoadOptions {
        model_id: model.display().to_string(),
        quantization: Quantization::None,
        text_encoder_quantization: Quantization::None,
        device: Device::Cpu,
        dtype: DType::F32,
        hf_token: None,
        attention: Default::default(),
        loras: Vec::new(),
    }
}

fn pipeline() -> &'static Flux2Pipeline {
    static P: OnceLock<Flux2Pipeline> = OnceLock::new();
    P.get_or_init(|| {
        Flux2Pipeline::load(&opts(&flux2_fixtures().join("tiny-model"))).expect("load tiny model")
    })
}

fn never() -> bool {
    false
}

struct Case {
    name: String,
    prompt: String,
    width: u32,
    height: u32,
    steps: u32,
    refs: Vec<String>,
    guidance: f32,
    distilled: bool,
}

fn cases() -> Vec<Case> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dit_fixture("pipeline.json")).unwrap())
            .unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().into(),
            prompt: c["prompt"].as_str().unwrap().into(),
            width: c["width"].as_u64().unwrap() as u32,
            height: c["height"].as_u64().unwrap() as u32,
            steps: c["steps"].as_u64().unwrap() as u32,
            refs: c["references"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap().into())
                .collect(),
            guidance: c["guidance_scale"].as_f64().unwrap() as f32,
            distilled: c["is_distilled"].as_bool().unwrap(),
        })
        .collect()
}

fn case(name: &str) -> Case {
    cases().into_iter().find(|c| c.name == name).unwrap()
}

fn tensors(name: &str) -> std::collections::HashMap<String, Tensor> {
    load_safetensors(dit_fixture(&format!("pipe_{name}.safetensors")))
}

fn ref_images(c: &Case) -> Vec<RgbImage> {
    c.refs
        .iter()
        .map(|r| image::open(dit_fixture(r)).unwrap().to_rgb8())
        .collect()
}

fn params(c: &Case, latents: Option<Tensor>) -> GenerateParams {
    GenerateParams {
        prompt: c.prompt.clone(),
        width: c.width,
        height: c.height,
        num_steps: c.steps,
        seed: 0,
        guidance_scale: c.guidance,
        latents,
        loras: Vec::new(),
    }
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

/// Runs one fixture case; checks the final latents (1e-4) and the image (1 level on 99.9 %).
fn run_case(p: &Flux2Pipeline, c: &Case) {
    assert_eq!(p.is_distilled(), c.distilled, "{}", c.name);
    let t = tensors(&c.name);
    let refs = p.encode_references(&ref_images(c)).unwrap();
    let refs = (!refs.is_empty()).then_some(&refs);
    // Final latents, before the VAE: diffusers output_type="latent" (denormalised, unpatchified).
    let embeds = p.encode_prompt(&c.prompt).unwrap();
    let cfg = c.guidance > 1.0 && !c.distilled;
    let neg = cfg.then(|| p.encode_prompt("").unwrap());
    let noise = &t["latents"];
    let (_, _, lh, lw) = noise.dims4().unwrap();
    let tokens = p
        .denoise(
            noise,
            &embeds,
            neg.as_ref(),
            c.guidance,
            c.steps as usize,
            refs,
            &never,
        )
        .unwrap();
    let z = unpatchify(
        &p.vae()
            .denormalize(&unpack(&tokens, lh, lw).unwrap())
            .unwrap(),
    )
    .unwrap();
    let lat_err = max_abs_diff(&z, &t["final_latents"]);

    let out = p
        .generate(&params(c, Some(noise.clone())), refs, &never)
        .unwrap();
    let want = image::open(dit_fixture(&format!("pipe_{}.png", c.name)))
        .unwrap()
        .to_rgb8();
    let (frac, worst) = compare_images(&out.image, &want);
    eprintln!(
        "{}: {}x{} final-latent max abs error {lat_err:e}, pixels within 1 level {:.4}%, max diff {worst}",
        c.name,
        out.image.width(),
        out.image.height(),
        frac * 100.0
    );
    assert!(lat_err < 1e-4, "{}: latent error {lat_err}", c.name);
    assert!(
        frac >= 0.999,
        "{}: only {frac} of pixels within 1 level",
        c.name
    );
}

#[test]
fn text_to_image_matches_diffusers() {
    run_case(pipeline(), &case("t2i"));
}

#[test]
fn prompt_embeddings_match_diffusers() {
    let t = tensors("t2i");
    let e = pipeline().encode_prompt(&case("t2i").prompt).unwrap();
    let err = max_abs_diff(&e, &t["prompt_embeds"]);
    eprintln!("t2i prompt embeddings max abs error {err:e}");
    assert!(err < 1e-4, "{err}");
}

#[test]
fn one_reference_matches_diffusers() {
    run_case(pipeline(), &case("ref1"));
}

#[test]
fn three_references_of_odd_sizes_match_diffusers() {
    run_case(pipeline(), &case("ref3"));
}

#[test]
fn size_not_divisible_by_16_is_floored_like_diffusers() {
    let c = case("odd_size");
    assert!(!c.width.is_multiple_of(16) && !c.height.is_multiple_of(16));
    run_case(pipeline(), &c);
    let out = pipeline()
        .generate(&params(&c, None), None, &never)
        .unwrap();
    assert_eq!(
        out.image.dimensions(),
        (c.width / 16 * 16, c.height / 16 * 16)
    );
}

#[test]
fn one_step_empty_prompt_and_long_prompt_match_diffusers() {
    for name in ["one_step", "empty_prompt", "long_prompt"] {
        run_case(pipeline(), &case(name));
    }
}

#[test]
fn non_distilled_model_uses_cfg_like_diffusers() {
    // The same weights, with model_index.json saying "is_distilled": false (klein base).
    let dir = tempfile::tempdir().unwrap();
    let src = flux2_fixtures().join("tiny-model");
    copy_dir(&src, dir.path());
    let idx = dir.path().join("model_index.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&idx).unwrap()).unwrap();
    v["is_distilled"] = serde_json::Value::Bool(false);
    std::fs::write(&idx, serde_json::to_string(&v).unwrap()).unwrap();
    let files = ModelFiles::local(dir.path()).unwrap();
    let p = Flux2Pipeline::from_files(&files, &opts(dir.path())).unwrap();
    assert!(!p.is_distilled());
    let c = case("cfg");
    run_case(&p, &c);
    let t = tensors("cfg");
    let want_cfg = image::open(dit_fixture("pipe_cfg.png")).unwrap().to_rgb8();
    // A second CFG request takes the negative (empty) prompt's embeddings from the cache.
    let again = p
        .generate(&params(&c, Some(t["latents"].clone())), None, &never)
        .unwrap()
        .image;
    let (frac, worst) = compare_images(&again, &want_cfg);
    assert!(
        frac >= 0.999,
        "cached negative prompt: {frac} within 1 level, max {worst}"
    );
    // Without guidance (scale 1) the base model gives the distilled path's image.
    let mut q = params(&c, Some(t["latents"].clone()));
    q.guidance_scale = 1.0;
    let plain = p.generate(&q, None, &never).unwrap().image;
    assert!(mean_abs_diff(&plain, &want_cfg) > 5.0, "CFG has no effect");
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

#[test]
fn fixtures_and_outputs_are_sensitive_to_every_input() {
    let p = pipeline();
    let c = case("ref1");
    let t = tensors("ref1");
    let refs = p.encode_references(&ref_images(&c)).unwrap();
    let other = p
        .encode_references(&[image::open(dit_fixture("ref_b.png")).unwrap().to_rgb8()])
        .unwrap();
    let noise = &t["latents"];
    let embeds = p.encode_prompt(&c.prompt).unwrap();
    let run = |e: &Tensor, n: &Tensor, steps: usize, r| {
        p.denoise(n, e, None, 1.0, steps, r, &never).unwrap()
    };
    let base = run(&embeds, noise, 4, Some(&refs));
    // Final latents are compared at 1e-4, so every input must move them far beyond that.
    let other_prompt = p.encode_prompt("a completely different prompt").unwrap();
    let flipped = (noise * -1.0).unwrap();
    let changes = [
        (
            "prompt",
            max_abs_diff(&base, &run(&other_prompt, noise, 4, Some(&refs))),
        ),
        (
            "noise",
            max_abs_diff(&base, &run(&embeds, &flipped, 4, Some(&refs))),
        ),
        (
            "steps",
            max_abs_diff(&base, &run(&embeds, noise, 2, Some(&refs))),
        ),
        (
            "reference",
            max_abs_diff(&base, &run(&embeds, noise, 4, Some(&other))),
        ),
        (
            "no reference",
            max_abs_diff(&base, &run(&embeds, noise, 4, None)),
        ),
    ];
    eprintln!("final-latent max change: {changes:?}");
    for (what, d) in changes {
        assert!(
            d > 1e-2,
            "changing the {what} moves the final latents by only {d:e}"
        );
    }
    // Images: prompt, noise and steps move pixels by several levels.
    let img = |q: &GenerateParams| p.generate(q, Some(&refs), &never).unwrap().image;
    let q0 = params(&c, Some(noise.clone()));
    let out = img(&q0);
    let mut q = q0.clone();
    q.prompt = "a completely different prompt".into();
    assert!(mean_abs_diff(&out, &img(&q)) > 2.0);
    let mut q = q0.clone();
    q.num_steps = 2;
    assert!(mean_abs_diff(&out, &img(&q)) > 2.0);
    // The committed fixtures themselves differ across cases (so they can catch a wrong input).
    let f = |n: &str| {
        image::open(dit_fixture(&format!("pipe_{n}.png")))
            .unwrap()
            .to_rgb8()
    };
    assert!(mean_abs_diff(&f("t2i"), &f("one_step")) > 2.0);
    assert!(mean_abs_diff(&f("t2i"), &f("cfg")) > 2.0);
}

#[test]
fn seeded_noise_is_deterministic() {
    let p = pipeline();
    let mut q = params(&case("t2i"), None);
    q.num_steps = 1;
    q.seed = 7;
    let a = p.generate(&q, None, &never).unwrap().image;
    let b = p.generate(&q, None, &never).unwrap().image;
    assert_eq!(a, b);
    q.seed = 8;
    let c = p.generate(&q, None, &never).unwrap().image;
    assert!(mean_abs_diff(&a, &c) > 2.0);
}

#[test]
fn bad_inputs_are_named_errors() {
    let p = pipeline();
    let small = RgbImage::new(80, 63);
    let ok = RgbImage::new(64, 64);
    let e = p.encode_references(&[ok.clone(), small]).unwrap_err();
    assert!(e.is_invalid_input());
    let msg = e.to_string();
    assert!(msg.contains("references[1]") && msg.contains("64"), "{msg}");
    let e = p
        .encode_references(&[ok.clone(), RgbImage::new(64, 600)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("references[1]") && e.contains("8:1"), "{e}");
    let e = p.encode_references(&vec![ok; 17]).unwrap_err().to_string();
    assert!(e.contains("17") && e.contains("16"), "{e}");

    let mut q = params(&case("t2i"), None);
    q.num_steps = 51;
    let e = p.generate(&q, None, &never).unwrap_err();
    assert!(
        e.is_invalid_input() && e.to_string().contains("num_steps") && e.to_string().contains("50"),
        "{e}"
    );
    q.num_steps = 0;
    assert!(
        p.generate(&q, None, &never)
            .unwrap_err()
            .to_string()
            .contains("num_steps")
    );
    let mut q = params(&case("t2i"), None);
    q.width = 8;
    let e = p.generate(&q, None, &never).unwrap_err().to_string();
    assert!(e.contains("width") && e.contains("16"), "{e}");
    let mut q = params(
        &case("t2i"),
        Some(Tensor::zeros((1, 128, 2, 2), DType::F32, &Device::Cpu).unwrap()),
    );
    q.width = 64;
    let e = p.generate(&q, None, &never).unwrap_err().to_string();
    assert!(e.contains("latents") && e.contains("[1, 128, 3, 4]"), "{e}");
}

#[test]
fn cancellation_is_polled_between_steps() {
    let p = pipeline();
    let calls = std::cell::Cell::new(0);
    let cancel = || {
        calls.set(calls.get() + 1);
        calls.get() > 2
    };
    let e = p
        .generate(&params(&case("t2i"), None), None, &cancel)
        .unwrap_err();
    assert!(matches!(e, Flux2Error::Cancelled), "{e}");
    assert_eq!(
        calls.get(),
        3,
        "polled once per step until it returned true"
    );
}

/// A model directory whose transformer is only a BFL single file (no transformer/ folder) loads:
/// its config comes from the tensor shapes.
#[test]
fn bfl_single_file_model_directory_loads_and_generates() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&flux2_fixtures().join("tiny-model"), dir.path());
    std::fs::remove_dir_all(dir.path().join("transformer")).unwrap();
    std::fs::copy(
        flux2_fixtures().join("flux-2-klein-tiny.safetensors"),
        dir.path().join("flux-2-klein-tiny.safetensors"),
    )
    .unwrap();
    let files = ModelFiles::local(dir.path()).unwrap();
    let p = Flux2Pipeline::from_files(&files, &opts(dir.path())).unwrap();
    assert_eq!(p.transformer().config().num_layers, 2);
    let mut q = params(&case("t2i"), None);
    q.num_steps = 1;
    let out = p.generate(&q, None, &never).unwrap();
    assert_eq!(out.image.dimensions(), (64, 48));
    // Without either transformer layout the error names the file.
    std::fs::remove_file(dir.path().join("flux-2-klein-tiny.safetensors")).unwrap();
    let files = ModelFiles::local(dir.path()).unwrap();
    let e = Flux2Pipeline::from_files(&files, &opts(dir.path()))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("transformer/config.json"), "{e}");
}

/// `QUANTIZATION` and `TEXT_ENCODER_QUANTIZATION` both fp8 (the 24 GB setting for 9B) or both
/// int8, and the text encoder alone in fp8: the t2i and one-reference images stay close to
/// diffusers' f32 ones, differ from our f32 ones (really quantized), and the text encoder holds
/// its projections quantized.
///
/// Measured (mean abs error in levels of 255; share of pixels within 8 levels), t2i / ref1:
/// encoder fp8 only 0.86 / 1.43, 100 % / 99.8 %; both fp8 2.57 / 2.70, 89 % / 88 % (transformer
/// fp8 alone: 2.29 / 2.12, so the encoder adds little); both int8 0.62 / 0.62, 100 %. For scale,
/// appending "!" to the prompt moves the f32 image by 1.06 / 1.03 levels, another prompt by
/// 7.6 / 4.1, and the images' mean deviation from their mean is about 52 levels.
#[test]
fn quantized_transformer_and_text_encoder_stay_close_to_f32() {
    let model = flux2_fixtures().join("tiny-model");
    // (transformer, text encoder, max mean abs error, min share within 8 levels)
    for (tq, teq, max_mean, min_within8) in [
        (Quantization::None, Quantization::Fp8, 2.0, 0.99),
        (Quantization::Fp8, Quantization::Fp8, 4.0, 0.8),
        (Quantization::Int8, Quantization::Int8, 1.0, 0.999),
    ] {
        let p = Flux2Pipeline::load(&LoadOptions {
            quantization: tq,
            text_encoder_quantization: teq,
            ..opts(&model)
        })
        .unwrap();
        assert_eq!(p.text_encoder().encoder().quantization(), Some(teq));
        for name in ["t2i", "ref1"] {
            let c = case(name);
            let q = params(&c, Some(tensors(name)["latents"].clone()));
            let run = |p: &Flux2Pipeline| {
                let refs = p.encode_references(&ref_images(&c)).unwrap();
                let refs = (!refs.is_empty()).then_some(&refs);
                p.generate(&q, refs, &never).unwrap().image
            };
            let got = run(&p);
            let want = image::open(dit_fixture(&format!("pipe_{name}.png")))
                .unwrap()
                .to_rgb8();
            let within8 = got
                .pixels()
                .zip(want.pixels())
                .filter(|(a, b)| a.0.iter().zip(b.0).all(|(x, y)| x.abs_diff(y) <= 8))
                .count() as f64
                / (got.width() * got.height()) as f64;
            let mean = mean_abs_diff(&got, &want);
            let moved = mean_abs_diff(&got, &run(pipeline()));
            eprintln!(
                "transformer {tq}, text encoder {teq}, {name}: mean abs error {mean:.3} levels, \
                 within 8 levels {within8:.4}; {moved:.3} levels from our f32 image"
            );
            assert!(mean <= max_mean, "{tq}/{teq} {name}: mean error {mean}");
            assert!(
                within8 >= min_within8,
                "{tq}/{teq} {name}: {within8} within 8"
            );
            assert!(moved > 0.1, "{tq}/{teq} {name}: image as unquantized");
        }
    }
}
