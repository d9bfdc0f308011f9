//! Whether this process may run where it is: a CPU-only binary on a GPU machine warns loudly
//! (and /health says so), `DEVICE=cuda` on a CPU-only build refuses to start, and a real 4B/9B
//! model on the CPU warns with the time an image will take. The GPU probe is injected so the
//! decision is tested without a GPU.

use super::DeviceKind;

/// Finds an NVIDIA GPU on this machine without CUDA libraries (the CPU build has none).
pub trait GpuProbe {
    /// The first GPU's name, if one is visible.
    fn gpu(&self) -> Option<String>;
}

/// `nvidia-smi -L`, else the kernel driver's `/proc/driver/nvidia/gpus`.
pub struct SystemProbe;

impl GpuProbe for SystemProbe {
    fn gpu(&self) -> Option<String> {
        let listed = std::process::Command::new("nvidia-smi")
            .arg("-L")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .find(|l| l.starts_with("GPU "))
                    .map(str::to_string)
            });
        listed.or_else(|| {
            let mut gpus = std::fs::read_dir("/proc/driver/nvidia/gpus").ok()?;
            gpus.next()
                .map(|_| "an NVIDIA GPU (kernel driver present)".to_string())
        })
    }
}

/// What the service will compute on, and what to tell the operator about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceDecision {
    /// Open the device as asked; `warning` goes to the log and /health.
    Proceed { warning: Option<String> },
    /// Do not start; the message says why and what to do.
    Refuse(String),
}

/// `kind` as asked, on a binary with (`cuda_built`) or without CUDA, with `probe`'s view of
/// the machine.
pub fn decide(kind: DeviceKind, cuda_built: bool, probe: &dyn GpuProbe) -> DeviceDecision {
    match (kind, cuda_built) {
        (DeviceKind::Cuda, false) => DeviceDecision::Refuse(
            "DEVICE=cuda, but this binary was built without CUDA. Build the CUDA binary with \
             `make build-cuda` (or start with `make run`, which builds it on a GPU machine), \
             or set DEVICE=cpu to run on the CPU on purpose"
                .into(),
        ),
        (DeviceKind::Auto, false) => DeviceDecision::Proceed {
            warning: probe.gpu().map(|gpu| {
                format!(
                    "this is a CPU-only build but the machine has {gpu}: it will NOT be used and \
                     every image runs on the CPU, minutes instead of seconds. Use the CUDA \
                     binary (`make run` builds it on a GPU machine, or `make build-cuda`), or \
                     set DEVICE=cpu to silence this"
                )
            }),
        },
        _ => DeviceDecision::Proceed { warning: None },
    }
}

/// The warning for a real-size model on the CPU: FLUX.2 [klein] at `params` transformer
/// parameters, one image of `side`² in `steps` steps, on `threads` cores. The estimate counts
/// 2·params FLOPs per token per step (the GEMMs dominate) at an assumed 50 GFLOP/s per core
/// (AVX2 f32 GEMM in practice); it is an order of magnitude, and says so.
pub fn cpu_time_warning(params: u64, side: u32, steps: u32, threads: usize) -> Option<String> {
    // The tiny test models and anything under 100 M parameters run fine on a CPU.
    if params < 100_000_000 {
        return None;
    }
    let tokens = (side as u64 / 16).pow(2) + 512;
    let flops = 2.0 * params as f64 * tokens as f64 * steps as f64;
    let secs = flops / (threads.max(1) as f64 * 50e9);
    Some(format!(
        "a {:.1} B-parameter model on the CPU: expect roughly {} per {side}x{side} image at \
         {steps} steps on {threads} cores (estimate). Use a GPU for serving",
        params as f64 / 1e9,
        human_duration(secs)
    ))
}

fn human_duration(secs: f64) -> String {
    if secs >= 90.0 {
        format!("{:.0} min", secs / 60.0)
    } else {
        format!("{secs:.0} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(Option<&'static str>);

    impl GpuProbe for Fake {
        fn gpu(&self) -> Option<String> {
            self.0.map(str::to_string)
        }
    }

    const H100: Fake = Fake(Some("GPU 0: NVIDIA H100 80GB HBM3"));

    #[test]
    fn cuda_on_a_cpu_build_refuses_to_start() {
        for probe in [&H100, &Fake(None)] {
            let DeviceDecision::Refuse(msg) = decide(DeviceKind::Cuda, false, probe) else {
                panic!("must refuse");
            };
            assert!(
                msg.contains("DEVICE=cuda") && msg.contains("make build-cuda"),
                "{msg}"
            );
        }
    }

    #[test]
    fn a_cpu_build_that_sees_a_gpu_warns_and_names_it() {
        let DeviceDecision::Proceed { warning: Some(w) } = decide(DeviceKind::Auto, false, &H100)
        else {
            panic!("must warn");
        };
        assert!(w.contains("H100") && w.contains("CPU-only"), "{w}");
    }

    #[test]
    fn no_warning_without_a_gpu_on_purpose_or_on_a_cuda_build() {
        let quiet = DeviceDecision::Proceed { warning: None };
        assert_eq!(decide(DeviceKind::Auto, false, &Fake(None)), quiet);
        assert_eq!(decide(DeviceKind::Cpu, false, &H100), quiet);
        assert_eq!(decide(DeviceKind::Auto, true, &H100), quiet);
        assert_eq!(decide(DeviceKind::Cuda, true, &H100), quiet);
    }

    #[test]
    fn real_models_on_the_cpu_warn_with_an_estimate() {
        assert_eq!(cpu_time_warning(2_000_000, 1024, 4, 16), None, "tiny model");
        // 4B at 1024², 4 steps, 16 cores: 2·4e9·4608·4 / (16·50e9) ≈ 184 s ≈ 3 min.
        let w = cpu_time_warning(4_000_000_000, 1024, 4, 16).unwrap();
        assert!(w.contains("4.0 B") && w.contains("3 min"), "{w}");
        let w = cpu_time_warning(9_000_000_000, 1024, 4, 2).unwrap();
        assert!(w.contains("9.0 B") && w.contains("min"), "{w}");
    }
}
