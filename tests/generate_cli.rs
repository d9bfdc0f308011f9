//! `imagegen generate` on the tiny random-weight model writes the PNG diffusers produces.

use std::process::Command;

mod common;
use common::{compare_images, flux2_fixtures};

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
