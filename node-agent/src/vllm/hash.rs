//! vLLM's `sha256_cbor` prefix-cache block hash, reproduced outside Python.
//!
//! vLLM (`--prefix-caching-hash-algo sha256_cbor`) hashes block `i` of a prompt as
//! `sha256(cbor((parent, tuple(token_ids), extra_keys)))`: `parent` is block `i-1`'s 32-byte
//! digest, or for the first block the *none hash*, `sha256(cbor(PYTHONHASHSEED))` (a random value
//! per process when that variable is unset, so hashes are only reproducible with it set);
//! `extra_keys` is `None` or a tuple (LoRA name, cache salt, multimodal ids). The CBOR is
//! canonical (RFC 8949: shortest integer heads, definite lengths). Its KV events publish the
//! digest's low 64 bits (`int.from_bytes(digest, "big") & (2**64 - 1)`), or the 32 bytes.

use sha2::{Digest, Sha256};

/// A CBOR value, as far as vLLM's hash inputs need.
#[derive(Debug, Clone, PartialEq)]
pub enum Cbor {
    Null,
    Int(i64),
    Bytes(Vec<u8>),
    Text(String),
    Array(Vec<Cbor>),
}

/// Writes a CBOR head: `major` type (0..=7) and its argument, in the shortest form.
fn head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    if n < 24 {
        out.push(m | n as u8);
    } else if n <= u64::from(u8::MAX) {
        out.extend_from_slice(&[m | 24, n as u8]);
    } else if n <= u64::from(u16::MAX) {
        out.push(m | 25);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else if n <= u64::from(u32::MAX) {
        out.push(m | 26);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

impl Cbor {
    /// Appends the canonical encoding.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Cbor::Null => out.push(0xf6),
            Cbor::Int(i) if *i >= 0 => head(out, 0, *i as u64),
            // Negative n is major type 1 with argument -1 - n.
            Cbor::Int(i) => head(out, 1, !(*i as u64)),
            Cbor::Bytes(b) => {
                head(out, 2, b.len() as u64);
                out.extend_from_slice(b);
            }
            Cbor::Text(t) => {
                head(out, 3, t.len() as u64);
                out.extend_from_slice(t.as_bytes());
            }
            Cbor::Array(items) => {
                head(out, 4, items.len() as u64);
                for v in items {
                    v.encode(out);
                }
            }
        }
    }
}

/// `sha256_cbor` of one value.
pub fn sha256_cbor(v: &Cbor) -> [u8; 32] {
    let mut buf = Vec::new();
    v.encode(&mut buf);
    Sha256::digest(&buf).into()
}

/// The first block's parent: `sha256_cbor` of the `PYTHONHASHSEED` string.
pub fn none_hash(python_hash_seed: &str) -> [u8; 32] {
    sha256_cbor(&Cbor::Text(python_hash_seed.to_string()))
}

/// One block's digest: `parent` (the previous block's, or [`none_hash`]), its tokens, and
/// `extra_keys` ([`Cbor::Null`] for a plain request).
pub fn block_hash(parent: &[u8; 32], tokens: &[u32], extra_keys: &Cbor) -> [u8; 32] {
    // Encoded directly (the token array can be long; no intermediate value).
    let mut buf = Vec::with_capacity(40 + tokens.len() * 5);
    head(&mut buf, 4, 3);
    head(&mut buf, 2, 32);
    buf.extend_from_slice(parent);
    head(&mut buf, 4, tokens.len() as u64);
    for &t in tokens {
        head(&mut buf, 0, u64::from(t));
    }
    extra_keys.encode(&mut buf);
    Sha256::digest(&buf).into()
}

/// The digests of every full `block_size` block of `tokens`, chained from `none`.
pub fn block_hashes(
    none: &[u8; 32],
    tokens: &[u32],
    block_size: usize,
    extra_keys: &Cbor,
) -> Vec<[u8; 32]> {
    let mut out: Vec<[u8; 32]> = Vec::new();
    for chunk in tokens.chunks_exact(block_size.max(1)) {
        let parent = out.last().unwrap_or(none);
        let h = block_hash(parent, chunk, extra_keys);
        out.push(h);
    }
    out
}

/// What vLLM's events publish of a digest: its low 64 bits, big-endian.
pub fn external(digest: &[u8; 32]) -> u64 {
    let mut low = [0u8; 8];
    low.copy_from_slice(&digest[24..]);
    u64::from_be_bytes(low)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn cbor_heads_are_the_shortest_form() {
        let enc = |v: Cbor| {
            let mut b = Vec::new();
            v.encode(&mut b);
            hex(&b)
        };
        // RFC 8949 appendix A examples.
        assert_eq!(enc(Cbor::Int(0)), "00");
        assert_eq!(enc(Cbor::Int(23)), "17");
        assert_eq!(enc(Cbor::Int(24)), "1818");
        assert_eq!(enc(Cbor::Int(1000)), "1903e8");
        assert_eq!(enc(Cbor::Int(1_000_000)), "1a000f4240");
        assert_eq!(enc(Cbor::Int(1_000_000_000_000)), "1b000000e8d4a51000");
        assert_eq!(enc(Cbor::Int(-1)), "20");
        assert_eq!(enc(Cbor::Int(-1000)), "3903e7");
        assert_eq!(enc(Cbor::Int(i64::MIN)), "3b7fffffffffffffff");
        assert_eq!(enc(Cbor::Text("IETF".into())), "6449455446");
        assert_eq!(enc(Cbor::Bytes(vec![1, 2, 3, 4])), "4401020304");
        assert_eq!(enc(Cbor::Null), "f6");
        assert_eq!(
            enc(Cbor::Array(vec![
                Cbor::Int(1),
                Cbor::Array(vec![Cbor::Int(2), Cbor::Int(3)])
            ])),
            "8201820203"
        );
        let long: Vec<Cbor> = (1..=25).map(Cbor::Int).collect();
        assert!(enc(Cbor::Array(long)).starts_with("9819"));
    }

    #[test]
    fn the_direct_block_encoding_equals_the_value_encoding() {
        let parent = [7u8; 32];
        let tokens: Vec<u32> = vec![1, 23, 24, 255, 256, 65_535, 65_536, u32::MAX];
        let value = Cbor::Array(vec![
            Cbor::Bytes(parent.to_vec()),
            Cbor::Array(tokens.iter().map(|&t| Cbor::Int(i64::from(t))).collect()),
            Cbor::Null,
        ]);
        assert_eq!(
            block_hash(&parent, &tokens, &Cbor::Null),
            sha256_cbor(&value)
        );
        // Chained: the second block's parent is the first's digest; a partial block is left.
        let none = none_hash("0");
        let hs = block_hashes(&none, &[1, 2, 3, 4, 5], 2, &Cbor::Null);
        assert_eq!(hs.len(), 2);
        assert_eq!(hs[0], block_hash(&none, &[1, 2], &Cbor::Null));
        assert_eq!(hs[1], block_hash(&hs[0], &[3, 4], &Cbor::Null));
        // The salt changes every hash.
        let salted = block_hashes(
            &none,
            &[1, 2],
            2,
            &Cbor::Array(vec![Cbor::Text("s".into())]),
        );
        assert_ne!(salted[0], hs[0]);
    }

    /// Vectors from vLLM's own `sha256_cbor` (`tests/vllm/make_hash_vectors.py` on the vLLM
    /// wheel named in the file).
    #[test]
    fn block_hashes_equal_vllms_own_function() {
        let text = include_str!("../../tests/vllm/sha256_cbor_vectors.json");
        let v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
        let cases = v["cases"].as_array().cloned().unwrap_or_default();
        assert_eq!(cases.len(), 3, "{v}");
        for c in cases {
            let none = none_hash(c["seed"].as_str().unwrap_or_default());
            assert_eq!(
                hex(&none),
                c["none_hash"].as_str().unwrap_or_default(),
                "{c}"
            );
            let tokens: Vec<u32> = c["tokens"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|t| t.as_u64())
                        .map(|t| t as u32)
                        .collect()
                })
                .unwrap_or_default();
            let extra = match c["extra_keys"].as_array() {
                None => Cbor::Null,
                Some(a) => Cbor::Array(
                    a.iter()
                        .map(|x| match x {
                            serde_json::Value::String(s) => Cbor::Text(s.clone()),
                            x => Cbor::Int(x.as_i64().unwrap_or_default()),
                        })
                        .collect(),
                ),
            };
            let bs = c["block_size"].as_u64().unwrap_or(1) as usize;
            let got = block_hashes(&none, &tokens, bs, &extra);
            let want: Vec<&str> = c["digests"]
                .as_array()
                .map(|a| a.iter().filter_map(|d| d.as_str()).collect())
                .unwrap_or_default();
            assert_eq!(got.len(), want.len(), "{c}");
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(&hex(g), w, "{c}");
            }
            let ext: Vec<u64> = got.iter().map(external).collect();
            let want_ext: Vec<u64> = c["external"]
                .as_array()
                .map(|a| a.iter().filter_map(|d| d.as_u64()).collect())
                .unwrap_or_default();
            assert_eq!(ext, want_ext, "{c}");
        }
    }

    #[test]
    fn external_is_the_low_64_bits_big_endian() {
        let mut d = [0u8; 32];
        d[24..].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        d[0] = 0xff;
        assert_eq!(external(&d), 0x0102_0304_0506_0708);
    }
}
