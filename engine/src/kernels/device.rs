//! Which backend runs the model: `--device cpu|cuda|auto`.
//!
//! Pure: the choice and a probe result go in, a backend or an error that names the flag comes out,
//! so the agent's start-up path is testable without a GPU. [`probe_cuda`] is the one impure part:
//! it asks the driver (builds with the `cuda` feature) and never panics.

use std::fmt;
use std::str::FromStr;

/// The `--device` flag's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    Cpu,
    Cuda,
    /// CUDA when a driver and a GPU are present, else the CPU.
    #[default]
    Auto,
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, DeviceError> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda),
            "auto" => Ok(DeviceChoice::Auto),
            _ => Err(DeviceError::BadFlag(s.to_string())),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
            DeviceChoice::Auto => "auto",
        })
    }
}

/// The backend that will run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    /// CUDA device ordinal.
    Cuda(usize),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("--device {0:?}: expected cpu, cuda or auto")]
    BadFlag(String),
    #[error("--device cuda: {0}")]
    CudaUnavailable(String),
}

/// How much of the GPU the KV cache gets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GpuKvBudget {
    /// vLLM's rule: this share of the free memory, less weights and activations
    /// (`--gpu-memory-utilization`, default 0.9).
    Utilization(f64),
    /// A fixed number of bytes (`--kv-memory`), checked against what is free.
    Bytes(u64),
}

/// How to start the CUDA backend.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CudaOptions {
    /// CUDA device ordinal.
    pub ordinal: usize,
    pub kv: GpuKvBudget,
    /// Weight and activation type (the weights are dequantized to it at load).
    pub dtype: super::Dtype,
}

/// vLLM's default share of GPU memory.
pub const DEFAULT_GPU_MEMORY_UTILIZATION: f64 = 0.9;

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            ordinal: 0,
            kv: GpuKvBudget::Utilization(DEFAULT_GPU_MEMORY_UTILIZATION),
            dtype: super::Dtype::Bf16,
        }
    }
}

/// Picks the backend for `choice`, given what [`probe_cuda`] found (`Ok(device count)` or why
/// CUDA cannot be used).
pub fn resolve(choice: DeviceChoice, cuda: Result<usize, String>) -> Result<Backend, DeviceError> {
    match (choice, cuda) {
        (DeviceChoice::Cpu, _) => Ok(Backend::Cpu),
        (DeviceChoice::Cuda | DeviceChoice::Auto, Ok(n)) if n > 0 => Ok(Backend::Cuda(0)),
        (DeviceChoice::Cuda, Ok(_)) => Err(DeviceError::CudaUnavailable(
            "the driver reports no GPU".into(),
        )),
        (DeviceChoice::Cuda, Err(why)) => Err(DeviceError::CudaUnavailable(why)),
        (DeviceChoice::Auto, _) => Ok(Backend::Cpu),
    }
}

/// How many CUDA devices this process can use, or why none.
pub fn probe_cuda() -> Result<usize, String> {
    #[cfg(feature = "cuda")]
    {
        let n = crate::cuda::device_count().map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(0);
        }
        // What the backend loads besides the driver: cuBLAS and NVRTC. Checked here so `auto`
        // falls back to the CPU rather than failing later.
        // SAFETY: only tries to dlopen libcublas under its usual names.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(crate::cuda::CudaError::NoCublas.to_string());
        }
        super::Nvrtc::global().map_err(|e| e.to_string())?;
        Ok(n)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err("this build has no CUDA backend (build with --features cuda)".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_values_parse_and_bad_ones_name_the_flag() {
        assert_eq!("CUDA".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda));
        assert_eq!("auto".parse::<DeviceChoice>(), Ok(DeviceChoice::Auto));
        let e = "tpu".parse::<DeviceChoice>().unwrap_err();
        assert!(e.to_string().contains("--device \"tpu\""));
    }

    #[test]
    fn auto_falls_back_to_cpu_and_cuda_says_why_it_cannot_run() {
        assert_eq!(resolve(DeviceChoice::Auto, Ok(1)), Ok(Backend::Cuda(0)));
        assert_eq!(resolve(DeviceChoice::Auto, Ok(0)), Ok(Backend::Cpu));
        assert_eq!(
            resolve(DeviceChoice::Auto, Err("no driver".into())),
            Ok(Backend::Cpu)
        );
        assert_eq!(resolve(DeviceChoice::Cpu, Ok(8)), Ok(Backend::Cpu));
        let e = resolve(DeviceChoice::Cuda, Err("no CUDA driver found".into())).unwrap_err();
        assert_eq!(e.to_string(), "--device cuda: no CUDA driver found");
        assert!(resolve(DeviceChoice::Cuda, Ok(0)).is_err());
    }

    #[test]
    fn probing_here_never_panics() {
        // On a machine without a driver (or a build without `cuda`) this is an error, not a panic.
        let _ = probe_cuda();
        assert!(resolve(DeviceChoice::Auto, probe_cuda()).is_ok());
    }
}
