//! Device and dtype selection shared by every model.

pub mod choice;
pub mod fault;

use candle_core::{DType, Device};

/// How long candle's CPU barrier pool (its element-wise ops) spins before parking, unless
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` says otherwise. candle's GEMMs run on rayon's pool, on the
/// same cores, so after every element-wise op its worker spins through the next GEMM for up to
/// candle's default 25 000 iterations, taking a core from it. 2000 was the fastest of 25 000, 2000
/// and 200 for the DiT, VAE decode, text encoder and x4plus alike (docs/benchmarks.md).
pub const CPU_BARRIER_POOL_SPIN_LIMIT: u32 = 2000;

/// Applies [`CPU_BARRIER_POOL_SPIN_LIMIT`] unless the environment sets the limit. candle reads
/// it once, when its pool starts at the first CPU op.
///
/// # Safety
/// Writes the process environment: call before any other thread exists (start of `main`).
pub unsafe fn tune_cpu_pools() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        // SAFETY: the caller guarantees no other thread reads the environment concurrently.
        unsafe { std::env::set_var(VAR, CPU_BARRIER_POOL_SPIN_LIMIT.to_string()) };
    }
}

/// The compute device asked for on the command line or in the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// CUDA if this binary was built with it and a GPU is present, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl DeviceKind {
    /// Opens the device. `Cuda` on a CPU-only build is an error, not a silent fallback.
    pub fn open(self) -> anyhow::Result<Device> {
        if let choice::DeviceDecision::Refuse(why) =
            choice::decide(self, cfg!(feature = "cuda"), &NoGpuProbe)
        {
            anyhow::bail!(why);
        }
        let device = match self {
            DeviceKind::Cpu => Device::Cpu,
            DeviceKind::Cuda => Device::new_cuda(0)?,
            DeviceKind::Auto => Device::cuda_if_available(0)?,
        };
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = &device {
            match cuda::MemPool::of(d).and_then(|p| p.retain_freed_memory()) {
                Ok(()) => tracing::debug!("CUDA memory pool keeps freed memory for reuse"),
                Err(e) => tracing::warn!("CUDA memory pool left at its defaults: {e:#}"),
            }
        }
        Ok(device)
    }
}

/// A probe that sees nothing: `open` only needs the refusal, not the warning.
struct NoGpuProbe;

impl choice::GpuProbe for NoGpuProbe {
    fn gpu(&self) -> Option<String> {
        None
    }
}

/// The CUDA stream-ordered memory pool candle allocates from (`cuMemAllocAsync`).
#[cfg(feature = "cuda")]
pub mod cuda {
    use std::sync::Arc;

    use candle_core::cuda::cudarc::driver::{CudaContext, sys};

    pub struct MemPool {
        ctx: Arc<CudaContext>,
        pool: sys::CUmemoryPool,
    }

    // The pool handle is a plain driver handle, valid on any thread bound to `ctx`.
    unsafe impl Send for MemPool {}
    unsafe impl Sync for MemPool {}

    impl MemPool {
        /// The device's current pool.
        pub fn of(d: &candle_core::CudaDevice) -> anyhow::Result<Self> {
            let ctx = d.cuda_stream().context().clone();
            ctx.bind_to_thread()?;
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            let r = unsafe { sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) };
            anyhow::ensure!(
                r == sys::CUresult::CUDA_SUCCESS,
                "cuDeviceGetMemPool failed: {r:?}"
            );
            Ok(Self { ctx, pool })
        }

        /// The pool's default release threshold is 0: at every synchronisation it hands all
        /// freed memory back to the driver, and the next step's hundreds of temporaries must
        /// map it again. Keeping it makes reuse a pool hit, as PyTorch's caching allocator
        /// does. Within a job nobody else needs that memory back; "used" figures (bench
        /// peaks) are unaffected, only "reserved" grows to the job's high-water mark. Between
        /// jobs the server trims the pool to `GPU_POOL_KEEP_MIB` ([`MemPool::trim_to`], called
        /// through `engine::DeviceMemory`), so a large request or an upscale does not keep
        /// its peak reserved afterwards.
        pub fn retain_freed_memory(&self) -> anyhow::Result<()> {
            self.set(
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                u64::MAX,
            )
        }

        fn set(&self, attr: sys::CUmemPool_attribute, mut value: u64) -> anyhow::Result<()> {
            self.ctx.bind_to_thread()?;
            let r = unsafe {
                sys::cuMemPoolSetAttribute(self.pool, attr, &mut value as *mut u64 as *mut _)
            };
            anyhow::ensure!(
                r == sys::CUresult::CUDA_SUCCESS,
                "cuMemPoolSetAttribute({attr:?}) failed: {r:?}"
            );
            Ok(())
        }

        fn get(&self, attr: sys::CUmemPool_attribute) -> Option<u64> {
            self.ctx.bind_to_thread().ok()?;
            let mut v: u64 = 0;
            let r = unsafe {
                sys::cuMemPoolGetAttribute(self.pool, attr, &mut v as *mut u64 as *mut _)
            };
            (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
        }

        /// Hands the pool's unused memory back to the driver, keeping at most `keep` bytes
        /// reserved (memory in use is never released).
        pub fn trim_to(&self, keep: u64) -> anyhow::Result<()> {
            self.ctx.bind_to_thread()?;
            let r = unsafe { sys::cuMemPoolTrimTo(self.pool, keep as usize) };
            anyhow::ensure!(
                r == sys::CUresult::CUDA_SUCCESS,
                "cuMemPoolTrimTo failed: {r:?}"
            );
            Ok(())
        }

        /// Bytes the pool holds from the driver now (in use or cached).
        pub fn reserved_now(&self) -> Option<u64> {
            self.get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)
        }

        /// Starts a new peak window at the current usage.
        pub fn reset_peak(&self) {
            let _ = self.set(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0);
        }

        /// Highest usage since the last reset, bytes.
        pub fn used_high(&self) -> Option<u64> {
            self.get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
        }

        /// Usage now, bytes.
        pub fn used_now(&self) -> Option<u64> {
            self.get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
        }

        /// Device-wide used memory (total − free), bytes.
        pub fn device_used(&self) -> Option<u64> {
            let (free, total) = self.ctx.mem_get_info().ok()?;
            Some((total - free) as u64)
        }
    }
}

/// The working dtype for a device: bf16 on CUDA, f32 on CPU (candle's CPU conv2d has no bf16).
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

/// GPU facts for `/health`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuInfo {
    /// The service computes on a CUDA device.
    pub available: bool,
    pub name: Option<String>,
    /// Total memory in GiB.
    pub memory_gb: Option<f64>,
    /// Memory in use on the whole device (all processes) in GiB, as nvidia-smi reports it.
    pub memory_used_gb: Option<f64>,
}

/// Asks `nvidia-smi` about the GPU this process computes on: CUDA ordinal 0, which is the
/// first entry of `CUDA_VISIBLE_DEVICES` when that is set (nvidia-smi itself ignores the
/// variable and numbers every GPU of the machine). `None` when it is missing or fails (CPU
/// machines) or no listed GPU matches.
///
/// nvidia-smi is used instead of NVML bindings to keep the build free of GPU libraries (NVML
/// would be one more library to load, for a figure sampled every 10 s); it is called on a timer,
/// never per request.
pub fn query_nvidia_smi() -> Option<(String, f64, f64)> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=index,uuid,name,memory.total,memory.used",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    select_gpu(&String::from_utf8_lossy(&out.stdout), visible.as_deref())
}

/// Which GPU of nvidia-smi's list CUDA ordinal 0 is, by `CUDA_VISIBLE_DEVICES`: unset → the
/// first; a number → the GPU with that index (as CUDA numbers them with
/// `CUDA_DEVICE_ORDER=PCI_BUS_ID`, nvidia-smi's order); `GPU-...` → the GPU whose UUID starts
/// with it (CUDA accepts UUID prefixes); empty, `-1` or no match → none (CUDA sees no device).
/// `csv` is `index, uuid, name, total MiB, used MiB` per line.
pub fn select_gpu(csv: &str, visible: Option<&str>) -> Option<(String, f64, f64)> {
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .map(|l| l.split(',').map(str::trim).collect::<Vec<_>>())
        .filter(|r| r.len() == 5)
        .collect();
    let row = match visible {
        None => rows.first(),
        Some(list) => {
            // CUDA stops at the first invalid entry, so only the first one can be ordinal 0.
            let first = list.split(',').next().unwrap_or("").trim();
            if first.is_empty() {
                None
            } else if first.chars().all(|c| c.is_ascii_digit()) {
                rows.iter().find(|r| r[0] == first)
            } else if first.starts_with("GPU-") || first.starts_with("MIG-") {
                rows.iter().find(|r| r[1].starts_with(first))
            } else {
                None
            }
        }
    }?;
    parse_nvidia_smi(&row[2..].join(", "))
}

/// Parses `name, total_mib, used_mib` into (name, total GiB, used GiB), rounded to 2 decimals.
pub fn parse_nvidia_smi(line: &str) -> Option<(String, f64, f64)> {
    let mut parts = line.lines().next()?.split(',').map(str::trim);
    let name = parts.next()?.to_string();
    let total: f64 = parts.next()?.parse().ok()?;
    let used: f64 = parts.next()?.parse().ok()?;
    let gib = |mib: f64| (mib / 1024.0 * 100.0).round() / 100.0;
    Some((name, gib(total), gib(used)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_smi_output_is_parsed_to_gib() {
        let (name, total, used) = parse_nvidia_smi("NVIDIA H100 80GB HBM3, 81559, 1024\n").unwrap();
        assert_eq!(name, "NVIDIA H100 80GB HBM3");
        assert_eq!(total, 79.65);
        assert_eq!(used, 1.0);
        assert_eq!(parse_nvidia_smi("garbage"), None);
    }

    const FOUR_GPUS: &str = "0, GPU-aaaa1111, NVIDIA A10, 23028, 100\n\
                             1, GPU-bbbb2222, NVIDIA L4, 23034, 200\n\
                             2, GPU-cccc3333, NVIDIA H100 80GB HBM3, 81559, 1024\n\
                             3, GPU-dddd4444, NVIDIA A100-SXM4-40GB, 40960, 400\n";

    #[test]
    fn the_gpu_reported_is_the_one_cuda_visible_devices_makes_ordinal_zero() {
        let name = |v: Option<&str>| select_gpu(FOUR_GPUS, v).map(|g| g.0);
        assert_eq!(name(None).as_deref(), Some("NVIDIA A10"));
        assert_eq!(name(Some("2")).as_deref(), Some("NVIDIA H100 80GB HBM3"));
        assert_eq!(name(Some("3,0")).as_deref(), Some("NVIDIA A100-SXM4-40GB"));
        assert_eq!(name(Some(" 1 ")).as_deref(), Some("NVIDIA L4"));
        assert_eq!(
            name(Some("GPU-cccc")).as_deref(),
            Some("NVIDIA H100 80GB HBM3")
        );
        assert_eq!(
            name(Some("GPU-dddd4444,1")).as_deref(),
            Some("NVIDIA A100-SXM4-40GB")
        );
        // Values of the selected GPU, not of GPU 0.
        assert_eq!(select_gpu(FOUR_GPUS, Some("2")).unwrap().1, 79.65);
        // CUDA sees no device: nothing to report (not GPU 0's figures).
        for none in ["", "-1", "7", "GPU-ffff", "nonsense"] {
            assert_eq!(name(Some(none)), None, "{none:?}");
        }
    }
}
