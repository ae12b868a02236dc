//! The continuous-batching scheduler: which sequences run this step, how many of their tokens,
//! and in which KV blocks (vLLM v1 style, over [`crate::kv`]).
//!
//! It owns every sequence's token ids (prompt plus generated), its progress (`num_computed`),
//! the running list and the waiting queue. It decides; it never runs a model, never samples and
//! never decides when a sequence stops (the caller does, from EOS, stop strings or
//! [`Scheduler::is_length_capped`], and then calls [`Scheduler::finish`]).
//!
//! # A step
//! 1. [`Scheduler::schedule`] builds a [`StepPlan`] under a token budget
//!    (`max_num_batched_tokens`): running sequences first, in admission order (a decode feeds one
//!    token; a prefill is cut into chunks when chunked prefill is on); when a running sequence
//!    needs a block and none is free, the newest running sequence is preempted (its blocks freed
//!    tail first, its progress reset: it is recomputed later, normally from its own cached
//!    prefix) and goes back to the front of the waiting queue. Then, unless a sequence was
//!    preempted in this step, waiting sequences are admitted in order while the budget, the
//!    `max_num_seqs` limit and the free blocks allow, each starting after its cached prefix.
//! 2. The caller runs the model on the plan: for each [`ScheduledSeq`], positions
//!    `start .. start + len` with tokens [`StepView::tokens`] into the blocks
//!    [`StepView::block_table`]; where `sample` is true it samples one token.
//! 3. [`Scheduler::complete_step`] with the sampled tokens: progress advances, newly computed
//!    full blocks enter the prefix cache, the tokens are appended.
//!
//! In steady state a step does no heap allocation: the plan's buffers are reused.

use std::collections::VecDeque;
use std::ops::Deref;

use crate::kv::pool::U64Map;
use crate::kv::{BlockEvent, BlockId, CapacitySnapshot, KvConfig, KvError, KvManager, KvSeq};

/// Scheduler settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedConfig {
    /// Tokens per KV block (≥ 1).
    pub block_size: usize,
    /// Blocks in the pool (≥ 1).
    pub num_blocks: usize,
    /// Most sequences running at once (≥ 1).
    pub max_num_seqs: usize,
    /// Most tokens fed to the model in one step (≥ 1).
    pub max_num_batched_tokens: usize,
    /// Longest sequence, prompt plus output, in tokens (≥ 2).
    pub max_model_len: usize,
    /// Cut long prefills into chunks that fit the step's remaining budget. When off, a prefill
    /// runs whole in one step, and `max_num_batched_tokens` must be at least the longest
    /// sequence.
    pub enable_chunked_prefill: bool,
    /// Share cached prefix blocks between sequences.
    pub enable_prefix_caching: bool,
    /// Record block events for [`Scheduler::take_events`] (leave off if nobody drains them).
    pub enable_events: bool,
    /// Start a waiting sequence only when its whole future fits: the blocks it may still take
    /// up to `prompt + max_tokens` (less cached prefix blocks running sequences hold) within
    /// the free blocks the running sequences are not promised. Running sequences then always
    /// find the blocks they grow into, and nothing is ever preempted; a batch of requests
    /// that stop early on EOS runs smaller than it could. Off (vLLM's way): start a sequence
    /// when its prompt fits and preempt when the pool runs out.
    pub admit_whole_future: bool,
    /// A waiting sequence whose next uncached prompt block a running sequence is computing
    /// right now (a burst of requests with one new system prompt) stays waiting until that
    /// block is cached, then starts with it as a hit: the prefix is computed once, not once
    /// per request. Later waiting sequences may start meanwhile. Needs prefix caching.
    pub share_inflight_prefixes: bool,
}

impl SchedConfig {
    /// Defaults around the given pool: 256 sequences, 2,048 tokens a step, sequences up to the
    /// pool's size, chunked prefill and prefix caching on, events off.
    pub fn new(block_size: usize, num_blocks: usize) -> Self {
        Self {
            block_size,
            num_blocks,
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            max_model_len: block_size.saturating_mul(num_blocks),
            enable_chunked_prefill: true,
            enable_prefix_caching: true,
            enable_events: false,
            admit_whole_future: false,
            share_inflight_prefixes: true,
        }
    }
}

/// Errors of the scheduler.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedError {
    #[error("invalid scheduler config: {0}")]
    Config(String),
    #[error("request {id}: empty prompt")]
    EmptyPrompt { id: u64 },
    #[error("request {id}: max_tokens must be at least 1")]
    ZeroMaxTokens { id: u64 },
    #[error(
        "request {id}: prompt of {len} tokens leaves no room to generate (at most {max} prompt \
         tokens: max_model_len {max_model_len}, pool {pool_tokens} tokens)"
    )]
    PromptTooLong {
        id: u64,
        len: usize,
        max: usize,
        max_model_len: usize,
        pool_tokens: usize,
    },
    #[error("request {id} is already queued or running")]
    DuplicateId { id: u64 },
    #[error("unknown request {id}")]
    UnknownSeq { id: u64 },
    #[error("complete_step without a scheduled step")]
    NoPendingStep,
    #[error("request {id}: sampled token not expected (its tokens are not all computed, or it was not in the step)")]
    UnexpectedSample { id: u64 },
    #[error(transparent)]
    Kv(#[from] KvError),
}

/// A request handed to the scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqSpec {
    /// Caller-chosen id, unique among live sequences.
    pub id: u64,
    /// Prompt token ids (≥ 1).
    pub prompt: Vec<u32>,
    /// Most tokens to generate (≥ 1); see [`Scheduler::is_length_capped`].
    pub max_tokens: u32,
    /// Mixed into the sequence's block hashes (LoRA name, cache salt); empty for none.
    pub extra_key: Vec<u8>,
}

/// One sequence's work in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledSeq {
    /// The sequence.
    pub id: u64,
    /// Tokens already computed: the position of the first token fed this step.
    pub start: usize,
    /// Tokens fed this step (≥ 1).
    pub len: usize,
    /// True iff after this step every known token of the sequence is computed: the runner must
    /// produce logits at the last position and sample one token.
    pub sample: bool,
    slot: u32,
}

/// What to compute in one step. Read it through [`StepView`] (which also gives each sequence's
/// tokens and block table) or [`Scheduler::plan`].
#[derive(Debug, Default)]
pub struct StepPlan {
    seqs: Vec<ScheduledSeq>,
    preempted: Vec<u64>,
    num_tokens: usize,
}

impl StepPlan {
    /// The scheduled sequences: running ones first (admission order), then newly admitted.
    pub fn seqs(&self) -> &[ScheduledSeq] {
        &self.seqs
    }
    /// Sequences preempted in this step (their KV is gone; they were requeued).
    pub fn preempted(&self) -> &[u64] {
        &self.preempted
    }
    /// Tokens fed in this step (sum of `len`).
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }
    /// Nothing to compute.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

/// A step's plan with read access to the scheduler's tokens and block tables. Derefs to
/// [`StepPlan`].
pub struct StepView<'a> {
    sched: &'a Scheduler,
}

impl Deref for StepView<'_> {
    type Target = StepPlan;
    fn deref(&self) -> &StepPlan {
        &self.sched.plan
    }
}

impl<'a> StepView<'a> {
    /// Token ids fed for `s`: positions `s.start .. s.start + s.len`.
    pub fn tokens(&self, s: &ScheduledSeq) -> &'a [u32] {
        self.sched.step_tokens(s)
    }
    /// All known tokens of `s`'s sequence (prompt then generated, `0 .. start + len` at least).
    pub fn all_tokens(&self, s: &ScheduledSeq) -> &'a [u32] {
        self.sched.scheduled(s).map_or(&[], |q| &q.tokens[..])
    }
    /// Block table of `s` (block `i` holds positions `i * block_size ..`); it covers at least
    /// `s.start + s.len` positions.
    pub fn block_table(&self, s: &ScheduledSeq) -> &'a [BlockId] {
        self.sched.step_block_table(s)
    }
    /// The plan, with the scheduler's lifetime.
    pub fn plan(&self) -> &'a StepPlan {
        &self.sched.plan
    }
    /// The KV copies (host tier) to perform before this step's forward pass, even when the
    /// plan is empty.
    pub fn copies(&self) -> &'a crate::kv::KvCopies {
        self.sched.kv.copies()
    }
}

/// Counters and capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SchedStats {
    pub running: usize,
    pub waiting: usize,
    /// Preemptions since start.
    pub preemptions: u64,
    /// Requests accepted by [`Scheduler::add`] since start.
    pub requests_received: u64,
    /// Requests ended by [`Scheduler::finish`] / [`Scheduler::abort`].
    pub requests_finished: u64,
    pub requests_aborted: u64,
    /// Blocks the waiting queue needs for its known tokens (ignoring cache hits).
    pub waiting_prompt_blocks: usize,
    /// Prompt tokens the running sequences have still to compute (chunked prefill spreads a
    /// prompt over several steps; cache hits count as computed).
    pub running_prefill_tokens: usize,
    /// Tokens the running sequences hold in the KV cache (computed so far, cache hits
    /// included): what their next decode steps read.
    pub running_kv_tokens: usize,
    /// Blocks the live sequences (running and waiting) have yet to allocate to reach their
    /// length cap (`prompt + max_tokens`, at most the longest sequence), ignoring cache hits:
    /// free blocks already promised to admitted requests. A router that admits only into
    /// `free - committed` never makes this engine preempt.
    pub committed_blocks: usize,
    /// The pool (includes the prefix query / hit token counters).
    pub capacity: CapacitySnapshot,
}

/// Token counts of a sequence that ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SeqUsage {
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// Prompt tokens served from the prefix cache at the first admission.
    pub cached_tokens: usize,
    /// Times the sequence was preempted.
    pub preemptions: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
}

struct Seq {
    id: u64,
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    num_computed: usize,
    kv: KvSeq,
    state: State,
    /// Blocks counted in `waiting_prompt_blocks` while waiting.
    waiting_blocks: usize,
    cached_tokens: Option<usize>,
    preemptions: u32,
}

/// Most generated tokens a sequence reserves room for at `add` (beyond this its buffers grow
/// by doubling).
const RESERVE_OUTPUT_TOKENS: usize = 4096;

/// The sequence in a slot named by the running list, the waiting queue or the index. Those
/// only ever name live slots (a slot is emptied only in `remove`, which unlinks it from all
/// three first), so an empty slot here is a bug in this module, not bad input.
#[inline]
#[allow(clippy::expect_used)]
fn live(seqs: &[Option<Seq>], slot: u32) -> &Seq {
    seqs[slot as usize]
        .as_ref()
        .expect("slots in queues and plans hold live sequences")
}

/// Mutable form of [`live`] (same invariant).
#[inline]
#[allow(clippy::expect_used)]
fn live_mut(seqs: &mut [Option<Seq>], slot: u32) -> &mut Seq {
    seqs[slot as usize]
        .as_mut()
        .expect("slots in queues and plans hold live sequences")
}

/// See the module docs.
pub struct Scheduler {
    cfg: SchedConfig,
    /// Longest sequence: `min(max_model_len, num_blocks * block_size)`.
    max_len: usize,
    kv: KvManager,
    seqs: Vec<Option<Seq>>,
    free_slots: Vec<u32>,
    index: U64Map<u32>,
    running: Vec<u32>,
    waiting: VecDeque<u32>,
    plan: StepPlan,
    pending: bool,
    preemptions: u64,
    received: u64,
    finished: u64,
    aborted: u64,
    waiting_prompt_blocks: usize,
    /// Prefix holds by key (see [`Scheduler::hold_prefix`]); few, so a list.
    holds: Vec<(u64, KvSeq)>,
}

impl Scheduler {
    /// A scheduler with an empty pool of `cfg.num_blocks` blocks.
    pub fn new(cfg: SchedConfig) -> Result<Self, SchedError> {
        let bad = |m: String| Err(SchedError::Config(m));
        if cfg.block_size == 0 || cfg.num_blocks == 0 {
            return bad("block_size and num_blocks must be at least 1".into());
        }
        if cfg.max_num_seqs == 0 || cfg.max_num_batched_tokens == 0 {
            return bad("max_num_seqs and max_num_batched_tokens must be at least 1".into());
        }
        let max_len = cfg
            .max_model_len
            .min(cfg.block_size.saturating_mul(cfg.num_blocks));
        if max_len < 2 {
            return bad(format!(
                "max_model_len {} with a pool of {} tokens leaves no room for a prompt and one \
                 generated token",
                cfg.max_model_len,
                cfg.block_size.saturating_mul(cfg.num_blocks)
            ));
        }
        if !cfg.enable_chunked_prefill && cfg.max_num_batched_tokens < max_len {
            return bad(format!(
                "without chunked prefill, max_num_batched_tokens ({}) must be at least the \
                 longest sequence ({max_len})",
                cfg.max_num_batched_tokens
            ));
        }
        let kv = KvManager::new(&KvConfig {
            block_size: cfg.block_size,
            num_blocks: cfg.num_blocks,
            enable_prefix_caching: cfg.enable_prefix_caching,
            enable_events: cfg.enable_events,
        })?;
        let cap = cfg.max_num_seqs.min(4096);
        let mut index = U64Map::default();
        index.reserve(cap);
        Ok(Self {
            max_len,
            kv,
            seqs: Vec::with_capacity(cap),
            free_slots: Vec::new(),
            index,
            running: Vec::with_capacity(cap),
            waiting: VecDeque::with_capacity(cap),
            plan: StepPlan {
                seqs: Vec::with_capacity(cap),
                preempted: Vec::with_capacity(cap),
                num_tokens: 0,
            },
            pending: false,
            preemptions: 0,
            received: 0,
            finished: 0,
            aborted: 0,
            waiting_prompt_blocks: 0,
            holds: Vec::new(),
            cfg,
        })
    }

    /// The settings.
    pub fn config(&self) -> &SchedConfig {
        &self.cfg
    }

    /// Longest sequence (prompt plus output) this scheduler lets grow:
    /// `min(max_model_len, num_blocks * block_size)`.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The KV manager (read-only).
    pub fn kv(&self) -> &KvManager {
        &self.kv
    }

    /// Test-only: see [`KvManager::set_hash_bits_for_tests`]. Call before adding sequences.
    pub fn set_block_hash_bits_for_tests(&mut self, bits: u32) {
        self.kv.set_hash_bits_for_tests(bits);
    }

    /// Adds a host tier of `slots` blocks to the KV manager (see [`crate::kv::host`]); the
    /// runner must then perform each step's [`StepView::copies`]. Call before adding requests.
    pub fn set_host_tier(&mut self, slots: usize) -> Result<(), SchedError> {
        self.kv
            .set_host_tier(slots)
            .map_err(|e| SchedError::Config(e.to_string()))
    }

    /// Queues a request. Rejects prompts that can never run: empty, or with no room left for a
    /// generated token within [`Self::max_len`].
    pub fn add(&mut self, spec: SeqSpec) -> Result<(), SchedError> {
        let SeqSpec {
            id,
            prompt,
            max_tokens,
            extra_key,
        } = spec;
        if self.index.contains_key(&id) {
            return Err(SchedError::DuplicateId { id });
        }
        if prompt.is_empty() {
            return Err(SchedError::EmptyPrompt { id });
        }
        if max_tokens == 0 {
            return Err(SchedError::ZeroMaxTokens { id });
        }
        if prompt.len() >= self.max_len {
            return Err(SchedError::PromptTooLong {
                id,
                len: prompt.len(),
                max: self.max_len - 1,
                max_model_len: self.cfg.max_model_len,
                pool_tokens: self.cfg.block_size.saturating_mul(self.cfg.num_blocks),
            });
        }
        // Reserve room for the whole sequence up front (bounded, for very long limits), so
        // decode steps do not reallocate its token list or block table.
        let expect = (prompt.len() + max_tokens as usize)
            .min(self.max_len)
            .min(prompt.len() + RESERVE_OUTPUT_TOKENS);
        let mut prompt = prompt;
        prompt.reserve_exact(expect - prompt.len());
        let kv = self.kv.open(&extra_key);
        self.kv.reserve(&kv, expect);
        self.kv.update_hashes(&kv, &prompt);
        let seq = Seq {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            max_tokens: max_tokens as usize,
            num_computed: 0,
            kv,
            state: State::Waiting,
            waiting_blocks: 0,
            cached_tokens: None,
            preemptions: 0,
        };
        let slot = match self.free_slots.pop() {
            Some(s) => {
                self.seqs[s as usize] = Some(seq);
                s
            }
            None => {
                self.seqs.push(Some(seq));
                (self.seqs.len() - 1) as u32
            }
        };
        self.index.insert(id, slot);
        self.enqueue(slot, false);
        self.received += 1;
        tracing::trace!(id, slot, "sequence queued");
        Ok(())
    }

    #[inline]
    fn seq(&self, slot: u32) -> &Seq {
        live(&self.seqs, slot)
    }

    #[inline]
    fn seq_mut(&mut self, slot: u32) -> &mut Seq {
        live_mut(&mut self.seqs, slot)
    }

    fn enqueue(&mut self, slot: u32, front: bool) {
        let bs = self.cfg.block_size;
        let s = self.seq_mut(slot);
        s.state = State::Waiting;
        s.waiting_blocks = s.tokens.len().div_ceil(bs);
        let wb = s.waiting_blocks;
        self.waiting_prompt_blocks += wb;
        if front {
            self.waiting.push_front(slot);
        } else {
            self.waiting.push_back(slot);
        }
    }

    #[inline]
    fn capped(&self, s: &Seq) -> bool {
        s.tokens.len() >= self.max_len || s.tokens.len() - s.prompt_len >= s.max_tokens
    }

    /// Plans the next step (see the module docs) and returns it. Call
    /// [`Self::complete_step`] once the step has run, before planning the next one. If the step
    /// could not run, just call `schedule` again: progress only advances in `complete_step`, so
    /// the same positions are planned again (the blocks already allocated for them are kept).
    pub fn schedule(&mut self) -> StepView<'_> {
        // The previous step's copies were performed before its forward pass.
        self.kv.begin_step();
        self.plan.seqs.clear();
        self.plan.preempted.clear();
        self.plan.num_tokens = 0;
        let mut budget = self.cfg.max_num_batched_tokens;
        let chunked = self.cfg.enable_chunked_prefill;

        // Running sequences, oldest first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let slot = self.running[i];
            let s = self.seq(slot);
            let known = s.tokens.len();
            let start = s.num_computed;
            let mut len = known - start;
            if len == 0 || self.capped(s) {
                // Done or waiting for a sample: the caller will finish it.
                i += 1;
                continue;
            }
            if len > budget {
                if !chunked {
                    i += 1;
                    continue;
                }
                len = budget;
            }
            let mut scheduled = true;
            loop {
                let s = live(&self.seqs, slot);
                match self.kv.allocate_slots(&s.kv, start + len, None) {
                    Ok(_) => break,
                    Err(_) => {
                        // `running` holds at least `slot` itself, so a victim always exists.
                        let Some(victim) = self.running.pop() else {
                            scheduled = false;
                            break;
                        };
                        self.preempt(victim);
                        if victim == slot {
                            scheduled = false;
                            break;
                        }
                    }
                }
            }
            if !scheduled {
                break;
            }
            let id = self.seq(slot).id;
            self.plan.seqs.push(ScheduledSeq {
                id,
                start,
                len,
                sample: start + len == known,
                slot,
            });
            self.plan.num_tokens += len;
            budget -= len;
            i += 1;
        }

        // Waiting sequences, in order, unless this step preempted.
        let mut w = 0;
        while self.plan.preempted.is_empty()
            && budget > 0
            && self.running.len() < self.cfg.max_num_seqs
            && w < self.waiting.len()
        {
            let slot = self.waiting[w];
            let s = self.seq(slot);
            if self.capped(s) {
                w += 1;
                continue;
            }
            let known = s.tokens.len();
            let s = live(&self.seqs, slot);
            self.kv.update_hashes(&s.kv, &s.tokens);
            let hit = self.kv.lookup_prefix(&s.kv, known);
            if self.cfg.share_inflight_prefixes
                && self.running.iter().any(|&r| {
                    self.kv
                        .computes_next_block(&s.kv, hit, &live(&self.seqs, r).kv)
                })
            {
                w += 1;
                continue;
            }
            let start = hit.total() * self.cfg.block_size;
            let mut len = known - start;
            if len > budget {
                if !chunked {
                    break;
                }
                len = budget;
            }
            if self.cfg.admit_whole_future && !self.running.is_empty() {
                // (Alone it runs whatever it needs: waiting would never make it fit better.)
                let s = self.seq(slot);
                let future = (s.prompt_len + s.max_tokens)
                    .min(self.max_len)
                    .div_ceil(self.cfg.block_size);
                let need = future.saturating_sub(self.kv.prefix_blocks_in_use(&s.kv, hit));
                let room = self
                    .kv
                    .pool()
                    .free()
                    .saturating_sub(self.committed_running());
                if need > room {
                    break;
                }
            }
            let s = live(&self.seqs, slot);
            if self
                .kv
                .allocate_slots(&s.kv, start + len, Some(hit))
                .is_err()
            {
                break;
            }
            if w == 0 {
                self.waiting.pop_front();
            } else {
                self.waiting.remove(w);
            }
            let s = self.seq_mut(slot);
            s.state = State::Running;
            s.num_computed = start;
            s.cached_tokens.get_or_insert(start);
            let (id, wb) = (s.id, s.waiting_blocks);
            self.waiting_prompt_blocks -= wb;
            self.running.push(slot);
            self.plan.seqs.push(ScheduledSeq {
                id,
                start,
                len,
                sample: start + len == known,
                slot,
            });
            self.plan.num_tokens += len;
            budget -= len;
        }
        self.pending = true;
        StepView { sched: self }
    }

    fn preempt(&mut self, slot: u32) {
        let s = live_mut(&mut self.seqs, slot);
        self.kv.free(&s.kv);
        s.num_computed = 0;
        s.preemptions += 1;
        let id = s.id;
        self.preemptions += 1;
        self.plan.preempted.push(id);
        self.enqueue(slot, true);
        tracing::debug!(id, "sequence preempted");
    }

    /// The last plan (empty before the first [`Self::schedule`]).
    pub fn plan(&self) -> &StepPlan {
        &self.plan
    }

    /// Live sequence in `s`'s slot, if it is still the one scheduled.
    fn scheduled(&self, s: &ScheduledSeq) -> Option<&Seq> {
        self.seqs
            .get(s.slot as usize)?
            .as_ref()
            .filter(|q| q.id == s.id)
    }

    /// Token ids fed for a planned sequence (empty if it has ended since).
    pub fn step_tokens(&self, s: &ScheduledSeq) -> &[u32] {
        self.scheduled(s)
            .and_then(|q| q.tokens.get(s.start..s.start + s.len))
            .unwrap_or(&[])
    }

    /// Block table of a planned sequence (empty if it has ended or was preempted since).
    pub fn step_block_table(&self, s: &ScheduledSeq) -> &[BlockId] {
        self.scheduled(s)
            .map_or(&[], |q| self.kv.block_table(&q.kv))
    }

    /// Records that the planned step ran: every planned sequence's tokens are now computed
    /// (full blocks enter the prefix cache), then each `(id, token)` is appended to its
    /// sequence. A token is accepted only for a sequence whose known tokens are now all
    /// computed (a plan entry with `sample`). Sequences finished or aborted since the plan are
    /// skipped. On an unexpected sample the rest is still applied and the first error returned.
    pub fn complete_step(&mut self, sampled: &[(u64, u32)]) -> Result<(), SchedError> {
        if !self.pending {
            return Err(SchedError::NoPendingStep);
        }
        self.pending = false;
        for k in 0..self.plan.seqs.len() {
            let e = self.plan.seqs[k];
            let Some(Some(s)) = self.seqs.get_mut(e.slot as usize) else {
                continue;
            };
            if s.id != e.id || s.state != State::Running || s.num_computed != e.start {
                continue;
            }
            s.num_computed = e.start + e.len;
            self.kv.cache_computed(&s.kv, &s.tokens, s.num_computed);
        }
        let mut first_err = None;
        // Samples usually come in plan order: follow the plan to find their slots without a
        // map lookup, and fall back to the map otherwise.
        let mut cursor = 0;
        for &(id, tok) in sampled {
            let mut slot = None;
            while cursor < self.plan.seqs.len() {
                let e = &self.plan.seqs[cursor];
                cursor += 1;
                if e.sample {
                    if e.id == id {
                        slot = Some(e.slot);
                    }
                    break;
                }
            }
            let slot = slot
                .filter(|&sl| matches!(&self.seqs[sl as usize], Some(q) if q.id == id))
                .or_else(|| self.index.get(&id).copied());
            let ok = match slot {
                Some(slot) => {
                    let max_len = self.max_len;
                    let s = self.seq_mut(slot);
                    let ready = s.state == State::Running
                        && s.num_computed == s.tokens.len()
                        && s.tokens.len() < max_len
                        && s.tokens.len() - s.prompt_len < s.max_tokens;
                    if ready {
                        s.tokens.push(tok);
                    }
                    ready
                }
                None => false,
            };
            if !ok && first_err.is_none() {
                first_err = Some(SchedError::UnexpectedSample { id });
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Ends a sequence normally (the caller decided it stops) and frees its blocks, last first.
    pub fn finish(&mut self, id: u64) -> Result<SeqUsage, SchedError> {
        let u = self.remove(id)?;
        self.finished += 1;
        Ok(u)
    }

    /// Ends a sequence early (client gone, error) and frees its blocks, last first.
    pub fn abort(&mut self, id: u64) -> Result<SeqUsage, SchedError> {
        let u = self.remove(id)?;
        self.aborted += 1;
        Ok(u)
    }

    fn remove(&mut self, id: u64) -> Result<SeqUsage, SchedError> {
        let slot = self
            .index
            .remove(&id)
            .ok_or(SchedError::UnknownSeq { id })?;
        let Some(s) = self.seqs[slot as usize].take() else {
            return Err(SchedError::UnknownSeq { id });
        };
        match s.state {
            State::Running => {
                if let Some(p) = self.running.iter().position(|&x| x == slot) {
                    self.running.remove(p);
                }
            }
            State::Waiting => {
                if let Some(p) = self.waiting.iter().position(|&x| x == slot) {
                    self.waiting.remove(p);
                }
                self.waiting_prompt_blocks -= s.waiting_blocks;
            }
        }
        let usage = SeqUsage {
            prompt_tokens: s.prompt_len,
            output_tokens: s.tokens.len() - s.prompt_len,
            cached_tokens: s.cached_tokens.unwrap_or(0),
            preemptions: s.preemptions,
        };
        self.kv.close(s.kv);
        self.free_slots.push(slot);
        tracing::trace!(id, "sequence ended");
        Ok(usage)
    }

    /// True when the sequence may not grow: `max_tokens` generated, or [`Self::max_len`]
    /// tokens in all. The caller should then finish it with finish reason "length". `None` for
    /// an unknown id.
    pub fn is_length_capped(&self, id: u64) -> Option<bool> {
        self.index.get(&id).map(|&slot| self.capped(self.seq(slot)))
    }

    /// A sequence's known tokens (prompt then generated).
    pub fn tokens(&self, id: u64) -> Option<&[u32]> {
        self.index.get(&id).map(|&slot| &self.seq(slot).tokens[..])
    }

    /// A sequence's generated tokens.
    pub fn output_tokens(&self, id: u64) -> Option<&[u32]> {
        self.index.get(&id).map(|&slot| {
            let s = self.seq(slot);
            &s.tokens[s.prompt_len..]
        })
    }

    /// A sequence's computed tokens (its KV is in its blocks).
    pub fn num_computed(&self, id: u64) -> Option<usize> {
        self.index.get(&id).map(|&slot| self.seq(slot).num_computed)
    }

    /// Whether the sequence is running (has blocks) rather than waiting.
    pub fn is_running(&self, id: u64) -> Option<bool> {
        self.index
            .get(&id)
            .map(|&slot| self.seq(slot).state == State::Running)
    }

    /// Live sequences (running plus waiting).
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// No live sequence.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Counters and capacity now.
    pub fn stats(&self) -> SchedStats {
        SchedStats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            preemptions: self.preemptions,
            requests_received: self.received,
            requests_finished: self.finished,
            requests_aborted: self.aborted,
            waiting_prompt_blocks: self.waiting_prompt_blocks,
            running_prefill_tokens: self
                .running
                .iter()
                .map(|&slot| {
                    let s = self.seq(slot);
                    s.prompt_len.saturating_sub(s.num_computed)
                })
                .sum(),
            running_kv_tokens: self
                .running
                .iter()
                .map(|&slot| self.seq(slot).num_computed)
                .sum(),
            committed_blocks: self.committed_blocks(),
            capacity: self.kv.snapshot(),
        }
    }

    /// Blocks a new sequence with this prompt and `max_tokens` would take out of the room, and
    /// the room (free blocks not promised to live sequences): its whole future
    /// (`prompt + max_tokens`, capped at the model's length) less the leading cached blocks of
    /// the prompt that live sequences or holds use (shared, never taken from the free list).
    /// Cached blocks nobody uses are free blocks: reusing them takes room like a new block.
    pub fn room_for(&self, prompt: &[u32], max_tokens: u32, extra_key: &[u8]) -> (usize, usize) {
        let bs = self.cfg.block_size;
        let total = (prompt.len() + max_tokens as usize)
            .min(self.max_len)
            .div_ceil(bs);
        let mut shared = 0;
        if self.cfg.enable_prefix_caching && prompt.len() > 1 {
            // As in admission: the hit never covers the last prompt token.
            let full = &prompt[..(prompt.len() - 1) / bs * bs];
            let pool = self.kv.pool();
            for h in crate::kv::hash::block_hashes(full, bs, extra_key) {
                match pool.lookup(h) {
                    Some(b) => shared += usize::from(pool.ref_count(b) > 0),
                    None => break,
                }
            }
        }
        let room = self
            .kv
            .pool()
            .free()
            .saturating_sub(self.committed_blocks());
        (total.saturating_sub(shared), room)
    }

    /// Blocks the sequence in `slot` may still allocate up to `prompt + max_tokens`.
    fn committed_of(&self, slot: u32) -> usize {
        let s = self.seq(slot);
        let cap = (s.prompt_len + s.max_tokens).min(self.max_len);
        cap.div_ceil(self.cfg.block_size)
            .saturating_sub(self.kv.block_table(&s.kv).len())
    }

    /// What the running sequences may still allocate; O(running sequences).
    fn committed_running(&self) -> usize {
        self.running
            .iter()
            .map(|&slot| self.committed_of(slot))
            .sum()
    }

    /// See [`SchedStats::committed_blocks`]; O(live sequences).
    fn committed_blocks(&self) -> usize {
        self.running
            .iter()
            .chain(self.waiting.iter())
            .map(|&slot| self.committed_of(slot))
            .sum()
    }

    /// Holds the leading cached blocks of `hashes` under `key` (replacing an earlier hold of the
    /// same key) so no allocation evicts them, taking at most `max_free` free blocks and only
    /// free blocks that no live sequence is promised (`free - committed`): a hold never makes
    /// this engine preempt. Returns the blocks held (0: none, and no hold is kept).
    pub fn hold_prefix(&mut self, key: u64, hashes: &[u64], max_free: usize) -> usize {
        self.release_hold(key);
        let room = self
            .kv
            .pool()
            .free()
            .saturating_sub(self.committed_blocks())
            .min(max_free);
        let (seq, n) = self.kv.hold_prefix(hashes, room);
        if n == 0 {
            self.kv.close(seq);
        } else {
            self.holds.push((key, seq));
        }
        n
    }

    /// Lets the blocks of hold `key` go (they stay cached, evictable, unless in use). False
    /// when there is no such hold.
    pub fn release_hold(&mut self, key: u64) -> bool {
        match self.holds.iter().position(|(k, _)| *k == key) {
            Some(i) => {
                let (_, seq) = self.holds.swap_remove(i);
                self.kv.close(seq);
                true
            }
            None => false,
        }
    }

    /// Prefix holds kept now.
    pub fn holds(&self) -> usize {
        self.holds.len()
    }

    /// Whether hold `key` is kept.
    pub fn has_hold(&self, key: u64) -> bool {
        self.holds.iter().any(|(k, _)| *k == key)
    }

    /// Block events since the last call (needs `enable_events`).
    pub fn take_events(&mut self) -> Vec<BlockEvent> {
        self.kv.take_events()
    }

    /// Every hash in the prefix cache now (for a subscriber's snapshot; the events taken after
    /// it continue from exactly this state).
    pub fn cached_hashes(&self) -> impl Iterator<Item = crate::kv::BlockHash> + '_ {
        self.kv.pool().cached_hashes()
    }

    /// Empties the prefix cache.
    pub fn reset_prefix_cache(&mut self) {
        self.kv.reset_prefix_cache();
    }

    /// Checks the scheduler's and the KV manager's invariants (tests; O(everything)).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.kv.check_invariants()?;
        if self.running.len() > self.cfg.max_num_seqs {
            return Err(format!("{} running > max_num_seqs", self.running.len()));
        }
        if self.running.len() + self.waiting.len() != self.index.len() {
            return Err("running + waiting != live sequences".into());
        }
        let mut wb = 0;
        for (&id, &slot) in &self.index {
            let s = self.seqs[slot as usize]
                .as_ref()
                .ok_or(format!("{id}: empty slot"))?;
            if s.id != id {
                return Err(format!("index {id} -> slot of {}", s.id));
            }
            let table = self.kv.block_table(&s.kv);
            if s.num_computed > s.tokens.len() || s.tokens.len() > self.max_len {
                return Err(format!(
                    "{id}: computed {} known {}",
                    s.num_computed,
                    s.tokens.len()
                ));
            }
            match s.state {
                State::Waiting => {
                    if !table.is_empty() || s.num_computed != 0 {
                        return Err(format!("waiting {id} holds blocks or progress"));
                    }
                    if !self.waiting.contains(&slot) {
                        return Err(format!("waiting {id} not queued"));
                    }
                    wb += s.waiting_blocks;
                }
                State::Running => {
                    if table.len() * self.cfg.block_size < s.num_computed {
                        return Err(format!("running {id}: table too short"));
                    }
                    if !self.running.contains(&slot) {
                        return Err(format!("running {id} not in the running list"));
                    }
                }
            }
        }
        if wb != self.waiting_prompt_blocks {
            return Err(format!(
                "waiting_prompt_blocks {} != {wb}",
                self.waiting_prompt_blocks
            ));
        }
        if self.plan.num_tokens > self.cfg.max_num_batched_tokens {
            return Err("plan over the token budget".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
