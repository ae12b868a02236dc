//! A deterministic [`InferenceBackend`] for tests: byte-level tokenizer, a trivial "model" whose
//! greedy output is a fixed function of the prompt, and a real block pool with prefix caching,
//! preemption and capacity events, stepped by its own thread.
//!
//! It exists so the agent's HTTP, gRPC, metrics and lifecycle code is tested without loading a
//! model. It must never be used to serve real traffic.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use kvroute_engine::api::{
    EngineEvent, EventSink, FinishReason, GenerateRequest, Prompt, RequestId, TokenEvent, Usage,
};

use super::{
    CacheEvent, CapacityObserver, CapacityStats, CapacityUpdate, ChatMessage, Dispatch,
    InferenceBackend, ModelInfo, SubmitError, TextError,
};

/// Settings of a [`FakeBackend`].
#[derive(Debug, Clone)]
pub struct FakeConfig {
    pub name: String,
    pub total_blocks: u64,
    pub block_size: u32,
    pub max_model_len: u32,
    pub max_num_seqs: usize,
    /// Most requests waiting before `submit` answers `Overloaded`.
    pub max_waiting: usize,
    /// Time per decode step.
    pub step: Duration,
    /// Fail every request with an engine error after this many tokens (fault injection).
    pub fail_after: Option<u32>,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            name: "fake-model".into(),
            total_blocks: 64,
            block_size: 4,
            max_model_len: 256,
            max_num_seqs: 8,
            max_waiting: 16,
            step: Duration::from_millis(2),
            fail_after: None,
        }
    }
}

/// The chained block hashes of `tokens` (full blocks only), with the engine's public hash
/// function, so capacity events carry the same hashes a router computes.
pub fn fake_block_hashes(tokens: &[u32], block_size: usize) -> Vec<u64> {
    kvroute_engine::kv::hash::block_hashes(tokens, block_size, &[])
}

/// The fake model's greedy continuation: token i of the output.
pub fn fake_next_token(prompt_len: usize, i: usize) -> u32 {
    u32::from(b'a') + ((prompt_len + i) % 26) as u32
}

struct Seq {
    id: RequestId,
    prompt: Vec<u32>,
    max_tokens: u32,
    generated: u32,
    blocks: u64,
    /// Cached hashes this sequence holds (in use, not evictable).
    held_hashes: Vec<u64>,
    sink: EventSink,
    started: bool,
    cached_tokens: u32,
}

struct State {
    total: u64,
    in_use: u64,
    /// Every cached hash; `true` while a running sequence holds it.
    cached: HashMap<u64, bool>,
    /// Cached hashes nobody holds, least recently used first.
    evictable: VecDeque<u64>,
    running: Vec<Seq>,
    waiting: VecDeque<Seq>,
    aborts: HashSet<RequestId>,
    next_id: RequestId,
    requests_received: u64,
    preemptions: u64,
    prefix_query_tokens: u64,
    prefix_hit_tokens: u64,
    events: Vec<CacheEvent>,
    /// Dispatches taken in since the last update.
    acks: Vec<Dispatch>,
    dirty: bool,
    observer: Option<CapacityObserver>,
    stopped: bool,
}

/// See the module docs.
pub struct FakeBackend {
    info: ModelInfo,
    cfg: FakeConfig,
    shared: Arc<(Mutex<State>, Condvar)>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FakeBackend {
    pub fn start(cfg: FakeConfig) -> Arc<Self> {
        let info = ModelInfo {
            name: cfg.name.clone(),
            block_size: cfg.block_size,
            max_model_len: cfg.max_model_len,
            block_bytes: 1024,
            tokenizer_json: r#"{"fake":"byte-level"}"#.into(),
            chat_template: Some(
                "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}".into(),
            ),
            bos_token: None,
            eos_token: Some("\u{0}".into()),
            add_bos: false,
        };
        let state = State {
            total: cfg.total_blocks,
            in_use: 0,
            cached: HashMap::new(),
            evictable: VecDeque::new(),
            running: Vec::new(),
            waiting: VecDeque::new(),
            aborts: HashSet::new(),
            next_id: 1,
            requests_received: 0,
            preemptions: 0,
            prefix_query_tokens: 0,
            prefix_hit_tokens: 0,
            events: Vec::new(),
            acks: Vec::new(),
            dirty: false,
            observer: None,
            stopped: false,
        };
        let shared = Arc::new((Mutex::new(state), Condvar::new()));
        let backend = Arc::new(Self {
            info,
            cfg: cfg.clone(),
            shared: shared.clone(),
            thread: Mutex::new(None),
        });
        let handle = std::thread::spawn(move || step_loop(shared, cfg));
        *backend.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        backend
    }
}

fn stats_of(s: &State, cfg: &FakeConfig) -> CapacityStats {
    CapacityStats {
        block_size: cfg.block_size,
        total_blocks: s.total,
        free_blocks: s.total - s.in_use,
        cached_evictable_blocks: s.evictable.len() as u64,
        committed_blocks: 0,
        running: s.running.len() as u32,
        waiting: s.waiting.len() as u32,
        requests_received: s.requests_received,
        preemptions: s.preemptions,
        prefix_query_tokens: s.prefix_query_tokens,
        prefix_hit_tokens: s.prefix_hit_tokens,
        max_model_len: cfg.max_model_len,
        block_bytes: 1024,
        // The fake measures no speed: routers use their priors.
        ..CapacityStats::default()
    }
}

fn blocks_for(tokens: usize, bs: u32) -> u64 {
    (tokens as u64).div_ceil(u64::from(bs))
}

impl State {
    fn uncached_free(&self) -> u64 {
        self.total - self.in_use - self.evictable.len() as u64
    }

    /// Takes `n` fresh blocks, evicting cached ones as needed; false when there are not enough.
    fn alloc(&mut self, n: u64) -> bool {
        if self.total - self.in_use < n {
            return false;
        }
        let mut need_evict = n.saturating_sub(self.uncached_free());
        let mut removed = Vec::new();
        while need_evict > 0 {
            if let Some(h) = self.evictable.pop_front() {
                self.cached.remove(&h);
                removed.push(h);
            }
            need_evict -= 1;
        }
        if !removed.is_empty() {
            self.events.push(CacheEvent::Removed(removed));
        }
        self.in_use += n;
        self.dirty = true;
        true
    }

    /// Releases a sequence's blocks; with `cache_prompt`, its full prompt blocks become cached
    /// (evictable) instead of plain free blocks.
    fn release(&mut self, seq: &Seq, bs: usize, cache_prompt: bool) {
        for h in &seq.held_hashes {
            if let Some(v) = self.cached.get_mut(h) {
                *v = false;
                self.evictable.push_back(*h);
            }
        }
        let held = seq.held_hashes.len() as u64;
        self.in_use -= held;
        let mut own = seq.blocks - held;
        if cache_prompt {
            let mut stored = Vec::new();
            for h in fake_block_hashes(&seq.prompt, bs)
                .into_iter()
                .skip(seq.held_hashes.len())
            {
                if own == 0 {
                    break;
                }
                own -= 1;
                self.in_use -= 1;
                // A block whose hash is already cached is simply freed.
                if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(h) {
                    e.insert(false);
                    self.evictable.push_back(h);
                    stored.push(h);
                }
            }
            if !stored.is_empty() {
                self.events.push(CacheEvent::Stored(stored));
            }
        }
        self.in_use -= own;
        self.dirty = true;
    }

    /// Tries to start a waiting sequence: takes prefix-cache hits, allocates the rest.
    fn admit(&mut self, mut seq: Seq, bs: usize) -> Result<Seq, Seq> {
        let hashes = fake_block_hashes(&seq.prompt, bs);
        let mut hits = Vec::new();
        // Keep the last prompt token uncached so there is always something to compute.
        for h in hashes
            .iter()
            .take((seq.prompt.len().saturating_sub(1)) / bs)
        {
            match self.cached.get(h) {
                Some(false) => hits.push(*h),
                _ => break,
            }
        }
        let len = seq.prompt.len() + seq.generated as usize;
        let needed = blocks_for(len + 1, bs as u32).saturating_sub(hits.len() as u64);
        // Hits leave the evictable list first so allocation cannot evict them.
        for h in &hits {
            self.evictable.retain(|x| x != h);
            self.cached.insert(*h, true);
            self.in_use += 1;
        }
        if !self.alloc(needed) {
            for h in &hits {
                self.cached.insert(*h, false);
                self.evictable.push_front(*h);
                self.in_use -= 1;
            }
            return Err(seq);
        }
        self.prefix_query_tokens += seq.prompt.len() as u64;
        self.prefix_hit_tokens += (hits.len() * bs) as u64;
        seq.cached_tokens = (hits.len() * bs) as u32;
        seq.blocks = needed + hits.len() as u64;
        seq.held_hashes = hits;
        Ok(seq)
    }
}

fn step_loop(shared: Arc<(Mutex<State>, Condvar)>, cfg: FakeConfig) {
    let bs = cfg.block_size as usize;
    loop {
        let mut s = lock(&shared.0);
        while !s.stopped
            && s.running.is_empty()
            && s.waiting.is_empty()
            && s.aborts.is_empty()
            && !s.dirty
        {
            s = shared.1.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        if s.stopped {
            let s = &mut *s;
            let running: Vec<Seq> = s.running.drain(..).chain(s.waiting.drain(..)).collect();
            for mut seq in running {
                (seq.sink)(EngineEvent::Finished {
                    reason: FinishReason::Abort,
                    usage: Usage::default(),
                });
            }
            return;
        }
        // Aborts.
        let aborts: HashSet<RequestId> = std::mem::take(&mut s.aborts);
        if !aborts.is_empty() {
            let (gone, keep): (Vec<Seq>, Vec<Seq>) =
                s.running.drain(..).partition(|q| aborts.contains(&q.id));
            s.running = keep;
            for mut seq in gone {
                s.release(&seq, bs, false);
                (seq.sink)(EngineEvent::Finished {
                    reason: FinishReason::Abort,
                    usage: Usage::default(),
                });
            }
            let waiting: VecDeque<Seq> = s.waiting.drain(..).collect();
            for mut seq in waiting {
                if aborts.contains(&seq.id) {
                    (seq.sink)(EngineEvent::Finished {
                        reason: FinishReason::Abort,
                        usage: Usage::default(),
                    });
                    s.dirty = true;
                } else {
                    s.waiting.push_back(seq);
                }
            }
        }
        // Admission.
        while s.running.len() < cfg.max_num_seqs {
            let Some(seq) = s.waiting.pop_front() else {
                break;
            };
            match s.admit(seq, bs) {
                Ok(mut seq) => {
                    let ok = seq.started
                        || (seq.sink)(EngineEvent::Started {
                            id: seq.id,
                            prompt_tokens: seq.prompt.len() as u32,
                        });
                    seq.started = true;
                    if ok {
                        s.running.push(seq);
                    } else {
                        s.release(&seq, bs, false);
                    }
                    s.dirty = true;
                }
                Err(seq) => {
                    s.waiting.push_front(seq);
                    break;
                }
            }
        }
        // One decode step.
        let mut running = std::mem::take(&mut s.running);
        let mut keep = Vec::with_capacity(running.len());
        for mut seq in running.drain(..) {
            let len = seq.prompt.len() + seq.generated as usize;
            if blocks_for(len + 1, cfg.block_size) > seq.blocks {
                if !s.alloc(1) {
                    // Preempt: recompute later.
                    s.release(&seq, bs, false);
                    s.preemptions += 1;
                    seq.blocks = 0;
                    seq.held_hashes.clear();
                    s.waiting.push_front(seq);
                    continue;
                }
                seq.blocks += 1;
            }
            if cfg.fail_after == Some(seq.generated) {
                s.release(&seq, bs, false);
                (seq.sink)(EngineEvent::Error("injected fault".into()));
                continue;
            }
            let token = fake_next_token(seq.prompt.len(), seq.generated as usize);
            seq.generated += 1;
            let alive = (seq.sink)(EngineEvent::Token(TokenEvent {
                token,
                text: char::from_u32(token).map(String::from).unwrap_or_default(),
                logprob: None,
                top_logprobs: Vec::new(),
            }));
            if !alive {
                s.release(&seq, bs, false);
                continue;
            }
            let total_len = seq.prompt.len() as u32 + seq.generated;
            if seq.generated >= seq.max_tokens || total_len >= cfg.max_model_len {
                s.release(&seq, bs, true);
                (seq.sink)(EngineEvent::Finished {
                    reason: FinishReason::Length,
                    usage: Usage {
                        prompt_tokens: seq.prompt.len() as u32,
                        completion_tokens: seq.generated,
                        cached_tokens: seq.cached_tokens,
                    },
                });
                continue;
            }
            keep.push(seq);
        }
        s.running = keep;
        if s.dirty {
            s.dirty = false;
            let update = CapacityUpdate {
                stats: stats_of(&s, &cfg),
                events: std::mem::take(&mut s.events),
                acks: std::mem::take(&mut s.acks),
            };
            if let Some(obs) = s.observer.as_mut() {
                obs(&update);
            }
        }
        let busy = !s.running.is_empty();
        drop(s);
        if busy {
            std::thread::sleep(cfg.step);
        }
    }
}

impl InferenceBackend for FakeBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenize(&self, text: &str, _add_special: bool) -> Result<Vec<u32>, TextError> {
        Ok(text.bytes().map(u32::from).collect())
    }

    fn detokenize(&self, ids: &[u32]) -> Result<String, TextError> {
        let bytes: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TextError> {
        let mut out = String::new();
        for m in messages {
            out.push_str(&format!("<{}>{}", m.role, m.content));
        }
        if add_generation_prompt {
            out.push_str("<assistant>");
        }
        Ok(out)
    }

    fn submit(&self, request: GenerateRequest, sink: EventSink) -> Result<RequestId, SubmitError> {
        let prompt = match request.prompt {
            Prompt::Tokens(t) => t,
            Prompt::Text(t) => t.bytes().map(u32::from).collect(),
        };
        if prompt.is_empty() {
            return Err(SubmitError::InvalidRequest("empty prompt".into()));
        }
        if blocks_for(prompt.len() + 1, self.cfg.block_size) > self.cfg.total_blocks {
            return Err(SubmitError::InvalidRequest(
                "prompt needs more KV blocks than the pool has".into(),
            ));
        }
        let mut s = lock(&self.shared.0);
        if s.stopped {
            return Err(SubmitError::Stopped);
        }
        if s.waiting.len() >= self.cfg.max_waiting {
            return Err(SubmitError::Overloaded);
        }
        let id = s.next_id;
        s.next_id += 1;
        s.requests_received += 1;
        if let Some(d) = request.dispatch {
            s.acks.push(d);
        }
        s.waiting.push_back(Seq {
            id,
            prompt,
            max_tokens: request.params.max_tokens.max(1),
            generated: 0,
            blocks: 0,
            held_hashes: Vec::new(),
            sink,
            started: false,
            cached_tokens: 0,
        });
        s.dirty = true;
        self.shared.1.notify_all();
        Ok(id)
    }

    fn acks_dispatches(&self) -> bool {
        true
    }

    fn abort(&self, id: RequestId) {
        let mut s = lock(&self.shared.0);
        s.aborts.insert(id);
        self.shared.1.notify_all();
    }

    fn stats(&self) -> CapacityStats {
        stats_of(&lock(&self.shared.0), &self.cfg)
    }

    fn set_capacity_observer(&self, observer: CapacityObserver) {
        lock(&self.shared.0).observer = Some(observer);
    }

    fn shutdown(&self) {
        lock(&self.shared.0).stopped = true;
        self.shared.1.notify_all();
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        lock(&self.shared.0).stopped = true;
        self.shared.1.notify_all();
    }
}
