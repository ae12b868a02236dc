//! The prefix-cache block hash: the wire contract between the engine and the gateway.
//!
//! This module owns the one function that names a full KV block. The gateway hashes a prompt with
//! it and compares the result with the hashes agents announce in `BlockEvent`s, so both sides
//! must agree bit for bit, in every process, on every machine, forever. It must never depend on
//! per-process state (random seeds, pointer values, `std`'s `RandomState`) nor on the platform's
//! byte order. Any change here is a protocol change: the test vectors in this file must fail.
//!
//! # The function
//!
//! ```text
//! hash_block(parent, extra_key, tokens) =
//!     XXH64(seed = parent.unwrap_or(ROOT_SEED),
//!           data = le32(tokens[0]) ‖ … ‖ le32(tokens[n-1]) ‖ extra_key ‖ le32(len(extra_key)))
//! ```
//!
//! - `XXH64` is xxHash64 (Yann Collet's specification, `XXH64(data, len, seed)`), implemented in
//!   this module and checked against the reference vectors in the tests.
//! - `le32(x)` is `x` as 4 bytes, little-endian; `‖` is concatenation.
//! - The first block of a sequence has no parent and uses the fixed seed [`ROOT_SEED`]; every
//!   later block uses its parent's hash as the seed, so a block's hash names its whole prefix.
//! - `extra_key` (a LoRA name, a cache salt; often empty) is mixed into *every* block. Its length
//!   goes last, so the encoding is unambiguous (the token bytes are a multiple of 4 long, the
//!   extra key is whatever is left before the length).
//! - Only full blocks are hashed: [`block_hashes`] ignores a trailing partial block.

/// A chained block hash (see the module docs for the exact definition).
pub type BlockHash = u64;

/// Seed of the first block of every sequence (the hash of "no parent"): the first 8 bytes of the
/// ASCII string `"kvroute1"` read as a little-endian `u64`. Fixed forever.
pub const ROOT_SEED: u64 = u64::from_le_bytes(*b"kvroute1");

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

#[inline(always)]
fn round(acc: u64, lane: u64) -> u64 {
    acc.wrapping_add(lane.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

#[inline(always)]
fn merge(acc: u64, v: u64) -> u64 {
    (acc ^ round(0, v)).wrapping_mul(P1).wrapping_add(P4)
}

#[inline(always)]
fn read_u64(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    u64::from_le_bytes(w)
}

#[inline(always)]
fn read_u32(b: &[u8]) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[..4]);
    u32::from_le_bytes(w)
}

/// Streaming xxHash64 state with a fast path for `u32` token ids (eight tokens are one 32-byte
/// stripe, read as four little-endian 64-bit lanes without going through bytes).
#[derive(Clone)]
struct Xxh64 {
    v: [u64; 4],
    seed: u64,
    total: u64,
    buf: [u8; 32],
    buf_len: usize,
}

impl Xxh64 {
    #[inline(always)]
    fn new(seed: u64) -> Self {
        Self {
            v: [
                seed.wrapping_add(P1).wrapping_add(P2),
                seed.wrapping_add(P2),
                seed,
                seed.wrapping_sub(P1),
            ],
            seed,
            total: 0,
            buf: [0; 32],
            buf_len: 0,
        }
    }

    #[inline(always)]
    fn stripe(&mut self, lanes: [u64; 4]) {
        self.v[0] = round(self.v[0], lanes[0]);
        self.v[1] = round(self.v[1], lanes[1]);
        self.v[2] = round(self.v[2], lanes[2]);
        self.v[3] = round(self.v[3], lanes[3]);
    }

    fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if self.buf_len > 0 {
            let take = (32 - self.buf_len).min(data.len());
            self.buf[self.buf_len..self.buf_len + take].copy_from_slice(&data[..take]);
            self.buf_len += take;
            data = &data[take..];
            if self.buf_len < 32 {
                return;
            }
            let b = self.buf;
            self.stripe([
                read_u64(&b[0..]),
                read_u64(&b[8..]),
                read_u64(&b[16..]),
                read_u64(&b[24..]),
            ]);
            self.buf_len = 0;
        }
        while data.len() >= 32 {
            self.stripe([
                read_u64(&data[0..]),
                read_u64(&data[8..]),
                read_u64(&data[16..]),
                read_u64(&data[24..]),
            ]);
            data = &data[32..];
        }
        self.buf[..data.len()].copy_from_slice(data);
        self.buf_len = data.len();
    }

    /// Same as `update` with the tokens' little-endian bytes, without building them.
    #[inline(always)]
    fn update_tokens(&mut self, tokens: &[u32]) {
        let mut rest = tokens;
        if self.buf_len == 0 {
            let mut chunks = tokens.chunks_exact(8);
            for c in &mut chunks {
                let lane = |i: usize| u64::from(c[i]) | (u64::from(c[i + 1]) << 32);
                self.stripe([lane(0), lane(2), lane(4), lane(6)]);
            }
            self.total += ((tokens.len() - chunks.remainder().len()) * 4) as u64;
            rest = chunks.remainder();
        }
        for t in rest {
            self.update(&t.to_le_bytes());
        }
    }

    #[inline(always)]
    fn digest(&self) -> u64 {
        let mut h = if self.total >= 32 {
            let [v1, v2, v3, v4] = self.v;
            let mut h = v1
                .rotate_left(1)
                .wrapping_add(v2.rotate_left(7))
                .wrapping_add(v3.rotate_left(12))
                .wrapping_add(v4.rotate_left(18));
            h = merge(h, v1);
            h = merge(h, v2);
            h = merge(h, v3);
            merge(h, v4)
        } else {
            self.seed.wrapping_add(P5)
        };
        h = h.wrapping_add(self.total);
        let mut tail = &self.buf[..self.buf_len];
        while tail.len() >= 8 {
            h ^= round(0, read_u64(tail));
            h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
            tail = &tail[8..];
        }
        if tail.len() >= 4 {
            h ^= u64::from(read_u32(tail)).wrapping_mul(P1);
            h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
            tail = &tail[4..];
        }
        for &b in tail {
            h ^= u64::from(b).wrapping_mul(P5);
            h = h.rotate_left(11).wrapping_mul(P1);
        }
        h ^= h >> 33;
        h = h.wrapping_mul(P2);
        h ^= h >> 29;
        h = h.wrapping_mul(P3);
        h ^ (h >> 32)
    }
}

/// XXH64 of the little-endian bytes of `head` followed by `last`, in registers (no buffer):
/// the same value as [`xxh64`] on those bytes.
#[inline(always)]
fn xxh64_words(seed: u64, head: &[u32], last: u32) -> u64 {
    let total = (head.len() as u64 + 1) * 4;
    let lane = |a: u32, b: u32| u64::from(a) | (u64::from(b) << 32);
    let mut chunks = head.chunks_exact(8);
    let rem = chunks.remainder();
    // The tail words after the last full stripe: rem ‖ last (at most 8 words).
    let mut tail = [0u32; 8];
    tail[..rem.len()].copy_from_slice(rem);
    tail[rem.len()] = last;
    let mut k = rem.len() + 1;
    let mut h = if total >= 32 {
        let mut v = [
            seed.wrapping_add(P1).wrapping_add(P2),
            seed.wrapping_add(P2),
            seed,
            seed.wrapping_sub(P1),
        ];
        for c in &mut chunks {
            v[0] = round(v[0], lane(c[0], c[1]));
            v[1] = round(v[1], lane(c[2], c[3]));
            v[2] = round(v[2], lane(c[4], c[5]));
            v[3] = round(v[3], lane(c[6], c[7]));
        }
        if k == 8 {
            let c = &tail;
            v[0] = round(v[0], lane(c[0], c[1]));
            v[1] = round(v[1], lane(c[2], c[3]));
            v[2] = round(v[2], lane(c[4], c[5]));
            v[3] = round(v[3], lane(c[6], c[7]));
            k = 0;
        }
        let [v1, v2, v3, v4] = v;
        let mut h = v1
            .rotate_left(1)
            .wrapping_add(v2.rotate_left(7))
            .wrapping_add(v3.rotate_left(12))
            .wrapping_add(v4.rotate_left(18));
        h = merge(h, v1);
        h = merge(h, v2);
        h = merge(h, v3);
        merge(h, v4)
    } else {
        seed.wrapping_add(P5)
    };
    h = h.wrapping_add(total);
    let mut i = 0;
    while i + 2 <= k {
        h ^= round(0, lane(tail[i], tail[i + 1]));
        h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
        i += 2;
    }
    if i < k {
        h ^= u64::from(tail[i]).wrapping_mul(P1);
        h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

/// xxHash64 of `data` with `seed` (the standard function; exposed for tests and for callers that
/// want to check the implementation against another one).
pub fn xxh64(data: &[u8], seed: u64) -> u64 {
    let mut s = Xxh64::new(seed);
    s.update(data);
    s.digest()
}

/// The hash of one full block: see the module docs for the exact definition.
///
/// `parent` is the previous block's hash (`None` for the first block), `extra_key` the
/// request's extra key (empty for none), `tokens` the block's token ids.
#[inline]
pub fn hash_block(parent: Option<BlockHash>, extra_key: &[u8], tokens: &[u32]) -> BlockHash {
    let seed = parent.unwrap_or(ROOT_SEED);
    if extra_key.is_empty() {
        // The common case: the data is the tokens then a zero length word, all 32-bit words.
        return xxh64_words(seed, tokens, 0);
    }
    let mut s = Xxh64::new(seed);
    s.update_tokens(tokens);
    if !extra_key.is_empty() {
        s.update(extra_key);
    }
    // A key longer than 4 GiB cannot reach here in practice; saturate rather than wrap so the
    // encoding stays a function of the input.
    let key_len = u32::try_from(extra_key.len()).unwrap_or(u32::MAX);
    s.update(&key_len.to_le_bytes());
    s.digest()
}

/// The chained hashes of every *full* block of `tokens` (a trailing partial block is ignored).
///
/// # Panics
/// If `block_size` is 0.
pub fn block_hashes(tokens: &[u32], block_size: usize, extra_key: &[u8]) -> Vec<BlockHash> {
    let mut out = Vec::with_capacity(tokens.len() / block_size.max(1));
    extend_block_hashes(&mut out, tokens, block_size, extra_key);
    out
}

/// Allocation-free form of [`block_hashes`]: makes `out` hold the chained hashes of every full
/// block of `tokens`, reusing what `out` already holds.
///
/// `out` may already hold the hashes of the first `out.len()` blocks of `tokens` (from an earlier
/// call on a shorter prefix of the same sequence); only the missing ones are computed and
/// appended. Pass an empty `out` (or [`Vec::clear`] it) for an unrelated sequence. Allocates only
/// if `out` must grow.
///
/// # Panics
/// If `block_size` is 0.
pub fn extend_block_hashes(
    out: &mut Vec<BlockHash>,
    tokens: &[u32],
    block_size: usize,
    extra_key: &[u8],
) {
    assert!(block_size > 0, "block_size must be at least 1");
    let full = tokens.len() / block_size;
    if out.len() > full {
        out.truncate(full);
        return;
    }
    let mut parent = out.last().copied();
    for i in out.len()..full {
        let h = hash_block(
            parent,
            extra_key,
            &tokens[i * block_size..(i + 1) * block_size],
        );
        out.push(h);
        parent = Some(h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le_bytes(tokens: &[u32], extra: &[u8]) -> Vec<u8> {
        let mut b: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        b.extend_from_slice(extra);
        b.extend_from_slice(&(extra.len() as u32).to_le_bytes());
        b
    }

    /// Reference values from the canonical xxHash implementation (the C library, through its
    /// Python binding `xxhash.xxh64(data, seed).intdigest()`).
    #[test]
    fn xxh64_matches_reference_vectors() {
        // The long cases hash the first `len` bytes of 0, 1, 2, …; the lengths cover every tail
        // path (< 4, 4..8, 8..32, exactly 32, stripes plus tails).
        let seq: Vec<u8> = (0..=255u8).collect();
        let cases: &[(&[u8], u64, u64)] = &[
            (b"", 0, 0xEF46_DB37_51D8_E999),
            (b"abc", 0, 0x44BC_2CF5_AD77_0999),
        ];
        for &(data, seed, want) in cases {
            assert_eq!(xxh64(data, seed), want, "data {data:?} seed {seed}");
        }
        let long_cases: &[(usize, u64, u64)] = &[
            (1, 0x0, 0xe934_a84a_db05_2768),
            (3, 0x0, 0xe5c7_bb45_33bc_65dd),
            (4, 0x1, 0x9450_6f8c_7e58_70a9),
            (7, 0x0, 0x14cc_643f_630c_72d2),
            (8, 0x0, 0x884a_1736_14b8_1b8d),
            (12, 0x9e37_79b1_85eb_ca87, 0x3ee9_8c75_ac20_b9d6),
            (31, 0x0, 0xc346_d2b5_9b4d_8ee1),
            (32, 0x0, 0xcbf5_9c51_16ff_32b4),
            (33, 0x7, 0x0c43_e577_54c7_78d9),
            (64, 0x0, 0xf7c6_7301_db67_13f0),
            (100, 0xffff_ffff_ffff_ffff, 0x09a9_91a0_91c9_f6d7),
        ];
        for &(len, seed, want) in long_cases {
            assert_eq!(xxh64(&seq[..len], seed), want, "len {len} seed {seed:#x}");
        }
    }

    #[test]
    fn streaming_equals_one_shot_at_every_split() {
        let data: Vec<u8> = (0..200u32)
            .map(|i| (i.wrapping_mul(37) ^ 0x5a) as u8)
            .collect();
        for len in [0usize, 1, 3, 4, 7, 8, 31, 32, 33, 63, 64, 65, 100, 200] {
            let want = xxh64(&data[..len], 42);
            for split in 0..=len {
                let mut s = Xxh64::new(42);
                s.update(&data[..split]);
                s.update(&data[split..len]);
                assert_eq!(s.digest(), want, "len {len} split {split}");
            }
        }
    }

    #[test]
    fn token_path_equals_byte_definition() {
        let tokens: Vec<u32> = (0..100u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
        for n in (0usize..=40).chain([63, 64, 65, 100]) {
            for extra in [&b""[..], b"k", b"salt-123", &[7u8; 40][..]] {
                for parent in [None, Some(0u64), Some(u64::MAX)] {
                    let want = xxh64(&le_bytes(&tokens[..n], extra), parent.unwrap_or(ROOT_SEED));
                    assert_eq!(
                        hash_block(parent, extra, &tokens[..n]),
                        want,
                        "n {n} extra {extra:?}"
                    );
                }
            }
        }
    }

    /// Literal values of the wire contract. If this test fails, the hash changed: that breaks
    /// every gateway that routes to this engine. Do not update these values casually.
    #[test]
    fn block_hash_contract_vectors() {
        assert_eq!(ROOT_SEED, 0x3165_7475_6f72_766b);
        let tokens: Vec<u32> = (1..=40).collect();
        let hs = block_hashes(&tokens, 16, b"");
        assert_eq!(hs.len(), 2);
        assert_eq!(hs, CONTRACT_EMPTY_KEY.to_vec());
        assert_eq!(block_hashes(&tokens, 16, b"salt"), CONTRACT_SALT.to_vec());
        assert_eq!(hash_block(None, b"", &[]), CONTRACT_EMPTY_BLOCK);
        assert_eq!(hash_block(Some(1), b"", &[0]), CONTRACT_PARENT_ONE);
    }

    // Computed independently from the byte definition in the module docs with the reference
    // xxHash library (Python binding), not with this module.
    const CONTRACT_EMPTY_KEY: [u64; 2] = [0x1885_ca14_4562_86ba, 0xdde0_a825_028d_239d];
    const CONTRACT_SALT: [u64; 2] = [0x1992_9562_e0c5_605b, 0xd510_e0b1_df74_d864];
    const CONTRACT_EMPTY_BLOCK: u64 = 0x579d_1021_8181_ffec;
    const CONTRACT_PARENT_ONE: u64 = 0x22c7_6afd_15f0_110f;
    /// The last of the 256 block hashes (block size 16) of the 4,096 tokens
    /// `(i * 2654435761) mod 50000`, i = 0..4096.
    const CONTRACT_4096_LAST: u64 = 0x6689_e09c_2d57_22ea;

    #[test]
    fn long_prompt_contract_vector() {
        let t: Vec<u32> = (0..4096u64)
            .map(|i| ((i * 2_654_435_761) % 50_000) as u32)
            .collect();
        let hs = block_hashes(&t, 16, b"");
        assert_eq!(hs.len(), 256);
        assert_eq!(hs[255], CONTRACT_4096_LAST);
    }

    #[test]
    fn chaining_and_keys_change_the_hash() {
        let a: Vec<u32> = (0..64).collect();
        let mut b = a.clone();
        b[3] = 999; // differs in block 0 only
        let ha = block_hashes(&a, 16, b"");
        let hb = block_hashes(&b, 16, b"");
        // Every block after a difference differs too (the chain carries the prefix).
        for i in 0..4 {
            assert_ne!(ha[i], hb[i], "block {i}");
        }
        assert_ne!(block_hashes(&a, 16, b"x"), ha);
        assert_ne!(block_hashes(&a, 16, b"x"), block_hashes(&a, 16, b"y"));
        // The same tokens as a different block split are different blocks.
        assert_ne!(block_hashes(&a, 8, b"")[0], ha[0]);
    }

    #[test]
    fn partial_blocks_are_ignored_and_extension_is_incremental() {
        let t: Vec<u32> = (0..50).collect();
        assert_eq!(block_hashes(&t, 16, b"k").len(), 3);
        assert!(block_hashes(&t[..15], 16, b"k").is_empty());
        assert!(block_hashes(&[], 4, b"k").is_empty());
        let mut out = Vec::new();
        extend_block_hashes(&mut out, &t[..20], 4, b"k");
        assert_eq!(out.len(), 5);
        extend_block_hashes(&mut out, &t, 4, b"k");
        assert_eq!(out, block_hashes(&t, 4, b"k"));
        // Asking for a shorter prefix truncates.
        extend_block_hashes(&mut out, &t[..9], 4, b"k");
        assert_eq!(out, block_hashes(&t[..9], 4, b"k"));
        // block_size 1: one hash per token.
        assert_eq!(block_hashes(&t[..5], 1, b"").len(), 5);
    }
}
