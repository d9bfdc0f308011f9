//! Timing: warm-up runs, then timed runs; median total and median per stage; the allocator's
//! peak over the timed runs. A failing case (out of memory, say) is reported, not fatal.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use candle_core::Device;

use super::memory::MemProbe;
use super::report::{CaseResult, Stages, median};

/// Runs `f` `warmup` times untimed, then `runs` times timed. `f` returns its stage split for that
/// run; the device is synchronised before each clock read so queued GPU work is counted.
pub fn measure(
    case: &str,
    warmup: u32,
    runs: u32,
    device: &Device,
    probe: &MemProbe,
    mut f: impl FnMut() -> anyhow::Result<Stages>,
) -> CaseResult {
    let mut call = || -> anyhow::Result<Stages> {
        match catch_unwind(AssertUnwindSafe(&mut f)) {
            Ok(r) => r,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                Err(anyhow::anyhow!("panicked: {msg}"))
            }
        }
    };
    let failed = |e: anyhow::Error, runs_ms: Vec<f64>| CaseResult {
        case: case.into(),
        status: "failed".into(),
        error: Some(format!("{e:#}")),
        runs_ms,
        median_ms: None,
        stages: Stages::default(),
        peak_mem_bytes: probe.peak_bytes(),
        mem_after_bytes: probe.in_use_bytes(),
    };
    for _ in 0..warmup {
        if let Err(e) = call().and_then(|s| device.synchronize().map(|_| s).map_err(Into::into)) {
            return failed(e.context("warm-up"), vec![]);
        }
    }
    let _ = device.synchronize();
    probe.reset_peak();
    let mut runs_ms = Vec::new();
    let mut splits = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let r = call().and_then(|s| device.synchronize().map(|_| s).map_err(Into::into));
        let dt = t.elapsed().as_secs_f64() * 1e3;
        match r {
            Ok(s) => {
                runs_ms.push(dt);
                splits.push(s);
            }
            Err(e) => return failed(e, runs_ms),
        }
    }
    CaseResult {
        case: case.into(),
        status: "ok".into(),
        error: None,
        median_ms: median(&runs_ms),
        runs_ms,
        stages: median_stages(&splits),
        peak_mem_bytes: probe.peak_bytes(),
        mem_after_bytes: probe.in_use_bytes(),
    }
}

/// A case that did not run, with the reason.
pub fn skipped(case: &str, why: impl Into<String>) -> CaseResult {
    CaseResult {
        case: case.into(),
        status: "skipped".into(),
        error: Some(why.into()),
        runs_ms: vec![],
        median_ms: None,
        stages: Stages::default(),
        peak_mem_bytes: None,
        mem_after_bytes: None,
    }
}

fn median_stages(splits: &[Stages]) -> Stages {
    let pick = |g: fn(&Stages) -> Option<f64>| {
        let v: Vec<f64> = splits.iter().filter_map(g).collect();
        if v.len() == splits.len() {
            median(&v)
        } else {
            None
        }
    };
    Stages {
        encode_refs_ms: pick(|s| s.encode_refs_ms),
        text_encoder_ms: pick(|s| s.text_encoder_ms),
        denoise_ms: pick(|s| s.denoise_ms),
        vae_decode_ms: pick(|s| s.vae_decode_ms),
        upscale_ms: pick(|s| s.upscale_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_is_not_timed_and_stages_are_medians() {
        let probe = MemProbe::new(&Device::Cpu).unwrap();
        let mut calls = 0;
        let r = measure("c", 2, 3, &Device::Cpu, &probe, || {
            calls += 1;
            Ok(Stages {
                denoise_ms: Some(calls as f64),
                ..Default::default()
            })
        });
        assert_eq!(calls, 5);
        assert_eq!(r.status, "ok");
        assert_eq!(r.runs_ms.len(), 3);
        // Timed runs are calls 3, 4, 5.
        assert_eq!(r.stages.denoise_ms, Some(4.0));
        assert_eq!(r.stages.text_encoder_ms, None);
        assert_eq!(r.peak_mem_bytes, None);
    }

    #[test]
    fn errors_and_panics_become_failed_cases() {
        let probe = MemProbe::new(&Device::Cpu).unwrap();
        let mut n = 0;
        let r = measure("c", 0, 3, &Device::Cpu, &probe, || {
            n += 1;
            anyhow::ensure!(n < 2, "out of memory");
            Ok(Stages::default())
        });
        assert_eq!(r.status, "failed");
        assert_eq!(r.runs_ms.len(), 1);
        assert!(r.error.as_deref().unwrap().contains("out of memory"));
        let r = measure(
            "p",
            1,
            1,
            &Device::Cpu,
            &probe,
            || -> anyhow::Result<Stages> { panic!("boom") },
        );
        assert_eq!(r.status, "failed");
        assert!(
            r.error.as_deref().unwrap().contains("warm-up")
                && r.error.as_deref().unwrap().contains("boom")
        );
    }
}
