//! `imagegen download` and a first `serve` start against a stub hub: files land in the hub
//! cache, progress is printed, and /health says `downloading` with bytes done of total.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::flux2_fixtures;
use crate::fake_hub::{FakeHub, Faults, REPO};

fn hub_env(cmd: &mut Command, hub: &FakeHub, home: &std::path::Path) {
    cmd.env("HF_ENDPOINT", hub.endpoint())
        .env("HF_HOME", home)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .env_remove("HUGGING_FACE_TOKEN");
}

#[test]
fn download_fetches_every_needed_file_with_progress_lines() {
    let hub = FakeHub::start(&flux2_fixtures().join("tiny-model"), Faults::default());
    let home = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imagegen"));
    cmd.args(["download", REPO]);
    hub_env(&mut cmd, &hub, home.path());
    let out = cmd.output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("files ready"), "{stdout}");
    // Not a terminal: plain lines, ending at 100 %.
    assert!(stderr.contains("download: 100%"), "{stderr}");
    let snapshot = home
        .path()
        .join("hub/models--test-org--klein-tiny/snapshots");
    let commit = std::fs::read_dir(&snapshot)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    for f in [
        "model_index.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
    ] {
        assert!(commit.join(f).is_file(), "{f} not in the cache");
    }
}

#[tokio::test]
async fn first_start_reports_downloading_in_health_then_serves() {
    const HELD: &str = "vae/diffusion_pytorch_model.safetensors";
    let hub = FakeHub::start(
        &flux2_fixtures().join("tiny-model"),
        Faults {
            hold: Some(HELD.into()),
            ..Default::default()
        },
    );
    let home = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imagegen"));
    cmd.args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--model-id", REPO, "--device", "cpu"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    hub_env(&mut cmd, &hub, home.path());
    let mut child = cmd.spawn().unwrap();
    let client = reqwest::Client::new();
    let health = |client: reqwest::Client| async move {
        let r = client
            .get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await
            .ok()?;
        r.json::<serde_json::Value>().await.ok()
    };
    // Generous bounds: a loaded 2-core CI machine must not make this flake.
    let deadline = Instant::now() + Duration::from_secs(120);
    let seen = loop {
        assert!(Instant::now() < deadline, "never saw status downloading");
        if let Some(h) = health(client.clone()).await
            && h["status"] == "downloading"
        {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let d = &seen["download"];
    let total = d["total_bytes"].as_u64().unwrap();
    let done = d["done_bytes"].as_u64().unwrap();
    assert!(total > 2_000_000 && done < total, "{seen}");
    assert!(d["files_total"].as_u64().unwrap() >= 5, "{seen}");
    hub.release();
    let healthy = loop {
        assert!(Instant::now() < deadline, "never became healthy");
        if let Some(h) = health(client.clone()).await
            && h["status"] == "healthy"
        {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(healthy.get("download").is_none(), "{healthy}");
    let _ = child.kill();
    let _ = child.wait();
}

/// `make run`'s choice (scripts/run.sh, dry run): the CPU binary without a GPU, the CUDA
/// build for the GPU's family with one (a fake nvidia-smi on PATH stands in for the driver).
#[test]
fn make_run_picks_cuda_when_a_gpu_is_present() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/run.sh");
    let run = |path: &str| {
        let out = Command::new("bash")
            .arg(script)
            .env("RUN_DRY", "1")
            .env("PATH", path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let system = std::env::var("PATH").unwrap_or_default();
    let bin = tempfile::tempdir().unwrap();
    let fake = bin.path().join("nvidia-smi");
    // nvidia-smi present but no GPU (driver not loaded): it fails.
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2; exit 9\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let no_gpu = run(&format!("{}:{system}", bin.path().display()));
    assert!(
        no_gpu.contains("no NVIDIA GPU found") && no_gpu.contains("CPU binary"),
        "{no_gpu}"
    );
    std::fs::write(&fake, "#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 9.0'\n").unwrap();
    let gpu = run(&format!("{}:{system}", bin.path().display()));
    assert!(
        gpu.contains("H100") && gpu.contains("CUDA binary for sm_90"),
        "{gpu}"
    );
    std::fs::write(&fake, "#!/bin/sh\necho 'NVIDIA GeForce RTX 4090, 8.9'\n").unwrap();
    let ada = run(&format!("{}:{system}", bin.path().display()));
    assert!(ada.contains("sm_89"), "{ada}");
}
