//! Model file resolution and transformer weight loading: diffusers folder, BFL single file,
//! BFL fp8 single file, missing files, hub cache and offline paths (the hub is never contacted:
//! the only endpoint used is a closed port on 127.0.0.1).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use imagegen::flux2::weights::{
    HubOptions, ModelFiles, TransformerFormat, WeightsError, bfl_var_builder,
};

use crate::common::{flux2_fixtures, load_safetensors, max_abs, max_abs_diff};

/// `weights::bfl_var_builder` (f32, CPU) over a BFL single-file fixture; also says if it is fp8.
fn bfl_file(name: &str) -> (VarBuilder<'static>, bool) {
    bfl_var_builder(&flux2_fixtures().join(name), DType::F32, &Device::Cpu).unwrap()
}

/// Every tensor name and shape of the diffusers transformer checkpoint.
fn diffusers_transformer() -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = load_safetensors(
        flux2_fixtures().join("tiny-model/transformer/diffusion_pytorch_model.safetensors"),
    )
    .into_iter()
    .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn diffusers_dir_gives_the_diffusers_transformer() {
    let files = ModelFiles::local(&flux2_fixtures().join("tiny-model")).unwrap();
    assert!(files.model_index().unwrap().is_distilled);
    let (vb, fmt) = files
        .transformer_var_builder(DType::F32, &Device::Cpu)
        .unwrap();
    assert_eq!(fmt, TransformerFormat::Diffusers);
    for (name, want) in diffusers_transformer() {
        let got = vb.get(want.shape(), &name).unwrap();
        assert_eq!(max_abs_diff(&got, &want), 0.0, "{name}");
    }
}

#[test]
fn bfl_single_file_gives_identical_diffusers_tensors() {
    let (vb, fp8) = bfl_file("flux-2-klein-tiny.safetensors");
    assert!(!fp8);
    let all = diffusers_transformer();
    assert!(all.len() > 30);
    for (name, want) in &all {
        assert!(vb.contains_tensor(name), "{name}");
        let got = vb.get(want.shape(), name).unwrap();
        assert_eq!(max_abs_diff(&got, want), 0.0, "{name}");
    }
    // Shapes are checked: asking for the wrong one is an error naming the tensor.
    let err = vb.get((3, 3), "proj_out.weight").unwrap_err().to_string();
    assert!(err.contains("proj_out.weight"), "{err}");
}

#[test]
fn bfl_final_layer_halves_are_swapped() {
    // Direct look at the raw BFL tensor: diffusers rows [scale; shift] = BFL rows [shift; scale].
    let raw = load_safetensors(flux2_fixtures().join("flux-2-klein-tiny.safetensors"));
    let bfl = &raw["final_layer.adaLN_modulation.1.weight"];
    let half = bfl.dim(0).unwrap() / 2;
    let (vb, _) = bfl_file("flux-2-klein-tiny.safetensors");
    let d = vb.get(bfl.shape(), "norm_out.linear.weight").unwrap();
    let top = d.narrow(0, 0, half).unwrap();
    assert_eq!(max_abs_diff(&top, &bfl.narrow(0, half, half).unwrap()), 0.0);
    // not symmetric by accident
    assert!(
        max_abs_diff(
            &bfl.narrow(0, 0, half).unwrap(),
            &bfl.narrow(0, half, half).unwrap()
        ) > 0.0
    );
}

#[test]
fn bfl_fp8_file_applies_its_scales() {
    let (vb, fp8) = bfl_file("flux-2-klein-tiny-fp8.safetensors");
    assert!(fp8);
    let raw = load_safetensors(flux2_fixtures().join("flux-2-klein-tiny-fp8.safetensors"));
    assert_eq!(
        raw["double_blocks.0.img_attn.qkv.weight"].dtype(),
        DType::F8E4M3
    );
    let mut quantized = 0;
    for (name, want) in diffusers_transformer() {
        let got = vb.get(want.shape(), &name).unwrap();
        let err = max_abs_diff(&got, &want);
        let scale = max_abs(&want);
        let is_block_linear = (name.starts_with("transformer_blocks.")
            || name.starts_with("single_transformer_blocks."))
            && want.rank() == 2;
        if is_block_linear {
            quantized += 1;
            // e4m3 keeps 3 mantissa bits: error <= |w|/16 <= absmax/16. Without the scale the
            // values would be ~448/absmax too large.
            assert!(err <= scale / 16.0, "{name}: err {err} vs absmax {scale}");
            assert!(err > 0.0, "{name} was not quantized");
        } else {
            // bf16 in the file: 8 mantissa bits.
            assert!(err <= scale / 256.0, "{name}: err {err} vs absmax {scale}");
        }
    }
    assert!(quantized >= 20, "{quantized}");
}

#[test]
fn missing_transformer_names_the_file() {
    // The sharded fixture has no transformer/ and no BFL file.
    let files = ModelFiles::local(&flux2_fixtures().join("tiny-model-sharded")).unwrap();
    let Err(err) = files.transformer_var_builder(DType::F32, &Device::Cpu) else {
        panic!("expected an error")
    };
    let msg = err.to_string();
    assert!(matches!(err, WeightsError::MissingFile { .. }), "{msg}");
    assert!(
        msg.contains("transformer/diffusion_pytorch_model.safetensors"),
        "{msg}"
    );
    assert!(msg.contains("MODEL_ID"), "the fix is named: {msg}");
    let err = files.get("vae/config.json").unwrap_err().to_string();
    assert!(
        err.contains("vae/config.json") && err.contains("tiny-model-sharded"),
        "{err}"
    );
}

#[test]
fn bfl_file_at_the_root_is_used_when_there_is_no_transformer_folder() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        flux2_fixtures().join("tiny-model/model_index.json"),
        dir.path().join("model_index.json"),
    )
    .unwrap();
    std::fs::copy(
        flux2_fixtures().join("flux-2-klein-tiny-fp8.safetensors"),
        dir.path().join("flux-2-klein-tiny-fp8.safetensors"),
    )
    .unwrap();
    let files = ModelFiles::open_with(dir.path().to_str().unwrap(), HubOptions::default()).unwrap();
    let (vb, fmt) = files
        .transformer_var_builder(DType::F32, &Device::Cpu)
        .unwrap();
    assert_eq!(fmt, TransformerFormat::Bfl { fp8: true });
    assert!(vb.contains_tensor("single_transformer_blocks.1.attn.to_out.weight"));
}

/// A fake HF cache with one snapshot, as hf-hub lays it out.
fn fake_cache(root: &Path, repo: &str, files: &[(&str, &Path)]) {
    let folder = format!("models--{}", repo.replace('/', "--"));
    let repo_dir = root.join(folder);
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), commit).unwrap();
    for (name, src) in files {
        let dst = repo_dir.join("snapshots").join(commit).join(name);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(src, dst).unwrap();
    }
}

fn unreachable_hub(cache: &Path) -> HubOptions {
    HubOptions {
        token: Some("hf_test_token".into()),
        cache_dir: Some(cache.to_path_buf()),
        // Port 9 (discard) on loopback: connection refused, nothing leaves the machine.
        endpoint: Some("http://127.0.0.1:9".into()),
        offline: false,
        list_timeout: None,
        ..Default::default()
    }
}

#[test]
fn silent_hub_times_out_instead_of_hanging() {
    // Accepts connections (kernel backlog) but never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cache = tempfile::tempdir().unwrap();
    let opts = HubOptions {
        endpoint: Some(format!("http://{}", silent.local_addr().unwrap())),
        list_timeout: Some(std::time::Duration::from_millis(500)),
        ..unreachable_hub(cache.path())
    };
    let t = std::time::Instant::now();
    let err = ModelFiles::open_with("4B", opts).unwrap_err().to_string();
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
    assert!(err.contains("no answer within"), "{err}");
}

#[test]
fn hub_offline_without_cache_names_the_repo_and_fix() {
    let cache = tempfile::tempdir().unwrap();
    let err = ModelFiles::open_with("4B", unreachable_hub(cache.path())).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, WeightsError::Offline { .. }), "{msg}");
    assert!(msg.contains("black-forest-labs/FLUX.2-klein-4B"), "{msg}");
    assert!(
        msg.contains("HF_TOKEN") && msg.contains("MODEL_ID"),
        "{msg}"
    );

    let offline = HubOptions {
        offline: true,
        ..unreachable_hub(cache.path())
    };
    let err = ModelFiles::open_with("someone/klein", offline).unwrap_err();
    assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
}

#[test]
fn hub_repo_served_from_the_cache_when_offline() {
    let cache = tempfile::tempdir().unwrap();
    let tiny = flux2_fixtures().join("tiny-model");
    let te_cfg = tiny.join("text_encoder/config.json");
    let te_w = tiny.join("text_encoder/model.safetensors");
    let idx = tiny.join("model_index.json");
    fake_cache(
        cache.path(),
        "black-forest-labs/FLUX.2-klein-9B",
        &[
            ("model_index.json", &idx),
            ("text_encoder/config.json", &te_cfg),
            ("text_encoder/model.safetensors", &te_w),
        ],
    );
    for opts in [
        unreachable_hub(cache.path()),
        HubOptions {
            offline: true,
            ..unreachable_hub(cache.path())
        },
    ] {
        let files = ModelFiles::open_with("9B", opts).unwrap();
        assert_eq!(files.id(), "black-forest-labs/FLUX.2-klein-9B");
        assert!(files.model_index().unwrap().is_distilled);
        let vb: VarBuilder = files
            .component_var_builder("text_encoder", DType::F32, &Device::Cpu)
            .unwrap();
        assert!(vb.contains_tensor("model.layers.27.mlp.up_proj.weight"));
        // Not cached and the hub is unreachable: the error names the file.
        let err = files.get("vae/config.json").unwrap_err().to_string();
        assert!(
            err.contains("vae/config.json") && err.contains("FLUX.2-klein-9B"),
            "{err}"
        );
        let Err(err) = files.transformer_var_builder(DType::F32, &Device::Cpu) else {
            panic!("expected an error")
        };
        let err = err.to_string();
        assert!(
            err.contains("transformer/diffusion_pytorch_model.safetensors"),
            "{err}"
        );
    }
}

/// `Quantization::Fp8` on an fp8 file keeps the file's fp8 values and scales (no second
/// rounding); the dequantized weight equals the scaled file weight exactly. Other quantizations
/// and diffusers folders go through the dense weight.
#[test]
fn fp8_linear_keeps_the_files_fp8_weights() {
    use candle_core::Module;
    use imagegen::flux2::quant::{Quantization, linear_no_bias};
    let (vb, _) = bfl_file("flux-2-klein-tiny-fp8.safetensors");
    let names = [
        ("transformer_blocks.1.attn", "to_k", 48, 48),
        ("transformer_blocks.0.attn", "add_v_proj", 48, 48),
        (
            "single_transformer_blocks.1.attn",
            "to_qkv_mlp_proj",
            48,
            432,
        ),
        ("transformer_blocks.0.ff", "linear_out", 144, 48),
    ];
    for (prefix, layer, in_dim, out_dim) in names {
        let vbl = vb.pp(prefix).pp(layer);
        let lin = linear_no_bias(in_dim, out_dim, vbl.clone(), Quantization::Fp8).unwrap();
        let want = vbl.get((out_dim, in_dim), "weight").unwrap();
        let got = lin.dequantized_weight(DType::F32).unwrap();
        assert_eq!(max_abs_diff(&got, &want), 0.0, "{prefix}.{layer}");
        // Re-quantizing the dequantized weight per row would round a second time.
        let requant = imagegen::flux2::quant::QLinear::from_weight(want.clone(), Quantization::Fp8)
            .unwrap()
            .dequantized_weight(DType::F32)
            .unwrap();
        assert!(max_abs_diff(&requant, &want) > 0.0, "{prefix}.{layer}");
        let x = Tensor::ones((1, in_dim), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(lin.forward(&x).unwrap().dims(), &[1, out_dim]);
    }
    // Non-fp8 tensors (final layer, diffusers folders) have no raw form.
    assert!(!vb.contains_tensor("proj_out.weight#fp8"));
    let files = ModelFiles::local(&flux2_fixtures().join("tiny-model")).unwrap();
    let (dvb, _) = files
        .transformer_var_builder(DType::F32, &Device::Cpu)
        .unwrap();
    assert!(!dvb.contains_tensor("transformer_blocks.0.attn.to_q.weight#fp8"));
}

/// The parameter count behind the CPU-time warning comes from the headers and equals the
/// stored tensors' element count.
#[test]
fn transformer_parameters_are_counted_from_the_headers() {
    let dir = flux2_fixtures().join("tiny-model");
    let files = ModelFiles::local(&dir).unwrap();
    let stored = load_safetensors(dir.join("transformer/diffusion_pytorch_model.safetensors"));
    let want: u64 = stored.values().map(|t| t.elem_count() as u64).sum();
    assert!(want > 0);
    assert_eq!(files.transformer_parameters(), Some(want));
}
