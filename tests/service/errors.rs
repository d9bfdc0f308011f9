//! Typed engine errors and their HTTP mapping: not loaded and a lost device answer 503 with
//! Retry-After, a lost device stops all further work, out of memory fails only its item.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use image::RgbImage;
use imagegen::engine::{BackendLoader, EngineError, ImageBackend, ItemParams, NoUpscaler};
use serde_json::{Value, json};

use crate::backend::Paint;
use crate::common::{Peer, Server};

/// Fails items as scripted (one entry per `generate` call, `None` = succeed), then succeeds.
#[derive(Clone, Default)]
struct Scripted {
    script: Arc<Mutex<VecDeque<Option<EngineError>>>>,
    calls: Arc<AtomicUsize>,
}

impl Scripted {
    fn new(script: Vec<Option<EngineError>>) -> Self {
        Self {
            script: Arc::new(Mutex::new(script.into())),
            calls: Arc::default(),
        }
    }

    fn loader(&self) -> Option<BackendLoader<Scripted>> {
        let me = self.clone();
        Some(Box::new(move || Ok(me)))
    }
}

impl ImageBackend for Scripted {
    type References = ();

    fn encode_references(&self, _: &[RgbImage]) -> Result<(), EngineError> {
        Ok(())
    }

    fn generate(
        &self,
        item: &ItemParams,
        _: Option<&()>,
        _: &dyn Fn() -> bool,
    ) -> Result<RgbImage, EngineError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match self.script.lock().unwrap().pop_front().flatten() {
            Some(e) => Err(e),
            None => Ok(RgbImage::new(item.width / 16 * 16, item.height / 16 * 16)),
        }
    }
}

fn body(peer: &Peer, n: usize) -> Value {
    json!({"prompts": vec!["p"; n], "upload_urls": vec![peer.url("/record"); n],
           "width": 256, "height": 256, "num_steps": 1, "seed": 1})
}

async fn scripted_server(backend: &Scripted) -> (Server, Peer) {
    let s = Server::start(backend.loader(), NoUpscaler, &["--retry-after-secs", "7"]).await;
    s.wait_status("healthy", Duration::from_secs(10)).await;
    (s, Peer::start().await)
}

#[tokio::test]
async fn a_lost_device_answers_503_with_retry_after_and_refuses_all_further_work() {
    let lost = EngineError::DeviceLost("CUDA_ERROR_ILLEGAL_ADDRESS".into());
    let backend = Scripted::new(vec![Some(lost)]);
    let (s, peer) = scripted_server(&backend).await;

    let resp = s.post("/generate", body(&peer, 2)).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "7");
    let v: Value = resp.json().await.unwrap();
    assert!(v["detail"].as_str().unwrap().contains("device lost"), "{v}");
    // The second item never ran: the batch stopped at the lost device.
    assert_eq!(backend.calls.load(Ordering::SeqCst), 1);

    let ready = s.get("/ready").await;
    assert_eq!(ready.status(), 503);
    let h: Value = s.get_json("/health").await;
    assert_eq!(h["status"], "unhealthy", "{h}");
    assert!(h["error"].as_str().unwrap().contains("device lost"), "{h}");

    // Nothing more reaches the device: both routes are refused at admission.
    let resp = s.post("/generate", body(&peer, 1)).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "7");
    let resp = s.post("/upscale", peer.upscale_body()).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(backend.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn out_of_memory_fails_only_its_item_and_is_counted_by_cause() {
    let oom = EngineError::OutOfMemory("allocating 2.0 GiB".into());
    let backend = Scripted::new(vec![Some(oom), None]);
    let (s, peer) = scripted_server(&backend).await;

    let resp = s.post("/generate", body(&peer, 2)).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["success"], false);
    assert!(
        v["results"][0]["error"]
            .as_str()
            .unwrap()
            .contains("out of device memory"),
        "{v}"
    );
    assert_eq!(v["results"][1]["success"], true, "{v}");
    let metrics = s.get_text("/metrics").await;
    assert!(
        metrics.contains("imagegen_items_total{endpoint=\"generate\",outcome=\"out_of_memory\"} 1"),
        "{metrics}"
    );
    // Out of memory is not a lost device: the server keeps working.
    assert_eq!(s.get("/ready").await.status(), 200);
    let v: Value = s.post_json("/generate", body(&peer, 1)).await;
    assert_eq!(v["success"], true, "{v}");
}

#[tokio::test]
async fn model_not_loaded_is_503_with_retry_after_and_the_original_body() {
    let s = Server::start::<Paint, _>(
        None,
        NoUpscaler,
        &["--preload-models", "false", "--retry-after-secs", "7"],
    )
    .await;
    let peer = Peer::start().await;
    let resp = s.post("/generate", body(&peer, 1)).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "7");
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"detail": "Model not loaded"})
    );
}

/// A loader that refuses the configuration (what a forced attention backend failing its
/// self-check on the device gives) stops the server with the reason instead of serving.
#[tokio::test]
async fn a_refused_configuration_stops_the_server_with_the_reason() {
    let why = "ATTENTION=cudnn failed its self-check on the device: max error 1.2e-1 exceeds \
               tolerance 3.0e-2";
    let loader: Option<BackendLoader<Scripted>> =
        Some(Box::new(move || Err(EngineError::Refused(why.into()))));
    let mut s = Server::start(loader, NoUpscaler, &[]).await;
    let stopped = tokio::time::timeout(Duration::from_secs(30), s.handle.take().unwrap())
        .await
        .expect("the server kept running on a refused configuration")
        .unwrap();
    let err = stopped.expect_err("the server exited cleanly on a refused configuration");
    assert!(
        err.to_string()
            .contains(&format!("refusing to start: {why}")),
        "{err}"
    );
}

/// `ATTENTION=<a backend this binary or device lacks>` stops the production server before it
/// loads any weights, naming what is available.
#[tokio::test]
async fn forcing_an_absent_attention_backend_refuses_to_start() {
    let mut s = Server::start_real(&["--attention", "cudnn"]).await;
    let stopped = tokio::time::timeout(Duration::from_secs(30), s.handle.take().unwrap())
        .await
        .expect("the server started on an absent attention backend")
        .unwrap();
    let err = stopped.expect_err("the server exited cleanly").to_string();
    assert!(
        err.contains(
            "ATTENTION=cudnn: no such backend in this binary for this device (available: naive)"
        ),
        "{err}"
    );
}
