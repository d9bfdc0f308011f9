//! Device memory figures for the bench: the CUDA stream-ordered pool's high-water mark (what
//! candle allocates through `cuMemAllocAsync`), the counterpart of PyTorch's
//! `max_memory_allocated`. On CPU there is no comparable figure and every value is `None`.

use candle_core::Device;

/// Reads and resets the allocator's peak for one device.
pub struct MemProbe {
    #[cfg(feature = "cuda")]
    cuda: Option<crate::device::cuda::MemPool>,
}

impl MemProbe {
    pub fn new(device: &Device) -> anyhow::Result<Self> {
        #[cfg(feature = "cuda")]
        {
            let cuda = match device {
                Device::Cuda(d) => Some(crate::device::cuda::MemPool::of(d)?),
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
