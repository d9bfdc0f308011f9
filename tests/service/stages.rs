//! The download stage: requests fetch their references before they take a GPU queue place, so
//! slow URLs hold download places (bounded on their own, 503 + Retry-After), never queue places.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use imagegen::engine::NoUpscaler;
use serde_json::{Value, json};

use crate::backend::Paint;
use crate::common::{Peer, Server};

async fn metric(s: &Server, name: &str) -> f64 {
    let text = s.get_text("/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in metrics"))
}

/// Waits until `n` GETs of /hold.png are being held by the peer.
async fn wait_held(peer: &Peer, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while peer.state.held.load(Ordering::SeqCst) < n {
        assert!(Instant::now() < deadline, "never {n} held downloads");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn body(peer: &Peer, refs: &[&str]) -> Value {
    let images: Vec<Value> = refs.iter().map(|r| json!({"url": peer.url(r)})).collect();
    json!({"prompts": ["p"], "upload_urls": [peer.url("/record")], "images": images,
           "width": 256, "height": 256, "num_steps": 1, "seed": 5})
}

async fn server(flags: &[&str]) -> (Server, Peer) {
    let s = Server::start(Paint::default().loader(Duration::ZERO), NoUpscaler, flags).await;
    s.wait_status("healthy", Duration::from_secs(10)).await;
    (s, Peer::start().await)
}

#[tokio::test]
async fn slow_references_in_several_requests_do_not_delay_a_ready_request() {
    // One queue place: before the download stage, the first slow request took it and every
    // other request got 503 while the worker sat idle.
    let (s, peer) = server(&["--queue-size", "1"]).await;
    let slow: Vec<_> = (0..3)
        .map(|_| s.spawn_post_json("/generate", body(&peer, &["/hold.png"])))
        .collect();
    wait_held(&peer, 3).await;
    assert_eq!(metric(&s, "imagegen_download_stage_depth").await, 3.0);
    assert_eq!(metric(&s, "imagegen_queue_depth").await, 0.0);

    // A request with nothing to download runs now, while the three still wait on their URLs.
    let ready = s.post("/generate", body(&peer, &[])).await;
    assert_eq!(ready.status(), 200);
    let v: Value = ready.json().await.unwrap();
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(
        peer.state.held.load(Ordering::SeqCst),
        3,
        "the slow ones finished first"
    );

    // Released together, the three become ready at once and only then compete for the single
    // queue place: each one ran, or was refused by the queue (not by its download).
    peer.state.released.store(true, Ordering::SeqCst);
    let mut ran = 0;
    for job in slow {
        let v = job.await.unwrap();
        if v["success"] == true {
            ran += 1;
        } else {
            assert_eq!(v["max_queue"], 1, "{v}");
        }
    }
    assert!(ran >= 1, "none of the slow requests ran");
    assert_eq!(metric(&s, "imagegen_download_stage_depth").await, 0.0);
}

#[tokio::test]
async fn a_full_download_stage_answers_503_with_retry_after_but_ready_work_still_runs() {
    let (s, peer) = server(&["--max-concurrent-downloads", "2", "--retry-after-secs", "4"]).await;
    let slow: Vec<_> = (0..2)
        .map(|_| s.spawn_post_json("/generate", body(&peer, &["/hold.png"])))
        .collect();
    wait_held(&peer, 2).await;

    let resp = s.post("/generate", body(&peer, &["/ref.png"])).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "4");
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("MAX_CONCURRENT_DOWNLOADS"),
        "{v}"
    );
    let resp = s.post("/upscale", peer.upscale_body()).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(metric(&s, "imagegen_download_rejections_total").await, 2.0);

    // Nothing to download: not limited by the stage.
    let v: Value = s.post_json("/generate", body(&peer, &[])).await;
    assert_eq!(v["success"], true, "{v}");

    peer.state.released.store(true, Ordering::SeqCst);
    for job in slow {
        assert_eq!(job.await.unwrap()["success"], true);
    }
}
