//! Selection with injected backends: each way a fused kernel can go wrong on the device is
//! simulated on the CPU, and the selection must fall back to (or refuse) correctly.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use super::*;

/// Correct and fast: computes `naive` once per input shape (the untimed first call), then
/// returns the cached result, so its timed calls cost next to nothing.
#[derive(Default)]
struct Cached(Mutex<HashMap<Vec<usize>, Tensor>>);
impl AttentionKernel for Cached {
    fn name(&self) -> &'static str {
        "cached"
    }
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let mut m = self.0.lock().unwrap();
        if let Some(t) = m.get(q.dims()) {
            return Ok(t.clone());
        }
        let t = Naive.forward(q, k, v)?;
        m.insert(q.dims().to_vec(), t.clone());
        Ok(t)
    }
}

/// Off by 0.1 everywhere (a wrong scale or tile shows as much larger errors).
struct Wrong;
impl AttentionKernel for Wrong {
    fn name(&self) -> &'static str {
        "wrong"
    }
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        Naive.forward(q, k, v)? + 0.1
    }
}

/// Correct, but 30 ms slower per call than naive.
struct Slow;
impl AttentionKernel for Slow {
    fn name(&self) -> &'static str {
        "slow"
    }
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        std::thread::sleep(Duration::from_millis(30));
        Naive.forward(q, k, v)
    }
}

struct Erroring;
impl AttentionKernel for Erroring {
    fn name(&self) -> &'static str {
        "erroring"
    }
    fn forward(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> Result<Tensor> {
        candle_core::bail!("CUDNN_STATUS_NOT_SUPPORTED")
    }
}

struct Panicking;
impl AttentionKernel for Panicking {
    fn name(&self) -> &'static str {
        "panicking"
    }
    fn forward(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> Result<Tensor> {
        panic!("kernel launch failed")
    }
}

/// Returns NaN (an overflowing f16 accumulator, say).
struct NotFinite;
impl AttentionKernel for NotFinite {
    fn name(&self) -> &'static str {
        "nan"
    }
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        Naive.forward(q, k, v)? * f64::NAN
    }
}

fn plan() -> CheckPlan {
    let shape = |seq| CheckShape {
        batch: 1,
        heads: 2,
        seq,
        head_dim: 32,
    };
    CheckPlan {
        shapes: vec![shape(300), shape(40)],
        dtype: DType::F32,
        iters: 2,
    }
}

fn kernels(list: Vec<Arc<dyn AttentionKernel>>) -> Vec<Arc<dyn AttentionKernel>> {
    list
}

fn reason<'a>(r: &'a AttentionReport, name: &str) -> &'a str {
    r.candidates
        .iter()
        .find(|c| c.name == name)
        .and_then(|c| c.reason.as_deref())
        .unwrap_or_else(|| panic!("no reason for {name}: {r:?}"))
}

#[test]
fn auto_without_fused_backends_is_naive_and_runs_no_check() {
    let (a, r) = select(&AttentionChoice::Auto, &[], &plan(), &Device::Cpu).unwrap();
    assert_eq!(a.name(), NAIVE);
    assert_eq!(r.selected, NAIVE);
    assert!(r.naive.is_none() && r.candidates.is_empty());
}

#[test]
fn auto_rejects_every_broken_or_slower_backend_and_starts_on_naive() {
    let c = kernels(vec![
        Arc::new(Wrong),
        Arc::new(Slow),
        Arc::new(Erroring),
        Arc::new(Panicking),
        Arc::new(NotFinite),
    ]);
    let (a, r) = select(&AttentionChoice::Auto, &c, &plan(), &Device::Cpu).unwrap();
    assert_eq!(a.name(), NAIVE);
    assert_eq!(r.selected, NAIVE);
    let naive = r.naive.as_ref().unwrap();
    assert!(naive.ok && naive.max_error.unwrap() < 1e-5, "{naive:?}");
    assert!(reason(&r, "wrong").contains("exceeds tolerance"));
    let w = r.candidates.iter().find(|c| c.name == "wrong").unwrap();
    assert!((w.max_error.unwrap() - 0.1).abs() < 1e-3 && !w.ok);
    assert!(reason(&r, "slow").starts_with("slower than naive"));
    assert!(r.candidates.iter().find(|c| c.name == "slow").unwrap().ok);
    assert!(reason(&r, "erroring").contains("CUDNN_STATUS_NOT_SUPPORTED"));
    assert!(reason(&r, "panicking").contains("panicked: kernel launch failed"));
    assert!(reason(&r, "nan").contains("non-finite"));
}

#[test]
fn auto_picks_the_fastest_backend_that_passes() {
    let c = kernels(vec![
        Arc::new(Slow),
        Arc::new(Wrong),
        Arc::new(Cached::default()),
    ]);
    let (a, r) = select(&AttentionChoice::Auto, &c, &plan(), &Device::Cpu).unwrap();
    assert_eq!(a.name(), "cached");
    assert_eq!(r.selected, "cached");
    let chosen = r.candidates.iter().find(|c| c.name == "cached").unwrap();
    assert!(chosen.ok && chosen.reason.is_none() && chosen.max_error == Some(0.0));
    assert!(reason(&r, "slow").starts_with("slower than"));
    // The selected backend is what the model then runs.
    let [q, k, v] = check_inputs(plan().shapes[1], DType::F32, &Device::Cpu).unwrap();
    let got = a.forward(&q, &k, &v).unwrap();
    assert_eq!(
        max_abs_diff(&got, &Naive.forward(&q, &k, &v).unwrap()).unwrap(),
        0.0
    );
}

#[test]
fn forcing_a_failing_backend_refuses_to_start() {
    let c = kernels(vec![
        Arc::new(Wrong),
        Arc::new(Erroring),
        Arc::new(Panicking),
    ]);
    for name in ["wrong", "erroring", "panicking"] {
        let choice = AttentionChoice::Named(name.into());
        match select(&choice, &c, &plan(), &Device::Cpu) {
            Err(AttentionError::CheckFailed { name: n, reason }) => {
                assert_eq!(n, name);
                assert!(!reason.is_empty());
            }
            other => panic!("{name}: expected CheckFailed, got {other:?}"),
        }
    }
    let err = select(&"cudnn".parse().unwrap(), &c, &plan(), &Device::Cpu).unwrap_err();
    assert!(matches!(err, AttentionError::NotCompiled { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("ATTENTION=cudnn") && msg.contains("naive, wrong, erroring, panicking"),
        "{msg}"
    );
}

#[test]
fn forcing_a_correct_but_slower_backend_uses_it() {
    let c = kernels(vec![Arc::new(Slow)]);
    let (a, r) = select(
        &AttentionChoice::Named("slow".into()),
        &c,
        &plan(),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!((a.name(), r.selected.as_str()), ("slow", "slow"));
}

#[test]
fn forcing_naive_skips_the_check() {
    let c = kernels(vec![Arc::new(Panicking)]);
    let (a, r) = select(&AttentionChoice::Naive, &c, &plan(), &Device::Cpu).unwrap();
    assert_eq!(a.name(), NAIVE);
    assert!(r.candidates.is_empty() && r.naive.is_none());
}

#[test]
fn naive_backend_is_bit_identical_to_chunked_attention() {
    let shape = CheckShape {
        batch: 1,
        heads: 3,
        seq: 50,
        head_dim: 16,
    };
    let [q, k, v] = check_inputs(shape, DType::F32, &Device::Cpu).unwrap();
    let a = Attention::naive().forward(&q, &k, &v).unwrap();
    let b = chunked_attention_prescaled(&q, &k, &v, MAX_SCORES).unwrap();
    let bits = |t: &Tensor| -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    assert_eq!(bits(&a), bits(&b));
}

/// The bf16 tolerance admits bf16 naive at a DiT-like shape (head_dim 128, 768 tokens) and
/// rejects an error of 0.1.
#[test]
fn bf16_tolerance_admits_rounding_and_rejects_real_errors() {
    let shape = model_check_shapes(2, 128, 512, 256)[1];
    assert_eq!(shape.seq, 768);
    let p = CheckPlan {
        shapes: vec![shape],
        dtype: DType::BF16,
        iters: 1,
    };
    let c = kernels(vec![Arc::new(Wrong)]);
    let (_, r) = select(&AttentionChoice::Auto, &c, &p, &Device::Cpu).unwrap();
    let naive = r.naive.clone().unwrap();
    assert!(naive.ok, "{naive:?}");
    let e = naive.max_error.unwrap();
    assert!(
        e > 1e-4 && e < tolerance(DType::BF16) / 2.0,
        "bf16 naive error {e}"
    );
    assert!(reason(&r, "wrong").contains("exceeds tolerance"));
}

#[test]
fn model_shapes_cover_the_largest_and_a_small_size() {
    let s = model_check_shapes(24, 128, 512, 1024);
    assert_eq!(s[0].seq, 512 + 4096);
    assert_eq!(s[1].seq, 512 + 256);
    assert!(
        s.iter()
            .all(|c| c.heads == 24 && c.head_dim == 128 && c.batch == 1)
    );
}

#[test]
fn choice_parses_and_names_what_is_wrong() {
    assert_eq!(
        "AUTO".parse::<AttentionChoice>().unwrap(),
        AttentionChoice::Auto
    );
    assert_eq!(
        "naive".parse::<AttentionChoice>().unwrap(),
        AttentionChoice::Naive
    );
    assert_eq!(
        "cudnn-sdpa".parse::<AttentionChoice>().unwrap(),
        AttentionChoice::Named("cudnn-sdpa".into())
    );
    let e = "flash attn!".parse::<AttentionChoice>().unwrap_err();
    assert!(e.contains("ATTENTION") && e.contains("auto, naive"), "{e}");
}

#[test]
fn metrics_show_selected_backend_and_each_candidate() {
    let c = kernels(vec![Arc::new(Wrong), Arc::new(Erroring)]);
    let (_, r) = select(&AttentionChoice::Auto, &c, &plan(), &Device::Cpu).unwrap();
    let m = report_metrics(&r);
    assert!(
        m.contains("imagegen_attention_backend_info{backend=\"naive\",requested=\"auto\"} 1"),
        "{m}"
    );
    assert!(m.contains("imagegen_attention_check_ok{backend=\"naive\"} 1"));
    assert!(m.contains("imagegen_attention_check_ok{backend=\"wrong\"} 0"));
    assert!(m.contains("imagegen_attention_check_ok{backend=\"erroring\"} 0"));
    assert!(m.contains("imagegen_attention_check_max_error{backend=\"wrong\"} 0.1"));
    assert!(m.contains("imagegen_attention_check_seconds{backend=\"naive\"}"));
}

/// The fused backends are CUDA kernels: a CUDA build running on the CPU device offers none, so
/// `auto` runs no check there and a forced one is refused before any weights load.
#[test]
fn the_cpu_device_offers_no_fused_backend() {
    assert!(compiled_backends(&Device::Cpu).is_empty());
    let cpu = compiled_backends(&Device::Cpu);
    assert!(check_available(&AttentionChoice::Auto, &cpu).is_ok());
    assert!(check_available(&AttentionChoice::Naive, &cpu).is_ok());
    let err = check_available(&"cudnn".parse().unwrap(), &cpu).unwrap_err();
    assert_eq!(
        err.to_string(),
        "ATTENTION=cudnn: no such backend in this binary for this device (available: naive)"
    );
    let c = kernels(vec![Arc::new(Slow)]);
    assert!(check_available(&AttentionChoice::Named("slow".into()), &c).is_ok());
}
