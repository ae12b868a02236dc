//! GPU telemetry through NVML, loaded at run time.
//!
//! `libnvidia-ml` is opened with `dlopen` when the agent starts (nvml-wrapper does not link it),
//! so one binary runs on machines with and without a GPU: without one, [`GpuMonitor::start`]
//! logs why and every sample is `None` — absent fields, never an error. NVML calls run on a
//! dedicated thread, never on the async runtime or the engine thread.

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One NVML reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuSample {
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub memory_free_bytes: u64,
    /// 0..=100.
    pub utilization_percent: u32,
}

impl From<GpuSample> for kvroute_proto::GpuStats {
    fn from(s: GpuSample) -> Self {
        kvroute_proto::GpuStats {
            memory_total_bytes: s.memory_total_bytes,
            memory_used_bytes: s.memory_used_bytes,
            memory_free_bytes: s.memory_free_bytes,
            utilization_percent: s.utilization_percent,
        }
    }
}

/// The latest GPU reading, refreshed in the background.
#[derive(Clone, Default)]
pub struct GpuMonitor {
    latest: Arc<Mutex<Option<GpuSample>>>,
}

impl GpuMonitor {
    /// A monitor that never has a sample (tests, CPU-only runs).
    pub fn absent() -> Self {
        Self::default()
    }

    /// Opens NVML and samples the agent's GPU every `period` on a background thread. Without
    /// NVML or a GPU the monitor stays empty.
    pub fn start(period: Duration) -> Self {
        let monitor = Self::default();
        let latest = monitor.latest.clone();
        let nvml = match nvml_wrapper::Nvml::init() {
            Ok(n) => n,
            Err(e) => {
                tracing::info!(error = %e, "NVML not available; GPU telemetry off");
                return monitor;
            }
        };
        let index = gpu_index();
        match nvml.device_by_index(index) {
            Ok(_) => {}
            Err(e) => {
                tracing::info!(index, error = %e, "no GPU at this NVML index; GPU telemetry off");
                return monitor;
            }
        }
        if let Some(s) = sample(&nvml, index) {
            set(&latest, Some(s));
        }
        let spawned = std::thread::Builder::new()
            .name("nvml".into())
            .spawn(move || loop {
                std::thread::sleep(period);
                if Arc::strong_count(&latest) == 1 {
                    return;
                }
                set(&latest, sample(&nvml, index));
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start the NVML thread");
        }
        monitor
    }

    /// The latest reading, if there is a GPU.
    pub fn sample(&self) -> Option<GpuSample> {
        *self.latest.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn set(latest: &Mutex<Option<GpuSample>>, v: Option<GpuSample>) {
    *latest.lock().unwrap_or_else(|e| e.into_inner()) = v;
}

/// The NVML index of this agent's GPU: the first entry of `CUDA_VISIBLE_DEVICES` when it is a
/// number, else 0.
fn gpu_index() -> u32 {
    std::env::var("CUDA_VISIBLE_DEVICES")
        .ok()
        .and_then(|v| v.split(',').next().and_then(|f| f.trim().parse().ok()))
        .unwrap_or(0)
}

fn sample(nvml: &nvml_wrapper::Nvml, index: u32) -> Option<GpuSample> {
    let dev = nvml.device_by_index(index).ok()?;
    let mem = dev.memory_info().ok()?;
    let util = dev.utilization_rates().map(|u| u.gpu).unwrap_or(0);
    Some(GpuSample {
        memory_total_bytes: mem.total,
        memory_used_bytes: mem.used,
        memory_free_bytes: mem.free,
        utilization_percent: util.min(100),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With NVML and a GPU the monitor has a plausible sample; without, it is empty (absent
    /// fields), never an error or a panic.
    #[test]
    fn sample_present_exactly_when_nvml_sees_a_gpu() {
        let gpu_seen = nvml_wrapper::Nvml::init()
            .ok()
            .and_then(|n| n.device_count().ok())
            .is_some_and(|c| c > gpu_index());
        let m = GpuMonitor::start(Duration::from_millis(50));
        match m.sample() {
            Some(s) => {
                assert!(gpu_seen);
                assert!(s.memory_total_bytes > 0);
                assert!(s.memory_used_bytes <= s.memory_total_bytes);
                assert!(s.utilization_percent <= 100);
            }
            None => assert!(!gpu_seen),
        }
        assert!(GpuMonitor::absent().sample().is_none());
    }
}
