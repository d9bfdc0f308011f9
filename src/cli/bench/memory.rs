//! Device memory figures for the bench: the CUDA stream-ordered pool's high-water mark (what
//! candle allocates through `cuMemAllocAsync`), the counterpart of PyTorch's
//! `max_memory_allocated`. On CPU there is no comparable figure and every value is `None`.

use candle_core::Device;

/// Reads and resets the allocator's peak for one device.
pub struct MemProbe {
    #[cfg(feature = "cuda")]
    cuda: Option<cuda::Pool>,
}

impl MemProbe {
    pub fn new(device: &Device) -> anyhow::Result<Self> {
        #[cfg(feature = "cuda")]
        {
            let cuda = match device {
                Device::Cuda(d) => Some(cuda::Pool::of(d)?),
                _ => None,
            };
            Ok(Self { cuda })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = device;
            Ok(Self {})
        }
    }

    /// Starts a new peak window at the current usage.
    pub fn reset_peak(&self) {
        #[cfg(feature = "cuda")]
        if let Some(p) = &self.cuda {
            p.reset_peak();
        }
    }

    /// Highest pool usage since the last reset, bytes.
    pub fn peak_bytes(&self) -> Option<u64> {
        #[cfg(feature = "cuda")]
        if let Some(p) = &self.cuda {
            return p.used_high();
        }
        None
    }

    /// Pool usage now, bytes.
    pub fn in_use_bytes(&self) -> Option<u64> {
        #[cfg(feature = "cuda")]
        if let Some(p) = &self.cuda {
            return p.used_now();
        }
        None
    }

    /// Device-wide used memory (total − free, as nvidia-smi counts it: context, cuBLAS
    /// workspaces and the pool's reserve included), bytes.
    pub fn device_used_bytes(&self) -> Option<u64> {
        #[cfg(feature = "cuda")]
        if let Some(p) = &self.cuda {
            return p.device_used();
        }
        None
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::Arc;

    use candle_core::cuda::cudarc::driver::{CudaContext, sys};

    pub struct Pool {
        ctx: Arc<CudaContext>,
        pool: sys::CUmemoryPool,
    }

    // The pool handle is a plain driver handle, valid on any thread bound to `ctx`.
    unsafe impl Send for Pool {}
    unsafe impl Sync for Pool {}

    impl Pool {
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

        fn get(&self, attr: sys::CUmemPool_attribute) -> Option<u64> {
            self.ctx.bind_to_thread().ok()?;
            let mut v: u64 = 0;
            let r = unsafe {
                sys::cuMemPoolGetAttribute(self.pool, attr, &mut v as *mut u64 as *mut _)
            };
            (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
        }

        pub fn reset_peak(&self) {
            if self.ctx.bind_to_thread().is_ok() {
                let mut zero: u64 = 0;
                unsafe {
                    sys::cuMemPoolSetAttribute(
                        self.pool,
                        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                        &mut zero as *mut u64 as *mut _,
                    );
                }
            }
        }

        pub fn used_high(&self) -> Option<u64> {
            self.get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
        }

        pub fn used_now(&self) -> Option<u64> {
            self.get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
        }

        pub fn device_used(&self) -> Option<u64> {
            let (free, total) = self.ctx.mem_get_info().ok()?;
            Some((total - free) as u64)
        }
    }
}
