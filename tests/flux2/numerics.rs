//! bf16 numerics against diffusers' own bf16 path (CPU, tiny model).
//!
//! For every component the fixture (`scripts/parity/make_bf16_fixtures.py`) holds diffusers'
//! f32 output and its bf16 output on the same inputs. Our bf16 output must drift from the f32
//! reference no further than 1.2× diffusers' bf16 does, both in mean |diff| and in the 99.9th
//! percentile of |diff|; and ours must sit close to diffusers' bf16 output itself.

use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use imagegen::flux2::Quantization;
use imagegen::flux2::pipeline::{Flux2Pipeline, LoadOptions};
use imagegen::flux2::vae::{unpack, unpatchify};

use crate::common::{dit_fixture, flux2_fixtures, load_safetensors};

/// Allowed ratio of our drift to diffusers' drift (the bar).
const RATIO: f64 = 1.2;

fn fixture() -> &'static HashMap<String, Tensor> {
    static F: OnceLock<HashMap<String, Tensor>> = OnceLock::new();
    F.get_or_init(|| load_safetensors(flux2_fixtures().join("bf16/numerics.safetensors")))
}

fn get(name: &str) -> Tensor {
    fixture()
        .get(name)
        .unwrap_or_else(|| panic!("fixture tensor {name} missing"))
        .clone()
}

fn load(dtype: DType, q: Quantization) -> Flux2Pipeline {
    Flux2Pipeline::load(&LoadOptions {
        model_id: flux2_fixtures().join("tiny-model").display().to_string(),
        quantization: q,
        text_encoder_quantization: q,
        device: Device::Cpu,
        dtype,
        hf_token: None,
        attention: Default::default(),
        loras: Vec::new(),
    })
    .unwrap()
}

fn pipeline(dtype: DType) -> &'static Flux2Pipeline {
    static F32: OnceLock<Flux2Pipeline> = OnceLock::new();
    static BF16: OnceLock<Flux2Pipeline> = OnceLock::new();
    let cell = if dtype == DType::BF16 { &BF16 } else { &F32 };
    cell.get_or_init(|| load(dtype, Quantization::None))
}

/// |a − b| statistics over all elements, in f64.
#[derive(Debug, Clone, Copy)]
struct Drift {
    mean: f64,
    p999: f64,
}

fn drift(a: &Tensor, b: &Tensor) -> Drift {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let f = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    let mut d: Vec<f64> = f(a).iter().zip(f(b)).map(|(x, y)| (x - y).abs()).collect();
    assert!(d.iter().all(|v| v.is_finite()), "non-finite values");
    d.sort_by(f64::total_cmp);
    let idx = ((d.len() as f64 * 0.999).ceil() as usize).clamp(1, d.len()) - 1;
    Drift {
        mean: d.iter().sum::<f64>() / d.len() as f64,
        p999: d[idx],
    }
}

/// Prints and returns (ours vs f32, reference vs f32, ours vs reference).
fn measure(name: &str, ours: &Tensor, f32_ref: &Tensor, theirs: &Tensor) -> [Drift; 3] {
    let o = drift(ours, f32_ref);
    let t = drift(theirs, f32_ref);
    let ot = drift(ours, theirs);
    eprintln!(
        "{name:24} ours-f32 mean {:.3e} p99.9 {:.3e} | theirs-f32 mean {:.3e} p99.9 {:.3e} | \
         ratio {:.2}/{:.2} | ours-theirs mean {:.3e} p99.9 {:.3e}",
        o.mean,
        o.p999,
        t.mean,
        t.p999,
        o.mean / t.mean,
        o.p999 / t.p999,
        ot.mean,
        ot.p999
    );
    [o, t, ot]
}

/// Checks one tensor: `ours` (our bf16 output), `f32_ref` (diffusers f32), `theirs` (diffusers
/// bf16). Returns (ours vs f32, theirs vs f32, ours vs theirs).
fn check(name: &str, ours: &Tensor, f32_ref: &Tensor, theirs: &Tensor) -> [Drift; 3] {
    assert_eq!(ours.dtype(), DType::BF16, "{name}: our output is not bf16");
    let [o, t, ot] = measure(name, ours, f32_ref, theirs);
    // The bf16 path must actually differ from f32, or the comparison proves nothing.
    assert!(t.mean > 0.0 && o.mean > 0.0, "{name}: no bf16 drift at all");
    assert!(
        o.mean <= RATIO * t.mean,
        "{name}: our mean drift {:.3e} > {RATIO} x diffusers' {:.3e}",
        o.mean,
        t.mean
    );
    assert!(
        o.p999 <= RATIO * t.p999,
        "{name}: our p99.9 drift {:.3e} > {RATIO} x diffusers' {:.3e}",
        o.p999,
        t.p999
    );
    // Two bf16 implementations with independent rounding sit about √2 x their drift apart;
    // systematic differences (another op order, a missing upcast) would push it further.
    assert!(
        ot.mean <= 1.5 * t.mean,
        "{name}: ours vs diffusers' bf16 mean {:.3e} > 1.5 x diffusers' drift {:.3e}",
        ot.mean,
        t.mean
    );
    [o, t, ot]
}

fn bf16(t: &Tensor) -> Tensor {
    t.to_dtype(DType::BF16).unwrap()
}

fn normal_prompt() -> String {
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(flux2_fixtures().join("text_encoder.json")).unwrap(),
    )
    .unwrap();
    meta["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "normal")
        .unwrap()["prompt"]
        .as_str()
        .unwrap()
        .to_string()
}

fn text_f32_reference() -> Tensor {
    load_safetensors(flux2_fixtures().join("text_encoder.safetensors"))["prompt_embeds.normal"]
        .clone()
}

#[test]
fn text_encoder_bf16_drift_is_within_diffusers() {
    let ours = pipeline(DType::BF16)
        .encode_prompt(&normal_prompt())
        .unwrap();
    check(
        "text.normal",
        &ours,
        &text_f32_reference(),
        &get("text.normal.bf16"),
    );
}

/// Quantised weights (fp8, int8) in the DiT and in the text encoder's projections, f32 and bf16
/// compute, against PyTorch running the same weights quantised the same way (the fixture script
/// re-implements src/flux2/quant.rs). The error is measured from the unquantised f32 output.
#[test]
fn quantised_paths_err_no_more_than_the_pytorch_reference() {
    let t = load_safetensors(dit_fixture("transformer.safetensors"));
    let text_ref = text_f32_reference().narrow(1, 0, 64).unwrap();
    let prompt = normal_prompt();
    for (kind, q) in [("fp8", Quantization::Fp8), ("int8", Quantization::Int8)] {
        for (tag, dtype) in [("f32", DType::F32), ("bf16", DType::BF16)] {
            let p = load(dtype, q);
            let mut cases = vec![];
            for (name, sigma) in [("dit.refs.t100", 1.0f32), ("dit.refs.t005", 0.05)] {
                let ts = Tensor::new(&[sigma], &Device::Cpu).unwrap();
                let ours = p
                    .transformer()
                    .forward(
                        &t["hidden_states"],
                        &t["encoder_hidden_states"],
                        &ts,
                        &t["img_ids"],
                        &t["txt_ids"],
                    )
                    .unwrap();
                cases.push((name, ours, get(&format!("{name}.f32"))));
            }
            let text = p.encode_prompt(&prompt).unwrap().narrow(1, 0, 64).unwrap();
            cases.push(("text.normal64", text, text_ref.clone()));
            for (name, ours, f32_ref) in cases {
                let label = format!("{kind}.{name}.{tag}");
                let theirs = get(&label);
                let [o, r, or] = measure(&label, &ours, &f32_ref, &theirs);
                assert!(r.mean > 0.0, "{label}: quantisation changed nothing");
                assert!(
                    o.mean <= RATIO * r.mean && o.p999 <= RATIO * r.p999,
                    "{label}: our error {o:?} > {RATIO} x the reference's {r:?}"
                );
                if dtype == DType::F32 {
                    // Same quantised weights, f32 compute: equal up to summation order.
                    assert!(or.p999 < 1e-4 * (1.0 + r.p999), "{label}: {or:?}");
                } else {
                    assert!(or.mean <= 1.5 * r.mean, "{label}: {or:?} vs {r:?}");
                }
            }
        }
    }
}

#[test]
fn transformer_bf16_drift_is_within_diffusers_at_several_timesteps() {
    let t = load_safetensors(dit_fixture("transformer.safetensors"));
    let tr = pipeline(DType::BF16).transformer();
    let tr32 = pipeline(DType::F32).transformer();
    for (name, sigma, refs) in [
        ("dit.refs.t100", 1.0f32, true),
        ("dit.refs.t073", 0.73, true),
        ("dit.refs.t005", 0.05, true),
        ("dit.norefs.t100", 1.0, false),
        ("dit.norefs.t073", 0.73, false),
    ] {
        let n = if refs { 18 } else { 12 };
        let hidden = t["hidden_states"].narrow(1, 0, n).unwrap();
        let ids = t["img_ids"].narrow(0, 0, n).unwrap();
        let ts = Tensor::new(&[sigma], &Device::Cpu).unwrap();
        let run = |m: &imagegen::flux2::transformer::Flux2Transformer2DModel| {
            m.forward(
                &hidden,
                &t["encoder_hidden_states"],
                &ts,
                &ids,
                &t["txt_ids"],
            )
            .unwrap()
        };
        let f32_ref = get(&format!("{name}.f32"));
        // The stored reference is what our f32 path computes, so the drift is bf16's alone.
        let ours32 = run(tr32);
        let e = drift(&ours32, &f32_ref);
        assert!(
            e.p999 < 1e-4,
            "{name}: our f32 differs from the f32 reference: {e:?}"
        );
        check(name, &run(tr), &f32_ref, &get(&format!("{name}.bf16")));
    }
}

#[test]
fn vae_bf16_drift_is_within_diffusers() {
    let img = image::open(flux2_fixtures().join("bf16/vae_in.png"))
        .unwrap()
        .to_rgb8();
    let (w, h) = img.dimensions();
    // As the fixture script: x / 255 · 2 − 1 in f32, [1, 3, H, W].
    let x = Tensor::from_vec(img.into_raw(), (h as usize, w as usize, 3), &Device::Cpu)
        .unwrap()
        .permute((2, 0, 1))
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .affine(2.0 / 255.0, -1.0)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let vae = pipeline(DType::BF16).vae();
    let x = bf16(&x);
    check(
        "vae.mean",
        &vae.encode_mean(&x).unwrap(),
        &get("vae.mean.f32"),
        &get("vae.mean.bf16"),
    );
    check(
        "vae.normalized",
        &vae.encode_normalized(&x).unwrap(),
        &get("vae.normalized.f32"),
        &get("vae.normalized.bf16"),
    );
    check(
        "vae.decoded",
        &vae.decode(&bf16(&get("vae.z"))).unwrap(),
        &get("vae.decoded.f32"),
        &get("vae.decoded.bf16"),
    );
}

#[test]
fn reference_latents_bf16_drift_is_within_diffusers() {
    let img: RgbImage = image::open(dit_fixture("ref_a.png")).unwrap().to_rgb8();
    let refs = pipeline(DType::BF16).encode_references(&[img]).unwrap();
    check(
        "refs.a",
        refs.tokens().unwrap(),
        &get("refs.a.f32"),
        &get("refs.a.bf16"),
    );
}

fn never() -> bool {
    false
}

#[test]
fn end_to_end_bf16_drift_is_within_diffusers_at_one_and_two_steps() {
    let p = pipeline(DType::BF16);
    let embeds = p.encode_prompt("a red fox in the snow").unwrap();
    for (name, steps) in [("e2e.one_step", 1usize), ("e2e.two_step", 2)] {
        let noise = get(&format!("{name}.noise"));
        let (_, _, lh, lw) = noise.dims4().unwrap();
        let tokens = p
            .denoise(&noise, &embeds, None, 1.0, steps, None, &never)
            .unwrap();
        let z = p
            .vae()
            .denormalize(&unpack(&tokens, lh, lw).unwrap())
            .unwrap();
        let latents = unpatchify(&z).unwrap();
        check(
            &format!("{name}.latents"),
            &latents,
            &get(&format!("{name}.latents.f32")),
            &get(&format!("{name}.latents.bf16")),
        );
        // diffusers' output_type="pt": (x / 2 + 0.5).clamp(0, 1), in the model dtype.
        let x = p.vae().decode(&latents).unwrap();
        let image = ((x / 2.0).unwrap() + 0.5)
            .unwrap()
            .clamp(0f32, 1f32)
            .unwrap();
        check(
            &format!("{name}.image"),
            &image,
            &get(&format!("{name}.image.f32")),
            &get(&format!("{name}.image.bf16")),
        );
    }
}

/// The BFL fp8 single file as stored (per-tensor scales, fp8 values kept), f32 and bf16 compute,
/// against PyTorch dequantising the same file the same way (diffusers' converter maps the names).
#[test]
fn bfl_fp8_file_errs_no_more_than_the_pytorch_reference() {
    use imagegen::flux2::transformer::{Flux2Transformer2DModel, Flux2TransformerConfig};
    let t = load_safetensors(dit_fixture("transformer.safetensors"));
    let cfg: Flux2TransformerConfig = serde_json::from_str(
        &std::fs::read_to_string(flux2_fixtures().join("tiny-model/transformer/config.json"))
            .unwrap(),
    )
    .unwrap();
    // None dequantises at load; Fp8 keeps the stored fp8 values and scales (and the file's
    // bf16 Linears as they are).
    for (tag, dtype, quant) in [
        ("f32", DType::F32, Quantization::None),
        ("bf16", DType::BF16, Quantization::None),
        ("f32", DType::F32, Quantization::Fp8),
        ("bf16", DType::BF16, Quantization::Fp8),
    ] {
        let (vb, fp8) = imagegen::flux2::weights::bfl_var_builder(
            &flux2_fixtures().join("flux-2-klein-tiny-fp8.safetensors"),
            dtype,
            &Device::Cpu,
        )
        .unwrap();
        assert!(fp8, "the fixture file holds fp8 weights");
        let model = Flux2Transformer2DModel::new(&cfg, vb, quant).unwrap();
        for (name, sigma) in [("dit.refs.t100", 1.0f32), ("dit.refs.t005", 0.05)] {
            let ts = Tensor::new(&[sigma], &Device::Cpu).unwrap();
            let ours = model
                .forward(
                    &t["hidden_states"],
                    &t["encoder_hidden_states"],
                    &ts,
                    &t["img_ids"],
                    &t["txt_ids"],
                )
                .unwrap();
            let label = format!("bflfp8.{name}.{tag}");
            let [o, r, or] = measure(
                &format!("{label} ({quant})"),
                &ours,
                &get(&format!("{name}.f32")),
                &get(&label),
            );
            assert!(r.mean > 0.0, "{label}: fp8 changed nothing");
            assert!(
                o.mean <= RATIO * r.mean && o.p999 <= RATIO * r.p999,
                "{label}: our error {o:?} > {RATIO} x the reference's {r:?}"
            );
            if dtype == DType::F32 {
                assert!(or.p999 < 1e-4 * (1.0 + r.p999), "{label}: {or:?}");
            } else {
                assert!(or.mean <= 1.5 * r.mean, "{label}: {or:?} vs {r:?}");
            }
        }
    }
}
