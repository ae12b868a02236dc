//! The prefix index: block hash → the agents caching it, and the walk that finds how many
//! leading blocks of a prompt each agent holds.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// Hasher for block hashes, which are already well-mixed 64-bit values: one multiply-rotate
/// instead of SipHash keeps the prefix walk cheap at 1,000 agents.
#[derive(Default, Clone, Copy)]
pub struct BlockHasher(u64);

impl Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (v ^ self.0)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }
}

pub(crate) type BlockMap<V> = HashMap<u64, V, BuildHasherDefault<BlockHasher>>;
pub(crate) type BlockSet = HashSet<u64, BuildHasherDefault<BlockHasher>>;

/// Words of a bitset over `n` agent slots.
pub(crate) fn words_for(n: usize) -> usize {
    n.div_ceil(64)
}

/// The agents caching one block hash: a sorted list of slots while few hold it, a bitset over
/// slots once the list would be larger than the bitset. The prefix walk intersects the set of
/// agents still matching with this, word by word, so a hash held by hundreds of agents costs
/// `agents / 64` word operations, not one per holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Holders {
    Few(Vec<u32>),
    Many { bits: Vec<u64>, count: u32 },
}

impl Holders {
    /// Largest list kept as a list for a cluster whose bitsets have `words` words.
    pub(crate) fn few_max(words: usize) -> usize {
        2 * words.max(4)
    }

    /// Adds `slot`; `words` is the bitset size for the current number of agents.
    pub(crate) fn insert(&mut self, slot: u32, words: usize) {
        match self {
            Holders::Few(v) => {
                if let Err(pos) = v.binary_search(&slot) {
                    v.insert(pos, slot);
                    if v.len() > Self::few_max(words) {
                        let mut bits = vec![0u64; words.max(slot as usize / 64 + 1)];
                        for &s in v.iter() {
                            bits[s as usize / 64] |= 1 << (s % 64);
                        }
                        let count = v.len() as u32;
                        *self = Holders::Many { bits, count };
                    }
                }
            }
            Holders::Many { bits, count } => {
                let w = slot as usize / 64;
                if w >= bits.len() {
                    bits.resize(w + 1, 0);
                }
                let bit = 1u64 << (slot % 64);
                if bits[w] & bit == 0 {
                    bits[w] |= bit;
                    *count += 1;
                }
            }
        }
    }

    /// Removes `slot`; returns true when no agent holds the hash any more.
    pub(crate) fn remove(&mut self, slot: u32, words: usize) -> bool {
        match self {
            Holders::Few(v) => {
                if let Ok(pos) = v.binary_search(&slot) {
                    v.remove(pos);
                }
            }
            Holders::Many { bits, count } => {
                let bit = 1u64 << (slot % 64);
                if let Some(word) = bits.get_mut(slot as usize / 64) {
                    if *word & bit != 0 {
                        *word &= !bit;
                        *count -= 1;
                    }
                }
                // Back to a list well below the threshold, so one agent toggling a hash does
                // not convert it back and forth.
                if (*count as usize) <= Self::few_max(words) / 2 {
                    let mut v = Vec::with_capacity(*count as usize);
                    for (w, &word) in bits.iter().enumerate() {
                        let mut m = word;
                        while m != 0 {
                            v.push((w * 64) as u32 + m.trailing_zeros());
                            m &= m - 1;
                        }
                    }
                    *self = Holders::Few(v);
                }
            }
        }
        self.is_empty()
    }

    pub(crate) fn is_empty(&self) -> bool {
        match self {
            Holders::Few(v) => v.is_empty(),
            Holders::Many { count, .. } => *count == 0,
        }
    }

    pub(crate) fn contains(&self, slot: u32) -> bool {
        match self {
            Holders::Few(v) => v.binary_search(&slot).is_ok(),
            Holders::Many { bits, .. } => bits
                .get(slot as usize / 64)
                .is_some_and(|w| w & (1 << (slot % 64)) != 0),
        }
    }

    /// Bits of word `w` (slots `64w..64w+64`) set for this hash's holders; `pos` is a cursor into
    /// a list, advanced across calls for increasing `w`.
    #[inline]
    pub(crate) fn word(&self, w: usize, pos: &mut usize) -> u64 {
        match self {
            Holders::Few(v) => {
                let mut m = 0u64;
                while let Some(&s) = v.get(*pos) {
                    let sw = s as usize / 64;
                    if sw > w {
                        break;
                    }
                    if sw == w {
                        m |= 1 << (s % 64);
                    }
                    *pos += 1;
                }
                m
            }
            Holders::Many { bits, .. } => bits.get(w).copied().unwrap_or(0),
        }
    }
}

/// Prompt blocks whose index entries the walk looks up at once.
const WALK_CHUNK: usize = 32;

/// Reusable buffers of a prefix walk, so a decision allocates nothing once warm.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    /// Agents whose cache still matches every prompt block walked so far (bitset over slots).
    pub(crate) matching: Vec<u64>,
    /// Leading prompt blocks cached, by slot.
    pub(crate) overlap: Vec<u32>,
}

/// Sets `overlap[slot] = value` for every slot whose bit is set in `mask` (word `w`).
#[inline]
fn mark(overlap: &mut [u32], w: usize, mut mask: u64, value: u32) {
    while mask != 0 {
        let slot = w * 64 + mask.trailing_zeros() as usize;
        if let Some(o) = overlap.get_mut(slot) {
            *o = value;
        }
        mask &= mask - 1;
    }
}

/// Fills `scratch.overlap` (length `n`) with the number of leading `hashes` each agent caches.
///
/// One pass over the prompt's hashes keeps the set of agents still matching as a bitset and stops
/// as soon as it is empty; an agent leaving the set at block `i` has overlap `i`. The cost is
/// `O(blocks walked × live words + holders in short lists)`, with no allocation once the buffers
/// have grown to `n`.
pub(crate) fn prefix_overlap(
    index: &BlockMap<Holders>,
    hashes: &[u64],
    n: usize,
    scratch: &mut Scratch,
) {
    let Scratch { matching, overlap } = scratch;
    overlap.clear();
    overlap.resize(n, 0);
    let words = words_for(n);
    matching.clear();
    matching.resize(words, 0);
    let Some(first) = hashes.first().and_then(|h| index.get(h)) else {
        return;
    };
    let mut pos = 0;
    let mut alive = 0u32;
    for (w, m) in matching.iter_mut().enumerate() {
        *m = first.word(w, &mut pos);
        alive += m.count_ones();
    }
    // Words outside `lo..hi` are zero: the range only shrinks.
    let mut lo = 0;
    let mut hi = words;
    let mut start = 1;
    // Short runs first: a walk that ends after a few blocks does not pay for many lookups.
    let mut chunk = 4;
    while start < hashes.len() {
        // Look up a run of hashes before walking it: the lookups are independent, so their cache
        // misses overlap instead of being paid one after another (they dominate the walk).
        let end = (start + chunk).min(hashes.len());
        chunk = (chunk * 2).min(WALK_CHUNK);
        let mut run: [Option<&Holders>; WALK_CHUNK] = [None; WALK_CHUNK];
        let mut touched = 0u64;
        for (r, h) in run.iter_mut().zip(&hashes[start..end]) {
            *r = index.get(h);
            touched ^= match r {
                Some(Holders::Many { bits, .. }) => bits.get(lo).copied().unwrap_or(0),
                Some(Holders::Few(v)) => v.first().copied().map_or(0, u64::from),
                None => 0,
            };
        }
        std::hint::black_box(touched);
        for (k, holders) in run.iter().take(end - start).enumerate() {
            while lo < hi && matching[lo] == 0 {
                lo += 1;
            }
            while hi > lo && matching[hi - 1] == 0 {
                hi -= 1;
            }
            if lo == hi {
                return;
            }
            let i = (start + k) as u32;
            let Some(holders) = holders else {
                for (w, m) in matching.iter().enumerate().take(hi).skip(lo) {
                    mark(overlap, w, *m, i);
                }
                return;
            };
            match holders {
                Holders::Few(v)
                    if v.iter().filter(|&&s| has_bit(matching, s as usize)).count()
                        == alive as usize =>
                {
                    // Every agent still matching holds this block too: nothing changes.
                }
                Holders::Many { bits, .. } if bits.len() >= hi => {
                    // The common case for a popular prefix: plain word-wise AND.
                    for ((w, m), b) in matching[lo..hi].iter_mut().enumerate().zip(&bits[lo..hi]) {
                        let gone = *m & !b;
                        if gone != 0 {
                            mark(overlap, lo + w, gone, i);
                            alive -= gone.count_ones();
                            *m &= b;
                        }
                    }
                }
                _ => {
                    let mut pos = match holders {
                        // Skip the list entries below the live range.
                        Holders::Few(v) => v.partition_point(|&s| (s as usize) < lo * 64),
                        Holders::Many { .. } => 0,
                    };
                    for (w, m) in matching.iter_mut().enumerate().take(hi).skip(lo) {
                        if *m == 0 {
                            continue;
                        }
                        let keep = *m & holders.word(w, &mut pos);
                        let gone = *m & !keep;
                        mark(overlap, w, gone, i);
                        alive -= gone.count_ones();
                        *m = keep;
                    }
                }
            }
        }
        start = end;
    }
    let full = hashes.len() as u32;
    for (w, m) in matching.iter().enumerate().take(hi).skip(lo) {
        mark(overlap, w, *m, full);
    }
}

/// True when bit `slot` is set in the bitset `bits`.
pub(crate) fn has_bit(bits: &[u64], slot: usize) -> bool {
    bits.get(slot / 64)
        .is_some_and(|w| (w >> (slot % 64)) & 1 == 1)
}
