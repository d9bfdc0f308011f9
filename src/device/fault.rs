//! What a tensor error means for the service: the device ran out of memory, the device (its
//! CUDA context) is gone, or neither. This is the one place that reads candle errors for that.
//!
//! candle hands CUDA failures over as a boxed `dyn Error` (cudarc's `DriverError`, cuBLAS or
//! cuDNN statuses, sometimes wrapped in context or a backtrace), so the stable, typed part left
//! to read is the CUDA result code, whose name appears in the error's text
//! (`DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")`). Everything downstream uses
//! [`DeviceFault`], never the text.

/// A device failure that changes what the service does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceFault {
    /// An allocation failed: the request was too large for the memory left. The device is fine;
    /// a smaller request (or a smaller upscaler tile) can succeed.
    OutOfMemory,
    /// The CUDA context is unusable (illegal address, ECC error, device fell off the bus, ...):
    /// every later kernel fails too, so the process must be restarted.
    Lost,
}

/// Result codes that mean an allocation failed.
const OUT_OF_MEMORY_CODES: &[&str] = &[
    "CUDA_ERROR_OUT_OF_MEMORY",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDA_ERROR_MEMORY_ALLOCATION",
];

/// Result codes after which the CUDA context is poisoned (CUDA's "sticky" errors) or the
/// device is no longer there.
const LOST_CODES: &[&str] = &[
    "CUDA_ERROR_ILLEGAL_ADDRESS",
    "CUDA_ERROR_ILLEGAL_INSTRUCTION",
    "CUDA_ERROR_MISALIGNED_ADDRESS",
    "CUDA_ERROR_INVALID_ADDRESS_SPACE",
    "CUDA_ERROR_INVALID_PC",
    "CUDA_ERROR_LAUNCH_FAILED",
    "CUDA_ERROR_HARDWARE_STACK_ERROR",
    "CUDA_ERROR_ECC_UNCORRECTABLE",
    "CUDA_ERROR_NVLINK_UNCORRECTABLE",
    "CUDA_ERROR_ASSERT",
    "CUDA_ERROR_CONTEXT_IS_DESTROYED",
    "CUDA_ERROR_DEVICE_UNAVAILABLE",
    "CUDA_ERROR_DEVICE_NOT_LICENSED",
    "CUDA_ERROR_NO_DEVICE",
    "CUDA_ERROR_SYSTEM_NOT_READY",
    "CUDA_ERROR_LAUNCH_TIMEOUT",
];

impl DeviceFault {
    /// Classifies a candle error; `None` for errors that are not about the device (shape
    /// mismatches and other bugs).
    pub fn of(e: &candle_core::Error) -> Option<DeviceFault> {
        Self::of_error(e)
    }

    /// Classifies any error by its chain (Display and Debug of each link).
    pub fn of_error(e: &(dyn std::error::Error + 'static)) -> Option<DeviceFault> {
        let mut text = String::new();
        let mut link: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = link {
            text.push_str(&format!("{err} {err:?} "));
            link = err.source();
        }
        let has = |codes: &[&str]| codes.iter().any(|c| text.contains(c));
        if has(LOST_CODES) {
            Some(DeviceFault::Lost)
        } else if has(OUT_OF_MEMORY_CODES) {
            Some(DeviceFault::OutOfMemory)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What cudarc's driver error looks like once candle has boxed it.
    #[derive(Debug)]
    struct DriverError(&'static str);
    impl std::fmt::Display for DriverError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "DriverError({}, \"...\")", self.0)
        }
    }
    impl std::error::Error for DriverError {}

    fn cuda(code: &'static str) -> candle_core::Error {
        candle_core::Error::Cuda(Box::new(DriverError(code)))
    }

    #[test]
    fn allocation_failures_are_out_of_memory() {
        for code in OUT_OF_MEMORY_CODES {
            assert_eq!(
                DeviceFault::of(&cuda(code)),
                Some(DeviceFault::OutOfMemory),
                "{code}"
            );
        }
    }

    #[test]
    fn sticky_cuda_errors_mean_the_device_is_lost() {
        for code in LOST_CODES {
            assert_eq!(
                DeviceFault::of(&cuda(code)),
                Some(DeviceFault::Lost),
                "{code}"
            );
        }
    }

    #[test]
    fn wrapped_errors_are_classified_through_context_and_backtraces() {
        let e = cuda("CUDA_ERROR_OUT_OF_MEMORY").context("conv2d band 3");
        assert_eq!(DeviceFault::of(&e), Some(DeviceFault::OutOfMemory));
        let e = candle_core::Error::wrap(DriverError("CUDA_ERROR_ILLEGAL_ADDRESS")).bt();
        assert_eq!(DeviceFault::of(&e), Some(DeviceFault::Lost));
    }

    #[test]
    fn other_errors_are_not_device_faults() {
        let shape = candle_core::Error::Msg("shape mismatch in matmul".into());
        assert_eq!(DeviceFault::of(&shape), None);
        assert_eq!(DeviceFault::of(&cuda("CUDA_ERROR_INVALID_VALUE")), None);
    }
}
