//! The block pool: one arena of KV blocks, their reference counts, the LRU free list and the
//! prefix-cache map (block hash → block).
//!
//! It owns which block is free, which is referenced and which holds a cached hash; it knows
//! nothing of requests (that is [`super::manager`]). Every operation is O(1) and does no heap
//! allocation: the free list is intrusive (prev/next ids stored in the blocks themselves) and the
//! hash map is sized for every block up front. It must never hand out a referenced block, never
//! let a reference count underflow, and never keep a hash in the map whose block was reallocated.
//!
//! Eviction is lazy: a freed block keeps its hash and stays hittable until it is handed out
//! again. The free list is ordered for reuse: the head is reused first. Freed blocks that hold a
//! hash go to the tail (least recently freed cached blocks are evicted first); freed blocks
//! without a hash go to the head, since reusing them loses nothing.

use std::collections::HashMap;
use std::hash::Hasher;

use super::hash::BlockHash;

/// Index of a block in the pool (`0..total`). Block `i` of a request's block table holds that
/// request's token positions `i * block_size .. (i + 1) * block_size`.
pub type BlockId = u32;

const NIL: u32 = u32::MAX;

/// A prefix-cache change, for routers (the proto's `BlockEvent`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockEvent {
    /// These blocks now hold these chained hashes (full blocks only).
    Stored(Vec<BlockHash>),
    /// The host tier now keeps these hashes (blocks the device pool evicted, see
    /// [`super::host`]): a prefix hit there is copied back instead of recomputed.
    HostStored(Vec<BlockHash>),
    /// These hashes are gone from the host tier.
    HostRemoved(Vec<BlockHash>),
    /// These hashes are gone from the cache (their blocks were reallocated).
    Removed(Vec<BlockHash>),
    /// Every cached hash is gone (cache reset).
    AllCleared,
    /// These cached blocks were free (evictable) and a request now uses them again.
    InUse(Vec<BlockHash>),
    /// No request uses these cached blocks any more: they are free, kept until reused
    /// (evictable). A cached block not named here since it was stored or last `InUse` is in use.
    Evictable(Vec<BlockHash>),
}

#[derive(Clone, Copy)]
pub(crate) enum EventKind {
    Stored,
    Removed,
    HostStored,
    HostRemoved,
    InUse,
    Evictable,
}

/// A fast hasher for `u64` map keys (block hashes, request ids): the key is mixed with a
/// per-process secret by one folded 128-bit multiply. The secret only decides where keys land
/// in this process's hash tables (it never leaves the process and changes no result), so
/// prompts crafted to make block hashes collide in the table cannot degrade lookups.
#[derive(Clone, Copy)]
pub(crate) struct U64Hasher {
    key: u64,
    acc: u64,
}

impl Hasher for U64Hasher {
    #[inline]
    fn finish(&self) -> u64 {
        // An odd multiplier derived from the secret, so the multiply is a bijection.
        let mul = (self.key.rotate_left(32) ^ 0x9E37_79B9_7F4A_7C15) | 1;
        let m = u128::from(self.acc ^ self.key) * u128::from(mul);
        (m as u64) ^ ((m >> 64) as u64)
    }
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are used; this keeps the Hasher contract for anything else.
        for &b in bytes {
            self.acc = (self.acc ^ u64::from(b)).wrapping_mul(0x100_0000_01B3);
        }
    }
    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.acc ^= n;
    }
}

/// Builds [`U64Hasher`]s with this process's secret.
#[derive(Clone, Copy)]
pub(crate) struct U64Build {
    key: u64,
}

impl Default for U64Build {
    fn default() -> Self {
        static KEY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let key = *KEY.get_or_init(|| {
            use std::hash::BuildHasher;
            // std's RandomState is seeded from the OS once per process.
            std::collections::hash_map::RandomState::new().hash_one(0x006b_7672_6f75_7465_u64)
        });
        Self { key }
    }
}

impl std::hash::BuildHasher for U64Build {
    type Hasher = U64Hasher;
    #[inline]
    fn build_hasher(&self) -> U64Hasher {
        U64Hasher {
            key: self.key,
            acc: 0,
        }
    }
}

pub(crate) type U64Map<V> = HashMap<u64, V, U64Build>;

#[derive(Clone, Copy)]
struct Block {
    hash: BlockHash,
    ref_cnt: u32,
    prev: u32,
    next: u32,
    hashed: bool,
}

/// The arena of blocks; see the module docs.
pub struct BlockPool {
    blocks: Vec<Block>,
    head: u32,
    tail: u32,
    free_len: usize,
    cached_free: usize,
    map: U64Map<BlockId>,
    events_enabled: bool,
    events: Vec<BlockEvent>,
}

impl BlockPool {
    /// A pool of `num_blocks` free, empty blocks. With `events_enabled`, every cache change is
    /// recorded until [`Self::take_events`] drains it.
    ///
    /// # Panics
    /// If `num_blocks >= u32::MAX` (block ids are `u32`; [`super::KvManager::new`] checks this
    /// and returns an error instead).
    pub fn new(num_blocks: usize, events_enabled: bool) -> Self {
        assert!(
            num_blocks < NIL as usize,
            "block ids are u32 and u32::MAX is reserved"
        );
        let n = num_blocks as u32;
        let blocks = (0..n)
            .map(|i| Block {
                hash: 0,
                ref_cnt: 0,
                prev: if i == 0 { NIL } else { i - 1 },
                next: if i + 1 == n { NIL } else { i + 1 },
                hashed: false,
            })
            .collect();
        let mut map = U64Map::default();
        map.reserve(num_blocks);
        Self {
            blocks,
            head: if n == 0 { NIL } else { 0 },
            tail: if n == 0 { NIL } else { n - 1 },
            free_len: num_blocks,
            cached_free: 0,
            map,
            events_enabled,
            events: Vec::new(),
        }
    }

    /// Blocks in the pool.
    pub fn total(&self) -> usize {
        self.blocks.len()
    }
    /// Blocks referenced by nobody (including those that still hold a cached hash).
    pub fn free(&self) -> usize {
        self.free_len
    }
    /// Free blocks that still hold a cached hash.
    pub fn cached_evictable(&self) -> usize {
        self.cached_free
    }
    /// Hashes currently in the prefix cache.
    pub fn cached(&self) -> usize {
        self.map.len()
    }
    /// Reference count of a block.
    pub fn ref_count(&self, id: BlockId) -> u32 {
        self.blocks[id as usize].ref_cnt
    }
    /// The hash a block holds, if it is in the prefix cache.
    pub fn block_hash(&self, id: BlockId) -> Option<BlockHash> {
        let b = &self.blocks[id as usize];
        b.hashed.then_some(b.hash)
    }

    /// The block caching `hash`, if any.
    #[inline]
    pub fn lookup(&self, hash: BlockHash) -> Option<BlockId> {
        self.map.get(&hash).copied()
    }

    #[inline]
    fn unlink(&mut self, id: u32) {
        let Block { prev, next, .. } = self.blocks[id as usize];
        if prev == NIL {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        self.free_len -= 1;
        if self.blocks[id as usize].hashed {
            self.cached_free -= 1;
        }
    }

    #[inline]
    fn push_back(&mut self, id: u32) {
        let b = &mut self.blocks[id as usize];
        b.prev = self.tail;
        b.next = NIL;
        if self.tail == NIL {
            self.head = id;
        } else {
            self.blocks[self.tail as usize].next = id;
        }
        self.tail = id;
    }

    #[inline]
    fn push_front(&mut self, id: u32) {
        let b = &mut self.blocks[id as usize];
        b.next = self.head;
        b.prev = NIL;
        if self.head == NIL {
            self.tail = id;
        } else {
            self.blocks[self.head as usize].prev = id;
        }
        self.head = id;
    }

    pub(crate) fn record(&mut self, kind: EventKind, hash: BlockHash) {
        if !self.events_enabled {
            return;
        }
        match (self.events.last_mut(), kind) {
            (Some(BlockEvent::Stored(v)), EventKind::Stored)
            | (Some(BlockEvent::Removed(v)), EventKind::Removed)
            | (Some(BlockEvent::InUse(v)), EventKind::InUse)
            | (Some(BlockEvent::Evictable(v)), EventKind::Evictable)
            | (Some(BlockEvent::HostStored(v)), EventKind::HostStored)
            | (Some(BlockEvent::HostRemoved(v)), EventKind::HostRemoved) => v.push(hash),
            _ => self.events.push(match kind {
                EventKind::Stored => BlockEvent::Stored(vec![hash]),
                EventKind::Removed => BlockEvent::Removed(vec![hash]),
                EventKind::InUse => BlockEvent::InUse(vec![hash]),
                EventKind::Evictable => BlockEvent::Evictable(vec![hash]),
                EventKind::HostStored => BlockEvent::HostStored(vec![hash]),
                EventKind::HostRemoved => BlockEvent::HostRemoved(vec![hash]),
            }),
        }
    }

    /// Takes the least recently freed block, evicting the hash it held (lazy eviction), and
    /// returns it with a reference count of 1. `None` when every block is referenced.
    #[inline]
    pub fn allocate(&mut self) -> Option<BlockId> {
        self.allocate_evicting().map(|(id, _)| id)
    }

    /// [`Self::allocate`], also returning the hash the block held, if it evicted one (its
    /// contents are still in the block until the caller writes to it).
    #[inline]
    pub fn allocate_evicting(&mut self) -> Option<(BlockId, Option<BlockHash>)> {
        let id = self.head;
        if id == NIL {
            return None;
        }
        self.unlink(id);
        let b = &mut self.blocks[id as usize];
        debug_assert_eq!(b.ref_cnt, 0, "a free block is unreferenced");
        b.ref_cnt = 1;
        if b.hashed {
            b.hashed = false;
            let h = b.hash;
            self.map.remove(&h);
            self.record(EventKind::Removed, h);
            return Some((id, Some(h)));
        }
        Some((id, None))
    }

    /// Adds a reference to a block (a prefix-cache hit). A free block leaves the free list and
    /// keeps its hash.
    #[inline]
    pub fn touch(&mut self, id: BlockId) {
        if self.blocks[id as usize].ref_cnt == 0 {
            self.unlink(id);
            let b = &self.blocks[id as usize];
            if b.hashed {
                let h = b.hash;
                self.record(EventKind::InUse, h);
            }
        }
        self.blocks[id as usize].ref_cnt += 1;
    }

    /// Drops one reference. At zero the block joins the free list: at the tail if it holds a hash
    /// (it stays hittable until reused), at the head if not.
    ///
    /// # Panics
    /// If the block is not referenced (a double free is a bug in the caller's bookkeeping, and
    /// going on would hand the block out twice).
    #[inline]
    pub fn release(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        assert!(
            b.ref_cnt > 0,
            "block {id} released more often than referenced"
        );
        b.ref_cnt -= 1;
        if b.ref_cnt == 0 {
            self.free_len += 1;
            if b.hashed {
                let h = b.hash;
                self.cached_free += 1;
                self.push_back(id);
                self.record(EventKind::Evictable, h);
            } else {
                self.push_front(id);
            }
        }
    }

    /// Puts a referenced block in the prefix cache under `hash`. Returns false (and changes
    /// nothing) when the block already holds a hash or another block already caches `hash` (two
    /// requests computed the same block: the first stays cached, the second is freed normally).
    pub fn register(&mut self, id: BlockId, hash: BlockHash) -> bool {
        let b = &self.blocks[id as usize];
        debug_assert!(b.ref_cnt > 0, "only blocks in use are registered");
        if b.hashed || self.map.contains_key(&hash) {
            return false;
        }
        self.map.insert(hash, id);
        let b = &mut self.blocks[id as usize];
        b.hashed = true;
        b.hash = hash;
        self.record(EventKind::Stored, hash);
        true
    }

    /// Empties the prefix cache (blocks in use keep their contents but are no longer hittable).
    pub fn reset_cache(&mut self) {
        for b in &mut self.blocks {
            b.hashed = false;
        }
        self.map.clear();
        self.cached_free = 0;
        if self.events_enabled {
            self.events.clear();
            self.events.push(BlockEvent::AllCleared);
        }
    }

    /// The cache events since the last call, oldest first. Consecutive events of one kind are
    /// merged (one `Stored` with many hashes).
    pub fn take_events(&mut self) -> Vec<BlockEvent> {
        std::mem::take(&mut self.events)
    }

    /// The cached hashes no request uses (evictable), in no particular order.
    pub fn evictable_hashes(&self) -> impl Iterator<Item = BlockHash> + '_ {
        self.blocks
            .iter()
            .filter(|b| b.hashed && b.ref_cnt == 0)
            .map(|b| b.hash)
    }

    /// Every hash in the cache (for a subscriber's snapshot), in no particular order.
    pub fn cached_hashes(&self) -> impl Iterator<Item = BlockHash> + '_ {
        self.map.keys().copied()
    }

    /// Checks the pool's own invariants (tests and debugging; O(total)).
    pub fn check(&self) -> Result<(), String> {
        let mut seen = vec![false; self.blocks.len()];
        let (mut n, mut cached, mut prev, mut cur) = (0usize, 0usize, NIL, self.head);
        while cur != NIL {
            let b = self
                .blocks
                .get(cur as usize)
                .ok_or(format!("free list holds bad id {cur}"))?;
            if std::mem::replace(&mut seen[cur as usize], true) {
                return Err(format!("block {cur} twice in the free list"));
            }
            if b.ref_cnt != 0 {
                return Err(format!(
                    "block {cur} is free and referenced ({})",
                    b.ref_cnt
                ));
            }
            if b.prev != prev {
                return Err(format!("block {cur} has a bad prev link"));
            }
            cached += usize::from(b.hashed);
            n += 1;
            prev = cur;
            cur = b.next;
        }
        if prev != self.tail {
            return Err("tail does not end the free list".into());
        }
        if n != self.free_len || cached != self.cached_free {
            return Err(format!(
                "counters: free {} (walked {n}), cached free {} (walked {cached})",
                self.free_len, self.cached_free
            ));
        }
        for (i, b) in self.blocks.iter().enumerate() {
            if b.ref_cnt == 0 && !seen[i] {
                return Err(format!(
                    "block {i} is unreferenced but not in the free list"
                ));
            }
            if b.hashed && self.map.get(&b.hash) != Some(&(i as u32)) {
                return Err(format!(
                    "block {i} holds hash {:#x} the map does not point at it",
                    b.hash
                ));
            }
        }
        for (&h, &id) in &self.map {
            let b = self
                .blocks
                .get(id as usize)
                .ok_or(format!("map points at bad id {id}"))?;
            if !b.hashed || b.hash != h {
                return Err(format!(
                    "map entry {h:#x} -> {id}, block holds another hash"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_until_empty_then_none() {
        let mut p = BlockPool::new(3, false);
        let ids: Vec<_> = (0..3).map(|_| p.allocate().unwrap()).collect();
        assert_eq!(ids, vec![0, 1, 2]);
        assert_eq!(p.allocate(), None);
        assert_eq!(p.free(), 0);
        p.check().unwrap();
        p.release(1);
        assert_eq!(p.allocate(), Some(1));
        p.check().unwrap();
    }

    #[test]
    fn empty_pool() {
        let mut p = BlockPool::new(0, true);
        assert_eq!(p.allocate(), None);
        assert_eq!((p.total(), p.free()), (0, 0));
        p.check().unwrap();
    }

    #[test]
    fn lazy_eviction_keeps_freed_hash_hittable_until_reuse() {
        let mut p = BlockPool::new(2, true);
        let a = p.allocate().unwrap();
        assert!(p.register(a, 0xAA));
        p.release(a);
        assert_eq!((p.free(), p.cached_evictable()), (2, 1));
        assert_eq!(p.lookup(0xAA), Some(a));
        // The unhashed block is reused first, so the cached one survives one more allocation.
        let b = p.allocate().unwrap();
        assert_ne!(a, b);
        assert_eq!(p.lookup(0xAA), Some(a));
        // Touching the cached block takes it off the free list with its hash intact.
        p.touch(a);
        assert_eq!((p.free(), p.cached_evictable()), (0, 0));
        p.release(a);
        p.release(b);
        let c = p.allocate().unwrap();
        assert_eq!(c, b, "the unhashed block goes to the head");
        let d = p.allocate().unwrap();
        assert_eq!(d, a);
        assert_eq!(p.lookup(0xAA), None);
        assert_eq!(
            p.take_events(),
            vec![
                BlockEvent::Stored(vec![0xAA]),
                BlockEvent::Evictable(vec![0xAA]),
                BlockEvent::InUse(vec![0xAA]),
                BlockEvent::Evictable(vec![0xAA]),
                BlockEvent::Removed(vec![0xAA])
            ]
        );
        assert!(p.take_events().is_empty());
        p.check().unwrap();
    }

    #[test]
    fn use_events_follow_the_reference_count_of_cached_blocks() {
        let mut p = BlockPool::new(3, true);
        let (a, b) = (p.allocate().unwrap(), p.allocate().unwrap());
        p.register(a, 1);
        p.register(b, 2);
        // A second user of `a` changes nothing a router sees; the last release does.
        p.touch(a);
        p.release(a);
        assert_eq!(p.take_events(), vec![BlockEvent::Stored(vec![1, 2])]);
        p.release(a);
        p.release(b);
        assert_eq!(p.take_events(), vec![BlockEvent::Evictable(vec![1, 2])]);
        let mut evictable: Vec<_> = p.evictable_hashes().collect();
        evictable.sort_unstable();
        assert_eq!(evictable, vec![1, 2]);
        p.touch(b);
        assert_eq!(p.take_events(), vec![BlockEvent::InUse(vec![2])]);
        assert_eq!(p.evictable_hashes().collect::<Vec<_>>(), vec![1]);
        // An unhashed block never shows.
        let c = p.allocate().unwrap();
        p.release(c);
        assert!(p.take_events().is_empty());
        p.check().unwrap();
    }

    #[test]
    fn duplicate_hash_is_not_registered_twice() {
        let mut p = BlockPool::new(2, true);
        let (a, b) = (p.allocate().unwrap(), p.allocate().unwrap());
        assert!(p.register(a, 7));
        assert!(!p.register(b, 7));
        assert!(!p.register(a, 8), "a block holds one hash");
        assert_eq!(p.lookup(7), Some(a));
        assert_eq!(p.block_hash(b), None);
        p.check().unwrap();
    }

    #[test]
    fn shared_block_is_freed_at_last_reference() {
        let mut p = BlockPool::new(1, false);
        let a = p.allocate().unwrap();
        p.register(a, 1);
        p.touch(a);
        assert_eq!(p.ref_count(a), 2);
        p.release(a);
        assert_eq!(p.free(), 0);
        p.release(a);
        assert_eq!((p.free(), p.cached_evictable()), (1, 1));
        p.check().unwrap();
    }

    #[test]
    #[should_panic(expected = "released more often")]
    fn double_release_panics() {
        let mut p = BlockPool::new(1, false);
        let a = p.allocate().unwrap();
        p.release(a);
        p.release(a);
    }

    #[test]
    fn reset_clears_map_and_emits_all_cleared() {
        let mut p = BlockPool::new(2, true);
        let a = p.allocate().unwrap();
        p.register(a, 5);
        p.release(a);
        p.reset_cache();
        assert_eq!((p.cached(), p.cached_evictable()), (0, 0));
        assert_eq!(p.lookup(5), None);
        assert_eq!(p.take_events(), vec![BlockEvent::AllCleared]);
        p.check().unwrap();
    }

    #[test]
    fn events_disabled_records_nothing() {
        let mut p = BlockPool::new(1, false);
        let a = p.allocate().unwrap();
        p.register(a, 5);
        p.release(a);
        p.allocate();
        assert!(p.take_events().is_empty());
    }
}
