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

/// Asks `nvidia-smi` about GPU 0. `None` when it is missing or fails (CPU machines).
///
/// nvidia-smi is used instead of NVML bindings to keep the build free of GPU libraries; it is
/// called on a timer, never per request.
pub fn query_nvidia_smi() -> Option<(String, f64, f64)> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,memory.total,memory.used",
            "--format=csv,noheader,nounits",
            "--id=0",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout))
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
}
