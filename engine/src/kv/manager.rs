//! The KV-cache manager: per-request block tables over the [`BlockPool`], prefix-cache lookups
//! and registration, and the capacity snapshot.
//!
//! It owns which blocks each open sequence holds, the sequence's chained block hashes and its
//! extra key, and the prefix-cache counters. It decides nothing about scheduling (that is
//! `engine::sched`) and never sees a model. Sequence state lives in slots that are reused, so in
//! steady state opening, growing, freeing and closing sequences do not allocate.
//!
//! Rules it keeps:
//! - a prefix hit never covers a sequence's last known token (that token must be computed to
//!   produce logits);
//! - a block is registered in the cache only once the caller says its tokens are computed
//!   ([`KvManager::cache_computed`]), so a hit always finds a block whose KV is in memory;
//! - a sequence's blocks are freed tail first, so its chain's tail is evicted before its head;
//! - a hit is verified, not trusted: the public block hash ([`super::hash`], which the gateway
//!   computes too) only finds a candidate block, which is shared only if its token ids equal the
//!   sequence's and its *verification digest* does too: a chained SipHash of the whole prefix
//!   (tokens and extra key) under a key drawn at random per process, which never leaves it. A
//!   prompt crafted to collide with another's public hash therefore never reads its KV.

use std::hash::BuildHasher;

use super::hash::{hash_block, BlockHash};
use super::host::{HostSlot, HostTier, Stored};
use super::pool::{BlockEvent, BlockId, BlockPool, EventKind};

/// Settings of a [`KvManager`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvConfig {
    /// Tokens per block (≥ 1).
    pub block_size: usize,
    /// Blocks in the pool (< `u32::MAX`).
    pub num_blocks: usize,
    /// Look up and register full blocks in the prefix cache.
    pub enable_prefix_caching: bool,
    /// Record [`BlockEvent`]s for [`KvManager::take_events`]. Leave off when nobody drains them:
    /// they accumulate until drained.
    pub enable_events: bool,
}

/// Errors of the KV manager.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// Not enough free blocks for this allocation (nothing was changed).
    #[error("does not fit: {needed} new blocks needed, {available} available")]
    DoesNotFit { needed: usize, available: usize },
    /// A prefix hit was passed for a sequence that already holds blocks, or its blocks are no
    /// longer cached (the pool changed between the lookup and the allocation).
    #[error("stale or misplaced prefix hit ({blocks} blocks)")]
    StaleHit { blocks: usize },
    /// Bad settings.
    #[error("invalid kv config: {0}")]
    Config(String),
}

/// Capacity of the pool, as reported to routers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapacitySnapshot {
    /// Tokens per block.
    pub block_size: u32,
    /// Blocks in the pool.
    pub total: u64,
    /// Blocks referenced by no request (includes `cached_evictable`).
    pub free: u64,
    /// Free blocks that still hold a cached prefix (hittable until reallocated).
    pub cached_evictable: u64,
    /// Blocks referenced by at least one request (`total - free`).
    pub used: u64,
    /// Tokens looked up in the prefix cache at admissions.
    pub prefix_query_tokens: u64,
    /// Of those, tokens found cached (in either tier).
    pub prefix_hit_tokens: u64,
    /// Of those, tokens copied back from the host tier.
    pub prefix_host_hit_tokens: u64,
    /// Slots of the host tier, and those holding a block.
    pub host_total: u64,
    pub host_used: u64,
    /// Blocks copied to the host tier, and copied back from it.
    pub offloaded_blocks: u64,
    pub reloaded_blocks: u64,
}

/// The copies one step needs before its forward pass, in this order: first every offload
/// (device block → host slot: an evicted prefix block, read before anything writes to the
/// block), then every reload (host slot → device block: a host-tier hit). No offload targets a
/// slot a reload of the same step reads (those slots are pinned).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KvCopies {
    pub offload: Vec<(BlockId, HostSlot)>,
    pub reload: Vec<(HostSlot, BlockId)>,
}

impl KvCopies {
    pub fn is_empty(&self) -> bool {
        self.offload.is_empty() && self.reload.is_empty()
    }
}

/// An open sequence's handle. Not `Clone`: [`KvManager::close`] consumes it, so a sequence
/// cannot be closed twice.
#[derive(Debug, PartialEq, Eq)]
pub struct KvSeq {
    slot: u32,
}

/// Result of a prefix lookup, to pass back to [`KvManager::allocate_slots`] on admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrefixHit {
    /// Leading full blocks found in the device pool.
    pub blocks: usize,
    /// Full blocks after those found in the host tier (copied back on admission).
    pub host_blocks: usize,
    /// Tokens the lookup was for (the sequence's known tokens).
    pub query_tokens: usize,
}

#[derive(Default)]
struct SeqTable {
    blocks: Vec<BlockId>,
    hashes: Vec<BlockHash>,
    /// Verification digests of the same blocks (see the module docs).
    digests: Vec<u64>,
    /// The token ids of the hashed blocks (`hashes.len() * block_size`).
    tokens: Vec<u32>,
    /// Blocks `0..num_cached` were hits or have been offered to the cache.
    num_cached: usize,
    extra_key: Vec<u8>,
    open: bool,
}

/// See the module docs.
pub struct KvManager {
    block_size: usize,
    prefix_caching: bool,
    pool: BlockPool,
    tables: Vec<SeqTable>,
    free_slots: Vec<u32>,
    prefix_query_tokens: u64,
    prefix_hit_tokens: u64,
    /// Verification digest and token ids of each block, as registered (meaningful while the
    /// block is in the cache).
    block_digest: Vec<u64>,
    block_tokens: Vec<u32>,
    /// The per-process key of the verification digests.
    digest_key: std::hash::RandomState,
    /// Public hashes are ANDed with this: all ones except in tests that need collisions.
    hash_mask: u64,
    /// Evicted prefix blocks kept in host memory (none without `--kv-offload-memory`).
    host: Option<HostTier>,
    /// The copies the current step needs (see [`KvCopies`]).
    copies: KvCopies,
    prefix_host_hit_tokens: u64,
    offloaded_blocks: u64,
    reloaded_blocks: u64,
}

impl PrefixHit {
    /// Blocks not to compute: device hits and host-tier hits.
    #[inline]
    pub fn total(&self) -> usize {
        self.blocks + self.host_blocks
    }
}

impl KvManager {
    /// A manager with every block free.
    pub fn new(cfg: &KvConfig) -> Result<Self, KvError> {
        if cfg.block_size == 0 {
            return Err(KvError::Config("block_size must be at least 1".into()));
        }
        if cfg.num_blocks >= u32::MAX as usize {
            return Err(KvError::Config(format!(
                "num_blocks {} is too large",
                cfg.num_blocks
            )));
        }
        Ok(Self {
            block_size: cfg.block_size,
            prefix_caching: cfg.enable_prefix_caching,
            pool: BlockPool::new(cfg.num_blocks, cfg.enable_events),
            tables: Vec::new(),
            free_slots: Vec::new(),
            prefix_query_tokens: 0,
            prefix_hit_tokens: 0,
            block_digest: vec![0; cfg.num_blocks],
            block_tokens: vec![0; cfg.num_blocks * cfg.block_size],
            digest_key: std::hash::RandomState::new(),
            hash_mask: u64::MAX,
            host: None,
            copies: KvCopies::default(),
            prefix_host_hit_tokens: 0,
            offloaded_blocks: 0,
            reloaded_blocks: 0,
        })
    }

    /// Adds a host tier of `slots` blocks: prefix blocks the pool evicts are copied there and
    /// hits on them copied back (see [`super::host`]). Needs prefix caching; 0 slots = none.
    /// Call before any sequence is opened.
    pub fn set_host_tier(&mut self, slots: usize) -> Result<(), KvError> {
        if slots >= u32::MAX as usize {
            return Err(KvError::Config(format!("{slots} host slots are too many")));
        }
        if slots > 0 && !self.prefix_caching {
            return Err(KvError::Config(
                "a host tier needs prefix caching (it keeps evicted prefix blocks)".into(),
            ));
        }
        self.host = (slots > 0).then(|| HostTier::new(slots, self.block_size));
        self.copies.offload.reserve(slots.min(4096));
        self.copies.reload.reserve(slots.min(4096));
        Ok(())
    }

    /// The host tier, if any.
    pub fn host(&self) -> Option<&HostTier> {
        self.host.as_ref()
    }

    /// Starts a step: the previous step's copies are done (the caller performed them before
    /// its forward pass), so they are forgotten and no host slot is pinned any more.
    pub fn begin_step(&mut self) {
        self.copies.offload.clear();
        self.copies.reload.clear();
        if let Some(h) = &mut self.host {
            h.unpin_all();
        }
    }

    /// The copies this step needs before its forward pass.
    pub fn copies(&self) -> &KvCopies {
        &self.copies
    }

    /// Offloads block `b`, just taken off the free list, which held `hash`: its contents go to
    /// the host tier (a copy recorded for this step) unless the tier already has them.
    fn offload(&mut self, b: BlockId, hash: BlockHash) {
        let Some(host) = &mut self.host else {
            return;
        };
        let bs = self.block_size;
        let at = b as usize * bs;
        match host.store(
            hash,
            self.block_digest[b as usize],
            &self.block_tokens[at..at + bs],
        ) {
            Stored::Present | Stored::NoRoom => {}
            Stored::Into(slot, replaced) => {
                if let Some(r) = replaced {
                    self.pool.record(EventKind::HostRemoved, r);
                }
                self.pool.record(EventKind::HostStored, hash);
                self.copies.offload.push((b, slot));
                self.offloaded_blocks += 1;
            }
        }
    }

    /// Test-only: keeps `bits` (1..=64) bits of every public block hash, so different prefixes
    /// collide often (to show that a collision never shares KV). Call before opening sequences.
    pub fn set_hash_bits_for_tests(&mut self, bits: u32) {
        self.hash_mask = if bits >= 64 {
            u64::MAX
        } else {
            (1u64 << bits.max(1)) - 1
        };
    }

    /// Hashes the full blocks of `tokens` the table has not hashed yet (public hash,
    /// verification digest, token copy).
    fn extend_table(&mut self, slot: usize, tokens: &[u32]) {
        let bs = self.block_size;
        let full = tokens.len() / bs;
        let t = &mut self.tables[slot];
        if t.hashes.len() > full {
            // Shorter tokens than hashed: keep what still holds.
            t.hashes.truncate(full);
            t.digests.truncate(full);
            t.tokens.truncate(full * bs);
            return;
        }
        while t.hashes.len() < full {
            let i = t.hashes.len();
            let block = &tokens[i * bs..(i + 1) * bs];
            let h = hash_block(t.hashes.last().copied(), &t.extra_key, block) & self.hash_mask;
            let d = self.digest_key.hash_one((
                t.digests.last().copied(),
                block,
                t.extra_key.as_slice(),
            ));
            t.hashes.push(h);
            t.digests.push(d);
            t.tokens.extend_from_slice(block);
        }
    }

    /// Whether cached block `b` holds exactly block `i` of the sequence in `t` (same tokens,
    /// same whole prefix).
    fn verified(&self, t: &SeqTable, i: usize, b: BlockId) -> bool {
        let bs = self.block_size;
        let at = b as usize * bs;
        t.digests.get(i) == Some(&self.block_digest[b as usize])
            && t.tokens.get(i * bs..(i + 1) * bs) == Some(&self.block_tokens[at..at + bs])
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The pool (read-only).
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Opens a sequence with no blocks. `extra_key` is mixed into its block hashes.
    pub fn open(&mut self, extra_key: &[u8]) -> KvSeq {
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None => {
                self.tables.push(SeqTable::default());
                (self.tables.len() - 1) as u32
            }
        };
        let t = &mut self.tables[slot as usize];
        debug_assert!(!t.open && t.blocks.is_empty());
        t.open = true;
        t.hashes.clear();
        t.digests.clear();
        t.tokens.clear();
        t.num_cached = 0;
        t.extra_key.clear();
        t.extra_key.extend_from_slice(extra_key);
        KvSeq { slot }
    }

    /// Reserves table room for a sequence of `num_tokens` tokens, so growing to that length
    /// does not allocate.
    pub fn reserve(&mut self, seq: &KvSeq, num_tokens: usize) {
        let n = num_tokens.div_ceil(self.block_size);
        let t = &mut self.tables[seq.slot as usize];
        t.blocks.reserve(n.saturating_sub(t.blocks.len()));
        if self.prefix_caching {
            t.hashes.reserve(n.saturating_sub(t.hashes.len()));
            t.digests.reserve(n.saturating_sub(t.digests.len()));
            t.tokens
                .reserve((n * self.block_size).saturating_sub(t.tokens.len()));
        }
    }

    /// Frees the sequence's blocks and forgets it.
    pub fn close(&mut self, seq: KvSeq) {
        self.free(&seq);
        let t = &mut self.tables[seq.slot as usize];
        t.open = false;
        self.free_slots.push(seq.slot);
    }

    #[inline]
    fn table(&self, seq: &KvSeq) -> &SeqTable {
        &self.tables[seq.slot as usize]
    }

    /// The sequence's block table: block `i` holds positions `i * block_size ..`.
    #[inline]
    pub fn block_table(&self, seq: &KvSeq) -> &[BlockId] {
        &self.table(seq).blocks
    }

    /// The chained hashes known for the sequence's full blocks.
    pub fn block_hashes(&self, seq: &KvSeq) -> &[BlockHash] {
        &self.table(seq).hashes
    }

    /// Frees the sequence's blocks, last block first, keeping its hashes (its tokens are
    /// unchanged, so a later admission can hit its own cached prefix). Used for preemption.
    pub fn free(&mut self, seq: &KvSeq) {
        let t = &mut self.tables[seq.slot as usize];
        for &b in t.blocks.iter().rev() {
            self.pool.release(b);
        }
        t.blocks.clear();
        t.num_cached = 0;
    }

    /// Computes the hashes of the full blocks of `tokens` (the sequence's known tokens) not yet
    /// hashed. Cheap when nothing new is full. No-op without prefix caching.
    pub fn update_hashes(&mut self, seq: &KvSeq, tokens: &[u32]) {
        if !self.prefix_caching {
            return;
        }
        let slot = seq.slot as usize;
        if tokens.len() / self.block_size > self.tables[slot].hashes.len() {
            self.extend_table(slot, tokens);
        }
    }

    /// How many leading blocks of a sequence with `num_tokens` known tokens are cached (call
    /// [`Self::update_hashes`] first). Capped so the hit never covers the last token.
    pub fn lookup_prefix(&self, seq: &KvSeq, num_tokens: usize) -> PrefixHit {
        let mut hit = PrefixHit {
            blocks: 0,
            host_blocks: 0,
            query_tokens: num_tokens,
        };
        if !self.prefix_caching || num_tokens == 0 {
            return hit;
        }
        let t = self.table(seq);
        let max = ((num_tokens - 1) / self.block_size).min(t.hashes.len());
        while hit.blocks < max {
            match self.pool.lookup(t.hashes[hit.blocks]) {
                Some(b) if self.verified(t, hit.blocks, b) => hit.blocks += 1,
                _ => break,
            }
        }
        if let Some(host) = &self.host {
            let bs = self.block_size;
            while hit.total() < max {
                let i = hit.total();
                match host.lookup(t.hashes[i]) {
                    Some(s) if host.verified(s, t.digests[i], &t.tokens[i * bs..(i + 1) * bs]) => {
                        hit.host_blocks += 1
                    }
                    _ => break,
                }
            }
        }
        hit
    }

    /// Of the `hit` blocks [`Self::lookup_prefix`] found for `seq`, those some sequence or hold
    /// uses now: sharing them takes no free block.
    pub fn prefix_blocks_in_use(&self, seq: &KvSeq, hit: PrefixHit) -> usize {
        let t = self.table(seq);
        t.hashes
            .iter()
            .take(hit.blocks)
            .filter(|&&h| {
                self.pool
                    .lookup(h)
                    .is_some_and(|b| self.pool.ref_count(b) > 0)
            })
            .count()
    }

    /// Whether `other` (a running sequence) will compute the block that `seq` misses first
    /// after its `hit`: the same chained hash at the same position, allocated or still to
    /// come in `other`'s known tokens, not yet in the cache. `seq` then gets that block (and
    /// every one `other` shares with it after) as a hit by waiting until `other` has computed
    /// it, instead of computing it a second time.
    pub fn computes_next_block(&self, seq: &KvSeq, hit: PrefixHit, other: &KvSeq) -> bool {
        if !self.prefix_caching {
            return false;
        }
        let (t, o) = (self.table(seq), self.table(other));
        let i = hit.total();
        // Never the block holding `seq`'s last known token: a hit stops before it.
        if i >= (hit.query_tokens.saturating_sub(1)) / self.block_size {
            return false;
        }
        match (t.hashes.get(i), o.hashes.get(i)) {
            (Some(a), Some(b)) => {
                a == b && t.digests.get(i) == o.digests.get(i) && i >= o.num_cached
            }
            _ => false,
        }
    }

    /// Makes the sequence's block table cover `num_tokens` positions.
    ///
    /// On admission pass the [`PrefixHit`] from [`Self::lookup_prefix`] (the sequence must hold
    /// no blocks): its blocks are shared first (taken off the free list if they sit there), then
    /// new blocks are allocated. Returns the number of newly allocated blocks, or
    /// [`KvError::DoesNotFit`] (changing nothing) when the free list cannot supply them; hit
    /// blocks that sit in the free list count against what is available, since sharing them
    /// takes them off it.
    pub fn allocate_slots(
        &mut self,
        seq: &KvSeq,
        num_tokens: usize,
        hit: Option<PrefixHit>,
    ) -> Result<usize, KvError> {
        let slot = seq.slot as usize;
        let have = self.tables[slot].blocks.len();
        // The common decode case: the table already covers the positions (no division).
        if hit.is_none() && num_tokens <= have * self.block_size {
            return Ok(0);
        }
        let hit_blocks = hit.map_or(0, |h| h.blocks);
        let host_blocks = hit.map_or(0, |h| h.host_blocks);
        let want = num_tokens.div_ceil(self.block_size);
        if hit_blocks + host_blocks > 0 {
            let t = &self.tables[slot];
            if have != 0 || hit_blocks + host_blocks > t.hashes.len() {
                return Err(KvError::StaleHit {
                    blocks: hit_blocks + host_blocks,
                });
            }
        }
        let needed = want.saturating_sub(have + hit_blocks);
        if needed < host_blocks {
            // A host hit is copied into a new block, so it must be within the positions asked.
            return Err(KvError::StaleHit {
                blocks: hit_blocks + host_blocks,
            });
        }
        let mut hits_in_free = 0;
        for &h in &self.tables[slot].hashes[..hit_blocks] {
            match self.pool.lookup(h) {
                Some(b) => hits_in_free += usize::from(self.pool.ref_count(b) == 0),
                None => return Err(KvError::StaleHit { blocks: hit_blocks }),
            }
        }
        let host_hits = hit_blocks..hit_blocks + host_blocks;
        if host_blocks > 0 {
            let Some(host) = &self.host else {
                return Err(KvError::StaleHit {
                    blocks: host_blocks,
                });
            };
            let t = &self.tables[slot];
            if t.hashes[host_hits.clone()]
                .iter()
                .any(|&h| host.lookup(h).is_none())
            {
                return Err(KvError::StaleHit {
                    blocks: host_blocks,
                });
            }
        }
        let available = self.pool.free() - hits_in_free;
        if needed > available {
            return Err(KvError::DoesNotFit { needed, available });
        }
        let t = &mut self.tables[slot];
        for i in 0..hit_blocks {
            // Looked up above and the pool has not changed since.
            let Some(b) = self.pool.lookup(t.hashes[i]) else {
                unreachable!("hit checked above")
            };
            self.pool.touch(b);
            t.blocks.push(b);
        }
        if let Some(host) = &mut self.host {
            // Pinned, the slots read this step keep their contents while the allocations
            // below offload evicted blocks.
            for &h in &t.hashes[host_hits.clone()] {
                if let Some(s) = host.lookup(h) {
                    host.pin(s);
                }
            }
        }
        if let Some(h) = hit {
            t.num_cached = hit_blocks + host_blocks;
            self.prefix_query_tokens += h.query_tokens as u64;
            self.prefix_hit_tokens += ((hit_blocks + host_blocks) * self.block_size) as u64;
            self.prefix_host_hit_tokens += (host_blocks * self.block_size) as u64;
        }
        for _ in 0..needed {
            let Some((b, evicted)) = self.pool.allocate_evicting() else {
                unreachable!("free count checked above")
            };
            if let Some(h) = evicted {
                self.offload(b, h);
            }
            self.tables[slot].blocks.push(b);
        }
        if host_blocks > 0 {
            self.reload(slot, host_hits);
        }
        Ok(needed)
    }

    /// Copies back the host hits `range` of the sequence in `slot` into the blocks just
    /// allocated for them, and caches those blocks under their hashes.
    fn reload(&mut self, slot: usize, range: std::ops::Range<usize>) {
        let bs = self.block_size;
        let Some(host) = &self.host else {
            return;
        };
        let t = &self.tables[slot];
        for i in range {
            let b = t.blocks[i];
            // Pinned above, so still there.
            let Some(s) = host.lookup(t.hashes[i]) else {
                unreachable!("host hit pinned above")
            };
            self.copies.reload.push((s, b));
            self.reloaded_blocks += 1;
            if self.pool.register(b, t.hashes[i]) {
                self.block_digest[b as usize] = t.digests[i];
                self.block_tokens[b as usize * bs..(b as usize + 1) * bs]
                    .copy_from_slice(&t.tokens[i * bs..(i + 1) * bs]);
            }
        }
    }

    /// Registers in the prefix cache every full block of the sequence whose tokens are now
    /// computed (`num_computed` positions; `tokens` are the sequence's known tokens). Blocks
    /// already cached (hits) and blocks whose hash another block already caches are skipped.
    pub fn cache_computed(&mut self, seq: &KvSeq, tokens: &[u32], num_computed: usize) {
        if !self.prefix_caching {
            return;
        }
        let slot = seq.slot as usize;
        let t = &self.tables[slot];
        // The common case: no new block became full (no division).
        if num_computed < (t.num_cached + 1) * self.block_size {
            return;
        }
        let full = (num_computed.min(tokens.len()) / self.block_size).min(t.blocks.len());
        if full <= t.num_cached {
            return;
        }
        if t.hashes.len() < full {
            self.extend_table(slot, tokens);
        }
        let bs = self.block_size;
        let t = &mut self.tables[slot];
        for i in t.num_cached..full {
            let b = t.blocks[i];
            if self.pool.register(b, t.hashes[i]) {
                // What a later hit on this block is verified against.
                self.block_digest[b as usize] = t.digests[i];
                self.block_tokens[b as usize * bs..(b as usize + 1) * bs]
                    .copy_from_slice(&t.tokens[i * bs..(i + 1) * bs]);
            }
        }
        t.num_cached = full;
    }

    /// Holds the leading cached blocks of `hashes` (chained block hashes, as
    /// [`Self::block_hashes`] gives them) so they cannot be evicted: a router keeps a prefix for
    /// a request it will send here once room frees. Stops at the first hash not cached, and
    /// takes at most `max_free` blocks off the free list (blocks already in use are held at no
    /// cost; each free one held lowers the room of everything else). Returns the hold, a
    /// sequence owning those blocks ([`Self::close`] it to let them go), and how many it holds.
    pub fn hold_prefix(&mut self, hashes: &[BlockHash], max_free: usize) -> (KvSeq, usize) {
        let seq = self.open(&[]);
        if !self.prefix_caching {
            return (seq, 0);
        }
        let mut taken_free = 0;
        let t = &mut self.tables[seq.slot as usize];
        for &h in hashes {
            let Some(b) = self.pool.lookup(h) else {
                break;
            };
            if self.pool.ref_count(b) == 0 {
                if taken_free == max_free {
                    break;
                }
                taken_free += 1;
            }
            self.pool.touch(b);
            t.blocks.push(b);
            t.hashes.push(h);
        }
        t.num_cached = t.blocks.len();
        let n = t.blocks.len();
        (seq, n)
    }

    /// Empties the prefix cache (emits `AllCleared`).
    pub fn reset_prefix_cache(&mut self) {
        self.pool.reset_cache();
        if let Some(h) = &mut self.host {
            h.clear();
        }
        for t in &mut self.tables {
            // Nothing is cached any more. The blocks in use still hold valid KV, so they are
            // offered to the cache again at the sequence's next `cache_computed`.
            t.num_cached = 0;
        }
    }

    /// The capacity now.
    pub fn snapshot(&self) -> CapacitySnapshot {
        let total = self.pool.total() as u64;
        let free = self.pool.free() as u64;
        CapacitySnapshot {
            block_size: self.block_size as u32,
            total,
            free,
            cached_evictable: self.pool.cached_evictable() as u64,
            used: total - free,
            prefix_query_tokens: self.prefix_query_tokens,
            prefix_hit_tokens: self.prefix_hit_tokens,
            prefix_host_hit_tokens: self.prefix_host_hit_tokens,
            host_total: self.host.as_ref().map_or(0, |h| h.capacity() as u64),
            host_used: self.host.as_ref().map_or(0, |h| h.len() as u64),
            offloaded_blocks: self.offloaded_blocks,
            reloaded_blocks: self.reloaded_blocks,
        }
    }

    /// Block events since the last call (empty unless events are enabled).
    pub fn take_events(&mut self) -> Vec<BlockEvent> {
        self.pool.take_events()
    }

    /// Checks every invariant of the pool and the tables (tests; O(total + table sizes)):
    /// each block's reference count equals the number of table entries naming it, a block is
    /// free iff unreferenced, every cached hash maps to a block holding it, and each table
    /// covers no fewer hashes than the blocks it offered to the cache.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.pool.check()?;
        if let Some(h) = &self.host {
            h.check()?;
        }
        let mut refs = vec![0u32; self.pool.total()];
        for (slot, t) in self.tables.iter().enumerate() {
            if !t.open && !t.blocks.is_empty() {
                return Err(format!("closed slot {slot} holds blocks"));
            }
            if t.num_cached > t.blocks.len() {
                return Err(format!("slot {slot}: num_cached beyond its blocks"));
            }
            for (i, &b) in t.blocks.iter().enumerate() {
                let r = refs
                    .get_mut(b as usize)
                    .ok_or(format!("slot {slot} names bad block {b}"))?;
                *r += 1;
                // A block holding a hash was a hit or registered by this sequence or by another
                // one sharing it (after a cache reset): always under this sequence's own hash.
                if let Some(h) = self.pool.block_hash(b) {
                    if t.hashes.get(i) != Some(&h) {
                        return Err(format!("slot {slot} block {i} holds a foreign hash"));
                    }
                }
            }
        }
        for (b, &r) in refs.iter().enumerate() {
            if self.pool.ref_count(b as u32) != r {
                return Err(format!(
                    "block {b}: ref count {} but {r} table entries",
                    self.pool.ref_count(b as u32)
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::block_hashes;

    fn mgr(block_size: usize, num_blocks: usize) -> KvManager {
        KvManager::new(&KvConfig {
            block_size,
            num_blocks,
            enable_prefix_caching: true,
            enable_events: true,
        })
        .unwrap()
    }

    /// Opens a sequence, computes all of `tokens` and caches its full blocks.
    fn run(kv: &mut KvManager, tokens: &[u32]) -> KvSeq {
        let s = kv.open(b"");
        kv.update_hashes(&s, tokens);
        let hit = kv.lookup_prefix(&s, tokens.len());
        kv.allocate_slots(&s, tokens.len(), Some(hit)).unwrap();
        kv.cache_computed(&s, tokens, tokens.len());
        s
    }

    /// Admits `tokens` as a new sequence computing all of them (performing the step's copies
    /// on `data`, a stand-in for the KV: one value per block and slot), and returns it with its
    /// hit.
    fn admit_with_copies(
        kv: &mut KvManager,
        data: &mut (Vec<Vec<u32>>, Vec<Vec<u32>>),
        tokens: &[u32],
    ) -> (KvSeq, PrefixHit) {
        let s = kv.open(&[]);
        kv.update_hashes(&s, tokens);
        let hit = kv.lookup_prefix(&s, tokens.len());
        kv.allocate_slots(&s, tokens.len(), Some(hit)).unwrap();
        let c = kv.copies().clone();
        for &(b, h) in &c.offload {
            data.1[h as usize] = data.0[b as usize].clone();
        }
        for &(h, b) in &c.reload {
            data.0[b as usize] = data.1[h as usize].clone();
        }
        kv.begin_step();
        let bs = kv.block_size();
        let table = kv.block_table(&s).to_vec();
        for p in hit.total() * bs..tokens.len() {
            data.0[table[p / bs] as usize][p % bs] = tokens[p];
        }
        kv.cache_computed(&s, tokens, tokens.len());
        // Every block of the table holds the sequence's own tokens.
        for (p, &t) in tokens.iter().enumerate() {
            assert_eq!(data.0[table[p / bs] as usize][p % bs], t, "position {p}");
        }
        kv.check_invariants().unwrap();
        (s, hit)
    }

    #[test]
    fn an_evicted_prefix_comes_back_from_the_host_tier_with_its_contents() {
        let mut kv = mgr(2, 4);
        kv.set_host_tier(4).unwrap();
        let mut data = (vec![vec![0; 2]; 4], vec![vec![0; 2]; 4]);
        let a = [1, 2, 3, 4, 5];
        let (s, hit) = admit_with_copies(&mut kv, &mut data, &a);
        assert_eq!(hit.total(), 0);
        kv.close(s);
        kv.take_events();
        // Another prompt takes every block: A's two cached blocks go to the host tier.
        let (s, _) = admit_with_copies(&mut kv, &mut data, &[7, 8, 9, 10, 11, 12, 13]);
        let ev = kv.take_events();
        let host_stored: usize = ev
            .iter()
            .map(|e| match e {
                BlockEvent::HostStored(h) => h.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(host_stored, 2);
        assert_eq!(kv.snapshot().offloaded_blocks, 2);
        kv.close(s);
        // A again: nothing of it is on the device, both full blocks come back from the host.
        let (s, hit) = admit_with_copies(&mut kv, &mut data, &a);
        assert_eq!((hit.blocks, hit.host_blocks), (0, 2));
        let snap = kv.snapshot();
        assert_eq!((snap.reloaded_blocks, snap.prefix_host_hit_tokens), (2, 4));
        assert_eq!(snap.host_used, 4);
        kv.close(s);
        // And now it is on the device again (the tier is inclusive: no copy to evict it).
        let s2 = kv.open(&[]);
        kv.update_hashes(&s2, &a);
        let hit = kv.lookup_prefix(&s2, a.len());
        assert_eq!((hit.blocks, hit.host_blocks), (2, 0));
        kv.close(s2);
    }

    #[test]
    fn a_host_slot_read_this_step_is_not_overwritten_by_an_offload_of_the_same_step() {
        // One host slot. [5, 6] evicts [1, 2]'s blocks: the slot ends up with block [1].
        // Admitting [1, 2] again copies that slot back while its allocations evict [5, 6]'s
        // blocks, whose offloads would want the same (only) slot: they are dropped instead, so
        // the copy back reads [1], not [5, 6]'s KV (admit_with_copies checks the contents).
        let mut kv = mgr(1, 2);
        kv.set_host_tier(1).unwrap();
        let mut data = (vec![vec![0; 1]; 2], vec![vec![0; 1]; 1]);
        let (s, _) = admit_with_copies(&mut kv, &mut data, &[1, 2]);
        kv.close(s);
        let (s, _) = admit_with_copies(&mut kv, &mut data, &[5, 6]);
        kv.close(s);
        let offloaded = kv.snapshot().offloaded_blocks;
        let (s, hit) = admit_with_copies(&mut kv, &mut data, &[1, 2]);
        assert_eq!((hit.blocks, hit.host_blocks), (0, 1));
        assert_eq!(
            kv.snapshot().offloaded_blocks,
            offloaded,
            "no offload this step"
        );
        kv.close(s);
    }

    #[test]
    fn a_host_tier_needs_prefix_caching() {
        let mut kv = KvManager::new(&KvConfig {
            block_size: 2,
            num_blocks: 2,
            enable_prefix_caching: false,
            enable_events: false,
        })
        .unwrap();
        assert!(kv.set_host_tier(2).is_err());
        assert!(kv.set_host_tier(0).is_ok());
    }

    #[test]
    fn freeing_is_tail_first_so_chain_tails_are_evicted_first() {
        let mut kv = mgr(2, 4);
        let a = run(&mut kv, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let table = kv.block_table(&a).to_vec();
        kv.close(a);
        assert_eq!(kv.snapshot().cached_evictable, 4);
        // Reuse order: last block of the chain first.
        let b = kv.open(b"");
        kv.allocate_slots(&b, 2, None).unwrap();
        assert_eq!(kv.block_table(&b), &table[3..4]);
        // The head of the chain is still a hit (3 blocks), the tail is gone.
        let c = kv.open(b"");
        kv.update_hashes(&c, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(kv.lookup_prefix(&c, 9).blocks, 3);
        kv.check_invariants().unwrap();
    }

    #[test]
    fn unhashed_blocks_are_reused_before_cached_ones() {
        let mut kv = mgr(4, 3);
        // 6 tokens: one full (cached) block and one partial (unhashed) block.
        let a = run(&mut kv, &[1, 2, 3, 4, 5, 6]);
        let t = kv.block_table(&a).to_vec();
        kv.close(a);
        let b = kv.open(b"");
        kv.allocate_slots(&b, 4, None).unwrap();
        assert_eq!(
            kv.block_table(&b),
            &t[1..2],
            "the partial block is reused first"
        );
        assert_eq!(kv.snapshot().cached_evictable, 1);
        kv.check_invariants().unwrap();
    }

    #[test]
    fn concurrent_computation_of_one_prefix_caches_it_once() {
        let mut kv = mgr(2, 8);
        let p = [1, 2, 3, 4, 5];
        let a = kv.open(b"");
        let b = kv.open(b"");
        for s in [&a, &b] {
            kv.update_hashes(s, &p);
            let hit = kv.lookup_prefix(s, p.len());
            assert_eq!(hit.blocks, 0, "nothing cached yet");
            kv.allocate_slots(s, p.len(), Some(hit)).unwrap();
        }
        kv.cache_computed(&a, &p, 5);
        kv.cache_computed(&b, &p, 5);
        assert_eq!(kv.pool().cached(), 2);
        let ev = kv.take_events();
        assert_eq!(ev, vec![BlockEvent::Stored(block_hashes(&p, 2, b""))]);
        kv.close(a);
        kv.close(b);
        let s = kv.snapshot();
        assert_eq!((s.free, s.cached_evictable, s.used), (8, 2, 0));
        kv.check_invariants().unwrap();
    }

    #[test]
    fn snapshot_counts_queries_and_hits_on_admission_only() {
        let mut kv = mgr(4, 8);
        let a = run(&mut kv, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        let b = kv.open(b"");
        kv.update_hashes(&b, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        let hit = kv.lookup_prefix(&b, 10);
        // A lookup alone counts nothing.
        assert_eq!(kv.snapshot().prefix_query_tokens, 9);
        kv.allocate_slots(&b, 10, Some(hit)).unwrap();
        let s = kv.snapshot();
        assert_eq!((s.prefix_query_tokens, s.prefix_hit_tokens), (19, 8));
        assert_eq!((s.block_size, s.total, s.used), (4, 8, 4));
        kv.close(a);
        kv.close(b);
    }

    #[test]
    fn prefix_caching_off_never_hits_or_registers() {
        let mut kv = KvManager::new(&KvConfig {
            block_size: 2,
            num_blocks: 4,
            enable_prefix_caching: false,
            enable_events: true,
        })
        .unwrap();
        let a = run(&mut kv, &[1, 2, 3, 4]);
        kv.close(a);
        assert_eq!(kv.pool().cached(), 0);
        assert!(kv.take_events().is_empty());
        let b = kv.open(b"");
        kv.update_hashes(&b, &[1, 2, 3, 4, 5]);
        assert_eq!(kv.lookup_prefix(&b, 5).blocks, 0);
        assert!(kv.block_hashes(&b).is_empty());
    }

    #[test]
    fn slots_are_reused() {
        let mut kv = mgr(2, 4);
        let a = kv.open(b"x");
        let slot = a.slot;
        kv.close(a);
        let b = kv.open(b"");
        assert_eq!(b.slot, slot);
        assert!(kv.block_hashes(&b).is_empty());
        kv.close(b);
        kv.check_invariants().unwrap();
    }

    /// Two different 2-token blocks whose public hashes collide under `mask`.
    fn colliding_blocks(mask: u64) -> ([u32; 2], [u32; 2]) {
        let mut seen = std::collections::HashMap::new();
        for i in 0u32.. {
            let b = [i, i.wrapping_mul(7) + 1];
            let h = hash_block(None, b"", &b) & mask;
            if let Some(prev) = seen.insert(h, b) {
                return (prev, b);
            }
        }
        unreachable!()
    }

    #[test]
    fn a_colliding_public_hash_never_shares_a_block() {
        let mut kv = mgr(2, 16);
        kv.set_hash_bits_for_tests(8);
        let (x, y) = colliding_blocks(0xff);
        // A caches x then 7, 8; B starts with y (same public hash as x) then 7, 8.
        let a = run(&mut kv, &[x[0], x[1], 7, 8, 9]);
        let b = kv.open(b"");
        let b_tokens = [y[0], y[1], 7, 8, 9];
        kv.update_hashes(&b, &b_tokens);
        assert_eq!(
            kv.block_hashes(&b)[0],
            kv.block_hashes(&a)[0],
            "the public hashes collide"
        );
        assert_eq!(kv.lookup_prefix(&b, 5).blocks, 0, "but nothing is shared");
        // B computes its own blocks; its second block has A's tokens under a different
        // prefix: still no hit for a third sequence with A's tokens beyond A's own blocks.
        kv.allocate_slots(&b, 5, Some(kv.lookup_prefix(&b, 5)))
            .unwrap();
        kv.cache_computed(&b, &b_tokens, 5);
        kv.close(a);
        let c = kv.open(b"");
        kv.update_hashes(&c, &[x[0], x[1], 7, 8, 9]);
        let hit = kv.lookup_prefix(&c, 5);
        assert_eq!(hit.blocks, 2, "A's own blocks are still verified hits");
        kv.check_invariants().unwrap();
    }

    #[test]
    fn a_block_with_equal_tokens_under_another_prefix_is_not_a_hit() {
        let mut kv = mgr(2, 16);
        kv.set_hash_bits_for_tests(8);
        let (x, y) = colliding_blocks(0xff);
        // A caches only its first block (x).
        let a = run(&mut kv, &[x[0], x[1], 5]);
        // B (y, 7, 8): no hit; its first block is not cached (x holds that public hash), its
        // second (7, 8) is, under the public hash that (x, 7, 8) would have too.
        let b = run(&mut kv, &[y[0], y[1], 7, 8, 9]);
        kv.close(a);
        kv.close(b);
        // C (x, 7, 8): its first block is A's (verified); its second block's public hash finds
        // B's (7, 8), whose tokens are equal but whose KV was computed after y: not a hit.
        let c = kv.open(b"");
        kv.update_hashes(&c, &[x[0], x[1], 7, 8, 9]);
        assert_eq!(kv.lookup_prefix(&c, 5).blocks, 1);
        kv.check_invariants().unwrap();
    }

    #[test]
    fn with_full_hashes_verification_changes_nothing() {
        let mut kv = mgr(2, 16);
        let a = run(&mut kv, &[1, 2, 3, 4, 5]);
        kv.close(a);
        let b = kv.open(b"");
        kv.update_hashes(&b, &[1, 2, 3, 4, 6]);
        assert_eq!(kv.lookup_prefix(&b, 5).blocks, 2);
        // An extra key is part of the verified prefix too.
        let c = kv.open(b"salt");
        kv.update_hashes(&c, &[1, 2, 3, 4, 6]);
        assert_eq!(kv.lookup_prefix(&c, 5).blocks, 0);
    }
}
