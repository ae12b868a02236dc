//! A MessagePack reader for vLLM's KV-event batches: the value types msgspec writes (nil,
//! booleans, integers, floats, strings, binary, arrays, maps; extension types are refused),
//! with limits so a hostile or corrupt payload cannot make it allocate without bound or recurse
//! without bound.

/// A decoded value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Nil,
    Bool(bool),
    /// Any integer that fits in `i128` (msgpack's range is `i64::MIN..=u64::MAX`).
    Int(i128),
    Float(f64),
    Str(String),
    Bin(Vec<u8>),
    Array(Vec<Value>),
    Map(Vec<(Value, Value)>),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The value under string key `key` of a map.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(m) => m
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }
}

/// Why a payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("truncated at byte {0}")]
    Truncated(usize),
    #[error("unsupported type byte 0x{0:02x} at byte {1}")]
    Unsupported(u8, usize),
    #[error("nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("{0} trailing bytes after the value")]
    Trailing(usize),
    #[error("a string at byte {0} is not UTF-8")]
    NotUtf8(usize),
}

/// Deepest nesting accepted (a batch is 4 levels deep; extra keys add a few).
pub const MAX_DEPTH: usize = 32;

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self.at.checked_add(n).ok_or(Error::Truncated(self.at))?;
        let s = self.b.get(self.at..end).ok_or(Error::Truncated(self.at))?;
        self.at = end;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }

    fn uint(&mut self, n: usize) -> Result<u64, Error> {
        let s = self.take(n)?;
        Ok(s.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
    }

    /// A length, refused when the bytes left cannot hold that many items of at least
    /// `min_item` bytes (so a forged length cannot reserve gigabytes).
    fn len(&mut self, n: usize, min_item: usize) -> Result<usize, Error> {
        let len = self.uint(n)? as usize;
        if len.saturating_mul(min_item) > self.b.len() - self.at {
            return Err(Error::Truncated(self.at));
        }
        Ok(len)
    }

    fn str(&mut self, len: usize) -> Result<Value, Error> {
        let at = self.at;
        let s = self.take(len)?;
        std::str::from_utf8(s)
            .map(|s| Value::Str(s.to_string()))
            .map_err(|_| Error::NotUtf8(at))
    }

    fn array(&mut self, len: usize, depth: usize) -> Result<Value, Error> {
        let mut v = Vec::with_capacity(len);
        for _ in 0..len {
            v.push(self.value(depth + 1)?);
        }
        Ok(Value::Array(v))
    }

    fn map(&mut self, len: usize, depth: usize) -> Result<Value, Error> {
        let mut v = Vec::with_capacity(len);
        for _ in 0..len {
            let k = self.value(depth + 1)?;
            v.push((k, self.value(depth + 1)?));
        }
        Ok(Value::Map(v))
    }

    fn value(&mut self, depth: usize) -> Result<Value, Error> {
        if depth > MAX_DEPTH {
            return Err(Error::TooDeep);
        }
        let at = self.at;
        let t = self.byte()?;
        Ok(match t {
            0x00..=0x7f => Value::Int(i128::from(t)),
            0x80..=0x8f => return self.map(usize::from(t & 0x0f), depth),
            0x90..=0x9f => return self.array(usize::from(t & 0x0f), depth),
            0xa0..=0xbf => return self.str(usize::from(t & 0x1f)),
            0xc0 => Value::Nil,
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xc4..=0xc6 => {
                let len = self.len(1 << (t - 0xc4), 1)?;
                Value::Bin(self.take(len)?.to_vec())
            }
            0xca => Value::Float(f64::from(f32::from_bits(self.uint(4)? as u32))),
            0xcb => Value::Float(f64::from_bits(self.uint(8)?)),
            0xcc..=0xcf => Value::Int(i128::from(self.uint(1 << (t - 0xcc))?)),
            0xd0 => Value::Int(i128::from(self.uint(1)? as u8 as i8)),
            0xd1 => Value::Int(i128::from(self.uint(2)? as u16 as i16)),
            0xd2 => Value::Int(i128::from(self.uint(4)? as u32 as i32)),
            0xd3 => Value::Int(i128::from(self.uint(8)? as i64)),
            0xd9..=0xdb => {
                let len = self.len(1 << (t - 0xd9), 1)?;
                return self.str(len);
            }
            0xdc | 0xdd => {
                let len = self.len(if t == 0xdc { 2 } else { 4 }, 1)?;
                return self.array(len, depth);
            }
            0xde | 0xdf => {
                let len = self.len(if t == 0xde { 2 } else { 4 }, 2)?;
                return self.map(len, depth);
            }
            0xe0..=0xff => Value::Int(i128::from(t as i8)),
            _ => return Err(Error::Unsupported(t, at)),
        })
    }
}

/// Decodes one value that must span all of `bytes`.
pub fn decode(bytes: &[u8]) -> Result<Value, Error> {
    let mut r = Reader { b: bytes, at: 0 };
    let v = r.value(0)?;
    match bytes.len() - r.at {
        0 => Ok(v),
        n => Err(Error::Trailing(n)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small msgpack writer for tests (what msgspec writes for these types).
    pub(crate) fn encode(v: &Value, out: &mut Vec<u8>) {
        match v {
            Value::Nil => out.push(0xc0),
            Value::Bool(b) => out.push(if *b { 0xc3 } else { 0xc2 }),
            Value::Int(i) if (0..128).contains(i) => out.push(*i as u8),
            Value::Int(i) if (-32..0).contains(i) => out.push(*i as i8 as u8),
            Value::Int(i) if *i >= 0 => {
                out.push(0xcf);
                out.extend_from_slice(&(*i as u64).to_be_bytes());
            }
            Value::Int(i) => {
                out.push(0xd3);
                out.extend_from_slice(&(*i as i64).to_be_bytes());
            }
            Value::Float(f) => {
                out.push(0xcb);
                out.extend_from_slice(&f.to_bits().to_be_bytes());
            }
            Value::Str(s) => {
                out.push(0xd9);
                out.push(s.len() as u8);
                out.extend_from_slice(s.as_bytes());
            }
            Value::Bin(b) => {
                out.push(0xc4);
                out.push(b.len() as u8);
                out.extend_from_slice(b);
            }
            Value::Array(a) => {
                out.push(0xdc);
                out.extend_from_slice(&(a.len() as u16).to_be_bytes());
                for x in a {
                    encode(x, out);
                }
            }
            Value::Map(m) => {
                out.push(0xde);
                out.extend_from_slice(&(m.len() as u16).to_be_bytes());
                for (k, x) in m {
                    encode(k, out);
                    encode(x, out);
                }
            }
        }
    }

    #[test]
    fn every_type_msgspec_writes_round_trips() {
        let v = Value::Array(vec![
            Value::Nil,
            Value::Bool(true),
            Value::Int(5),
            Value::Int(-3),
            Value::Int(i128::from(u64::MAX)),
            Value::Int(i128::from(i64::MIN)),
            Value::Float(1.5),
            Value::Str("BlockStored".into()),
            Value::Bin(vec![1, 2, 3]),
            Value::Map(vec![(Value::Str("k".into()), Value::Int(1))]),
        ]);
        let mut b = Vec::new();
        encode(&v, &mut b);
        assert_eq!(decode(&b), Ok(v));
        // Compact forms: fixarray of fixint, fixstr, negative fixint, uint8, int16, float32.
        assert_eq!(
            decode(&[0x93, 0x01, 0xa1, b'x', 0xff]),
            Ok(Value::Array(vec![
                Value::Int(1),
                Value::Str("x".into()),
                Value::Int(-1)
            ]))
        );
        assert_eq!(decode(&[0xcc, 0xff]), Ok(Value::Int(255)));
        assert_eq!(decode(&[0xd1, 0xff, 0x38]), Ok(Value::Int(-200)));
        assert_eq!(decode(&[0xca, 0x3f, 0xc0, 0, 0]), Ok(Value::Float(1.5)));
    }

    #[test]
    fn malformed_payloads_are_refused_not_trusted() {
        // Truncated anywhere.
        let mut b = Vec::new();
        encode(
            &Value::Array(vec![Value::Str("abc".into()), Value::Int(1 << 40)]),
            &mut b,
        );
        for cut in 0..b.len() {
            assert!(decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        // A forged huge length does not allocate: refused as truncated.
        assert_eq!(
            decode(&[0xdd, 0xff, 0xff, 0xff, 0xff, 0x01]),
            Err(Error::Truncated(5))
        );
        assert_eq!(
            decode(&[0xc6, 0x7f, 0xff, 0xff, 0xff]),
            Err(Error::Truncated(5))
        );
        // Extension types, reserved bytes, bad UTF-8, trailing bytes, deep nesting.
        assert_eq!(decode(&[0xc1]), Err(Error::Unsupported(0xc1, 0)));
        assert_eq!(decode(&[0xd4, 1, 2]), Err(Error::Unsupported(0xd4, 0)));
        assert_eq!(decode(&[0xa1, 0xff]), Err(Error::NotUtf8(1)));
        assert_eq!(decode(&[0x01, 0x02]), Err(Error::Trailing(1)));
        let deep = vec![0x91u8; 100];
        assert_eq!(decode(&deep), Err(Error::TooDeep));
    }
}
