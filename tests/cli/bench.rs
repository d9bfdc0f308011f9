//! `imagegen bench` end to end on CPU with the tiny fixture model: every requested case reports,
//! the JSON has the schema `benches/compare.py` reads, the markdown has a row per case, and
//! `--random-weights` says so loudly. No timing assertions (timings belong to benches).

use std::path::Path;
use std::process::Command;

use serde_json::Value;

const TINY: &str = "tests/fixtures/flux2/tiny-model";

fn bench(args: &[&str], dir: &Path) -> (Value, String, String) {
    let json = dir.join("bench.json");
    let md = dir.join("bench.md");
    let out = Command::new(env!("CARGO_BIN_EXE_imagegen"))
        .arg("bench")
        .args(args)
        .args([
            "--device",
            "cpu",
            "--runs",
            "2",
            "--warmup",
            "1",
            "--ref-size",
            "64",
        ])
        .arg("--json-out")
        .arg(&json)
        .arg("--md-out")
        .arg(&md)
        .env_remove("QUANTIZATION")
        .env_remove("TEXT_ENCODER_QUANTIZATION")
        .output()
        .expect("run imagegen bench");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "bench failed:\n{stdout}\n{stderr}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let md_file = std::fs::read_to_string(&md).unwrap();
    assert!(
        stdout.contains(&md_file),
        "stdout carries the markdown table"
    );
    (report, md_file, stdout + &stderr)
}

fn case<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["case"] == name)
        .unwrap_or_else(|| panic!("case {name} missing from {report}"))
}

fn assert_ok_timed(c: &Value, runs: usize) {
    assert_eq!(c["status"], "ok", "{c}");
    assert_eq!(c["runs_ms"].as_array().unwrap().len(), runs, "{c}");
    let med = c["median_ms"].as_f64().unwrap();
    assert!(med > 0.0, "{c}");
    // CPU has no device-memory figure: null, not a made-up number.
    assert!(
        c["peak_mem_bytes"].is_null() && c["mem_after_bytes"].is_null(),
        "{c}"
    );
}

#[test]
fn real_tiny_model_every_case_reports_with_stage_split() {
    let dir = tempfile::tempdir().unwrap();
    let (r, md, _) = bench(
        &["--model", TINY, "--cases", "load,t2i-64x48,refs2-64x64"],
        dir.path(),
    );
    for k in [
        "implementation",
        "implementation_version",
        "weights",
        "model",
        "quantization",
        "text_encoder_quantization",
        "dtype",
        "device",
        "device_name",
        "num_steps",
        "warmup",
        "runs",
        "started_at",
    ] {
        assert!(!r[k].is_null(), "top-level {k} missing: {r}");
    }
    assert_eq!(r["implementation"], "imagegen");
    assert_eq!(r["weights"], "real");
    assert_eq!(r["quantization"], "none");
    assert_eq!(r["text_encoder_quantization"], "none");
    assert_eq!(r["device"], "cpu");
    assert_eq!(r["cases"].as_array().unwrap().len(), 3);

    let load = case(&r, "load");
    assert_ok_timed(load, 1);

    let t2i = case(&r, "t2i-64x48");
    assert_ok_timed(t2i, 2);
    let st = &t2i["stages"];
    for k in ["text_encoder_ms", "denoise_ms", "vae_decode_ms"] {
        assert!(st[k].as_f64().unwrap() > 0.0, "{k}: {t2i}");
    }
    assert!(
        st.get("encode_refs_ms").is_none(),
        "no references in t2i: {t2i}"
    );

    let refs = case(&r, "refs2-64x64");
    assert_ok_timed(refs, 2);
    assert!(
        refs["stages"]["encode_refs_ms"].as_f64().unwrap() > 0.0,
        "{refs}"
    );

    for name in ["load", "t2i-64x48", "refs2-64x64"] {
        assert!(
            md.contains(&format!("| {name} | ok |")),
            "row {name} in:\n{md}"
        );
    }
    assert!(
        !md.contains("RANDOM WEIGHTS"),
        "real weights are not flagged random"
    );
}

#[test]
fn random_weights_are_announced_and_cover_upscale() {
    let dir = tempfile::tempdir().unwrap();
    let (r, md, out) = bench(
        &[
            "--random-weights",
            TINY,
            "--cases",
            "t2i-32x32,upscale-x4plus-16",
        ],
        dir.path(),
    );
    assert_eq!(r["weights"], "random");
    assert!(md.starts_with("**RANDOM WEIGHTS**"), "{md}");
    assert!(out.contains("RANDOM WEIGHTS: fabricated"), "{out}");
    assert_ok_timed(case(&r, "t2i-32x32"), 2);
    let up = case(&r, "upscale-x4plus-16");
    assert_ok_timed(up, 2);
    assert!(up["stages"]["upscale_ms"].as_f64().unwrap() > 0.0, "{up}");
    // `load` was not asked for, so it is not reported.
    assert_eq!(r["cases"].as_array().unwrap().len(), 2);
}

/// A run records both weight settings, in the JSON and the markdown header; the text encoder's
/// follows `--quantization` unless given.
#[test]
fn quantized_runs_record_both_settings() {
    let dir = tempfile::tempdir().unwrap();
    for (flags, te) in [
        (&["--quantization", "fp8"][..], "fp8"),
        (
            &[
                "--quantization",
                "fp8",
                "--text-encoder-quantization",
                "int8",
            ][..],
            "int8",
        ),
    ] {
        let mut args = vec!["--model", TINY, "--cases", "t2i-32x32"];
        args.extend_from_slice(flags);
        let (r, md, _) = bench(&args, dir.path());
        assert_eq!(r["quantization"], "fp8", "{r}");
        assert_eq!(r["text_encoder_quantization"], te, "{r}");
        assert!(
            md.contains(&format!("· transformer fp8, text encoder {te} ·")),
            "{md}"
        );
        assert_ok_timed(case(&r, "t2i-32x32"), 2);
    }
}

#[test]
fn bad_case_names_the_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_imagegen"))
        .args([
            "bench", "--model", TINY, "--device", "cpu", "--cases", "t2i-huge",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--cases") && err.contains("t2i-huge"), "{err}");
}
