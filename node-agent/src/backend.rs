//! The agent's view of an inference engine: one trait, [`InferenceBackend`], that the HTTP and
//! gRPC layers drive.
//!
//! The real implementation wraps `kvroute_engine`'s runtime; [`fake::FakeBackend`] is a
//! deterministic test double with a real block pool, so the service layers are tested without a
//! model. Implementations must never block the caller for long: `submit` queues the request and
//! returns, events arrive on the engine's own thread through the [`EventSink`].

pub mod fake;

pub use kvroute_engine::api::Dispatch;
use kvroute_engine::api::{EventSink, GenerateRequest, RequestId};
pub use kvroute_engine::runtime::HoldReply;

/// What the agent serves, fixed once the model is loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// Name in the OpenAI API.
    pub name: String,
    /// Tokens per KV block.
    pub block_size: u32,
    /// Longest request (prompt + output tokens) accepted.
    pub max_model_len: u32,
    /// Bytes of KV cache per block.
    pub block_bytes: u64,
    /// The tokenizer in its serialized (Hugging Face `tokenizer.json`) form.
    pub tokenizer_json: String,
    /// The model's chat template (Jinja), when it has one.
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Whether prompts get a BOS token prepended.
    pub add_bos: bool,
}

/// KV-cache and scheduler counters, absolute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapacityStats {
    /// The backend's cache events say which cached blocks are in use (`InUse` / `Evictable`).
    pub block_use_events: bool,
    pub block_size: u32,
    pub total_blocks: u64,
    /// Blocks referenced by no request (includes `cached_evictable_blocks`).
    pub free_blocks: u64,
    pub cached_evictable_blocks: u64,
    /// Free blocks promised to live requests' remaining tokens (up to `max_tokens`): the
    /// capacity report subtracts them from `free_blocks`, so a router admitting into the
    /// reported room never makes the engine preempt.
    pub committed_blocks: u64,
    pub running: u32,
    pub waiting: u32,
    pub requests_received: u64,
    pub preemptions: u64,
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
    pub max_model_len: u32,
    pub block_bytes: u64,
    /// Measured speed (0 = not measured yet): prompt tokens per second of prefill, and the time
    /// of a decode-only step at the batch size it ran at.
    pub prefill_tokens_per_s: u32,
    pub decode_step_us: u32,
    pub decode_batch: u32,
    /// What one more sequence adds to a decode step (0: not measured).
    pub decode_step_per_seq_ns: u32,
    /// What one more KV token read adds to a decode step, picoseconds (0: not measured).
    pub decode_step_per_kv_token_ps: u32,
    /// Tokens the running requests hold in the KV cache.
    pub running_kv_tokens: u64,
    /// Room (`free - committed`) given back by requests that ended, since start (monotonic).
    pub room_released_blocks: u64,
    /// Prompt tokens the waiting queue still has to compute (ignoring cache hits).
    pub waiting_prefill_tokens: u64,
    /// Prompt tokens the running requests have still to compute.
    pub running_prefill_tokens: u64,
    /// The KV host tier: slots, slots holding a block, blocks copied there and back, and
    /// prompt tokens copied back (included in `prefix_hit_tokens`). All 0 without one.
    pub host_total_blocks: u64,
    pub host_used_blocks: u64,
    pub offloaded_blocks: u64,
    pub reloaded_blocks: u64,
    pub prefix_host_hit_tokens: u64,
    /// Measured nanoseconds to copy one block to or from the host tier (0: not measured).
    pub host_copy_block_ns: u32,
}

/// A change to the set of cached block hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheEvent {
    Stored(Vec<u64>),
    Removed(Vec<u64>),
    AllCleared,
    /// Cached blocks a request uses again (they were evictable).
    InUse(Vec<u64>),
    /// Cached blocks no request uses any more (evictable).
    Evictable(Vec<u64>),
    /// The host tier keeps these hashes (evicted from the device, copied back on a hit).
    HostStored(Vec<u64>),
    /// These hashes are gone from the host tier.
    HostRemoved(Vec<u64>),
}

/// What the engine reports after every change: the new counters and the cache events since the
/// previous update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapacityUpdate {
    pub stats: CapacityStats,
    pub events: Vec<CacheEvent>,
    /// Dispatches the backend took in since the previous update (`stats` counts them).
    pub acks: Vec<Dispatch>,
}

/// Called on the engine's thread after every change. Must return quickly and never block.
pub type CapacityObserver = Box<dyn FnMut(&CapacityUpdate) + Send>;

/// One chat message, already reduced to text.
pub use kvroute_openai::ChatMessage;

/// Why a request was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The request cannot run (too long for the pool, bad parameters).
    #[error("{0}")]
    InvalidRequest(String),
    /// The engine's queue is full.
    #[error("the engine's queue is full")]
    Overloaded,
    /// The engine has stopped.
    #[error("the engine has stopped")]
    Stopped,
    /// The engine does not do this.
    #[error("{0}")]
    Unsupported(&'static str),
}

/// Tokenizer or chat-template failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("tokenizer: {0}")]
    Tokenize(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
}

/// An engine the agent can serve.
pub trait InferenceBackend: Send + Sync + 'static {
    /// The loaded model's fixed facts.
    fn info(&self) -> &ModelInfo;
    /// Token ids of `text`; `add_special` adds BOS when the model wants it and recognises special
    /// tokens written in the text.
    fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TextError>;
    /// Token ids of a rendered chat prompt: special tokens written by the template are
    /// recognised, and a BOS the template already wrote is not added twice.
    fn tokenize_chat(&self, rendered: &str) -> Result<Vec<u32>, TextError> {
        self.tokenize(rendered, true)
    }
    /// Text of `ids`.
    fn detokenize(&self, ids: &[u32]) -> Result<String, TextError>;
    /// The prompt text for a chat, rendered with the model's chat template.
    fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TextError>;
    /// Queues a request; its events go to `sink` on the engine's thread.
    fn submit(&self, request: GenerateRequest, sink: EventSink) -> Result<RequestId, SubmitError>;

    /// Whether the backend acknowledges `GenerateRequest::dispatch` in the capacity update that
    /// first counts the request (`CapacityUpdate::acks`). Otherwise the agent acknowledges a
    /// dispatch as soon as `submit` returns.
    fn acks_dispatches(&self) -> bool {
        false
    }
    /// Aborts a request (no-op when it already ended); its blocks are freed.
    fn abort(&self, id: RequestId);
    /// Holds the leading cached blocks of `hashes` for at most `ttl` (taking at most `max_free`
    /// free blocks) so they are not evicted
    /// (a router keeps the prefix of a request it will send here once room frees); `reply`
    /// gets (hold id, blocks held), on the engine's thread. Backends that cannot hold say so.
    fn hold_prefix(
        &self,
        hashes: Vec<u64>,
        max_free: usize,
        ttl: std::time::Duration,
        reply: HoldReply,
    ) -> Result<(), SubmitError> {
        let _ = (hashes, max_free, ttl, reply);
        Err(SubmitError::Unsupported("this engine cannot hold prefixes"))
    }
    /// Lets a prefix hold go (unknown ids are ignored).
    fn release_hold(&self, id: u64) {
        let _ = id;
    }
    /// Counters now.
    fn stats(&self) -> CapacityStats;
    /// Installs the observer of capacity changes (replacing any earlier one).
    fn set_capacity_observer(&self, observer: CapacityObserver);
    /// Stops the engine: running requests end with `Abort`.
    fn shutdown(&self);
    /// Why the engine can no longer serve (its step loop died or is stuck), if it cannot.
    /// The agent then reports itself failed and exits.
    fn failure(&self) -> Option<String> {
        None
    }
}
