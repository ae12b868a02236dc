//! The CUDA backend (feature `cuda`): the device, its compiled kernels and cuBLAS, through
//! `cudarc` with the driver and cuBLAS loaded at run time.
//!
//! Owns talking to the GPU. The sources, launch shapes, layouts and references it uses live in
//! [`crate::kernels`], which every build compiles and tests. A machine without a driver or GPU gets
//! [`CudaError::NoDriver`] / [`CudaError::NoDevice`] from [`CudaDevice::open`], never a panic:
//! cudarc panics when a library it is asked to use is missing, so presence is checked first.

pub mod model;
pub mod ops;
pub mod runner;

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, DriverError};

use crate::kernels::ptx_cache::PtxCache;
use crate::kernels::{self, Arch, ConfigError, KernelConfig, Nvrtc, NvrtcError};

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no CUDA driver found (libcuda.so): --device cuda needs an NVIDIA GPU with its driver installed")]
    NoDriver,
    #[error("cuBLAS (libcublas.so) not found: install CUDA's cuBLAS or put it on LD_LIBRARY_PATH")]
    NoCublas,
    #[error("no CUDA device {ordinal}: {detail}")]
    NoDevice { ordinal: usize, detail: String },
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    #[error("cuBLAS: {0}")]
    Cublas(#[from] cudarc::cublas::result::CublasError),
    #[error(transparent)]
    Nvrtc(#[from] NvrtcError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Shape(#[from] kernels::launch::ShapeError),
    #[error(transparent)]
    Sizing(#[from] kernels::layout::SizingError),
    #[error("kernel {0} is not loaded")]
    MissingKernel(String),
    #[error("{0}")]
    Invalid(String),
}

impl CudaError {
    /// Short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            CudaError::NoDriver => "no_driver",
            CudaError::NoCublas => "no_cublas",
            CudaError::NoDevice { .. } => "no_device",
            CudaError::Driver(_) => "driver",
            CudaError::Cublas(_) => "cublas",
            CudaError::Nvrtc(_) => "nvrtc",
            CudaError::Config(_) => "config",
            CudaError::Shape(_) => "shape",
            CudaError::Sizing(_) => "kv_sizing",
            CudaError::MissingKernel(_) => "missing_kernel",
            CudaError::Invalid(_) => "invalid",
        }
    }
}

pub type Result<T, E = CudaError> = std::result::Result<T, E>;

/// Whether a CUDA driver library can be loaded here (no device is touched).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda under its usual names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Number of CUDA devices, or an error saying why there are none to use.
pub fn device_count() -> Result<usize> {
    if !driver_present() {
        return Err(CudaError::NoDriver);
    }
    let n = CudaContext::device_count()?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// One GPU: its context, a stream, cuBLAS on that stream, and the kernels compiled for it.
pub struct CudaDevice {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    pub arch: Arch,
    pub name: String,
    pub sm_count: usize,
    pub l2_bytes: usize,
    pub kernels: Kernels,
}

impl CudaDevice {
    /// Opens device `ordinal` and compiles (or loads from the PTX cache) every kernel for it,
    /// specialized to `cfg`.
    pub fn open(ordinal: usize, cfg: &KernelConfig) -> Result<Self> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(CudaError::NoDevice {
                ordinal,
                detail: format!("{count} device(s) present"),
            });
        }
        // SAFETY: only tries to dlopen libcublas under its usual names.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(CudaError::NoCublas);
        }
        let ctx = CudaContext::new(ordinal)?;
        let (major, minor) = ctx.compute_capability()?;
        let arch = Arch {
            major: major.max(0) as u32,
            minor: minor.max(0) as u32,
        };
        use cudarc::driver::sys::CUdevice_attribute as A;
        let sm_count = ctx
            .attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            .max(1) as usize;
        let l2_bytes = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?.max(0) as usize;
        let name = ctx.name()?;
        // One stream does all the work (kernels and cuBLAS), so cross-stream tracking buys
        // nothing; left on, cudarc records an event and a stream wait per slice argument of
        // every launch: thousands of driver calls a step, which makes batch-1 decode CPU-bound.
        // SAFETY: every slice is created after this call and used on `stream` only (this is the
        // only stream this engine creates).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let blas = CudaBlas::new(stream.clone())?;
        let kernels = Kernels::load(&ctx, arch, cfg)?;
        tracing::info!(device = ordinal, %name, %arch, sm_count, l2_bytes, "CUDA device ready");
        Ok(CudaDevice {
            ctx,
            stream,
            blas,
            arch,
            name,
            sm_count,
            l2_bytes,
            kernels,
        })
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        Ok(self.ctx.mem_get_info()?)
    }

    fn pool_attr(
        &self,
        attr: cudarc::driver::sys::CUmemPool_attribute,
        set: Option<u64>,
    ) -> Result<u64> {
        use cudarc::driver::sys;
        self.ctx.bind_to_thread()?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: valid out-pointer and the context's own device.
        unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, self.ctx.cu_device()) }.result()?;
        let mut v: u64 = set.unwrap_or(0);
        // SAFETY: these attributes are cuuint64_t values, read into / written from `v`.
        unsafe {
            match set {
                Some(_) => sys::cuMemPoolSetAttribute(pool, attr, (&mut v as *mut u64).cast()),
                None => sys::cuMemPoolGetAttribute(pool, attr, (&mut v as *mut u64).cast()),
            }
        }
        .result()?;
        Ok(v)
    }

    /// Bytes the stream-ordered allocator (which all of kvroute's buffers come from) has handed
    /// out now, and the most since [`CudaDevice::reset_memory_high`].
    pub fn memory_used(&self) -> Result<(u64, u64)> {
        use cudarc::driver::sys::CUmemPool_attribute as A;
        Ok((
            self.pool_attr(A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT, None)?,
            self.pool_attr(A::CU_MEMPOOL_ATTR_USED_MEM_HIGH, None)?,
        ))
    }

    /// Bytes the stream-ordered allocator holds from the device now (used or cached for reuse).
    pub fn memory_reserved(&self) -> Result<u64> {
        use cudarc::driver::sys::CUmemPool_attribute as A;
        self.pool_attr(A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, None)
    }

    /// Resets the high-water mark of [`CudaDevice::memory_used`] to the current use.
    pub fn reset_memory_high(&self) -> Result<()> {
        use cudarc::driver::sys::CUmemPool_attribute as A;
        self.stream.synchronize()?;
        self.pool_attr(A::CU_MEMPOOL_ATTR_USED_MEM_HIGH, Some(0))
            .map(|_| ())
    }
}

/// Every kernel entry point, loaded into one context.
pub struct Kernels {
    pub cfg: KernelConfig,
    functions: HashMap<&'static str, CudaFunction>,
}

impl Kernels {
    /// Compiles every source for `arch` (through the PTX cache) and loads its entries.
    pub fn load(ctx: &Arc<CudaContext>, arch: Arch, cfg: &KernelConfig) -> Result<Self> {
        cfg.validate()?;
        let nvrtc = Nvrtc::global()?;
        let cache = PtxCache::default_dir().map(PtxCache::new);
        let mut functions = HashMap::new();
        for src in kernels::SOURCES {
            let ptx = kernels::compile_cached(nvrtc, cache.as_ref(), src, arch, cfg)?;
            let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx))?;
            for &entry in src.entries {
                functions.insert(entry, module.load_function(entry)?);
            }
        }
        Ok(Kernels {
            cfg: *cfg,
            functions,
        })
    }

    /// The kernel called `name`.
    pub fn get(&self, name: &str) -> Result<&CudaFunction> {
        self.functions
            .get(name)
            .ok_or_else(|| CudaError::MissingKernel(name.to_string()))
    }
}
