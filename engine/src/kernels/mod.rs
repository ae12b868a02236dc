//! The CUDA kernels' host side that needs no GPU: their CUDA C sources, compiling them to PTX
//! with NVRTC (cached on disk), launch shapes, the paged KV layout and its sizing, and f32 CPU
//! references of every kernel.
//!
//! Compiled in every build (not only with the `cuda` feature), so the default test command checks
//! that each kernel compiles for the target GPUs and that the launch and layout arithmetic holds.
//! This module never calls the CUDA driver; `crate::cuda` (feature `cuda`) does, using this.

pub mod device;
pub mod launch;
pub mod layout;
pub mod nvrtc;
pub mod ptx_cache;
pub mod reference;

use sha2::{Digest, Sha256};

pub use nvrtc::{Nvrtc, NvrtcError, Ptx};

/// Helpers prepended to every source (no `#include`: NVRTC needs no header path).
pub const COMMON: &str = include_str!("../../kernels/common.cuh");

/// One CUDA C source file and the kernels (`extern "C"` entry points) it defines.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    pub name: &'static str,
    pub code: &'static str,
    pub entries: &'static [&'static str],
}

/// Every kernel source kvroute ships.
pub const SOURCES: &[KernelSource] = &[
    KernelSource {
        name: "cache",
        code: include_str!("../../kernels/cache.cu"),
        entries: &["reshape_and_cache"],
    },
    KernelSource {
        name: "paged_attention",
        code: include_str!("../../kernels/paged_attention.cu"),
        entries: &[
            "paged_attention_decode_bf16",
            "paged_attention_reduce_bf16",
            "paged_attention_decode_f16",
            "paged_attention_reduce_f16",
        ],
    },
    KernelSource {
        name: "prefill_attention",
        code: include_str!("../../kernels/prefill_attention.cu"),
        entries: &["prefill_attention_bf16", "prefill_attention_f16"],
    },
    KernelSource {
        name: "elementwise",
        code: include_str!("../../kernels/elementwise.cu"),
        entries: &[
            "rms_norm_bf16",
            "add_rms_norm_bf16",
            "rope_bf16",
            "swiglu_bf16",
            "add_inplace_bf16",
            "add_bias_bf16",
            "rms_norm_f16",
            "add_rms_norm_f16",
            "rope_f16",
            "swiglu_f16",
            "add_inplace_f16",
            "add_bias_f16",
            "embedding",
            "cast_f32_bf16",
            "cast_f32_f16",
        ],
    },
    KernelSource {
        name: "dequant",
        code: include_str!("../../kernels/dequant.cu"),
        entries: &[
            "dequant_f32_bf16",
            "dequant_f16_bf16",
            "dequant_bf16_bf16",
            "dequant_q4_0_bf16",
            "dequant_q4_1_bf16",
            "dequant_q8_0_bf16",
            "dequant_q4_k_bf16",
            "dequant_q6_k_bf16",
            "dequant_f32_f16",
            "dequant_f16_f16",
            "dequant_bf16_f16",
            "dequant_q4_0_f16",
            "dequant_q4_1_f16",
            "dequant_q8_0_f16",
            "dequant_q4_k_f16",
            "dequant_q6_k_f16",
        ],
    },
    KernelSource {
        name: "sampling",
        code: include_str!("../../kernels/sampling.cu"),
        entries: &["argmax_f32", "topk_f32"],
    },
];

/// Each entry's parameter types, one letter per parameter (`p`: pointer or i64, `i`: i32, `f`:
/// f32), as the launches in `crate::cuda::ops` pass them. The compile test checks the PTX against
/// this, so a kernel signature and its launch cannot drift apart unnoticed.
pub fn signature(entry: &str) -> Option<&'static str> {
    let stem = entry
        .strip_suffix("_bf16")
        .or_else(|| entry.strip_suffix("_f16"))
        .unwrap_or(entry);
    Some(match stem {
        "reshape_and_cache" => "pppppiiii",
        "paged_attention_decode" => "ppppppppfiiiiii",
        "paged_attention_reduce" => "pppppii",
        "prefill_attention" => "pppppppfiiii",
        "rms_norm" => "pppif",
        "add_rms_norm" => "ppppif",
        "rope" => "ppppiiiiiii",
        "swiglu" => "pppiii",
        "add_inplace" | "cast_f32" => "ppp",
        "add_bias" => "ppii",
        "embedding" => "pppii",
        "argmax_f32" => "ppi",
        "topk_f32" => "pppii",
        s if s.starts_with("dequant_") => "ppp",
        _ => return None,
    })
}

/// The source called `name`.
pub fn source(name: &str) -> Option<&'static KernelSource> {
    SOURCES.iter().find(|s| s.name == name)
}

/// 16-bit float type of activations, weights and the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bf16,
    F16,
}

impl Dtype {
    /// The suffix of this type's kernel entry names.
    pub fn suffix(self) -> &'static str {
        match self {
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }
}

/// A GPU architecture, as CUDA's compute capability (major, minor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Arch {
    pub major: u32,
    pub minor: u32,
}

impl Arch {
    pub const SM80: Arch = Arch { major: 8, minor: 0 };
    pub const SM90: Arch = Arch { major: 9, minor: 0 };

    /// NVRTC's `--gpu-architecture` value: a virtual architecture, so the output is PTX that the
    /// driver finishes for the exact device.
    pub fn nvrtc_option(self) -> String {
        format!("--gpu-architecture=compute_{}{}", self.major, self.minor)
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sm_{}{}", self.major, self.minor)
    }
}

/// Compile-time constants of the kernels, fixed per model (the sources are specialized to them,
/// which is what run-time compilation buys: register arrays sized exactly, no run-time loops over
/// heads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KernelConfig {
    /// Elements per attention head.
    pub head_dim: usize,
    /// Query heads per KV head.
    pub gqa: usize,
    /// Largest decode partition (tokens per split); sizes the decode kernel's shared memory.
    pub max_partition: usize,
}

/// Threads in a decode block.
pub const DECODE_THREADS: usize = 128;
/// KV tokens each decode thread has in flight.
pub const DECODE_UNROLL: usize = 4;
/// Threads in a prefill-attention block, and the (token, head) rows one block covers.
pub const PREFILL_THREADS: usize = 128;
pub const PREFILL_ROWS: usize = 16;
/// Static shared memory a block may use without opting in to more.
pub const SHARED_LIMIT: usize = 48 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("head_dim {0} unsupported: the CUDA kernels take 64, 128 (prefill: at most 128) or 256 (decode)")]
    HeadDim(usize),
    #[error("{heads} query heads do not split evenly over {kv_heads} KV heads")]
    Gqa { heads: usize, kv_heads: usize },
    #[error("decode would need {0} bytes of shared memory per block (limit {SHARED_LIMIT})")]
    Shared(usize),
    #[error("decode partition {0} must be a positive multiple of 32")]
    Partition(usize),
}

impl KernelConfig {
    /// The config for a model with these attention shapes.
    pub fn new(
        head_dim: usize,
        num_heads: usize,
        num_kv_heads: usize,
    ) -> Result<Self, ConfigError> {
        if num_kv_heads == 0 || num_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return Err(ConfigError::Gqa {
                heads: num_heads,
                kv_heads: num_kv_heads,
            });
        }
        let cfg = KernelConfig {
            head_dim,
            gqa: num_heads / num_kv_heads,
            max_partition: 512,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !matches!(self.head_dim, 64 | 128 | 256) {
            return Err(ConfigError::HeadDim(self.head_dim));
        }
        if self.max_partition == 0 || !self.max_partition.is_multiple_of(32) {
            return Err(ConfigError::Partition(self.max_partition));
        }
        let shared = self.decode_shared_bytes();
        if shared > SHARED_LIMIT {
            return Err(ConfigError::Shared(shared));
        }
        Ok(())
    }

    /// Whether the prefill kernel supports this head size.
    pub fn prefill_supported(&self) -> bool {
        self.head_dim <= 128
    }

    /// Static shared memory of the decode kernel: scores, output accumulator, statistics.
    pub fn decode_shared_bytes(&self) -> usize {
        4 * self.gqa * (self.max_partition + self.head_dim + 2)
    }

    /// The `-D` options that specialize the sources.
    pub fn defines(&self) -> Vec<String> {
        vec![
            format!("-DKVR_HEAD_DIM={}", self.head_dim),
            format!("-DKVR_GQA={}", self.gqa),
            format!("-DKVR_PARTITION={}", self.max_partition),
            format!("-DKVR_DECODE_THREADS={DECODE_THREADS}"),
            format!("-DKVR_UNROLL={DECODE_UNROLL}"),
        ]
    }
}

/// The full NVRTC option list for `arch` and `cfg`.
pub fn compile_options(arch: Arch, cfg: &KernelConfig) -> Vec<String> {
    let mut o = vec![
        arch.nvrtc_option(),
        "--std=c++17".to_string(),
        "-lineinfo".to_string(),
    ];
    o.extend(cfg.defines());
    o
}

/// The text NVRTC compiles for `src`: the common helpers, then the file.
pub fn full_source(src: &KernelSource) -> String {
    format!("{COMMON}\n#line 1 \"{}.cu\"\n{}", src.name, src.code)
}

/// Cache key: a hash of the full source, the options, the architecture and NVRTC's version.
pub fn cache_key(
    src: &KernelSource,
    options: &[String],
    arch: Arch,
    nvrtc_version: (i32, i32),
) -> String {
    let mut h = Sha256::new();
    h.update(full_source(src).as_bytes());
    for o in options {
        h.update([0u8]);
        h.update(o.as_bytes());
    }
    h.update(format!("\0{arch}\0nvrtc {}.{}", nvrtc_version.0, nvrtc_version.1).as_bytes());
    let digest = h.finalize();
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("{}-{arch}-{hex}", src.name)
}

/// Compiles `src` for `arch`, or returns it from the on-disk cache.
pub fn compile_cached(
    nvrtc: &Nvrtc,
    cache: Option<&ptx_cache::PtxCache>,
    src: &KernelSource,
    arch: Arch,
    cfg: &KernelConfig,
) -> Result<String, NvrtcError> {
    let options = compile_options(arch, cfg);
    let key = cache_key(src, &options, arch, nvrtc.version());
    if let Some(ptx) = cache.and_then(|c| c.get(&key)) {
        return Ok(ptx);
    }
    let ptx = nvrtc.compile(&format!("{}.cu", src.name), &full_source(src), &options)?;
    if !ptx.log.is_empty() {
        tracing::debug!(kernel = src.name, log = %ptx.log, "nvrtc messages");
    }
    if let Some(c) = cache {
        if let Err(e) = c.put(&key, &ptx.text) {
            tracing::warn!(kernel = src.name, error = %e, "could not write the PTX cache");
        }
    }
    Ok(ptx.text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails (does not skip) when NVRTC cannot be loaded: the test command always installs it.
    fn nvrtc() -> &'static Nvrtc {
        match Nvrtc::global() {
            Ok(n) => n,
            Err(e) => panic!(
                "{e} (scripts/test.sh unpacks NVRTC and sets {})",
                nvrtc::LIB_DIR_ENV
            ),
        }
    }

    #[test]
    fn every_kernel_compiles_to_ptx_for_sm80_and_sm90_with_its_entries() {
        let nvrtc = nvrtc();
        // Llama-3-8B-like and SmolLM2-135M-like attention shapes.
        let configs = [
            KernelConfig::new(128, 32, 8).unwrap(),
            KernelConfig::new(64, 9, 3).unwrap(),
        ];
        for arch in [Arch::SM80, Arch::SM90] {
            for cfg in &configs {
                for src in SOURCES {
                    let ptx = nvrtc
                        .compile(src.name, &full_source(src), &compile_options(arch, cfg))
                        .unwrap_or_else(|e| panic!("{e}"));
                    let target = format!(".target sm_{}{}", arch.major, arch.minor);
                    assert!(
                        ptx.text.contains(&target),
                        "{} for {arch}: no `{target}`",
                        src.name
                    );
                    let mut got = ptx.entries();
                    got.sort_unstable();
                    let mut want = src.entries.to_vec();
                    want.sort_unstable();
                    assert_eq!(got, want, "{} for {arch}", src.name);
                    for entry in src.entries {
                        let sig =
                            signature(entry).unwrap_or_else(|| panic!("no signature for {entry}"));
                        assert_eq!(
                            ptx.params(entry).as_deref(),
                            Some(sig),
                            "{entry} parameters"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn compiled_ptx_is_cached_on_disk_under_a_key_of_source_options_and_arch() {
        let nvrtc = nvrtc();
        let dir = tempfile::tempdir().unwrap();
        let cache = ptx_cache::PtxCache::new(dir.path());
        let cfg = KernelConfig::new(64, 9, 3).unwrap();
        let src = source("sampling").unwrap();
        let first = compile_cached(nvrtc, Some(&cache), src, Arch::SM90, &cfg).unwrap();
        let key = cache_key(
            src,
            &compile_options(Arch::SM90, &cfg),
            Arch::SM90,
            nvrtc.version(),
        );
        assert_eq!(cache.get(&key).as_deref(), Some(first.as_str()));
        // A hit is served from disk: plant a marker and get it back.
        cache.put(&key, ".visible .entry planted()").unwrap();
        let second = compile_cached(nvrtc, Some(&cache), src, Arch::SM90, &cfg).unwrap();
        assert_eq!(second, ".visible .entry planted()");
        // Another architecture or config is another key.
        assert_ne!(
            key,
            cache_key(
                src,
                &compile_options(Arch::SM80, &cfg),
                Arch::SM80,
                nvrtc.version()
            )
        );
        let other = KernelConfig::new(128, 32, 8).unwrap();
        assert_ne!(
            key,
            cache_key(
                src,
                &compile_options(Arch::SM90, &other),
                Arch::SM90,
                nvrtc.version()
            )
        );
    }

    #[test]
    fn configs_outside_the_kernels_limits_are_errors() {
        assert_eq!(KernelConfig::new(96, 8, 8), Err(ConfigError::HeadDim(96)));
        assert!(matches!(
            KernelConfig::new(128, 10, 4),
            Err(ConfigError::Gqa { .. })
        ));
        assert!(matches!(
            KernelConfig::new(128, 64, 1),
            Err(ConfigError::Shared(_))
        ));
        let c = KernelConfig::new(128, 32, 8).unwrap();
        assert_eq!(c.gqa, 4);
        assert!(c.defines().contains(&"-DKVR_GQA=4".to_string()));
    }
}
