//! vLLM's KV-cache events, read and translated into kvroute's block hashes.
//!
//! vLLM (`--kv-events-config '{"enable_kv_cache_events":true,"publisher":"zmq",...}'`) publishes
//! ZMQ multipart messages `[topic, seq, payload]`: `seq` an 8-byte big-endian counter, `payload`
//! a msgpack batch `(ts, events, data_parallel_rank)`. Events are `BlockStored` (the new blocks'
//! hashes, the parent's, their token ids, block size, LoRA id, medium, ...), `BlockRemoved`
//! (hashes) and `AllBlocksCleared`. msgspec writes a batch as an array (vLLM 0.32) or a map,
//! and an event as a map with a `type` key (0.32) or an array led by the tag (`array_like`
//! events): all are read. A hash is an integer (the
//! digest's low 64 bits) or the digest's bytes (reduced the same way).
//!
//! [`Translator`] re-hashes each stored block's tokens with kvroute's function
//! ([`kvroute_engine::kv::hash::hash_block`], chained from the parent's kvroute hash) and keeps
//! the vLLM → kvroute map for removals. Sequence numbers must follow on: on a gap (or after a
//! reconnect) it refuses the batch, and its owner resets it and sends a fresh snapshot.

use std::collections::HashMap;

use super::msgpack::{self, Value};
use kvroute_engine::kv::hash::hash_block;

/// One event of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Stored {
        hashes: Vec<u64>,
        parent: Option<u64>,
        token_ids: Vec<u32>,
        block_size: u32,
        /// `GPU` (or absent) for the device cache; other tiers (`CPU`) are not the device's.
        medium: Option<String>,
    },
    Removed {
        hashes: Vec<u64>,
        medium: Option<String>,
    },
    Cleared,
    /// An event type this reader does not know (skipped).
    Other(String),
}

/// One decoded payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub ts: f64,
    pub events: Vec<Event>,
    pub data_parallel_rank: Option<i64>,
}

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EventError {
    #[error("msgpack: {0}")]
    Msgpack(#[from] msgpack::Error),
    #[error("malformed batch: {0}")]
    Malformed(String),
    #[error("sequence frame of {0} bytes (8 expected)")]
    SeqFrame(usize),
}

fn bad(what: impl Into<String>) -> EventError {
    EventError::Malformed(what.into())
}

/// A block hash as vLLM publishes it, as the low 64 bits of the digest.
fn block_hash_of(v: &Value) -> Result<u64, EventError> {
    match v {
        Value::Int(i) if (0..=i128::from(u64::MAX)).contains(i) => Ok(*i as u64),
        // Negative: the same 64 bits (a signed encoder's view of a large hash).
        Value::Int(i) if (i128::from(i64::MIN)..0).contains(i) => Ok(*i as i64 as u64),
        Value::Bin(b) if b.len() >= 8 => {
            let mut low = [0u8; 8];
            low.copy_from_slice(&b[b.len() - 8..]);
            Ok(u64::from_be_bytes(low))
        }
        other => Err(bad(format!("block hash {other:?}"))),
    }
}

fn hashes_of(v: Option<&Value>) -> Result<Vec<u64>, EventError> {
    v.and_then(Value::as_array)
        .ok_or_else(|| bad("block_hashes is not a list"))?
        .iter()
        .map(block_hash_of)
        .collect()
}

fn opt_str(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(str::to_string)
}

fn uint(v: Option<&Value>, what: &str, max: u64) -> Result<u64, EventError> {
    match v {
        Some(Value::Int(i)) if (0..=i128::from(max)).contains(i) => Ok(*i as u64),
        other => Err(bad(format!("{what}: {other:?}"))),
    }
}

/// The fields of an event in declaration order (array form) by name.
const STORED: [&str; 6] = [
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
];
const REMOVED: [&str; 2] = ["block_hashes", "medium"];

/// An event's fields, by name, in either encoding.
enum Fields<'a> {
    /// `[tag, field1, field2, ...]` with the field names in declaration order.
    Array(&'a [Value], &'static [&'static str]),
    /// `{"type": tag, name: value, ...}`.
    Map(&'a Value),
}

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&'a Value> {
        match self {
            Fields::Array(a, names) => {
                let i = names.iter().position(|n| *n == name)?;
                a.get(i + 1)
            }
            Fields::Map(v) => v.get(name),
        }
    }
}

fn event_of(v: &Value) -> Result<Event, EventError> {
    let (tag, fields) = match v {
        Value::Array(a) => {
            let tag = a
                .first()
                .and_then(Value::as_str)
                .ok_or_else(|| bad("event without a tag"))?;
            let names: &'static [&'static str] = match tag {
                "BlockStored" => &STORED,
                "BlockRemoved" => &REMOVED,
                _ => &[],
            };
            (tag, Fields::Array(a, names))
        }
        Value::Map(_) => {
            let tag = v
                .get("type")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("event without a type"))?;
            (tag, Fields::Map(v))
        }
        other => return Err(bad(format!("event {other:?}"))),
    };
    let field = |name: &str| fields.get(name);
    Ok(match tag {
        "BlockStored" => Event::Stored {
            hashes: hashes_of(field("block_hashes"))?,
            parent: match field("parent_block_hash") {
                None | Some(Value::Nil) => None,
                Some(h) => Some(block_hash_of(h)?),
            },
            token_ids: field("token_ids")
                .and_then(Value::as_array)
                .ok_or_else(|| bad("token_ids is not a list"))?
                .iter()
                .map(|t| uint(Some(t), "token id", u64::from(u32::MAX)).map(|t| t as u32))
                .collect::<Result<_, _>>()?,
            block_size: uint(field("block_size"), "block_size", u64::from(u32::MAX))? as u32,
            medium: opt_str(field("medium")),
        },
        "BlockRemoved" => Event::Removed {
            hashes: hashes_of(field("block_hashes"))?,
            medium: opt_str(field("medium")),
        },
        "AllBlocksCleared" => Event::Cleared,
        other => Event::Other(other.to_string()),
    })
}

/// Decodes one payload (the message's third frame).
pub fn decode_batch(payload: &[u8]) -> Result<Batch, EventError> {
    let v = msgpack::decode(payload)?;
    let (ts, events, rank) = match &v {
        Value::Array(a) => (a.first(), a.get(1), a.get(2)),
        Value::Map(_) => (v.get("ts"), v.get("events"), v.get("data_parallel_rank")),
        other => return Err(bad(format!("batch {other:?}"))),
    };
    let ts = match ts {
        Some(Value::Float(f)) => *f,
        Some(Value::Int(i)) => *i as f64,
        other => return Err(bad(format!("ts {other:?}"))),
    };
    let events = events
        .and_then(Value::as_array)
        .ok_or_else(|| bad("events is not a list"))?
        .iter()
        .map(event_of)
        .collect::<Result<_, _>>()?;
    let data_parallel_rank = match rank {
        None | Some(Value::Nil) => None,
        Some(Value::Int(i)) => i64::try_from(*i).ok(),
        Some(other) => return Err(bad(format!("data_parallel_rank {other:?}"))),
    };
    Ok(Batch {
        ts,
        events,
        data_parallel_rank,
    })
}

/// The sequence number of a message's second frame (8 bytes, big-endian; -1 ends a replay).
pub fn seq_of(frame: &[u8]) -> Result<i64, EventError> {
    let b: [u8; 8] = frame
        .try_into()
        .map_err(|_| EventError::SeqFrame(frame.len()))?;
    Ok(i64::from_be_bytes(b))
}

/// What one batch changes in kvroute's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// kvroute hashes of blocks now cached on the device.
    Stored(Vec<u64>),
    /// kvroute hashes of blocks no longer cached.
    Removed(Vec<u64>),
    /// Everything is gone.
    Cleared,
}

/// A batch that does not follow the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("sequence gap: expected {expected}, got {got}")]
pub struct Gap {
    pub expected: u64,
    pub got: u64,
}

/// vLLM's stream, in kvroute's hashes.
#[derive(Debug, Default)]
pub struct Translator {
    /// vLLM hash → kvroute hash of every block known cached on the device.
    map: HashMap<u64, u64>,
    next_seq: Option<u64>,
    /// Stored blocks that could not be translated (parent unknown, tokens missing).
    pub untranslated: u64,
    /// Events of unknown types skipped.
    pub skipped: u64,
}

impl Translator {
    /// Applies the batch numbered `seq`. Refused (nothing applied) when it does not follow
    /// the previous one: the caller then [`reset`](Self::reset)s and resynchronises.
    pub fn apply(&mut self, seq: u64, batch: &Batch) -> Result<Vec<Update>, Gap> {
        if let Some(expected) = self.next_seq {
            if seq != expected {
                return Err(Gap { expected, got: seq });
            }
        }
        self.next_seq = Some(seq.wrapping_add(1));
        let mut out = Vec::new();
        for e in &batch.events {
            match e {
                Event::Stored {
                    hashes,
                    parent,
                    token_ids,
                    block_size,
                    medium,
                } if device(medium) => {
                    let mut parent_kv = match parent {
                        None => None,
                        Some(p) => match self.map.get(p) {
                            Some(&kv) => Some(kv),
                            None => {
                                // Its parent was stored before we listened (or lost): these
                                // blocks cannot be named in kvroute's hash.
                                self.untranslated += hashes.len() as u64;
                                continue;
                            }
                        },
                    };
                    let bs = *block_size as usize;
                    let mut stored = Vec::with_capacity(hashes.len());
                    for (i, &h) in hashes.iter().enumerate() {
                        let chunk = token_ids.get(i * bs..(i + 1) * bs).filter(|_| bs > 0);
                        let Some(chunk) = chunk else {
                            self.untranslated += (hashes.len() - i) as u64;
                            break;
                        };
                        let kv = hash_block(parent_kv, &[], chunk);
                        self.map.insert(h, kv);
                        stored.push(kv);
                        parent_kv = Some(kv);
                    }
                    if !stored.is_empty() {
                        out.push(Update::Stored(stored));
                    }
                }
                Event::Removed { hashes, medium } if device(medium) => {
                    let removed: Vec<u64> =
                        hashes.iter().filter_map(|h| self.map.remove(h)).collect();
                    if !removed.is_empty() {
                        out.push(Update::Removed(removed));
                    }
                }
                Event::Cleared => {
                    self.map.clear();
                    out.push(Update::Cleared);
                }
                Event::Other(_) => self.skipped += 1,
                // Other tiers' blocks (vLLM's CPU offload) are not the device cache.
                Event::Stored { .. } | Event::Removed { .. } => {}
            }
        }
        Ok(out)
    }

    /// Forgets everything (after a gap or a reconnect): the next batch is accepted whatever its
    /// number, and the owner sends an empty snapshot.
    pub fn reset(&mut self) {
        self.map.clear();
        self.next_seq = None;
    }

    /// kvroute hashes of every block known cached (for a snapshot), sorted.
    pub fn cached(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.map.values().copied().collect();
        v.sort_unstable();
        v
    }
}

fn device(medium: &Option<String>) -> bool {
    medium
        .as_deref()
        .is_none_or(|m| m.eq_ignore_ascii_case("GPU"))
}

#[cfg(test)]
mod tests {
    use super::super::msgpack::tests::encode;
    use super::*;
    use kvroute_engine::kv::hash::block_hashes;

    fn s(x: &str) -> Value {
        Value::Str(x.into())
    }
    fn int(x: u64) -> Value {
        Value::Int(i128::from(x))
    }
    fn ints(xs: &[u64]) -> Value {
        Value::Array(xs.iter().map(|&x| int(x)).collect())
    }

    /// A batch as older vLLM writes it: arrays led by the tag.
    fn array_batch(events: Vec<Value>) -> Vec<u8> {
        let mut b = Vec::new();
        encode(
            &Value::Array(vec![Value::Float(1.0), Value::Array(events), Value::Int(0)]),
            &mut b,
        );
        b
    }

    fn stored(hashes: &[u64], parent: Option<u64>, tokens: &[u64], bs: u64) -> Value {
        Value::Array(vec![
            s("BlockStored"),
            ints(hashes),
            parent.map_or(Value::Nil, int),
            ints(tokens),
            int(bs),
            Value::Nil,
            s("GPU"),
        ])
    }

    fn removed(hashes: &[u64]) -> Value {
        Value::Array(vec![s("BlockRemoved"), ints(hashes), s("GPU")])
    }

    #[test]
    fn a_stored_chain_becomes_kvroutes_hashes_and_removals_follow_the_map() {
        let tokens: Vec<u64> = (1..=12).collect();
        let t32: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
        let want = block_hashes(&t32, 4, &[]);
        let mut tr = Translator::default();
        // Blocks 1-2 stored, then block 3 with block 2 as its parent.
        let b = decode_batch(&array_batch(vec![stored(
            &[101, 102],
            None,
            &tokens[..8],
            4,
        )]))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            tr.apply(0, &b),
            Ok(vec![Update::Stored(want[..2].to_vec())])
        );
        let b = decode_batch(&array_batch(vec![stored(
            &[103],
            Some(102),
            &tokens[8..],
            4,
        )]))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(tr.apply(1, &b), Ok(vec![Update::Stored(vec![want[2]])]));
        // The removal chain, leaf first, and an unknown hash (ignored).
        let b = decode_batch(&array_batch(vec![removed(&[103, 102, 999])]))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            tr.apply(2, &b),
            Ok(vec![Update::Removed(vec![want[2], want[1]])])
        );
        assert_eq!(tr.cached(), vec![want[0]]);
        // A gap is refused and changes nothing; after a reset any number is accepted.
        let b = decode_batch(&array_batch(vec![Value::Array(vec![s(
            "AllBlocksCleared",
        )])]))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            tr.apply(5, &b),
            Err(Gap {
                expected: 3,
                got: 5
            })
        );
        assert_eq!(tr.cached(), vec![want[0]]);
        tr.reset();
        assert_eq!(tr.apply(5, &b), Ok(vec![Update::Cleared]));
        assert!(tr.cached().is_empty());
        // A child of a block stored before we listened cannot be named.
        let b = decode_batch(&array_batch(vec![stored(
            &[104],
            Some(77),
            &tokens[..4],
            4,
        )]))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(tr.apply(6, &b), Ok(vec![]));
        assert_eq!(tr.untranslated, 1);
    }

    #[test]
    fn map_form_batches_byte_hashes_and_other_media_are_read() {
        let tokens: Vec<u64> = (1..=4).collect();
        let mut digest = vec![0u8; 32];
        digest[31] = 9;
        let ev = Value::Map(vec![
            (s("type"), s("BlockStored")),
            (s("block_hashes"), Value::Array(vec![Value::Bin(digest)])),
            (s("parent_block_hash"), Value::Nil),
            (s("token_ids"), ints(&tokens)),
            (s("block_size"), int(4)),
            (s("lora_id"), Value::Nil),
            (s("medium"), s("GPU")),
        ]);
        let cpu = Value::Map(vec![
            (s("type"), s("BlockStored")),
            (s("block_hashes"), ints(&[50])),
            (s("parent_block_hash"), Value::Nil),
            (s("token_ids"), ints(&tokens)),
            (s("block_size"), int(4)),
            (s("medium"), s("CPU")),
        ]);
        let unknown = Value::Map(vec![(s("type"), s("SomethingNew"))]);
        let events = Value::Array(vec![ev, cpu, unknown]);
        // vLLM 0.32: the batch an array, its events maps tagged with `type`.
        let mut b = Vec::new();
        encode(
            &Value::Array(vec![Value::Float(2.5), events.clone(), Value::Int(1)]),
            &mut b,
        );
        let batch = decode_batch(&b).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(batch.ts, 2.5);
        assert_eq!(batch.data_parallel_rank, Some(1));
        // Newer: the batch a map too.
        let mut b = Vec::new();
        encode(
            &Value::Map(vec![
                (s("ts"), Value::Float(2.5)),
                (s("events"), events),
                (s("data_parallel_rank"), Value::Nil),
            ]),
            &mut b,
        );
        let as_map = decode_batch(&b).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(as_map.events, batch.events);
        assert_eq!(as_map.data_parallel_rank, None);
        let mut tr = Translator::default();
        let out = tr.apply(0, &batch).unwrap_or_default();
        let t32: Vec<u32> = vec![1, 2, 3, 4];
        assert_eq!(out, vec![Update::Stored(block_hashes(&t32, 4, &[]))]);
        assert_eq!(tr.skipped, 1);
        // The digest's low 64 bits name it for the removal.
        let mut b = Vec::new();
        encode(
            &Value::Array(vec![
                Value::Float(3.0),
                Value::Array(vec![Value::Map(vec![
                    (s("type"), s("BlockRemoved")),
                    (s("block_hashes"), ints(&[9])),
                ])]),
            ]),
            &mut b,
        );
        let batch = decode_batch(&b).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(tr.apply(1, &batch).unwrap_or_default().len(), 1);
        assert!(tr.cached().is_empty());
    }

    #[test]
    fn malformed_batches_and_frames_are_refused() {
        let mut cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0x01], "batch"),
            (array_batch(vec![int(3)]), "event"),
            (array_batch(vec![Value::Array(vec![])]), "tag"),
            (
                array_batch(vec![Value::Array(vec![s("BlockStored"), int(1)])]),
                "block_hashes",
            ),
            (
                array_batch(vec![stored(&[1], None, &[1 << 40], 1)]),
                "token id",
            ),
        ];
        let mut b = Vec::new();
        encode(
            &Value::Array(vec![s("x"), Value::Array(vec![]), Value::Nil]),
            &mut b,
        );
        cases.push((b, "ts"));
        cases.push((vec![0x93, 0xcb], "msgpack"));
        for (bytes, what) in cases {
            let e = decode_batch(&bytes).expect_err(what).to_string();
            assert!(e.contains(what), "{what}: {e}");
        }
        assert_eq!(seq_of(&7u64.to_be_bytes()), Ok(7));
        assert_eq!(seq_of(&(-1i64).to_be_bytes()), Ok(-1));
        assert_eq!(seq_of(&[0, 1]), Err(EventError::SeqFrame(2)));
    }
}
