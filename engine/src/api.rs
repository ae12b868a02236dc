//! The engine's public request/response types: what the agent hands in and gets back.
//!
//! This module is the contract between the engine and its callers (the agent's HTTP layer, the
//! CLI, tests). It holds plain data only; the step loop that produces these events lives in
//! `engine::runtime`. It must never depend on an async runtime: events are delivered through a
//! caller-supplied sink, so the agent can bridge them into tokio channels.

/// Engine-assigned id of a request, unique for the engine's lifetime.
pub type RequestId = u64;

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Raw text, tokenized with the model's tokenizer (special tokens recognised; BOS added if
    /// the model asks for it).
    Text(String),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

/// Sampling settings with OpenAI semantics.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Most tokens to generate (≥ 1).
    pub max_tokens: u32,
    /// 0.0 means greedy; otherwise 0.0 < t ≤ 2.0.
    pub temperature: f32,
    /// Nucleus sampling mass, 0.0 < p ≤ 1.0 (1.0 = off).
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: u32,
    /// Seed for reproducible sampling; `None` draws one per request.
    pub seed: Option<u64>,
    /// Stop strings: generation ends before the first occurrence; the stop string is not output.
    pub stop: Vec<String>,
    /// Token ids that end generation (in addition to the model's EOS unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past EOS (benchmarks).
    pub ignore_eos: bool,
    /// Return the log-probability of each sampled token and this many alternatives (0..=20).
    /// They are the model's own (before penalties, temperature, top-k and top-p).
    pub logprobs: Option<u32>,
    /// OpenAI's presence penalty, in [-2, 2]: subtracted once from the logit of every token
    /// generated so far (the prompt's tokens are not counted).
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty, in [-2, 2]: subtracted from the logit of every token
    /// generated so far, times the times it was generated.
    pub frequency_penalty: f32,
}

impl SamplingParams {
    /// Whether a penalty applies.
    pub fn has_penalties(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 16,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

/// One generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub params: SamplingParams,
    /// Extra key mixed into the prefix-cache block hashes (a LoRA name or a cache salt), so
    /// requests with different keys never share cached blocks.
    pub cache_key: Option<String>,
    /// A prefix hold ([`crate::runtime::Engine::hold_prefix`]) kept for this request: let go
    /// once the request is admitted (it then holds the blocks itself) or ends.
    pub hold: Option<u64>,
    /// The router's dispatch this request is (from `x-kvroute-dispatch`): the capacity update
    /// taken right after the engine took the request in acknowledges it
    /// ([`crate::runtime::CapacityUpdate::acks`]).
    pub dispatch: Option<Dispatch>,
    /// Refuse the request ([`EngineEvent::NoRoom`]) instead of queueing it when its whole
    /// future (`prompt + max_tokens` blocks, less cached prefix blocks running requests hold)
    /// does not fit in the blocks free and not promised to live requests: a router that
    /// reserved room for it asks for this, so two routers with the same view cannot both fill
    /// the same room and make the engine preempt.
    pub only_with_room: bool,
}

/// One router's dispatch of one request: the router's id and its sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Dispatch {
    pub source: std::sync::Arc<str>,
    pub seq: u64,
}

/// Why a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token id or a stop string.
    Stop,
    /// `max_tokens` reached, or the model's context is full.
    Length,
    /// Aborted by the caller (or its event sink went away).
    Abort,
}

impl FinishReason {
    /// The OpenAI `finish_reason` string.
    pub fn as_openai(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
}

/// A candidate token with its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub text: String,
    pub logprob: f32,
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub token: u32,
    /// Text this token adds to the output. Never ends inside a multi-byte character: bytes of
    /// an incomplete character are held back until it completes (so it may be empty). Text held
    /// back because it might start a stop string is released once it cannot.
    pub text: String,
    /// Log-probability of the sampled token (when logprobs were asked for).
    pub logprob: Option<f32>,
    /// The top alternatives, most likely first (when logprobs were asked for).
    pub top_logprobs: Vec<TokenLogprob>,
}

/// What the engine tells the caller about one request, in order: `Started` once, any number of
/// `Token`s, then exactly one `Finished` or `Error`; or only `NoRoom` (a request with
/// [`GenerateRequest::only_with_room`] that did not fit).
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    Started {
        id: RequestId,
        prompt_tokens: u32,
    },
    Token(TokenEvent),
    Finished {
        reason: FinishReason,
        usage: Usage,
    },
    Error(String),
    /// Refused, never queued: it needs `need` blocks, only `room` are free and unpromised.
    NoRoom {
        need: u64,
        room: u64,
    },
}

/// Receives a request's events on the engine thread. Returns `false` when the receiver is gone
/// (client disconnected): the engine then aborts the request and frees its blocks.
pub type EventSink = Box<dyn FnMut(EngineEvent) -> bool + Send>;
