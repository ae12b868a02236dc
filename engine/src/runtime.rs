//! The engine runtime: a step loop on its own thread that admits requests into the scheduler,
//! runs the model on each step's batch, samples, streams text, and ends requests on EOS, stop
//! ids, stop strings, `max_tokens` or the context length.
//!
//! [`Engine`] is a cheap handle (`Clone + Send + Sync`) the agent shares between its HTTP
//! handlers. Requests go to the loop through a channel; their events come back through each
//! request's [`EventSink`], called on the engine thread (it must not block). A sink returning
//! `false` (client gone) aborts the request and frees its blocks.
//!
//! Never blocks the step loop on callers; never panics on request input.

use crate::api::{
    Dispatch, EngineEvent, EventSink, FinishReason, GenerateRequest, Prompt, RequestId,
    SamplingParams, TokenEvent, TokenLogprob, Usage,
};
use crate::chat::ChatTemplate;
use crate::config::ModelConfig;
use crate::kv::{BlockEvent, CapacitySnapshot};
use crate::load::LoadedModel;
use crate::model::{CpuRunner, KvStorage, Model, ModelError, SeqInput};
use crate::sample::{Rng, Sampler};
use crate::sched::{SchedConfig, SchedError, Scheduler, SeqSpec};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Runtime settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Memory for the KV cache; blocks = this / block bytes.
    pub kv_memory_bytes: u64,
    /// Host memory for evicted prefix blocks (the host tier, see [`crate::kv::host`]); 0 =
    /// none. Slots = this / block bytes.
    pub kv_offload_memory_bytes: u64,
    /// The KV cache's element type (CPU backend: `f16` or `q8_0`); block bytes follow it.
    pub kv_cache_dtype: crate::model::KvCacheDtype,
    /// Most requests running at once.
    pub max_num_seqs: usize,
    /// Most tokens in one step (prefill chunks plus decodes).
    pub max_num_batched_tokens: usize,
    /// Longest request (prompt + output); `None` = the model's context length.
    pub max_model_len: Option<usize>,
    /// CPU threads; 0 = every available core.
    pub threads: usize,
    /// Most requests admitted but not finished before [`EngineError::Overloaded`].
    pub max_pending: usize,
    /// Start a request only when its whole future fits (see
    /// [`SchedConfig::admit_whole_future`]): the engine never preempts.
    pub admit_whole_future: bool,
    /// Test-only fault injection: the engine thread panics at this step (counting steps that
    /// ran a batch), to exercise [`Engine::failure`] and what depends on it.
    pub fault_panic_at_step: Option<u64>,
    /// Test-only: keep this many bits of each public block hash (so prefixes collide), to show
    /// that a colliding prompt never shares another's KV. `None`: the full 64.
    pub block_hash_bits_for_tests: Option<u32>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            block_size: 16,
            kv_memory_bytes: 256 << 20,
            kv_offload_memory_bytes: 0,
            kv_cache_dtype: crate::model::KvCacheDtype::F16,
            max_num_seqs: 256,
            max_num_batched_tokens: 512,
            max_model_len: None,
            threads: 0,
            max_pending: 4096,
            admit_whole_future: false,
            fault_panic_at_step: None,
            block_hash_bits_for_tests: None,
        }
    }
}

/// [`Engine::failure`] reports an engine with requests pending that has not stepped for this
/// long as stuck (no CPU or GPU step of a serving engine takes near this).
pub const STUCK_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// The heartbeat's value while the engine thread waits for work (never stuck then).
const IDLE_BEAT: u64 = u64::MAX;

/// The engine thread's heartbeat: milliseconds since `epoch` at its last loop turn, or
/// [`IDLE_BEAT`].
struct Heartbeat {
    epoch: std::time::Instant,
    at_ms: AtomicU64,
}

impl Heartbeat {
    fn new() -> Self {
        Self {
            epoch: std::time::Instant::now(),
            at_ms: AtomicU64::new(IDLE_BEAT),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn beat(&self) {
        self.at_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn idle(&self) {
        self.at_ms.store(IDLE_BEAT, Ordering::Relaxed);
    }

    /// How long since the last beat, unless idle.
    fn silent_for(&self) -> Option<std::time::Duration> {
        let at = self.at_ms.load(Ordering::Relaxed);
        (at != IDLE_BEAT)
            .then(|| std::time::Duration::from_millis(self.now_ms().saturating_sub(at)))
    }
}

/// The text of a panic payload.
fn panic_text(p: &(dyn std::any::Any + Send)) -> &str {
    p.downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Errors of the engine API.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("engine overloaded: too many requests pending")]
    Overloaded,
    #[error("engine is shut down")]
    Shutdown,
    #[error("invalid engine config: {0}")]
    Config(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The compute device could not be set up (no driver, no GPU, no room for the KV cache...).
    #[error("{0}")]
    Device(String),
}

impl EngineError {
    /// A short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            EngineError::InvalidRequest(_) => "invalid_request",
            EngineError::Overloaded => "overloaded",
            EngineError::Shutdown => "shutdown",
            EngineError::Config(_) => "config",
            EngineError::Model(_) => "model",
            EngineError::Device(_) => "device",
        }
    }
}

/// What the engine is running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub name: String,
    pub vocab_size: usize,
    pub max_model_len: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    /// Bytes one KV block takes (all layers, K and V).
    pub block_bytes: usize,
    pub threads: usize,
    /// Kernel instruction set (`avx512vnni`, `avx2`, `scalar`).
    pub kernels: &'static str,
}

/// Counters and capacity of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineStats {
    pub capacity: CapacitySnapshot,
    pub running: usize,
    pub waiting: usize,
    /// Requests the engine thread has taken into its scheduler (accepted or rejected there).
    pub requests_received: u64,
    pub preemptions: u64,
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
    /// Blocks the waiting queue needs for its prompts.
    pub waiting_prompt_blocks: usize,
    /// Prompt tokens the running requests have still to compute.
    pub running_prefill_tokens: usize,
    /// Free blocks promised to live requests' remaining tokens (see
    /// [`crate::sched::SchedStats::committed_blocks`]).
    pub committed_blocks: usize,
    pub max_model_len: usize,
    pub block_bytes: usize,
    /// Measured speed (see [`StepSpeed`]); 0 until measured.
    pub prefill_tokens_per_s: u32,
    pub decode_step_us: u32,
    pub decode_batch: u32,
    /// What one more sequence adds to a decode step ([`StepSpeed::decode_fit`]).
    pub decode_step_per_seq_ns: u32,
    /// What one more KV token read adds to a decode step, in picoseconds
    /// ([`StepSpeed::decode_fit`]).
    pub decode_step_per_kv_token_ps: u32,
    /// Tokens the running sequences hold in the KV cache (computed so far).
    pub running_kv_tokens: usize,
    /// Room (`free - committed` blocks) given back by requests that ended, since start.
    pub room_released_blocks: u64,
    /// Measured nanoseconds to copy one block between the KV cache and its host tier (0 = not
    /// measured, or no host tier).
    pub kv_copy_block_ns: u32,
}

/// Moving averages of the engine's own step times, so a router can predict how long a request
/// takes to start here (prefill throughput) and how fast running requests finish (decode step
/// time at the batch it ran at). Learned from the steps the engine runs; nothing is hard-coded.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepSpeed {
    /// Prompt tokens per second of prefill time.
    pub prefill_tokens_per_s: f64,
    /// Seconds per decode-only step, and its batch size.
    pub decode_step_s: f64,
    pub decode_batch: f64,
    /// Seconds to copy one block between the KV cache and its host tier (either way).
    pub copy_block_s: f64,
    /// Decode-only steps, for the fit of step time over batch size `b` and the KV tokens the
    /// step reads `c`: decayed sums of their weight, `b`, `c`, `b²`, `c²`, `b·c`, the time `t`,
    /// `b·t` and `c·t`.
    fit: [f64; 9],
}

/// The decode step's fitted shape: `fixed + per_seq_s · batch + per_token_s · KV tokens read`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DecodeFit {
    pub per_seq_s: f64,
    pub per_token_s: f64,
}

impl StepSpeed {
    /// Weight of a new sample in the moving averages.
    const ALPHA: f64 = 0.2;
    /// Decay of the decode fit per sample (its memory is a few hundred steps).
    const FIT_DECAY: f64 = 0.995;
    /// Least variance of the batch sizes (sequences²) the fit needs to say anything.
    const FIT_MIN_VARIANCE: f64 = 0.25;

    /// Least variance of the KV tokens read (tokens²) the fit needs to use them.
    const FIT_MIN_TOKEN_VARIANCE: f64 = 64.0;
    /// Least share of the KV tokens' variance the batch size must leave unexplained for the
    /// two slopes to be told apart (below it, batches of like lengths: one slope, per sequence).
    const FIT_MIN_INDEPENDENCE: f64 = 0.02;

    /// Seconds one more sequence adds to a decode step ([`StepSpeed::decode_fit`]).
    pub fn decode_per_seq_s(&self) -> f64 {
        self.decode_fit().per_seq_s
    }

    /// The least-squares fit of decode-only step times (recent steps weigh more) over their
    /// batch size and the KV tokens they read, both slopes at least 0 and each at most the
    /// average step divided by its average amount. A GPU's decode step grows with the KV it
    /// reads rather than with the number of sequences; a CPU's with both. A slope the steps seen
    /// cannot tell (batches or lengths that have not varied) is 0; with batches of like lengths
    /// the two are one, and it is put on the sequence.
    pub fn decode_fit(&self) -> DecodeFit {
        let [w, sb, sc, sbb, scc, sbc, st, sbt, sct] = self.fit;
        if w <= 0.0 {
            return DecodeFit::default();
        }
        let (mb, mc, mt) = (sb / w, sc / w, st / w);
        let vbb = sbb / w - mb * mb;
        let vcc = scc / w - mc * mc;
        let vbc = sbc / w - mb * mc;
        let vbt = sbt / w - mb * mt;
        let vct = sct / w - mc * mt;
        let most = |mean: f64| if mean > 0.0 { mt / mean } else { 0.0 };
        let one = |v: f64, cov: f64, min: f64| if v >= min { cov / v } else { 0.0 };
        let seq_only = || DecodeFit {
            per_seq_s: one(vbb, vbt, Self::FIT_MIN_VARIANCE).clamp(0.0, most(mb)),
            per_token_s: 0.0,
        };
        let token_only = || DecodeFit {
            per_seq_s: 0.0,
            per_token_s: one(vcc, vct, Self::FIT_MIN_TOKEN_VARIANCE).clamp(0.0, most(mc)),
        };
        if vcc < Self::FIT_MIN_TOKEN_VARIANCE {
            return seq_only();
        }
        if vbb < Self::FIT_MIN_VARIANCE {
            return token_only();
        }
        let det = vbb * vcc - vbc * vbc;
        if det < Self::FIT_MIN_INDEPENDENCE * vbb * vcc {
            return seq_only();
        }
        let per_seq = (vbt * vcc - vct * vbc) / det;
        let per_token = (vct * vbb - vbt * vbc) / det;
        match (per_seq >= 0.0, per_token >= 0.0) {
            (true, true) => DecodeFit {
                per_seq_s: per_seq.min(most(mb)),
                per_token_s: per_token.min(most(mc)),
            },
            // One slope negative: the other alone explains the steps better.
            (true, false) => seq_only(),
            (false, true) => token_only(),
            (false, false) => DecodeFit::default(),
        }
    }

    fn ewma(old: f64, sample: f64) -> f64 {
        if old <= 0.0 {
            sample
        } else {
            old + Self::ALPHA * (sample - old)
        }
    }

    /// Records one step of `seconds` that computed `prefill_tokens` prompt tokens and advanced
    /// `decode_seqs` sequences by one token, reading the KV of `decode_kv_tokens` tokens for
    /// them. A mixed step's prefill time is what is left after the decode part, estimated from
    /// the decode average (at least a third of the step is credited to prefill, so a poor
    /// decode estimate cannot make prefill look free).
    pub fn record(
        &mut self,
        seconds: f64,
        prefill_tokens: usize,
        decode_seqs: usize,
        decode_kv_tokens: usize,
    ) {
        if !(seconds.is_finite() && seconds > 0.0) {
            return;
        }
        if prefill_tokens == 0 {
            if decode_seqs > 0 {
                self.decode_step_s = Self::ewma(self.decode_step_s, seconds);
                self.decode_batch = Self::ewma(self.decode_batch, decode_seqs as f64);
                let (b, c, t) = (decode_seqs as f64, decode_kv_tokens as f64, seconds);
                for (s, v) in
                    self.fit
                        .iter_mut()
                        .zip([1.0, b, c, b * b, c * c, b * c, t, b * t, c * t])
                {
                    *s = *s * Self::FIT_DECAY + v;
                }
            }
            return;
        }
        let decode_part = if decode_seqs > 0 && self.decode_batch > 0.0 {
            self.decode_step_s * (decode_seqs as f64 / self.decode_batch).min(1.0)
        } else {
            0.0
        };
        let prefill_s = (seconds - decode_part).max(seconds / 3.0);
        self.prefill_tokens_per_s =
            Self::ewma(self.prefill_tokens_per_s, prefill_tokens as f64 / prefill_s);
    }

    /// Records one step's host-tier copies: `blocks` blocks in `seconds`.
    pub fn record_copies(&mut self, seconds: f64, blocks: usize) {
        if blocks > 0 && seconds.is_finite() && seconds >= 0.0 {
            // A copy never takes no time: keep the average positive (0 means not measured).
            let per = (seconds / blocks as f64).max(1e-9);
            self.copy_block_s = Self::ewma(self.copy_block_s, per);
        }
    }
}

/// What a capacity observer is told after every change, with the prefix-cache block events
/// since the last update, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct CapacityUpdate {
    pub stats: EngineStats,
    pub events: Vec<BlockEvent>,
    /// Dispatches ([`GenerateRequest::dispatch`]) the engine took in since the previous update:
    /// `stats` counts them (or they were refused and take nothing).
    pub acks: Vec<Dispatch>,
}

/// Called on the engine thread after each step, admission or abort that changed anything.
pub type CapacityObserver = Box<dyn FnMut(&CapacityUpdate) + Send>;

/// Which backend runs the model's steps. The scheduler, KV manager and sampling are the same
/// for both.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum EngineDevice {
    /// The CPU forward pass; the KV cache gets `EngineConfig::kv_memory_bytes`.
    #[default]
    Cpu,
    /// The CUDA forward pass (builds with the `cuda` feature); the KV cache is sized from the
    /// GPU's memory ([`crate::kernels::device::GpuKvBudget`]), `kv_memory_bytes` is not used.
    Cuda(crate::kernels::device::CudaOptions),
}

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[cfg(feature = "cuda")]
    #[error("CUDA: {0}")]
    Cuda(#[from] crate::cuda::CudaError),
}

/// The backend behind the step loop. An enum, not a trait object: the CPU path stays a direct
/// call. One per engine, moved once into the engine thread, so its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Runner {
    Cpu(CpuRunner),
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::cuda::runner::CudaRunner>),
}

impl Runner {
    /// Logits of every sequence with `want_logits`, in batch order, on the host.
    fn step(&mut self, inputs: &[SeqInput<'_>]) -> Result<&[f32], StepError> {
        match self {
            Runner::Cpu(r) => Ok(r.step(inputs)?),
            #[cfg(feature = "cuda")]
            Runner::Cuda(r) => Ok(r.step(inputs)?),
        }
    }

    /// Whether [`Runner::step_greedy`] picks tokens on the device (so the logits need not be
    /// copied back when every sequence samples greedily).
    fn greedy_on_device(&self) -> bool {
        match self {
            Runner::Cpu(_) => false,
            #[cfg(feature = "cuda")]
            Runner::Cuda(_) => true,
        }
    }

    /// Performs a step's host-tier copies (before its forward pass).
    fn copy_blocks(&mut self, copies: &crate::kv::KvCopies) -> Result<(), StepError> {
        match self {
            Runner::Cpu(r) => Ok(r.kv_mut().copy_blocks(copies)?),
            // The CUDA engine refuses a host tier at start, so it never has copies.
            #[cfg(feature = "cuda")]
            Runner::Cuda(_) => Err(StepError::Model(ModelError::Config(
                "the CUDA backend has no KV host tier".into(),
            ))),
        }
    }

    /// The greedy token of every sequence with `want_logits`, in batch order.
    fn step_greedy(&mut self, inputs: &[SeqInput<'_>]) -> Result<&[u32], StepError> {
        #[cfg(not(feature = "cuda"))]
        let _ = inputs;
        match self {
            Runner::Cpu(_) => Err(StepError::Model(ModelError::Config(
                "the CPU runner samples on the host".into(),
            ))),
            #[cfg(feature = "cuda")]
            Runner::Cuda(r) => Ok(r.step_greedy(inputs)?),
        }
    }
}

/// Whether `p` picks the most likely token (what the device argmax computes).
fn is_greedy(p: &SamplingParams) -> bool {
    (p.temperature <= 0.0 || p.top_k == 1) && p.logprobs.is_none() && !p.has_penalties()
}

/// Receives a prefix hold's outcome: (hold id, blocks held).
pub type HoldReply = Box<dyn FnOnce(u64, usize) + Send>;

/// Most prefix holds kept at once; a new one beyond it replaces the oldest.
pub const MAX_HOLDS: usize = 256;

enum Cmd {
    Add {
        id: RequestId,
        prompt: Vec<u32>,
        params: SamplingParams,
        cache_key: Option<String>,
        hold: Option<u64>,
        dispatch: Option<Dispatch>,
        only_with_room: bool,
        sink: EventSink,
    },
    Abort(RequestId),
    Hold {
        hashes: Vec<u64>,
        max_free: usize,
        ttl: std::time::Duration,
        reply: HoldReply,
    },
    Release(u64),
    Observer(CapacityObserver),
    Shutdown,
}

struct Shared {
    tx: Mutex<Option<Sender<Cmd>>>,
    next_id: AtomicU64,
    pending: Arc<AtomicUsize>,
    stats: Arc<Mutex<EngineStats>>,
    info: ModelInfo,
    tokenizer: Tokenizer,
    chat_template: Option<ChatTemplate>,
    config: ModelConfig,
    max_pending: usize,
    thread: Mutex<Option<JoinHandle<()>>>,
    heartbeat: Arc<Heartbeat>,
    /// Why the engine thread ended without being asked to (set once).
    failure: std::sync::OnceLock<String>,
}

/// A handle to a running engine; clone it freely.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("info", &self.shared.info)
            .finish()
    }
}

impl Engine {
    /// Sizes the KV cache, starts the step-loop thread on the CPU backend and returns the handle.
    pub fn start(model: LoadedModel, config: EngineConfig) -> Result<Engine, EngineError> {
        Engine::start_on(model, config, EngineDevice::Cpu)
    }

    /// [`Engine::start`] on the given backend.
    pub fn start_on(
        model: LoadedModel,
        config: EngineConfig,
        device: EngineDevice,
    ) -> Result<Engine, EngineError> {
        match device {
            EngineDevice::Cpu => Engine::start_cpu(model, config),
            EngineDevice::Cuda(opts) => Engine::start_cuda(model, config, opts),
        }
    }

    #[cfg(not(feature = "cuda"))]
    fn start_cuda(
        _model: LoadedModel,
        _config: EngineConfig,
        _opts: crate::kernels::device::CudaOptions,
    ) -> Result<Engine, EngineError> {
        Err(EngineError::Device(
            "this build has no CUDA backend (build with --features cuda)".into(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn start_cuda(
        model: LoadedModel,
        config: EngineConfig,
        opts: crate::kernels::device::CudaOptions,
    ) -> Result<Engine, EngineError> {
        use crate::cuda::runner::{CudaRunner, StepLimits};
        use crate::kernels::device::GpuKvBudget;
        use crate::kernels::layout::mib;
        let mc = model.model.config().clone();
        if config.block_size == 0 {
            return Err(EngineError::Config("block size must be at least 1".into()));
        }
        let max_model_len = config
            .max_model_len
            .unwrap_or(mc.max_position_embeddings)
            .min(mc.max_position_embeddings.max(2));
        let max_tokens = config.max_num_batched_tokens.max(1);
        let limits = StepLimits {
            block_size: config.block_size,
            max_tokens,
            max_seqs: config.max_num_seqs.clamp(1, max_tokens),
            max_context: max_model_len,
        };
        if config.kv_cache_dtype != crate::model::KvCacheDtype::F16 {
            return Err(EngineError::Config(format!(
                "--kv-cache-dtype {} is not supported on the CUDA backend yet (f16 only)",
                config.kv_cache_dtype.name()
            )));
        }
        if config.kv_offload_memory_bytes > 0 {
            return Err(EngineError::Config(
                "--kv-offload-memory (the KV host tier) is not supported on the CUDA backend yet"
                    .into(),
            ));
        }
        let runner = CudaRunner::start(&mc, model.weights.as_ref(), &opts, limits)
            .map_err(|e| EngineError::Device(format!("--device cuda: {e}")))?;
        let z = runner.sizing();
        let budget = match z.budget {
            GpuKvBudget::Utilization(u) => format!("--gpu-memory-utilization {u}"),
            GpuKvBudget::Bytes(b) => format!("--kv-memory {}", mib(b)),
        };
        tracing::info!(
            device = %z.device,
            total = %mib(z.total_bytes),
            free_before_load = %mib(z.free_before_load),
            budget = %budget,
            weights = %mib(z.weight_bytes),
            step_buffers = %mib(z.workspace_bytes),
            activation_peak = %mib(z.activation_peak_bytes),
            block_bytes = z.block_bytes,
            blocks = z.num_blocks,
            "GPU KV cache sized (free before load × utilization − weights − activation peak) ÷ block bytes"
        );
        let sched = Engine::scheduler(&config, runner.num_blocks(), max_model_len)?;
        let block_bytes = z.block_bytes as usize;
        Engine::launch(
            model,
            config,
            Runner::Cuda(Box::new(runner)),
            sched,
            block_bytes,
            1,
            "cuda",
        )
    }

    fn start_cpu(model: LoadedModel, config: EngineConfig) -> Result<Engine, EngineError> {
        let mc = model.model.config().clone();
        if config.block_size == 0 {
            return Err(EngineError::Config("block size must be at least 1".into()));
        }
        let block_bytes = KvStorage::block_bytes_of(&mc, config.block_size, config.kv_cache_dtype);
        let num_blocks = (config.kv_memory_bytes / block_bytes as u64) as usize;
        if num_blocks == 0 {
            return Err(EngineError::Config(format!(
                "--kv-memory {} bytes holds no KV block ({block_bytes} bytes each for block size {})",
                config.kv_memory_bytes, config.block_size
            )));
        }
        let max_model_len = config
            .max_model_len
            .unwrap_or(mc.max_position_embeddings)
            .min(mc.max_position_embeddings.max(2));
        let threads = if config.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            config.threads
        };
        let host_slots = (config.kv_offload_memory_bytes / block_bytes as u64) as usize;
        if config.kv_offload_memory_bytes > 0 && host_slots == 0 {
            return Err(EngineError::Config(format!(
                "--kv-offload-memory {} bytes holds no KV block ({block_bytes} bytes each for block size {})",
                config.kv_offload_memory_bytes, config.block_size
            )));
        }
        let mut sched = Engine::scheduler(&config, num_blocks, max_model_len)?;
        sched
            .set_host_tier(host_slots)
            .map_err(|e| EngineError::Config(e.to_string()))?;
        let max_len = sched.max_len();
        let mut runner = CpuRunner::new(
            model.model.clone(),
            config.block_size,
            num_blocks,
            config.max_num_batched_tokens.max(1),
            threads,
        )?;
        runner.set_kv_dtype(config.kv_cache_dtype)?;
        runner.kv_mut().set_host_slots(host_slots)?;
        tracing::info!(
            blocks = num_blocks,
            block_size = config.block_size,
            block_bytes,
            kv_cache_tokens = num_blocks * config.block_size,
            host_tier_blocks = host_slots,
            kv_cache_dtype = config.kv_cache_dtype.name(),
            max_model_len = max_len,
            max_concurrency = format!(
                "{:.2}",
                (num_blocks * config.block_size) as f64 / max_len as f64
            ),
            threads = runner.threads(),
            kernels = model.model.isa().name(),
            "KV cache sized"
        );
        let threads = runner.threads();
        let kernels = model.model.isa().name();
        Engine::launch(
            model,
            config,
            Runner::Cpu(runner),
            sched,
            block_bytes,
            threads,
            kernels,
        )
    }

    fn scheduler(
        config: &EngineConfig,
        num_blocks: usize,
        max_model_len: usize,
    ) -> Result<Scheduler, EngineError> {
        let mut sc = SchedConfig::new(config.block_size, num_blocks);
        sc.max_num_seqs = config.max_num_seqs.max(1);
        sc.max_num_batched_tokens = config.max_num_batched_tokens.max(1);
        sc.max_model_len = max_model_len;
        sc.enable_events = true;
        sc.admit_whole_future = config.admit_whole_future;
        let mut sched = Scheduler::new(sc).map_err(|e| EngineError::Config(e.to_string()))?;
        if let Some(bits) = config.block_hash_bits_for_tests {
            sched.set_block_hash_bits_for_tests(bits);
        }
        Ok(sched)
    }

    /// Starts the step loop: `sched` hands out the blocks `runner`'s KV cache holds.
    fn launch(
        model: LoadedModel,
        config: EngineConfig,
        runner: Runner,
        sched: Scheduler,
        block_bytes: usize,
        threads: usize,
        kernels: &'static str,
    ) -> Result<Engine, EngineError> {
        let mc = model.model.config().clone();
        let max_len = sched.max_len();
        let num_blocks = sched.kv().pool().total();
        let info = ModelInfo {
            name: model.name.clone(),
            vocab_size: mc.vocab_size,
            max_model_len: max_len,
            block_size: config.block_size,
            num_blocks,
            block_bytes,
            threads,
            kernels,
        };
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        let pending = Arc::new(AtomicUsize::new(0));
        let heartbeat = Arc::new(Heartbeat::new());
        let (tx, rx) = std::sync::mpsc::channel();
        let mut lp = Loop {
            rx,
            heartbeat: Arc::clone(&heartbeat),
            steps: 0,
            fault_panic_at_step: config.fault_panic_at_step,
            sched,
            runner,
            tokenizer: model.tokenizer.clone(),
            stop_ids: model.tokenizer.stop_ids(),
            reqs: HashMap::new(),
            sampler: Sampler::new(),
            observer: None,
            stats: stats.clone(),
            pending: pending.clone(),
            rejected: 0,
            speed: StepSpeed::default(),
            room_released: 0,
            block_bytes,
            top: Vec::new(),
            penalized: Vec::new(),
            sampled: Vec::new(),
            logit_ids: Vec::new(),
            model: model.model.clone(),
            holds: Vec::new(),
            next_hold: 1,
            hold_reqs: Vec::new(),
            acks: Vec::new(),
        };
        lp.publish(false);
        let handle = std::thread::Builder::new()
            .name("kvroute-engine".into())
            .spawn(move || lp.run())
            .map_err(|e| EngineError::Config(format!("cannot start the engine thread: {e}")))?;
        Ok(Engine {
            shared: Arc::new(Shared {
                tx: Mutex::new(Some(tx)),
                next_id: AtomicU64::new(1),
                pending,
                stats,
                info,
                tokenizer: model.tokenizer,
                chat_template: model.chat_template,
                config: mc,
                max_pending: config.max_pending.max(1),
                thread: Mutex::new(Some(handle)),
                heartbeat,
                failure: std::sync::OnceLock::new(),
            }),
        })
    }

    fn send(&self, cmd: Cmd) -> Result<(), EngineError> {
        let tx = self.shared.tx.lock().unwrap_or_else(|p| p.into_inner());
        match tx.as_ref() {
            Some(tx) => tx.send(cmd).map_err(|_| EngineError::Shutdown),
            None => Err(EngineError::Shutdown),
        }
    }

    /// Queues a request; its events go to `sink` (on the engine thread).
    pub fn add_request(
        &self,
        req: GenerateRequest,
        sink: EventSink,
    ) -> Result<RequestId, EngineError> {
        let p = &req.params;
        let bad = |m: String| Err(EngineError::InvalidRequest(m));
        if p.max_tokens == 0 {
            return bad("max_tokens must be at least 1".into());
        }
        if !(0.0..=2.0).contains(&p.temperature) || p.temperature.is_nan() {
            return bad(format!("temperature {} is outside 0..=2", p.temperature));
        }
        if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            return bad(format!("top_p {} is outside (0, 1]", p.top_p));
        }
        if p.logprobs.is_some_and(|n| n > 20) {
            return bad("logprobs must be at most 20".into());
        }
        for (name, v) in [
            ("presence_penalty", p.presence_penalty),
            ("frequency_penalty", p.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(format!("{name} {v} is outside [-2, 2]"));
            }
        }
        if p.stop.iter().any(|s| s.is_empty()) {
            return bad("stop strings must not be empty".into());
        }
        let vocab = self.shared.info.vocab_size;
        let prompt = match req.prompt {
            Prompt::Text(t) => self
                .shared
                .tokenizer
                .encode(&t, true)
                .map_err(|e| EngineError::InvalidRequest(format!("cannot tokenize: {e}")))?,
            Prompt::Tokens(t) => {
                if let Some(bad_id) = t.iter().find(|&&id| id as usize >= vocab) {
                    return bad(format!(
                        "token id {bad_id} is outside the vocabulary ({vocab})"
                    ));
                }
                t
            }
        };
        if prompt.is_empty() {
            return bad("the prompt is empty".into());
        }
        let info = &self.shared.info;
        if prompt.len() >= info.max_model_len {
            return bad(format!(
                "the prompt has {} tokens; this model accepts at most {} (max_model_len {} leaves room for one generated token)",
                prompt.len(),
                info.max_model_len - 1,
                info.max_model_len
            ));
        }
        let need_blocks = (prompt.len() + 1).div_ceil(info.block_size);
        if need_blocks > info.num_blocks {
            return bad(format!(
                "the prompt needs {need_blocks} KV blocks; the cache has {} in all",
                info.num_blocks
            ));
        }
        let pending = self.shared.pending.fetch_add(1, Ordering::SeqCst);
        if pending >= self.shared.max_pending {
            self.shared.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Overloaded);
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let sent = self.send(Cmd::Add {
            id,
            prompt,
            params: req.params,
            cache_key: req.cache_key,
            hold: req.hold,
            dispatch: req.dispatch,
            only_with_room: req.only_with_room,
            sink,
        });
        if sent.is_err() {
            self.shared.pending.fetch_sub(1, Ordering::SeqCst);
        }
        sent.map(|()| id)
    }

    /// Ends a request early (its sink gets `Finished { reason: Abort }`); frees its blocks.
    /// Unknown or finished ids are ignored.
    pub fn abort(&self, id: RequestId) {
        let _ = self.send(Cmd::Abort(id));
    }

    /// Holds the leading cached blocks of `hashes` (chained block hashes) for at most `ttl`, so
    /// they are not evicted before a request that will reuse them arrives (a router holds the
    /// prefix of a request that waits for room here). Takes at most `max_free` free (evictable)
    /// blocks, and only room no live request is promised, so it never makes the engine preempt
    /// (a router passes the room its own reservations leave). `reply` gets the hold's id and the blocks
    /// held (0: nothing held, no hold kept), on the engine thread. A request naming the hold in
    /// [`GenerateRequest::hold`] lets it go once admitted; [`Self::release_hold`] earlier.
    pub fn hold_prefix(
        &self,
        hashes: Vec<u64>,
        max_free: usize,
        ttl: std::time::Duration,
        reply: HoldReply,
    ) -> Result<(), EngineError> {
        self.send(Cmd::Hold {
            hashes,
            max_free,
            ttl,
            reply,
        })
    }

    /// Lets a prefix hold go (unknown or expired ids are ignored).
    pub fn release_hold(&self, id: u64) {
        let _ = self.send(Cmd::Release(id));
    }

    /// Counters and capacity as of the last step.
    pub fn stats(&self) -> EngineStats {
        *self.shared.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Installs the capacity observer (replacing any previous one); it is called once right away
    /// with the current state, then after every change.
    pub fn set_capacity_observer(&self, observer: CapacityObserver) {
        let _ = self.send(Cmd::Observer(observer));
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.shared.tokenizer
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.shared.chat_template.as_ref()
    }

    pub fn info(&self) -> &ModelInfo {
        &self.shared.info
    }

    pub fn model_config(&self) -> &ModelConfig {
        &self.shared.config
    }

    /// Stops the step loop: running and waiting requests end with `Finished { Abort }`. Waits for
    /// the thread; later calls (and calls on clones) do nothing.
    /// Why this engine can no longer serve, if it cannot: its thread ended without
    /// [`Self::shutdown`] (a panic: the message is given), or it has had requests pending
    /// without a step for [`STUCK_AFTER`]. Cheap; call it periodically.
    pub fn failure(&self) -> Option<String> {
        if let Some(f) = self.shared.failure.get() {
            return Some(f.clone());
        }
        let asked_to_stop = self
            .shared
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none();
        if asked_to_stop {
            return None;
        }
        let mut thread = self.shared.thread.lock().unwrap_or_else(|p| p.into_inner());
        if thread.as_ref().is_some_and(|h| h.is_finished()) {
            let why = match thread.take().map(|h| h.join()) {
                Some(Err(p)) => format!("the engine thread panicked: {}", panic_text(&*p)),
                _ => "the engine thread stopped".to_string(),
            };
            return Some(self.shared.failure.get_or_init(|| why).clone());
        }
        drop(thread);
        let pending = self.shared.pending.load(Ordering::Relaxed);
        match self.shared.heartbeat.silent_for() {
            Some(d) if pending > 0 && d >= STUCK_AFTER => Some(format!(
                "the engine has not stepped for {} s with {pending} requests pending",
                d.as_secs()
            )),
            _ => None,
        }
    }

    pub fn shutdown(&self) {
        let tx = self
            .shared
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(tx) = tx {
            let _ = tx.send(Cmd::Shutdown);
        }
        let handle = self
            .shared
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!("the engine thread panicked");
            }
        }
    }
}

/// Per-request state on the engine thread.
struct Req {
    params: SamplingParams,
    sink: EventSink,
    rng: Rng,
    decoder: StreamDecoder,
    /// Decoded text not yet sent because it could be the start of a stop string.
    held: String,
    prompt_tokens: u32,
    generated: u32,
    /// Log-probability of the token just sampled and its alternatives (when asked for).
    held_logprob: Option<f32>,
    top: Vec<(u32, f32)>,
    /// Times each token was generated (only with penalties).
    counts: HashMap<u32, u32>,
}

struct Loop {
    rx: Receiver<Cmd>,
    sched: Scheduler,
    runner: Runner,
    model: Arc<Model>,
    tokenizer: Tokenizer,
    stop_ids: Vec<u32>,
    reqs: HashMap<RequestId, Req>,
    sampler: Sampler,
    observer: Option<CapacityObserver>,
    stats: Arc<Mutex<EngineStats>>,
    pending: Arc<AtomicUsize>,
    rejected: u64,
    speed: StepSpeed,
    room_released: u64,
    block_bytes: usize,
    top: Vec<(u32, f32)>,
    /// Logits with penalties applied (reused).
    penalized: Vec<f32>,
    sampled: Vec<(u64, u32)>,
    logit_ids: Vec<u64>,
    /// Prefix holds: (id, expiry), oldest first.
    holds: Vec<(u64, std::time::Instant)>,
    next_hold: u64,
    /// Requests that came with a hold not yet let go: (request, hold).
    hold_reqs: Vec<(RequestId, u64)>,
    /// Dispatches taken in since the last capacity update.
    acks: Vec<Dispatch>,
    heartbeat: Arc<Heartbeat>,
    /// Steps that ran a batch.
    steps: u64,
    fault_panic_at_step: Option<u64>,
}

/// How a request ends after a token.
enum Outcome {
    Continue,
    Finish(FinishReason),
}

impl Loop {
    fn run(mut self) {
        loop {
            let mut changed = false;
            // Take commands: block while idle, otherwise just drain.
            if self.sched.is_empty() {
                self.heartbeat.idle();
                let cmd = match self.holds.iter().map(|h| h.1).min() {
                    // Wake for the first hold's expiry.
                    Some(t) => match self
                        .rx
                        .recv_timeout(t.saturating_duration_since(std::time::Instant::now()))
                    {
                        Ok(cmd) => Some(cmd),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                            return self.stop_all()
                        }
                    },
                    None => match self.rx.recv() {
                        Ok(cmd) => Some(cmd),
                        Err(_) => return self.stop_all(),
                    },
                };
                self.heartbeat.beat();
                if let Some(cmd) = cmd {
                    if !self.handle(cmd, &mut changed) {
                        return self.stop_all();
                    }
                }
            }
            self.heartbeat.beat();
            loop {
                match self.rx.try_recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd, &mut changed) {
                            return self.stop_all();
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return self.stop_all(),
                }
            }
            if !self.sched.is_empty() {
                self.step();
                changed = true;
            }
            changed |= self.let_go_holds();
            if changed {
                self.publish(true);
            }
        }
    }

    /// Applies a command; false on shutdown.
    fn handle(&mut self, cmd: Cmd, changed: &mut bool) -> bool {
        match cmd {
            Cmd::Add {
                id,
                prompt,
                params,
                cache_key,
                hold,
                dispatch,
                only_with_room,
                mut sink,
            } => {
                *changed = true;
                // Taken in (accepted or refused below): the next update's counters include it.
                if let Some(d) = dispatch {
                    self.acks.push(d);
                }
                if let Some(h) = hold {
                    self.hold_reqs.push((id, h));
                }
                if only_with_room {
                    let extra = cache_key.as_deref().unwrap_or_default().as_bytes();
                    let (need, room) = self.sched.room_for(&prompt, params.max_tokens, extra);
                    if need > room {
                        self.rejected += 1;
                        self.pending.fetch_sub(1, Ordering::SeqCst);
                        self.hold_reqs.retain(|&(r, _)| r != id);
                        // The router routes it again without the hold (and asks for a new one
                        // if it waits here): kept, it would pin its blocks until its TTL.
                        if let Some(h) = hold {
                            self.end_hold(h);
                        }
                        sink(EngineEvent::NoRoom {
                            need: need as u64,
                            room: room as u64,
                        });
                        return true;
                    }
                }
                let prompt_tokens = prompt.len() as u32;
                let spec = SeqSpec {
                    id,
                    prompt,
                    max_tokens: params.max_tokens,
                    extra_key: cache_key.map(String::into_bytes).unwrap_or_default(),
                };
                if let Err(e) = self.sched.add(spec) {
                    self.rejected += 1;
                    self.pending.fetch_sub(1, Ordering::SeqCst);
                    let msg = match e {
                        SchedError::PromptTooLong { .. } => e.to_string(),
                        other => format!("request rejected: {other}"),
                    };
                    sink(EngineEvent::Error(msg));
                    return true;
                }
                if !sink(EngineEvent::Started { id, prompt_tokens }) {
                    self.end_aborted(id, None);
                    return true;
                }
                let seed = params.seed.unwrap_or_else(Rng::random_seed);
                self.reqs.insert(
                    id,
                    Req {
                        rng: Rng::new(seed),
                        decoder: self.tokenizer.stream_decoder(),
                        held: String::new(),
                        prompt_tokens,
                        generated: 0,
                        held_logprob: None,
                        counts: HashMap::new(),
                        top: Vec::new(),
                        params,
                        sink,
                    },
                );
            }
            Cmd::Abort(id) => {
                if let Some(r) = self.reqs.remove(&id) {
                    *changed = true;
                    self.end_aborted(id, Some(r));
                }
            }
            Cmd::Observer(mut o) => {
                o(&CapacityUpdate {
                    stats: self.current_stats(),
                    events: Vec::new(),
                    acks: Vec::new(),
                });
                self.observer = Some(o);
            }
            Cmd::Hold {
                hashes,
                max_free,
                ttl,
                reply,
            } => {
                let id = self.next_hold;
                self.next_hold += 1;
                if self.holds.len() >= MAX_HOLDS {
                    let (old, _) = self.holds.remove(0);
                    self.sched.release_hold(old);
                }
                let n = self.sched.hold_prefix(id, &hashes, max_free);
                if n > 0 {
                    self.holds.push((id, std::time::Instant::now() + ttl));
                    *changed = true;
                }
                reply(id, n);
            }
            Cmd::Release(id) => *changed |= self.end_hold(id),
            Cmd::Shutdown => return false,
        }
        true
    }

    /// Lets hold `id` go now; false when it was not kept.
    fn end_hold(&mut self, id: u64) -> bool {
        let kept = self.sched.release_hold(id);
        if kept {
            self.holds.retain(|h| h.0 != id);
        }
        kept
    }

    /// Lets go the holds that expired and those whose request was admitted (it holds the
    /// blocks itself now) or ended. True when any was let go.
    fn let_go_holds(&mut self) -> bool {
        if self.holds.is_empty() && self.hold_reqs.is_empty() {
            return false;
        }
        let now = std::time::Instant::now();
        let mut any = false;
        let sched = &mut self.sched;
        self.hold_reqs.retain(|&(req, hold)| {
            if sched.is_running(req) == Some(false) {
                // Still waiting for its blocks.
                return true;
            }
            any |= sched.release_hold(hold);
            false
        });
        self.holds.retain(|&(id, expiry)| {
            if expiry <= now {
                any |= sched.release_hold(id);
                return false;
            }
            sched.has_hold(id)
        });
        any
    }

    /// Aborts `id` in the scheduler and tells its sink (if it still has one).
    fn end_aborted(&mut self, id: RequestId, req: Option<Req>) {
        let before = self.room();
        let usage = self.sched.abort(id).ok();
        self.room_released += self.room().saturating_sub(before);
        self.pending.fetch_sub(1, Ordering::SeqCst);
        self.refresh();
        if let Some(mut r) = req {
            let usage = Usage {
                prompt_tokens: r.prompt_tokens,
                completion_tokens: r.generated,
                cached_tokens: usage.map_or(0, |u| u.cached_tokens as u32),
            };
            (r.sink)(EngineEvent::Finished {
                reason: FinishReason::Abort,
                usage,
            });
        }
    }

    fn stop_all(mut self) {
        let ids: Vec<RequestId> = self.reqs.keys().copied().collect();
        for id in ids {
            let r = self.reqs.remove(&id);
            self.end_aborted(id, r);
        }
        self.publish(true);
    }

    fn step(&mut self) {
        let view = self.sched.schedule();
        let copies = view.copies();
        if !copies.is_empty() {
            let started = std::time::Instant::now();
            let copied = self.runner.copy_blocks(copies);
            self.speed.record_copies(
                started.elapsed().as_secs_f64(),
                copies.offload.len() + copies.reload.len(),
            );
            if let Err(e) = copied {
                // The blocks involved may hold wrong KV now: forget the cache and end the
                // step's requests, like a failed forward pass.
                let ids: Vec<RequestId> = view.plan().seqs().iter().map(|s| s.id).collect();
                let _ = self.sched.complete_step(&[]);
                self.sched.reset_prefix_cache();
                tracing::error!(error = %e, "KV host-tier copy failed; ending the step's requests");
                for id in ids {
                    if let Some(mut r) = self.reqs.remove(&id) {
                        (r.sink)(EngineEvent::Error(format!("KV copy error: {e}")));
                        let _ = self.sched.abort(id);
                        self.pending.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                return;
            }
        }
        if view.is_empty() {
            return;
        }
        self.steps += 1;
        if self.fault_panic_at_step == Some(self.steps) {
            panic!("injected fault at step {}", self.steps);
        }
        let seqs = view.plan().seqs();
        let mut inputs = Vec::with_capacity(seqs.len());
        self.logit_ids.clear();
        for s in seqs {
            inputs.push(SeqInput {
                tokens: view.tokens(s),
                start_pos: s.start,
                block_table: view.block_table(s),
                want_logits: s.sample,
            });
            if s.sample {
                self.logit_ids.push(s.id);
            }
        }
        let vocab = self.model.config().vocab_size;
        self.sampled.clear();
        let reqs = &self.reqs;
        let greedy = self.runner.greedy_on_device()
            && self
                .logit_ids
                .iter()
                .all(|id| reqs.get(id).is_none_or(|r| is_greedy(&r.params)));
        let prefill_tokens: usize = inputs
            .iter()
            .filter(|i| i.tokens.len() > 1)
            .map(|i| i.tokens.len())
            .sum();
        let decode_seqs = inputs.iter().filter(|i| i.tokens.len() == 1).count();
        let decode_kv_tokens: usize = inputs
            .iter()
            .filter(|i| i.tokens.len() == 1)
            .map(|i| i.start_pos + 1)
            .sum();
        let started = std::time::Instant::now();
        let result = if greedy {
            match self.runner.step_greedy(&inputs) {
                Ok(ids) if ids.len() != self.logit_ids.len() => {
                    Err(StepError::Model(ModelError::Batch(format!(
                        "{} greedy tokens for {} sequences",
                        ids.len(),
                        self.logit_ids.len()
                    ))))
                }
                Ok(ids) => {
                    for (&tok, &id) in ids.iter().zip(&self.logit_ids) {
                        if self.reqs.contains_key(&id) {
                            self.sampled.push((id, tok));
                        }
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            }
        } else {
            // Sampled on the host from logits copied back.
            match self.runner.step(&inputs) {
                Ok(logits) => {
                    for (row, &id) in logits.chunks_exact(vocab).zip(&self.logit_ids) {
                        let Some(r) = self.reqs.get_mut(&id) else {
                            continue;
                        };
                        let tok = if r.params.has_penalties() {
                            let p = &r.params;
                            self.penalized.clear();
                            self.penalized.extend_from_slice(row);
                            for (&t, &n) in &r.counts {
                                if let Some(l) = self.penalized.get_mut(t as usize) {
                                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                                }
                            }
                            let tok = self.sampler.sample(&self.penalized, p, &mut r.rng);
                            *r.counts.entry(tok).or_insert(0) += 1;
                            tok
                        } else {
                            self.sampler.sample(row, &r.params, &mut r.rng)
                        };
                        self.sampled.push((id, tok));
                        if let Some(n) = r.params.logprobs {
                            let lp = self.sampler.logprobs(row, tok, n as usize, &mut self.top);
                            // Stashed until the token event is built below.
                            r.held_logprob = Some(lp);
                            r.top.clear();
                            r.top.extend_from_slice(&self.top);
                        }
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            }
        };
        if let Err(e) = result {
            drop(inputs);
            let _ = self.sched.complete_step(&[]);
            tracing::error!(error = %e, "model step failed; ending the step's requests");
            let ids = std::mem::take(&mut self.logit_ids);
            for id in ids {
                if let Some(mut r) = self.reqs.remove(&id) {
                    (r.sink)(EngineEvent::Error(format!("model error: {e}")));
                    let _ = self.sched.abort(id);
                    self.pending.fetch_sub(1, Ordering::SeqCst);
                }
            }
            return;
        }
        drop(inputs);
        self.speed.record(
            started.elapsed().as_secs_f64(),
            prefill_tokens,
            decode_seqs,
            decode_kv_tokens,
        );
        if let Err(e) = self.sched.complete_step(&self.sampled) {
            tracing::warn!(error = %e, "scheduler refused a sampled token");
        }
        let sampled = std::mem::take(&mut self.sampled);
        for &(id, tok) in &sampled {
            self.emit(id, tok);
        }
        self.sampled = sampled;
    }

    /// Streams one sampled token and ends the request when it should.
    fn emit(&mut self, id: RequestId, tok: u32) {
        let capped = self.sched.is_length_capped(id).unwrap_or(true);
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        r.generated += 1;
        let is_stop_token = r.params.stop_token_ids.contains(&tok)
            || (!r.params.ignore_eos && self.stop_ids.contains(&tok));
        let mut text = String::new();
        let mut outcome = Outcome::Continue;
        if is_stop_token {
            // The stop token's own text is not output; what was held back is.
            text.push_str(&std::mem::take(&mut r.held));
            outcome = Outcome::Finish(FinishReason::Stop);
        } else {
            let delta = r.decoder.push(tok);
            r.held.push_str(&delta);
            if let Some(at) = find_stop(&r.held, &r.params.stop) {
                text.push_str(&r.held[..at]);
                r.held.clear();
                outcome = Outcome::Finish(FinishReason::Stop);
            } else if capped {
                text.push_str(&std::mem::take(&mut r.held));
                text.push_str(&r.decoder.finish());
                outcome = Outcome::Finish(FinishReason::Length);
            } else {
                let keep = stop_prefix_len(&r.held, &r.params.stop);
                let cut = r.held.len() - keep;
                text.push_str(&r.held[..cut]);
                r.held.drain(..cut);
            }
        }
        let (logprob, top_logprobs) = match r.held_logprob.take() {
            Some(lp) => (
                Some(lp),
                r.top
                    .iter()
                    .map(|&(t, l)| TokenLogprob {
                        token: t,
                        text: self.tokenizer.decode(&[t]),
                        logprob: l,
                    })
                    .collect(),
            ),
            None => (None, Vec::new()),
        };
        let alive = (r.sink)(EngineEvent::Token(TokenEvent {
            token: tok,
            text,
            logprob,
            top_logprobs,
        }));
        match outcome {
            Outcome::Finish(reason) => self.finish(id, reason),
            Outcome::Continue if !alive => {
                let r = self.reqs.remove(&id);
                self.end_aborted(id, r);
            }
            Outcome::Continue => {}
        }
    }

    fn finish(&mut self, id: RequestId, reason: FinishReason) {
        let Some(mut r) = self.reqs.remove(&id) else {
            return;
        };
        let before = self.room();
        let usage = self.sched.finish(id).ok();
        self.room_released += self.room().saturating_sub(before);
        self.pending.fetch_sub(1, Ordering::SeqCst);
        // Stats show the freed blocks by the time the client sees the end.
        self.refresh();
        (r.sink)(EngineEvent::Finished {
            reason,
            usage: Usage {
                prompt_tokens: r.prompt_tokens,
                completion_tokens: r.generated,
                cached_tokens: usage.map_or(0, |u| u.cached_tokens as u32),
            },
        });
    }

    fn current_stats(&self) -> EngineStats {
        let s = self.sched.stats();
        let fit = self.speed.decode_fit();
        EngineStats {
            capacity: s.capacity,
            running: s.running,
            waiting: s.waiting,
            requests_received: s.requests_received + self.rejected,
            preemptions: s.preemptions,
            prefix_query_tokens: s.capacity.prefix_query_tokens,
            prefix_hit_tokens: s.capacity.prefix_hit_tokens,
            waiting_prompt_blocks: s.waiting_prompt_blocks,
            running_prefill_tokens: s.running_prefill_tokens,
            committed_blocks: s.committed_blocks,
            max_model_len: self.sched.max_len(),
            block_bytes: self.block_bytes,
            prefill_tokens_per_s: self.speed.prefill_tokens_per_s.round() as u32,
            decode_step_us: (self.speed.decode_step_s * 1e6).round() as u32,
            decode_batch: self.speed.decode_batch.round() as u32,
            decode_step_per_seq_ns: (fit.per_seq_s * 1e9).round() as u32,
            decode_step_per_kv_token_ps: (fit.per_token_s * 1e12).round().min(f64::from(u32::MAX))
                as u32,
            running_kv_tokens: s.running_kv_tokens,
            room_released_blocks: self.room_released,
            kv_copy_block_ns: (self.speed.copy_block_s * 1e9)
                .round()
                .min(f64::from(u32::MAX)) as u32,
        }
    }

    /// Blocks free and not promised to a live request (what the capacity report calls free).
    fn room(&self) -> u64 {
        let s = self.sched.stats();
        s.capacity.free.saturating_sub(s.committed_blocks as u64)
    }

    /// Updates the stats [`Engine::stats`] returns.
    fn refresh(&self) -> EngineStats {
        let stats = self.current_stats();
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) = stats;
        stats
    }

    /// Refreshes the shared stats and tells the observer (with the block events since last time).
    fn publish(&mut self, notify: bool) {
        let stats = self.refresh();
        let events = self.sched.take_events();
        let acks = std::mem::take(&mut self.acks);
        if notify {
            if let Some(o) = self.observer.as_mut() {
                o(&CapacityUpdate {
                    stats,
                    events,
                    acks,
                });
            }
        }
    }
}

/// Byte offset of the earliest occurrence of any stop string in `text`.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// Length of the longest suffix of `text` that is a proper prefix of some stop string (text that
/// must be held back because the next token could complete a stop string).
fn stop_prefix_len(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        let max = (s.len() - 1).min(text.len());
        for k in (best + 1..=max).rev() {
            let start = text.len() - k;
            if text.is_char_boundary(start) && s.starts_with(&text[start..]) {
                best = k;
                break;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_fit_finds_the_cost_of_one_more_sequence() {
        let mut s = StepSpeed::default();
        // Unvaried batches say nothing about the slope.
        for _ in 0..50 {
            s.record(0.008 + 40e-6 * 8.0, 0, 8, 8 * 300);
        }
        assert_eq!(s.decode_per_seq_s(), 0.0);
        // A GPU-like step: 8 ms fixed plus 40 µs per sequence, batches 1..=64.
        for i in 0..400 {
            let b = 1 + (i * 7) % 64;
            s.record(0.008 + 40e-6 * b as f64, 0, b, b * 300);
        }
        let slope = s.decode_per_seq_s();
        assert!((slope - 40e-6).abs() < 2e-6, "{slope}");
        // Mixed steps (with prefill) do not feed the fit.
        s.record(5.0, 4096, 3, 900);
        assert!((s.decode_per_seq_s() - slope).abs() < 1e-12);
        // Bad samples are ignored.
        s.record(f64::NAN, 0, 10, 3000);
        s.record(-1.0, 0, 10, 3000);
        assert!((s.decode_per_seq_s() - slope).abs() < 1e-12);
        // A CPU-like step, cost proportional to (2 + b): the slope follows once it has seen it.
        let mut c = StepSpeed::default();
        for i in 0..400 {
            let b = 1 + i % 16;
            c.record(0.005 * (2.0 + b as f64), 0, b, b * 300);
        }
        assert!(
            (c.decode_per_seq_s() - 0.005).abs() < 1e-4,
            "{}",
            c.decode_per_seq_s()
        );
        // Batches of like lengths: the KV tokens add nothing the batch size does not say.
        assert_eq!(s.decode_fit().per_token_s, 0.0);
    }

    #[test]
    fn decode_fit_tells_the_kv_read_from_the_batch_size() {
        // A GPU-like step: 8 ms of weights plus 40 ns per KV token read; the batch size itself
        // costs nothing. Batches of 1..=64 sequences of 100..=4,000 tokens each.
        let mut g = StepSpeed::default();
        for i in 0..600usize {
            let b = 1 + (i * 7) % 64;
            let c = b * (100 + (i * 131) % 3_900);
            g.record(0.008 + 40e-9 * c as f64, 0, b, c);
        }
        let fit = g.decode_fit();
        assert!((fit.per_token_s - 40e-9).abs() < 1e-9, "{fit:?}");
        assert!(fit.per_seq_s < 1e-6, "{fit:?}");
        // A CPU-like step: 5 ms per sequence (and two of overhead) plus 10 ns per KV token.
        let mut c = StepSpeed::default();
        for i in 0..600usize {
            let b = 1 + i % 16;
            let kv = b * (50 + (i * 97) % 1_000);
            c.record(0.005 * (2.0 + b as f64) + 10e-9 * kv as f64, 0, b, kv);
        }
        let fit = c.decode_fit();
        assert!((fit.per_seq_s - 0.005).abs() < 1e-4, "{fit:?}");
        assert!((fit.per_token_s - 10e-9).abs() < 1e-9, "{fit:?}");
        // Lengths that vary while the batch does not: the slope is all on the tokens.
        let mut t = StepSpeed::default();
        for i in 0..300usize {
            let kv = 8 * (100 + (i * 37) % 500);
            t.record(0.002 + 20e-9 * kv as f64, 0, 8, kv);
        }
        let fit = t.decode_fit();
        assert!((fit.per_token_s - 20e-9).abs() < 1e-9, "{fit:?}");
        assert_eq!(fit.per_seq_s, 0.0);
        // Times that shrink as either grows (noise, another load on the machine): no negative
        // slope comes out.
        let mut n = StepSpeed::default();
        for i in 0..300usize {
            let b = 1 + i % 16;
            let kv = b * (100 + (i * 37) % 500);
            n.record(1.0 / (b as f64 + kv as f64), 0, b, kv);
        }
        let fit = n.decode_fit();
        assert!(fit.per_seq_s >= 0.0 && fit.per_token_s >= 0.0, "{fit:?}");
    }

    #[test]
    fn only_plain_greedy_requests_take_the_device_argmax() {
        let p = |temperature: f32, top_k: u32, logprobs: Option<u32>| SamplingParams {
            temperature,
            top_k,
            logprobs,
            ..SamplingParams::default()
        };
        assert!(is_greedy(&p(0.0, 0, None)));
        assert!(is_greedy(&p(0.7, 1, None)));
        assert!(!is_greedy(&p(0.7, 0, None)));
        assert!(!is_greedy(&p(0.7, 40, None)));
        // Log-probabilities need the whole row on the host.
        assert!(!is_greedy(&p(0.0, 0, Some(0))));
        let cfg = ModelConfig {
            arch: crate::config::Arch::Llama,
            vocab_size: 96,
            hidden_size: 64,
            intermediate_size: 96,
            num_layers: 1,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            rope_theta: 10_000.0,
            rope_style: crate::config::RopeStyle::Interleaved,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
        };
        let w =
            crate::kernels::reference::SyntheticWeights::new(&cfg, 1, crate::quant::GgmlType::F32);
        let model = Model::new(Arc::new(w), cfg).unwrap();
        let mut cpu = Runner::Cpu(CpuRunner::new(Arc::new(model), 4, 4, 8, 1).unwrap());
        assert!(!cpu.greedy_on_device());
        // Asked anyway, the CPU runner refuses rather than guessing.
        let tokens = [1u32, 2];
        let input = [SeqInput {
            tokens: &tokens,
            start_pos: 0,
            block_table: &[0],
            want_logits: true,
        }];
        assert!(cpu.step_greedy(&input).is_err());
        assert_eq!(cpu.step(&input).unwrap().len(), 96);
    }

    #[test]
    fn stop_helpers() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(find_stop("abc\n\nx", &stops), Some(3));
        assert_eq!(find_stop("abENDc\n\n", &stops), Some(2));
        assert_eq!(find_stop("abc", &stops), None);
        assert_eq!(stop_prefix_len("abc\n", &stops), 1);
        assert_eq!(stop_prefix_len("abcEN", &stops), 2);
        assert_eq!(stop_prefix_len("abcE", &stops), 1);
        assert_eq!(stop_prefix_len("abc", &stops), 0);
        assert_eq!(stop_prefix_len("é", &["éa".to_string()]), 2);
    }
}
