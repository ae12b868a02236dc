//! The host tier: a bounded pool of slots in host memory that keeps prefix blocks the device
//! pool evicted, so a request whose prefix was evicted gets those blocks copied back instead of
//! recomputed (vLLM's CPU offloading, LMCache, Dynamo's KVBM do the same).
//!
//! Pure bookkeeping, like the pool: which slot holds which chained hash (with the verification
//! digest and token ids a hit is checked against, see [`super::manager`]), and the LRU order of
//! the slots. The copies themselves are the runner's: the manager records them
//! ([`super::manager::KvCopies`]) and the engine performs them before the step's forward pass.
//!
//! The tier is inclusive: a block copied back keeps its host slot, so evicting it from the
//! device again costs no copy. Every operation is O(1) (intrusive LRU list, map sized up front)
//! except [`HostTier::store`] when slots are pinned (see there).

use super::hash::BlockHash;
use super::pool::U64Map;

/// Index of a slot in the host tier (`0..capacity`).
pub type HostSlot = u32;

const NIL: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct Entry {
    hash: BlockHash,
    digest: u64,
    used: bool,
    /// Copied back this step: its contents are read after the step's offloads, so no offload
    /// may overwrite it before then.
    pinned: bool,
    prev: u32,
    next: u32,
}

/// See the module docs.
pub struct HostTier {
    block_size: usize,
    entries: Vec<Entry>,
    tokens: Vec<u32>,
    map: U64Map<HostSlot>,
    /// Least recently used slot (replaced first); unused slots sit at this end.
    head: u32,
    /// Most recently used slot.
    tail: u32,
    pinned: Vec<HostSlot>,
}

/// What [`HostTier::store`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// The hash was already in the tier (same contents): nothing to copy.
    Present,
    /// Copy the block into this slot; the hash it replaced, if any, is gone from the tier.
    Into(HostSlot, Option<BlockHash>),
    /// Every slot is pinned this step: the block is dropped, not offloaded.
    NoRoom,
}

impl HostTier {
    /// A tier of `capacity` empty slots of `block_size` tokens.
    ///
    /// # Panics
    /// If `capacity >= u32::MAX` (the manager checks this first and returns an error).
    pub fn new(capacity: usize, block_size: usize) -> Self {
        assert!(capacity < NIL as usize, "host slots are u32");
        let n = capacity as u32;
        let entries = (0..n)
            .map(|i| Entry {
                hash: 0,
                digest: 0,
                used: false,
                pinned: false,
                prev: if i == 0 { NIL } else { i - 1 },
                next: if i + 1 == n { NIL } else { i + 1 },
            })
            .collect();
        let mut map = U64Map::default();
        map.reserve(capacity);
        Self {
            block_size,
            entries,
            tokens: vec![0; capacity * block_size],
            map,
            head: if n == 0 { NIL } else { 0 },
            tail: if n == 0 { NIL } else { n - 1 },
            pinned: Vec::new(),
        }
    }

    /// Slots in the tier.
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    /// Slots holding a block.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The slot holding `hash`, if it is in the tier.
    #[inline]
    pub fn lookup(&self, hash: BlockHash) -> Option<HostSlot> {
        self.map.get(&hash).copied()
    }

    /// Whether `slot` holds a block with this verification digest and these token ids.
    pub fn verified(&self, slot: HostSlot, digest: u64, tokens: &[u32]) -> bool {
        let e = &self.entries[slot as usize];
        let at = slot as usize * self.block_size;
        e.used && e.digest == digest && self.tokens.get(at..at + self.block_size) == Some(tokens)
    }

    /// Every hash in the tier, in no particular order (for a subscriber's snapshot).
    pub fn hashes(&self) -> impl Iterator<Item = BlockHash> + '_ {
        self.map.keys().copied()
    }

    fn unlink(&mut self, i: u32) {
        let Entry { prev, next, .. } = self.entries[i as usize];
        if prev == NIL {
            self.head = next;
        } else {
            self.entries[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.entries[next as usize].prev = prev;
        }
    }

    fn push_back(&mut self, i: u32) {
        let e = &mut self.entries[i as usize];
        e.prev = self.tail;
        e.next = NIL;
        if self.tail == NIL {
            self.head = i;
        } else {
            self.entries[self.tail as usize].next = i;
        }
        self.tail = i;
    }

    /// Marks `slot` most recently used and pins it until [`Self::unpin_all`]: it is being copied
    /// back this step.
    pub fn pin(&mut self, slot: HostSlot) {
        self.unlink(slot);
        self.push_back(slot);
        let e = &mut self.entries[slot as usize];
        if !e.pinned {
            e.pinned = true;
            self.pinned.push(slot);
        }
    }

    /// Ends the step: no slot is pinned any more.
    pub fn unpin_all(&mut self) {
        for &s in &self.pinned {
            self.entries[s as usize].pinned = false;
        }
        self.pinned.clear();
    }

    /// Keeps a block evicted from the device: `hash` with its verification `digest` and
    /// `tokens` (one block). Takes the least recently used slot that is not pinned (walking
    /// past pinned ones, at most as many as were copied back this step).
    pub fn store(&mut self, hash: BlockHash, digest: u64, tokens: &[u32]) -> Stored {
        if let Some(&s) = self.map.get(&hash) {
            let e = &self.entries[s as usize];
            let at = s as usize * self.block_size;
            if e.digest == digest && self.tokens[at..at + self.block_size] == *tokens {
                if !e.pinned {
                    self.unlink(s);
                    self.push_back(s);
                }
                return Stored::Present;
            }
            // The same public hash over other contents (a collision): the tier keeps the newer.
            if e.pinned {
                return Stored::NoRoom;
            }
            self.map.remove(&hash);
            self.entries[s as usize].used = false;
            return self.fill(s, hash, digest, tokens, Some(hash));
        }
        let mut s = self.head;
        while s != NIL && self.entries[s as usize].pinned {
            s = self.entries[s as usize].next;
        }
        if s == NIL {
            return Stored::NoRoom;
        }
        let old = self.entries[s as usize];
        let replaced = if old.used {
            self.map.remove(&old.hash);
            Some(old.hash)
        } else {
            None
        };
        self.fill(s, hash, digest, tokens, replaced)
    }

    fn fill(
        &mut self,
        s: HostSlot,
        hash: BlockHash,
        digest: u64,
        tokens: &[u32],
        replaced: Option<BlockHash>,
    ) -> Stored {
        let bs = self.block_size;
        self.tokens[s as usize * bs..(s as usize + 1) * bs].copy_from_slice(tokens);
        let e = &mut self.entries[s as usize];
        e.hash = hash;
        e.digest = digest;
        e.used = true;
        self.map.insert(hash, s);
        self.unlink(s);
        self.push_back(s);
        Stored::Into(s, replaced)
    }

    /// Empties the tier (a cache reset).
    pub fn clear(&mut self) {
        for e in &mut self.entries {
            e.used = false;
        }
        self.map.clear();
    }

    /// Checks the tier's invariants (tests; O(capacity)): the LRU list holds every slot once,
    /// the map names exactly the used slots under their own hashes.
    pub fn check(&self) -> Result<(), String> {
        let mut seen = vec![false; self.entries.len()];
        let (mut prev, mut cur, mut n) = (NIL, self.head, 0usize);
        while cur != NIL {
            let e = &self.entries[cur as usize];
            if seen[cur as usize] {
                return Err(format!("host slot {cur} twice in the LRU list"));
            }
            seen[cur as usize] = true;
            if e.prev != prev {
                return Err(format!("host slot {cur}: bad prev link"));
            }
            (prev, cur, n) = (cur, e.next, n + 1);
        }
        if prev != self.tail || n != self.entries.len() {
            return Err(format!(
                "host LRU list holds {n} of {} slots",
                self.entries.len()
            ));
        }
        let used = self.entries.iter().filter(|e| e.used).count();
        if used != self.map.len() {
            return Err(format!("{used} used host slots, {} mapped", self.map.len()));
        }
        for (&h, &s) in &self.map {
            let e = &self.entries[s as usize];
            if !e.used || e.hash != h {
                return Err(format!(
                    "host map names slot {s} for a hash it does not hold"
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
    fn replaces_the_least_recently_used_slot_and_reports_it() {
        let mut t = HostTier::new(2, 2);
        assert_eq!(t.store(1, 10, &[1, 1]), Stored::Into(0, None));
        assert_eq!(t.store(2, 20, &[2, 2]), Stored::Into(1, None));
        // Storing 1 again touches it: 2 is now the oldest.
        assert_eq!(t.store(1, 10, &[1, 1]), Stored::Present);
        assert_eq!(t.store(3, 30, &[3, 3]), Stored::Into(1, Some(2)));
        assert_eq!(t.lookup(2), None);
        assert_eq!(t.lookup(1), Some(0));
        assert!(t.verified(0, 10, &[1, 1]));
        assert!(!t.verified(0, 11, &[1, 1]));
        assert!(!t.verified(0, 10, &[1, 2]));
        t.check().unwrap();
    }

    #[test]
    fn a_pinned_slot_is_never_overwritten_in_its_step() {
        let mut t = HostTier::new(2, 1);
        t.store(1, 1, &[1]);
        t.store(2, 2, &[2]);
        t.pin(0);
        t.pin(1);
        assert_eq!(t.store(3, 3, &[3]), Stored::NoRoom);
        t.unpin_all();
        t.pin(1);
        assert_eq!(t.store(3, 3, &[3]), Stored::Into(0, Some(1)));
        t.check().unwrap();
    }

    #[test]
    fn a_colliding_hash_replaces_the_older_contents() {
        let mut t = HostTier::new(2, 1);
        t.store(7, 1, &[1]);
        assert_eq!(t.store(7, 2, &[2]), Stored::Into(0, Some(7)));
        assert!(t.verified(0, 2, &[2]));
        assert_eq!(t.len(), 1);
        t.check().unwrap();
    }

    #[test]
    fn an_empty_tier_stores_nothing() {
        let mut t = HostTier::new(0, 4);
        assert_eq!(t.store(1, 1, &[1, 2, 3, 4]), Stored::NoRoom);
        assert!(t.is_empty());
        t.check().unwrap();
    }
}
