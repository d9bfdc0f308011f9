//! `imagegen generate` on the tiny random-weight model writes the PNG diffusers produces.

use std::process::Command;

use crate::common::{compare_images, flux2_fixtures};

#[test]
fn generate_writes_the_reference_png() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let dit = flux2_fixtures().join("dit");
    let status = Command::new(env!("CARGO_BIN_EXE_imagegen"))
        .args(["generate", "--model"])
        .arg(flux2_fixtures().join("tiny-model"))
        .args([
            "--prompt",
            "the same fox, now in a forest",
            "--width",
            "64",
            "--height",
            "64",
        ])
        .args(["--steps", "4", "--device", "cpu", "--reference"])
        .arg(dit.join("ref_a.png"))
        .arg("--latents")
        .arg(dit.join("pipe_ref1.safetensors"))
        .arg("--output")
        .arg(&out)
        .env_remove("MODEL_ID")
        .env_remove("QUANTIZATION")
        .env_remove("TEXT_ENCODER_QUANTIZATION")
        .status()
        .unwrap();
    assert!(status.success());
    let got = image::open(&out).unwrap().to_rgb8();
    let want = image::open(dit.join("pipe_ref1.png")).unwrap().to_rgb8();
    assert_eq!(got.dimensions(), (64, 64));
    let (frac, worst) = compare_images(&got, &want);
    assert!(
        frac >= 0.999,
        "only {frac} of pixels within 1 level, max diff {worst}"
    );
}

#[test]
fn generate_rejects_a_bad_reference_with_its_index() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small.png");
    image::RgbImage::new(32, 80).save(&small).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_imagegen"))
        .args(["generate", "--model"])
        .arg(flux2_fixtures().join("tiny-model"))
        .args([
            "--prompt",
            "x",
            "--width",
            "64",
            "--height",
            "64",
            "--device",
            "cpu",
            "--reference",
        ])
        .arg(flux2_fixtures().join("dit/ref_a.png"))
        .arg("--reference")
        .arg(&small)
        .arg("--output")
        .arg(dir.path().join("o.png"))
        .env_remove("MODEL_ID")
        .env_remove("QUANTIZATION")
        .env_remove("TEXT_ENCODER_QUANTIZATION")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("references[1]") && err.contains("64px"),
        "{err}"
    );
    assert!(!dir.path().join("o.png").exists());
}

/// `imagegen generate` on the one-reference fixture with the given quantization environment.
fn generate_ref1(
    env: &[(&str, &str)],
    args: &[&str],
    out: &std::path::Path,
) -> std::process::Output {
    let dit = flux2_fixtures().join("dit");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imagegen"));
    cmd.args(["generate", "--model"])
        .arg(flux2_fixtures().join("tiny-model"))
        .args(["--prompt", "the same fox, now in a forest"])
        .args([
            "--width", "64", "--height", "64", "--steps", "4", "--device", "cpu",
        ])
        .arg("--reference")
        .arg(dit.join("ref_a.png"))
        .arg("--latents")
        .arg(dit.join("pipe_ref1.safetensors"))
        .args(args)
        .arg("--output")
        .arg(out)
        .env_remove("MODEL_ID")
        .env_remove("QUANTIZATION")
        .env_remove("TEXT_ENCODER_QUANTIZATION");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// `QUANTIZATION=int8` alone quantizes the text encoder too (it follows), and the image stays
/// within 5 levels of diffusers' f32 one (measured: max 5, mean 0.62, see
/// flux2_pipeline::quantized_transformer_and_text_encoder_stay_close_to_f32); an explicit
/// `TEXT_ENCODER_QUANTIZATION=none` keeps the encoder unquantized.
#[test]
fn generate_quantizes_the_text_encoder_with_quantization_unless_told_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let want = image::open(flux2_fixtures().join("dit/pipe_ref1.png"))
        .unwrap()
        .to_rgb8();
    let out = dir.path().join("int8.png");
    let o = generate_ref1(&[("QUANTIZATION", "int8")], &[], &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("transformer int8, text encoder int8"), "{err}");
    // Not a terminal: plain progress lines, the first at step 0 and the last at 100 %.
    assert!(err.contains("denoise: 0% (0/"), "{err}");
    assert!(err.contains("denoise: 100%"), "{err}");
    let got = image::open(&out).unwrap().to_rgb8();
    let (frac, worst) = compare_images(&got, &want);
    assert!(worst <= 5, "max diff {worst}");
    assert!(
        frac < 0.999,
        "int8 image identical to f32 ({frac} within 1 level)"
    );

    let out = dir.path().join("te-none.png");
    let o = generate_ref1(
        &[("TEXT_ENCODER_QUANTIZATION", "none")],
        &["--quantization", "fp8"],
        &out,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("transformer fp8, text encoder none"), "{err}");
}

/// A bad `TEXT_ENCODER_QUANTIZATION` stops the command before loading, naming the variable and
/// the allowed values.
#[test]
fn generate_rejects_a_bad_text_encoder_quantization() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.png");
    let o = generate_ref1(&[("TEXT_ENCODER_QUANTIZATION", "bf16")], &[], &out);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("invalid TEXT_ENCODER_QUANTIZATION 'bf16': expected one of none, fp8, int8"),
        "{err}"
    );
    assert!(!err.contains("loaded"), "{err}");
    assert!(!out.exists());
}

/// `generate --dtype bf16 --device cpu` reproduces diffusers' bf16 image of the same noise about
/// as closely as diffusers' bf16 reproduces its own f32 image (tests/fixtures/flux2/bf16).
#[test]
fn generate_bf16_on_cpu_reproduces_diffusers_bf16() {
    use candle_core::{DType, Tensor};
    let fx = crate::common::load_safetensors(flux2_fixtures().join("bf16/numerics.safetensors"));
    let dir = tempfile::tempdir().unwrap();
    let latents = dir.path().join("latents.safetensors");
    let noise = fx["e2e.one_step.noise"].clone();
    candle_core::safetensors::save(&[("latents", noise)].into_iter().collect(), &latents).unwrap();
    let out = dir.path().join("out.png");
    let status = Command::new(env!("CARGO_BIN_EXE_imagegen"))
        .args(["generate", "--model"])
        .arg(flux2_fixtures().join("tiny-model"))
        .args(["--prompt", "a red fox in the snow", "--width", "64"])
        .args(["--height", "48", "--steps", "1", "--device", "cpu"])
        .args(["--dtype", "bf16", "--latents"])
        .arg(&latents)
        .arg("--output")
        .arg(&out)
        .env_remove("MODEL_ID")
        .env_remove("QUANTIZATION")
        .env_remove("TEXT_ENCODER_QUANTIZATION")
        .status()
        .unwrap();
    assert!(status.success());
    let png = image::open(&out).unwrap().to_rgb8();
    assert_eq!(png.dimensions(), (64, 48));
    // PNG [H, W, 3] u8 → [1, 3, H, W] in 0..1, as diffusers' output_type="pt".
    let ours = Tensor::from_vec(png.into_raw(), (48, 64, 3), &candle_core::Device::Cpu)
        .unwrap()
        .permute((2, 0, 1))
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .affine(1.0 / 255.0, 0.0)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mean_abs = |a: &Tensor, b: &Tensor| {
        (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let theirs = &fx["e2e.one_step.image.bf16"];
    let theirs_drift = mean_abs(theirs, &fx["e2e.one_step.image.f32"]);
    let ours_vs_theirs = mean_abs(&ours, theirs);
    eprintln!(
        "ours (PNG) vs diffusers bf16 {ours_vs_theirs:e}, diffusers bf16 vs f32 {theirs_drift:e}"
    );
    // The PNG's own rounding (±0.5 level, mean ~1/1020) comes on top of the bf16 differences.
    assert!(
        ours_vs_theirs <= 1.5 * theirs_drift,
        "{ours_vs_theirs} vs {theirs_drift}"
    );
}

/// `--version` says Cargo's package version, the one /health, `GET /` and OpenAPI report.
#[test]
fn version_flag_says_the_package_version() {
    let out = Command::new(env!("CARGO_BIN_EXE_imagegen"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text.trim(),
        format!("imagegen {}", env!("CARGO_PKG_VERSION"))
    );
}

/// `ATTENTION` naming a backend this binary or device lacks stops `generate` with the
/// available ones named, and writes no image; `ATTENTION=naive` is the image diffusers made.
#[test]
fn generate_refuses_an_absent_attention_backend_and_runs_on_naive() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.png");
    let o = generate_ref1(&[("ATTENTION", "cudnn")], &[], &out);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(
            "ATTENTION=cudnn: no such backend in this binary for this device (available: naive)"
        ),
        "{err}"
    );
    assert!(!out.exists());

    let o = generate_ref1(&[("ATTENTION", "naive")], &[], &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = image::open(&out).unwrap().to_rgb8();
    let want = image::open(flux2_fixtures().join("dit/pipe_ref1.png"))
        .unwrap()
        .to_rgb8();
    let (frac, worst) = compare_images(&got, &want);
    assert!(
        frac >= 0.999,
        "only {frac} of pixels within 1 level, max diff {worst}"
    );
}
