//! The device-memory promise: after every job (a /generate batch, an /upscale), whatever its
//! outcome, the worker gives device memory back (on CUDA: the pool is trimmed to
//! GPU_POOL_KEEP_MIB). Here a recorder stands in for the CUDA pool.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imagegen::engine::DeviceMemory;
use serde_json::json;

use crate::backend::{Paint, TinyEsrgan};
use crate::common::{Peer, Server};

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<&'static str>>>);

impl DeviceMemory for Recorder {
    fn after_job(&self, job: &'static str) {
        self.0.lock().unwrap().push(job);
    }
}

impl Recorder {
    /// Waits (the hook runs on the worker after the reply went out) until `n` calls are seen.
    async fn wait(&self, n: usize) -> Vec<&'static str> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let seen = self.0.lock().unwrap().clone();
            if seen.len() >= n || Instant::now() > deadline {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test]
async fn memory_is_given_back_once_after_every_batch_and_every_upscale() {
    let memory = Recorder::default();
    let esrgan = TinyEsrgan::default();
    let s = Server::start_with_memory(
        Paint::default().loader(Duration::ZERO),
        esrgan.clone(),
        memory.clone(),
        &[],
    )
    .await;
    s.wait_status("healthy", Duration::from_secs(10)).await;
    let peer = Peer::start().await;

    // A batch of three with the upscaler: one job, so one hand-back, after the whole batch.
    let v = s
        .post_json(
            "/generate",
            json!({"prompts": ["a", "b", "c"], "upload_urls": vec![peer.url("/record"); 3],
                   "width": 256, "height": 256, "num_steps": 1, "upscale": 2}),
        )
        .await;
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(memory.wait(1).await, vec!["generate"]);

    let v = s
        .post_json(
            "/upscale",
            json!({"image_url": peer.url("/ref.png"), "upload_url": peer.url("/record"), "scale": 2}),
        )
        .await;
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(memory.wait(2).await, vec!["generate", "upscale"]);

    // A failed job gives memory back too.
    let v = s
        .post_json(
            "/upscale",
            json!({"image_url": peer.url("/not-image"), "upload_url": peer.url("/record")}),
        )
        .await;
    assert_eq!(v["success"], false, "{v}");
    let v = s
        .post_json(
            "/generate",
            json!({"prompts": ["a"], "upload_urls": [peer.url("/forbidden")],
                   "width": 256, "height": 256, "num_steps": 1}),
        )
        .await;
    assert_eq!(v["success"], false, "{v}");
    let seen = memory.wait(3).await;
    // The /not-image download fails before any job is queued: only the generate counts.
    assert_eq!(seen, vec!["generate", "upscale", "generate"]);
    assert_eq!(esrgan.loads.load(std::sync::atomic::Ordering::SeqCst), 2);
}
