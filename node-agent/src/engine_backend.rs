//! kvroute's own engine behind [`InferenceBackend`], and model loading for the subcommands.
//!
//! Loading: `--model default|PATH` is resolved by `engine::fetch` (the default model is fetched
//! and verified into the cache, with a progress bar on a terminal), loaded by `engine::load`
//! (memory-mapped weights, tokenizer, chat template) and started as an `engine::runtime::Engine`
//! with the KV budget from the flags. `tokenize` needs only the text side ([`ModelText`]).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use indicatif::{ProgressBar, ProgressStyle};
use kvroute_engine::chat::{ChatMessage as EngineChatMessage, ChatTemplate};
use kvroute_engine::fetch::{self, ModelFormat, ModelRef, Progress, ResolvedModel};
use kvroute_engine::gguf::Gguf;
use kvroute_engine::tokenizer::Tokenizer;

use kvroute_engine::api::{EventSink, GenerateRequest, RequestId};
use kvroute_engine::kv::BlockEvent;
use kvroute_engine::load::LoadedModel;
use kvroute_engine::runtime::{Engine, EngineConfig, EngineDevice, EngineError, EngineStats};

use crate::backend::{
    CacheEvent, CapacityObserver, CapacityStats, CapacityUpdate, ChatMessage, InferenceBackend,
    ModelInfo, SubmitError, TextError,
};
use crate::config::{Device, KvBudget, ServeConfig};

/// Loading failures.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("--model {model:?}: {cause}")]
    Fetch {
        model: String,
        cause: fetch::FetchError,
    },
    #[error("reading {path}: {why}")]
    Read { path: PathBuf, why: String },
    #[error("the tokenizer of {path}: {cause}")]
    Tokenizer {
        path: PathBuf,
        cause: kvroute_engine::tokenizer::TokenizerError,
    },
    #[error("loading {path}: {cause}")]
    Load {
        path: PathBuf,
        cause: kvroute_engine::load::LoadError,
    },
    #[error("starting the engine: {0}")]
    Start(kvroute_engine::runtime::EngineError),
    #[error("{flag}: {why}")]
    Unsupported { flag: &'static str, why: String },
}

/// Renders fetch progress: an indicatif bar on a terminal, log lines otherwise.
struct FetchProgress {
    bar: Mutex<Option<ProgressBar>>,
    terminal: bool,
}

impl FetchProgress {
    fn new() -> Self {
        Self {
            bar: Mutex::new(None),
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn finish(&self) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            b.finish_and_clear();
        }
    }
}

impl Progress for FetchProgress {
    fn stage(&self, name: &str) {
        tracing::info!(stage = name, "model");
        if self.terminal {
            let mut slot = self.bar.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(b) = slot.take() {
                b.finish_and_clear();
            }
            let b = ProgressBar::new(0);
            let style = ProgressStyle::with_template(
                "{msg:>24} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
            )
            .map(|s| s.progress_chars("=> "));
            if let Ok(style) = style {
                b.set_style(style);
            }
            b.set_message(name.to_string());
            *slot = Some(b);
        }
    }

    fn message(&self, line: &str) {
        tracing::debug!(line, "fetch");
    }

    fn bytes(&self, done: u64, total: Option<u64>) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            if let Some(t) = total {
                b.set_length(t);
            }
            b.set_position(done);
        }
    }
}

/// Finds the model `--model` names, fetching the default model into the cache if needed.
pub fn resolve(model: &str, cache_dir: Option<&Path>) -> Result<ResolvedModel, LoadError> {
    let fetch_err = |cause| LoadError::Fetch {
        model: model.to_string(),
        cause,
    };
    let r: ModelRef = model.parse().map_err(fetch_err)?;
    let cache = match cache_dir {
        Some(c) => c.to_path_buf(),
        None => fetch::cache_dir().map_err(fetch_err)?,
    };
    let progress = FetchProgress::new();
    let resolved = fetch::resolve(&r, &cache, &progress);
    progress.finish();
    resolved.map_err(fetch_err)
}

/// The text side of a model: tokenizer and chat template.
pub struct ModelText {
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
}

impl ModelText {
    pub fn load(model: &ResolvedModel) -> Result<Self, LoadError> {
        let tok_err = |cause| LoadError::Tokenizer {
            path: model.path.clone(),
            cause,
        };
        let tokenizer = match model.format {
            ModelFormat::Gguf => {
                let g = Gguf::open(&model.path).map_err(|e| LoadError::Read {
                    path: model.path.clone(),
                    why: e.to_string(),
                })?;
                Tokenizer::from_gguf(&g).map_err(tok_err)?
            }
            ModelFormat::Safetensors => {
                let cfg = model.path.join("tokenizer_config.json");
                Tokenizer::from_hf_files(
                    &model.path.join("tokenizer.json"),
                    cfg.exists().then_some(cfg.as_path()),
                )
                .map_err(tok_err)?
            }
        };
        let template = match ChatTemplate::from_tokenizer(&tokenizer) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(error = %e, "no usable chat template; /v1/chat/completions will answer 400");
                None
            }
        };
        Ok(Self {
            tokenizer,
            template,
        })
    }

    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TextError> {
        self.tokenizer
            .encode(text, add_special)
            .map_err(|e| TextError::Tokenize(e.to_string()))
    }

    /// The token ids of a rendered chat prompt: special tokens recognised; a BOS the template
    /// already wrote is not doubled.
    pub fn tokenize_chat(&self, rendered: &str) -> Result<Vec<u32>, TextError> {
        tokenize_chat_with(&self.tokenizer, rendered)
    }

    /// The chat prompt rendered with the model's template.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TextError> {
        render_chat_with(self.template.as_ref(), messages, add_generation_prompt)
    }
}

/// The token ids of a rendered chat prompt: special tokens recognised; a BOS the template
/// already wrote is not doubled.
fn tokenize_chat_with(tok: &Tokenizer, rendered: &str) -> Result<Vec<u32>, TextError> {
    let mut ids = tok
        .encode(rendered, true)
        .map_err(|e| TextError::Tokenize(e.to_string()))?;
    if let (Some(bos), Some(bos_text)) = (tok.bos_id(), tok.bos_token()) {
        if ids.len() >= 2 && ids[0] == bos && ids[1] == bos && rendered.starts_with(&bos_text) {
            ids.remove(0);
        }
    }
    Ok(ids)
}

fn render_chat_with(
    template: Option<&ChatTemplate>,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> Result<String, TextError> {
    let t = template.ok_or_else(|| {
        TextError::ChatTemplate("the model has no chat template; use /v1/completions".into())
    })?;
    let msgs: Vec<EngineChatMessage> = messages
        .iter()
        .map(|m| EngineChatMessage::new(m.role.clone(), m.content.clone()))
        .collect();
    t.render(&msgs, add_generation_prompt)
        .map_err(|e| TextError::ChatTemplate(e.to_string()))
}

/// kvroute's engine behind [`InferenceBackend`].
pub struct EngineBackend {
    engine: Engine,
    info: ModelInfo,
}

fn stats_from(s: &EngineStats) -> CapacityStats {
    CapacityStats {
        block_use_events: true,
        block_size: s.capacity.block_size,
        total_blocks: s.capacity.total,
        free_blocks: s.capacity.free,
        cached_evictable_blocks: s.capacity.cached_evictable,
        committed_blocks: s.committed_blocks as u64,
        running: u32::try_from(s.running).unwrap_or(u32::MAX),
        waiting: u32::try_from(s.waiting).unwrap_or(u32::MAX),
        requests_received: s.requests_received,
        preemptions: s.preemptions,
        prefix_query_tokens: s.prefix_query_tokens,
        prefix_hit_tokens: s.prefix_hit_tokens,
        max_model_len: u32::try_from(s.max_model_len).unwrap_or(u32::MAX),
        block_bytes: s.block_bytes as u64,
        prefill_tokens_per_s: s.prefill_tokens_per_s,
        decode_step_us: s.decode_step_us,
        decode_batch: s.decode_batch,
        decode_step_per_seq_ns: s.decode_step_per_seq_ns,
        decode_step_per_kv_token_ps: s.decode_step_per_kv_token_ps,
        running_kv_tokens: s.running_kv_tokens as u64,
        room_released_blocks: s.room_released_blocks,
        waiting_prefill_tokens: (s.waiting_prompt_blocks as u64)
            .saturating_mul(u64::from(s.capacity.block_size)),
        running_prefill_tokens: s.running_prefill_tokens as u64,
        host_total_blocks: s.capacity.host_total,
        host_used_blocks: s.capacity.host_used,
        offloaded_blocks: s.capacity.offloaded_blocks,
        reloaded_blocks: s.capacity.reloaded_blocks,
        prefix_host_hit_tokens: s.capacity.prefix_host_hit_tokens,
        host_copy_block_ns: s.kv_copy_block_ns,
    }
}

fn event_from(e: &BlockEvent) -> CacheEvent {
    match e {
        BlockEvent::Stored(h) => CacheEvent::Stored(h.clone()),
        BlockEvent::Removed(h) => CacheEvent::Removed(h.clone()),
        BlockEvent::AllCleared => CacheEvent::AllCleared,
        BlockEvent::InUse(h) => CacheEvent::InUse(h.clone()),
        BlockEvent::Evictable(h) => CacheEvent::Evictable(h.clone()),
        BlockEvent::HostStored(h) => CacheEvent::HostStored(h.clone()),
        BlockEvent::HostRemoved(h) => CacheEvent::HostRemoved(h.clone()),
    }
}

impl EngineBackend {
    /// Starts the engine on a loaded model.
    pub fn start(
        loaded: LoadedModel,
        config: EngineConfig,
        device: EngineDevice,
        served_name: String,
    ) -> Result<Self, LoadError> {
        let engine = Engine::start_on(loaded, config, device).map_err(LoadError::Start)?;
        let tok = engine.tokenizer();
        let tokenizer_json = tok.to_json().map_err(|cause| LoadError::Tokenizer {
            path: PathBuf::from(&served_name),
            cause,
        })?;
        // Whether encoding adds a BOS: the tokenizer knows, it has no getter for it.
        let add_bos = match (tok.bos_id(), tok.encode("a", true)) {
            (Some(bos), Ok(ids)) => ids.first() == Some(&bos),
            _ => false,
        };
        let ei = engine.info();
        let info = ModelInfo {
            name: served_name,
            block_size: u32::try_from(ei.block_size).unwrap_or(u32::MAX),
            max_model_len: u32::try_from(ei.max_model_len).unwrap_or(u32::MAX),
            block_bytes: ei.block_bytes as u64,
            tokenizer_json,
            chat_template: tok.chat_template().map(str::to_string),
            bos_token: tok.bos_token(),
            eos_token: tok.eos_token(),
            add_bos,
        };
        tracing::info!(
            model = %info.name,
            blocks = ei.num_blocks,
            block_size = ei.block_size,
            block_bytes = ei.block_bytes,
            max_model_len = ei.max_model_len,
            threads = ei.threads,
            kernels = ei.kernels,
            "engine started"
        );
        Ok(Self { engine, info })
    }
}

impl InferenceBackend for EngineBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TextError> {
        self.engine
            .tokenizer()
            .encode(text, add_special)
            .map_err(|e| TextError::Tokenize(e.to_string()))
    }

    fn tokenize_chat(&self, rendered: &str) -> Result<Vec<u32>, TextError> {
        tokenize_chat_with(self.engine.tokenizer(), rendered)
    }

    fn detokenize(&self, ids: &[u32]) -> Result<String, TextError> {
        Ok(self.engine.tokenizer().decode(ids))
    }

    fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TextError> {
        render_chat_with(self.engine.chat_template(), messages, add_generation_prompt)
    }

    fn acks_dispatches(&self) -> bool {
        true
    }

    fn submit(&self, request: GenerateRequest, sink: EventSink) -> Result<RequestId, SubmitError> {
        self.engine.add_request(request, sink).map_err(|e| match e {
            EngineError::InvalidRequest(m) => SubmitError::InvalidRequest(m),
            EngineError::Overloaded => SubmitError::Overloaded,
            EngineError::Shutdown => SubmitError::Stopped,
            other => SubmitError::InvalidRequest(other.to_string()),
        })
    }

    fn abort(&self, id: RequestId) {
        self.engine.abort(id);
    }

    fn hold_prefix(
        &self,
        hashes: Vec<u64>,
        max_free: usize,
        ttl: std::time::Duration,
        reply: crate::backend::HoldReply,
    ) -> Result<(), SubmitError> {
        self.engine
            .hold_prefix(hashes, max_free, ttl, reply)
            .map_err(|_| SubmitError::Stopped)
    }

    fn release_hold(&self, id: u64) {
        self.engine.release_hold(id);
    }

    fn stats(&self) -> CapacityStats {
        stats_from(&self.engine.stats())
    }

    fn set_capacity_observer(&self, mut observer: CapacityObserver) {
        self.engine.set_capacity_observer(Box::new(
            move |u: &kvroute_engine::runtime::CapacityUpdate| {
                observer(&CapacityUpdate {
                    stats: stats_from(&u.stats),
                    events: u.events.iter().map(event_from).collect(),
                    acks: u.acks.clone(),
                })
            },
        ));
    }

    fn shutdown(&self) {
        self.engine.shutdown();
    }

    fn failure(&self) -> Option<String> {
        self.engine.failure()
    }
}

/// Shows a spinner on a terminal while `f` runs.
fn with_spinner<T>(message: &str, f: impl FnOnce() -> T) -> T {
    let spinner = std::io::stderr().is_terminal().then(|| {
        let s = ProgressBar::new_spinner();
        s.set_message(message.to_string());
        s.enable_steady_tick(std::time::Duration::from_millis(100));
        s
    });
    let out = f();
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    out
}

/// Loads `cfg.model` and starts the engine on `cfg.device`.
pub fn load(cfg: &ServeConfig) -> Result<Arc<dyn InferenceBackend>, LoadError> {
    let device = engine_device(cfg)?;
    let kv_memory_bytes = match cfg.kv_budget {
        KvBudget::Bytes(b) => b,
        // Sized from the GPU's memory by the CUDA backend instead.
        KvBudget::GpuFraction(_) => 0,
    };
    let resolved = resolve(&cfg.model, cfg.cache_dir.as_deref())?;
    tracing::info!(path = %resolved.path.display(), "loading model");
    let loaded = with_spinner("loading model", || kvroute_engine::load::load(&resolved)).map_err(
        |cause| LoadError::Load {
            path: resolved.path.clone(),
            cause,
        },
    )?;
    let name = served_name(cfg.served_model_name.as_deref(), &resolved.path);
    let config = EngineConfig {
        block_size: cfg.block_size as usize,
        kv_memory_bytes,
        kv_offload_memory_bytes: cfg.kv_offload_memory,
        kv_cache_dtype: cfg.kv_cache_dtype,
        max_num_seqs: cfg.max_num_seqs as usize,
        max_model_len: cfg.max_model_len.map(|v| v as usize),
        threads: cfg.threads,
        admit_whole_future: !cfg.optimistic_admission,
        fault_panic_at_step: cfg.fault_panic_at_step,
        ..EngineConfig::default()
    };
    Ok(Arc::new(EngineBackend::start(
        loaded, config, device, name,
    )?))
}

/// The engine backend for `cfg.device`, with the GPU's KV budget from the flags.
fn engine_device(cfg: &ServeConfig) -> Result<EngineDevice, LoadError> {
    use kvroute_engine::kernels::device::{CudaOptions, GpuKvBudget};
    match (cfg.device, cfg.kv_budget) {
        (Device::Cpu, KvBudget::Bytes(_)) => Ok(EngineDevice::Cpu),
        (Device::Cpu, KvBudget::GpuFraction(_)) => Err(LoadError::Unsupported {
            flag: "--gpu-memory-utilization",
            why: "needs --device cuda; use --kv-memory on the CPU".into(),
        }),
        (Device::Cuda, budget) => Ok(EngineDevice::Cuda(CudaOptions {
            kv: match budget {
                KvBudget::Bytes(b) => GpuKvBudget::Bytes(b),
                KvBudget::GpuFraction(f) => GpuKvBudget::Utilization(f),
            },
            ..CudaOptions::default()
        })),
    }
}

/// The name clients use: `--served-model-name`, else the model file's name without `.gguf`
/// (or the folder's name).
pub fn served_name(flag: Option<&str>, model_path: &Path) -> String {
    if let Some(n) = flag {
        return n.to_string();
    }
    let file = model_path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    file.strip_suffix(".gguf")
        .map(str::to_string)
        .unwrap_or(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_names() {
        let p = Path::new("/cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert_eq!(served_name(None, p), "SmolLM2-135M-Instruct.Q4_1");
        assert_eq!(served_name(Some("smol"), p), "smol");
        assert_eq!(served_name(None, Path::new("/m/Qwen2-0.5B/")), "Qwen2-0.5B");
    }

    #[test]
    fn missing_model_path_is_a_clear_error() {
        let e = match resolve("/no/such/model.gguf", None) {
            Err(e) => e.to_string(),
            Ok(r) => panic!("{r:?}"),
        };
        assert!(e.starts_with("--model \"/no/such/model.gguf\""), "{e}");
    }
}
