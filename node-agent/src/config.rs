//! Command-line flags of `kvroute-agent serve` and their validated, typed form.
//!
//! Every flag can also come from an environment variable (for Kubernetes). Flags are parsed by
//! clap and checked once, here, into [`ServeConfig`]; the rest of the agent trusts that value.
//! Errors name the flag and the bad value. This module never touches the network or the engine.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, ValueEnum};
use kvroute_contract::units;

/// A bad flag value.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("{flag} {value:?}: {reason}")]
    Invalid {
        flag: &'static str,
        value: String,
        reason: String,
    },
}

impl ConfigError {
    fn invalid(flag: &'static str, value: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            flag,
            value: value.into(),
            reason: reason.into(),
        }
    }
}

/// Which compute backend runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
    Auto,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Flags of `kvroute-agent serve`, as typed by the user.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// `default` (the default model, fetched to the cache) or a path to a GGUF file or a model
    /// folder.
    #[arg(long, env = "KVROUTE_MODEL", default_value = "default")]
    pub model: String,
    /// HTTP (OpenAI API, health, metrics) listen address; port 0 picks a free one.
    #[arg(long, env = "KVROUTE_HTTP", default_value = "127.0.0.1:8001")]
    pub http: String,
    /// gRPC (capacity service, grpc.health.v1) listen address; port 0 picks a free one.
    #[arg(long, env = "KVROUTE_GRPC", default_value = "127.0.0.1:9001")]
    pub grpc: String,
    /// Compute device.
    #[arg(long, env = "KVROUTE_DEVICE", value_enum, default_value = "auto")]
    pub device: DeviceArg,
    /// KV-cache memory, e.g. `2GiB`, `512MiB`, `1000000` (bytes). Default: 1GiB.
    #[arg(
        long,
        env = "KVROUTE_KV_MEMORY",
        conflicts_with = "gpu_memory_utilization"
    )]
    pub kv_memory: Option<String>,
    /// Fraction of GPU memory (0 < f ≤ 1) for weights plus KV cache (CUDA only).
    #[arg(long, env = "KVROUTE_GPU_MEMORY_UTILIZATION")]
    pub gpu_memory_utilization: Option<String>,
    /// Host memory for prefix blocks evicted from the KV cache, e.g. `2GiB` (the host tier):
    /// a request whose prefix was evicted gets it copied back instead of recomputed. Default:
    /// none. CPU backend only for now.
    #[arg(long, env = "KVROUTE_KV_OFFLOAD_MEMORY")]
    pub kv_offload_memory: Option<String>,
    /// KV cache element type: `f16` or `q8_0` (8-bit, one f16 scale per 32 values: 1.88× the
    /// blocks in the same memory). CPU backend only for now.
    #[arg(long, env = "KVROUTE_KV_CACHE_DTYPE", default_value = "f16")]
    pub kv_cache_dtype: String,
    /// Tokens per KV block.
    #[arg(long, env = "KVROUTE_BLOCK_SIZE", default_value = "16")]
    pub block_size: String,
    /// Most requests computed at once.
    #[arg(long, env = "KVROUTE_MAX_NUM_SEQS", default_value = "256")]
    pub max_num_seqs: String,
    /// Compute threads of the CPU backend; default: every core this process may use.
    #[arg(long, env = "KVROUTE_THREADS")]
    pub threads: Option<String>,
    /// Longest request (prompt + output tokens); default: the model's context length.
    #[arg(long, env = "KVROUTE_MAX_MODEL_LEN")]
    pub max_model_len: Option<String>,
    /// Model name in the OpenAI API; default: the model file's name.
    #[arg(long, env = "KVROUTE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Agent id in capacity reports; default: $HOSTNAME (the pod name), else `kvroute-agent`.
    #[arg(long, env = "KVROUTE_AGENT_ID")]
    pub agent_id: Option<String>,
    /// Largest accepted HTTP request body, e.g. `4MiB`.
    #[arg(long, env = "KVROUTE_MAX_BODY_BYTES", default_value = "4MiB")]
    pub max_body_bytes: String,
    /// Grace period for in-flight requests after SIGTERM, e.g. `30s`, `500ms`, `2m`.
    #[arg(long, env = "KVROUTE_DRAIN_TIMEOUT", default_value = "30s")]
    pub drain_timeout: String,
    /// A request's headers (and a connection's first byte, and a kept-alive connection's next
    /// request) must arrive within this, e.g. `10s`: a client that stalls is disconnected.
    #[arg(long, env = "KVROUTE_HEADER_READ_TIMEOUT", default_value = "10s")]
    pub header_read_timeout: String,
    /// A request body must arrive whole within this, e.g. `60s`.
    #[arg(long, env = "KVROUTE_BODY_READ_TIMEOUT", default_value = "60s")]
    pub body_read_timeout: String,
    /// Most open HTTP connections; more are answered 503 + Retry-After and closed.
    #[arg(long, env = "KVROUTE_MAX_CONNECTIONS", default_value = "8192")]
    pub max_connections: String,
    /// Most concurrent `WatchCapacity` streams (gateway replicas, dashboards); more are
    /// refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "KVROUTE_MAX_CAPACITY_SUBSCRIBERS", default_value = "256")]
    pub max_capacity_subscribers: String,
    /// File holding a shared token: then every OpenAI, hold and gRPC call needs
    /// `authorization: Bearer <token>` (gateways get the same file); `/health`, `/ready` and
    /// `/metrics` stay open.
    #[arg(long, env = "KVROUTE_AUTH_TOKEN_FILE", value_name = "FILE")]
    pub auth_token_file: Option<std::path::PathBuf>,
    /// Where `--model default` is downloaded to.
    #[arg(long, env = "KVROUTE_CACHE")]
    pub cache_dir: Option<std::path::PathBuf>,
    /// Log format on stderr.
    #[arg(long, env = "KVROUTE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Start a request when its prompt fits and preempt (recompute) when the pool runs out,
    /// as vLLM does. Default: start a request only when its whole future (`prompt +
    /// max_tokens`) fits beside the running ones', so the engine never preempts.
    #[arg(long, env = "KVROUTE_OPTIMISTIC_ADMISSION")]
    pub optimistic_admission: bool,
    /// Test-only fault injection: the engine thread panics at this step.
    #[arg(long, env = "KVROUTE_FAULT_PANIC_AT_STEP", hide = true)]
    pub fault_panic_at_step: Option<u64>,
}

/// How much memory the KV cache gets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvBudget {
    Bytes(u64),
    /// Fraction of the GPU's free memory for weights, activations and KV (CUDA only).
    GpuFraction(f64),
}

/// The device after resolving `auto` against this build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

/// `kvroute-agent serve`'s configuration, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeConfig {
    pub model: String,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub device: Device,
    /// How `device` was chosen (for the start-up log): `--device auto` says what it found.
    pub device_note: String,
    pub kv_budget: KvBudget,
    /// Bytes of the KV host tier (0: none).
    pub kv_offload_memory: u64,
    pub kv_cache_dtype: kvroute_engine::model::KvCacheDtype,
    pub block_size: u32,
    pub max_num_seqs: u32,
    /// CPU compute threads (≥ 1).
    pub threads: usize,
    pub max_model_len: Option<u32>,
    pub served_model_name: Option<String>,
    pub agent_id: String,
    pub max_body_bytes: usize,
    pub drain_timeout: Duration,
    /// Header, body and connection limits of the HTTP server.
    pub http_limits: kvroute_serve::Limits,
    /// Most concurrent capacity streams.
    pub max_capacity_subscribers: usize,
    /// The shared token callers must send (read from `--auth-token-file`).
    pub auth_token: Option<String>,
    pub cache_dir: Option<std::path::PathBuf>,
    pub log_format: LogFormat,
    /// Start requests whose prompt fits and preempt when the pool runs out (vLLM's way),
    /// instead of only those whose whole future fits.
    pub optimistic_admission: bool,
    /// Test-only: the engine thread panics at this step.
    pub fault_panic_at_step: Option<u64>,
}

/// Default KV budget on the CPU: 1 GiB.
pub const DEFAULT_KV_MEMORY: u64 = 1 << 30;

/// Default KV budget on the GPU: vLLM's `--gpu-memory-utilization 0.9`.
pub const DEFAULT_GPU_MEMORY_UTILIZATION: f64 =
    kvroute_engine::kernels::device::DEFAULT_GPU_MEMORY_UTILIZATION;

/// Whether this binary was built with the `cuda` feature.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

impl ServeArgs {
    /// Checks every flag once; the first bad one is reported with its name and value.
    pub fn validate(&self) -> Result<ServeConfig, ConfigError> {
        let model = self.model.trim().to_string();
        if model.is_empty() {
            return Err(ConfigError::invalid(
                "--model",
                &self.model,
                "must not be empty",
            ));
        }
        let http = parse_addr("--http", &self.http)?;
        let grpc = parse_addr("--grpc", &self.grpc)?;
        if http.port() != 0 && http == grpc {
            return Err(ConfigError::invalid(
                "--grpc",
                &self.grpc,
                "must differ from --http",
            ));
        }
        let (device, device_note) = resolve_device(self.device)?;
        let kv_budget = match (&self.kv_memory, &self.gpu_memory_utilization) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    "--gpu-memory-utilization",
                    self.gpu_memory_utilization.clone().unwrap_or_default(),
                    "give either --kv-memory or --gpu-memory-utilization, not both",
                ))
            }
            (Some(m), None) => {
                let bytes = parse_size("--kv-memory", m)?;
                if bytes == 0 {
                    return Err(ConfigError::invalid(
                        "--kv-memory",
                        m,
                        "must be more than 0",
                    ));
                }
                KvBudget::Bytes(bytes)
            }
            (None, Some(f)) => {
                let v: f64 = f.trim().parse().map_err(|_| {
                    ConfigError::invalid("--gpu-memory-utilization", f, "not a number")
                })?;
                if !(v > 0.0 && v <= 1.0) {
                    return Err(ConfigError::invalid(
                        "--gpu-memory-utilization",
                        f,
                        "must be in (0, 1]",
                    ));
                }
                if device != Device::Cuda {
                    return Err(ConfigError::invalid(
                        "--gpu-memory-utilization",
                        f,
                        "only applies to --device cuda; use --kv-memory on the CPU",
                    ));
                }
                KvBudget::GpuFraction(v)
            }
            (None, None) if device == Device::Cuda => {
                KvBudget::GpuFraction(DEFAULT_GPU_MEMORY_UTILIZATION)
            }
            (None, None) => KvBudget::Bytes(DEFAULT_KV_MEMORY),
        };
        let kv_offload_memory = match &self.kv_offload_memory {
            None => 0,
            Some(m) => {
                let bytes = parse_size("--kv-offload-memory", m)?;
                if bytes > 0 && device == Device::Cuda {
                    return Err(ConfigError::invalid(
                        "--kv-offload-memory",
                        m,
                        "the host tier is not supported on --device cuda yet",
                    ));
                }
                bytes
            }
        };
        let kv_cache_dtype: kvroute_engine::model::KvCacheDtype =
            self.kv_cache_dtype.parse().map_err(|e: String| {
                ConfigError::invalid("--kv-cache-dtype", &self.kv_cache_dtype, e)
            })?;
        if kv_cache_dtype != kvroute_engine::model::KvCacheDtype::F16 && device == Device::Cuda {
            return Err(ConfigError::invalid(
                "--kv-cache-dtype",
                &self.kv_cache_dtype,
                "only f16 on --device cuda so far",
            ));
        }
        let block_size = parse_u32("--block-size", &self.block_size)?;
        if !(1..=256).contains(&block_size) {
            return Err(ConfigError::invalid(
                "--block-size",
                &self.block_size,
                "must be in 1..=256",
            ));
        }
        let max_num_seqs = parse_u32("--max-num-seqs", &self.max_num_seqs)?;
        if max_num_seqs == 0 {
            return Err(ConfigError::invalid(
                "--max-num-seqs",
                &self.max_num_seqs,
                "must be at least 1",
            ));
        }
        let threads = match &self.threads {
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
            Some(s) => {
                let v = parse_u32("--threads", s)?;
                if v == 0 || v > 1024 {
                    return Err(ConfigError::invalid("--threads", s, "must be in 1..=1024"));
                }
                v as usize
            }
        };
        let max_model_len = match &self.max_model_len {
            None => None,
            Some(s) => {
                let v = parse_u32("--max-model-len", s)?;
                if v < 2 {
                    return Err(ConfigError::invalid(
                        "--max-model-len",
                        s,
                        "must be at least 2",
                    ));
                }
                Some(v)
            }
        };
        let served_model_name = match &self.served_model_name {
            None => None,
            Some(s) if s.trim().is_empty() => {
                return Err(ConfigError::invalid(
                    "--served-model-name",
                    s,
                    "must not be empty",
                ))
            }
            Some(s) => Some(s.trim().to_string()),
        };
        let agent_id = match &self.agent_id {
            Some(s) if s.trim().is_empty() => {
                return Err(ConfigError::invalid("--agent-id", s, "must not be empty"))
            }
            Some(s) => s.trim().to_string(),
            None => std::env::var("HOSTNAME")
                .ok()
                .filter(|h| !h.trim().is_empty())
                .unwrap_or_else(|| "kvroute-agent".to_string()),
        };
        let max_body = parse_size("--max-body-bytes", &self.max_body_bytes)?;
        if max_body == 0 {
            return Err(ConfigError::invalid(
                "--max-body-bytes",
                &self.max_body_bytes,
                "must be more than 0",
            ));
        }
        let max_body_bytes = usize::try_from(max_body).map_err(|_| {
            ConfigError::invalid("--max-body-bytes", &self.max_body_bytes, "too large")
        })?;
        let drain_timeout = parse_duration("--drain-timeout", &self.drain_timeout)?;
        let http_limits = http_limits(
            &self.header_read_timeout,
            &self.body_read_timeout,
            &self.max_connections,
        )?;
        let subscribers = parse_u32("--max-capacity-subscribers", &self.max_capacity_subscribers)?;
        if subscribers == 0 || subscribers > MAX_SUBSCRIBERS_LIMIT {
            return Err(ConfigError::invalid(
                "--max-capacity-subscribers",
                &self.max_capacity_subscribers,
                format!("must be 1 to {MAX_SUBSCRIBERS_LIMIT}"),
            ));
        }
        let auth_token = match &self.auth_token_file {
            Some(p) => Some(kvroute_contract::token::read_token_file(p).map_err(|e| {
                ConfigError::invalid("--auth-token-file", p.display().to_string(), e)
            })?),
            None => None,
        };
        Ok(ServeConfig {
            model,
            http,
            grpc,
            device,
            device_note,
            kv_budget,
            kv_offload_memory,
            kv_cache_dtype,
            block_size,
            max_num_seqs,
            threads,
            max_model_len,
            served_model_name,
            agent_id,
            max_body_bytes,
            drain_timeout,
            http_limits,
            max_capacity_subscribers: subscribers as usize,
            auth_token,
            cache_dir: self.cache_dir.clone(),
            log_format: self.log_format,
            optimistic_admission: self.optimistic_admission,
            fault_panic_at_step: self.fault_panic_at_step,
        })
    }
}

/// `--device`: `cpu`, `cuda` (an error when this build, the driver or the GPU is missing), or
/// `auto` (CUDA when the build has it and a driver and a GPU are present, else the CPU). Returns
/// the device and a note on how it was chosen.
fn resolve_device(arg: DeviceArg) -> Result<(Device, String), ConfigError> {
    use kvroute_engine::kernels::device::{
        probe_cuda, resolve, Backend, DeviceChoice, DeviceError,
    };
    let choice = match arg {
        DeviceArg::Cpu => return Ok((Device::Cpu, "--device cpu".into())),
        DeviceArg::Cuda => DeviceChoice::Cuda,
        DeviceArg::Auto => DeviceChoice::Auto,
    };
    let probe = probe_cuda();
    let found = match &probe {
        Ok(n) => format!("{n} CUDA device(s)"),
        Err(why) => why.clone(),
    };
    match resolve(choice, probe) {
        Ok(Backend::Cuda(i)) => {
            let flag = if choice == DeviceChoice::Auto {
                "auto"
            } else {
                "cuda"
            };
            Ok((
                Device::Cuda,
                format!("--device {flag}: CUDA device {i} ({found})"),
            ))
        }
        Ok(Backend::Cpu) => Ok((Device::Cpu, format!("--device auto: the CPU ({found})"))),
        // No CUDA feature, no driver or no GPU: a start-up error saying which.
        Err(e) => Err(ConfigError::invalid(
            "--device",
            "cuda",
            match e {
                DeviceError::CudaUnavailable(why) => why,
                other => other.to_string(),
            },
        )),
    }
}

fn parse_addr(flag: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.trim().parse().map_err(|_| {
        ConfigError::invalid(
            flag,
            s,
            "expected IP:PORT, e.g. 127.0.0.1:8001 or 0.0.0.0:0",
        )
    })
}

fn parse_u32(flag: &'static str, s: &str) -> Result<u32, ConfigError> {
    s.trim()
        .parse()
        .map_err(|_| ConfigError::invalid(flag, s, "expected a whole number"))
}

/// Parses a byte size ([`kvroute_contract::units::parse_size`]); errors name the flag.
pub fn parse_size(flag: &'static str, s: &str) -> Result<u64, ConfigError> {
    units::parse_size(s).map_err(|e| ConfigError::invalid(flag, s, e.0))
}

/// Most `--max-capacity-subscribers` accepted.
pub const MAX_SUBSCRIBERS_LIMIT: u32 = 100_000;

/// Most `--max-connections` accepted.
pub const MAX_CONNECTIONS_LIMIT: u32 = 1_000_000;

/// `--header-read-timeout`, `--body-read-timeout`, `--max-connections`: both timeouts more
/// than 0, connections 1 ..= [`MAX_CONNECTIONS_LIMIT`].
pub fn http_limits(
    header: &str,
    body: &str,
    connections: &str,
) -> Result<kvroute_serve::Limits, ConfigError> {
    let positive = |flag: &'static str, s: &str| {
        let d = parse_duration(flag, s)?;
        if d.is_zero() {
            return Err(ConfigError::invalid(flag, s, "must be more than 0"));
        }
        Ok(d)
    };
    let header_read_timeout = positive("--header-read-timeout", header)?;
    let body_read_timeout = positive("--body-read-timeout", body)?;
    let max = parse_u32("--max-connections", connections)?;
    if max == 0 || max > MAX_CONNECTIONS_LIMIT {
        return Err(ConfigError::invalid(
            "--max-connections",
            connections,
            format!("must be 1 to {MAX_CONNECTIONS_LIMIT}"),
        ));
    }
    Ok(kvroute_serve::Limits {
        header_read_timeout,
        body_read_timeout,
        max_connections: max as usize,
        ..kvroute_serve::Limits::default()
    })
}

/// Parses a duration ([`kvroute_contract::units::parse_duration`]); errors name the flag.
pub fn parse_duration(flag: &'static str, s: &str) -> Result<Duration, ConfigError> {
    units::parse_duration(s).map_err(|e| ConfigError::invalid(flag, s, e.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn args(extra: &[&str]) -> ServeArgs {
        let mut v = vec!["x"];
        v.extend_from_slice(extra);
        Cli::parse_from(v).serve
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("--f", "2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("--f", "512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("--f", "512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("--f", "4M").unwrap(), 4 << 20);
        assert_eq!(parse_size("--f", "1GB").unwrap(), 1_000_000_000);
        assert_eq!(parse_size("--f", "1000").unwrap(), 1000);
        assert_eq!(parse_size("--f", "1.5KiB").unwrap(), 1536);
        for bad in [
            "",
            "GiB",
            "2XB",
            "-1GiB",
            "99999999999999999999",
            "1.2.3MiB",
        ] {
            let e = parse_size("--kv-memory", bad).unwrap_err();
            assert!(e.to_string().starts_with("--kv-memory"), "{e}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("--f", "30s").unwrap(),
            Duration::from_secs(30)
        );
        assert_eq!(
            parse_duration("--f", "500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(
            parse_duration("--f", "2m").unwrap(),
            Duration::from_secs(120)
        );
        assert_eq!(parse_duration("--f", "7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("--f", "soon").is_err());
        assert!(parse_duration("--f", "3d").is_err());
    }

    #[test]
    fn defaults_validate() {
        let c = args(&[]).validate().unwrap();
        assert_eq!(c.kv_budget, KvBudget::Bytes(DEFAULT_KV_MEMORY));
        assert_eq!(c.block_size, 16);
        assert_eq!(c.max_body_bytes, 4 << 20);
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
        assert_eq!(c.http.port(), 8001);
        assert_eq!(c.http_limits.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.http_limits.body_read_timeout, Duration::from_secs(60));
        assert_eq!(c.http_limits.max_connections, 8192);
        assert_eq!(c.max_capacity_subscribers, 256);
    }

    #[test]
    fn errors_name_flag_and_value() {
        let cases: &[(&[&str], &str, &str)] = &[
            (&["--http", "localhost"], "--http", "localhost"),
            (&["--kv-memory", "lots"], "--kv-memory", "lots"),
            (&["--kv-memory", "0"], "--kv-memory", "0"),
            (&["--kv-cache-dtype", "int3"], "--kv-cache-dtype", "int3"),
            (
                &["--kv-cache-dtype", "fp8_e4m3"],
                "--kv-cache-dtype",
                "fp8_e4m3",
            ),
            (
                &["--kv-offload-memory", "much"],
                "--kv-offload-memory",
                "much",
            ),
            (
                &["--kv-offload-memory", "99999999999999TiB"],
                "--kv-offload-memory",
                "99999999999999TiB",
            ),
            (&["--block-size", "0"], "--block-size", "0"),
            (&["--block-size", "sixteen"], "--block-size", "sixteen"),
            (&["--max-num-seqs", "0"], "--max-num-seqs", "0"),
            (&["--threads", "0"], "--threads", "0"),
            (&["--max-model-len", "1"], "--max-model-len", "1"),
            (&["--max-body-bytes", "4Q"], "--max-body-bytes", "4Q"),
            (
                &["--drain-timeout", "forever"],
                "--drain-timeout",
                "forever",
            ),
            (&["--agent-id", " "], "--agent-id", " "),
            (
                &["--header-read-timeout", "0s"],
                "--header-read-timeout",
                "0s",
            ),
            (
                &["--header-read-timeout", "soon"],
                "--header-read-timeout",
                "soon",
            ),
            (&["--body-read-timeout", "0"], "--body-read-timeout", "0"),
            (&["--body-read-timeout", "1y"], "--body-read-timeout", "1y"),
            (&["--max-connections", "0"], "--max-connections", "0"),
            (
                &["--max-connections", "1000001"],
                "--max-connections",
                "1000001",
            ),
            (&["--max-connections", "many"], "--max-connections", "many"),
            (
                &["--max-capacity-subscribers", "0"],
                "--max-capacity-subscribers",
                "0",
            ),
            (
                &["--max-capacity-subscribers", "100001"],
                "--max-capacity-subscribers",
                "100001",
            ),
            (
                &["--max-capacity-subscribers=-3"],
                "--max-capacity-subscribers",
                "-3",
            ),
            (
                &["--auth-token-file", "/nonexistent/token"],
                "--auth-token-file",
                "/nonexistent/token",
            ),
        ];
        for (argv, flag, value) in cases {
            let e = args(argv).validate().unwrap_err().to_string();
            assert!(e.starts_with(flag), "{argv:?}: {e}");
            assert!(e.contains(&format!("{value:?}")), "{argv:?}: {e}");
        }
    }

    #[test]
    fn cuda_without_a_usable_gpu_is_a_startup_error_and_auto_says_what_it_picked() {
        let probe = kvroute_engine::kernels::device::probe_cuda();
        let r = args(&["--device", "cuda"]).validate();
        match &probe {
            Ok(_) => {
                let c = r.unwrap();
                assert_eq!(c.device, Device::Cuda);
                assert_eq!(
                    c.kv_budget,
                    KvBudget::GpuFraction(DEFAULT_GPU_MEMORY_UTILIZATION)
                );
            }
            Err(why) => {
                let e = r.unwrap_err().to_string();
                assert!(e.starts_with("--device \"cuda\": "), "{e}");
                assert!(e.contains(why.as_str()), "{e}");
                if !CUDA_BUILT {
                    assert!(e.contains("--features cuda"), "{e}");
                }
            }
        }
        let auto = args(&["--device", "auto"]).validate().unwrap();
        match &probe {
            Ok(_) => assert_eq!(auto.device, Device::Cuda, "{}", auto.device_note),
            Err(why) => {
                assert_eq!(auto.device, Device::Cpu);
                assert_eq!(auto.kv_budget, KvBudget::Bytes(DEFAULT_KV_MEMORY));
                assert!(
                    auto.device_note.contains(why.as_str()),
                    "{}",
                    auto.device_note
                );
            }
        }
        let e = args(&["--device", "cpu", "--gpu-memory-utilization", "0.9"])
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--gpu-memory-utilization"), "{e}");
    }
}
