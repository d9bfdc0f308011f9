//! Device and dtype selection shared by every model.

use candle_core::{DType, Device};

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
        match self {
            DeviceKind::Cpu => Ok(Device::Cpu),
            DeviceKind::Cuda => Ok(Device::new_cuda(0)?),
            DeviceKind::Auto => Ok(Device::cuda_if_available(0)?),
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
