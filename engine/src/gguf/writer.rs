//! A small GGUF writer — a test utility.
//!
//! Tests (this crate's and others') build synthetic models with it: metadata plus tensors of any
//! type, laid out exactly as llama.cpp's writer does (v3 by default, data section and every tensor
//! aligned). It writes what it is given without judging it, so tests can also produce subtly
//! wrong files; [`GgufWriter::to_bytes`] output can be patched by hand for the rest. It is not a
//! model converter and never quantizes.

use std::io;
use std::path::Path;

use super::{Value, ValueType, DEFAULT_ALIGNMENT};
use crate::quant::GgmlType;

/// One tensor to write.
#[derive(Debug, Clone)]
struct PendingTensor {
    name: String,
    dtype: GgmlType,
    shape: Vec<u64>,
    data: Vec<u8>,
}

/// Builds a GGUF file in memory.
#[derive(Debug, Clone)]
pub struct GgufWriter {
    version: u32,
    metadata: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// An empty v3 file.
    pub fn new() -> Self {
        GgufWriter {
            version: 3,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Sets the version number written in the header (2 and 3 share a layout).
    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// Adds a metadata key/value (in order; duplicates are written as given).
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.metadata.push((key.into(), value.into()));
        self
    }

    /// Adds an array of strings.
    pub fn meta_strings<S: AsRef<str>>(self, key: impl Into<String>, items: &[S]) -> Self {
        let items = items
            .iter()
            .map(|s| Value::String(s.as_ref().to_owned()))
            .collect();
        self.meta(key, Value::Array(ValueType::String, items))
    }

    /// Adds an array of `i32`.
    pub fn meta_i32s(self, key: impl Into<String>, items: &[i32]) -> Self {
        let items = items.iter().map(|&v| Value::I32(v)).collect();
        self.meta(key, Value::Array(ValueType::I32, items))
    }

    /// Adds a tensor with raw bytes of `dtype` and a shape in ggml order.
    pub fn tensor_raw(
        mut self,
        name: impl Into<String>,
        dtype: GgmlType,
        shape: &[usize],
        data: Vec<u8>,
    ) -> Self {
        self.tensors.push(PendingTensor {
            name: name.into(),
            dtype,
            shape: shape.iter().map(|&d| d as u64).collect(),
            data,
        });
        self
    }

    /// Adds an F32 tensor.
    pub fn tensor_f32(self, name: impl Into<String>, shape: &[usize], values: &[f32]) -> Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor_raw(name, GgmlType::F32, shape, data)
    }

    /// Adds an F16 tensor (values rounded to half precision).
    pub fn tensor_f16(self, name: impl Into<String>, shape: &[usize], values: &[f32]) -> Self {
        let data = values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        self.tensor_raw(name, GgmlType::F16, shape, data)
    }

    /// Adds a complete GPT-2 style byte-level BPE tokenizer (`tokenizer.ggml.*`): the `specials`
    /// first (control tokens, ids 0..), then the 256 byte symbols, then one token per merge
    /// (`"a b"` makes `ab`), with `tokenizer.ggml.pre` = `pre`, BOS = id 0 and EOS = id 1 when
    /// there are that many specials. Synthetic models get a real tokenizer this way.
    pub fn byte_level_tokenizer(self, pre: &str, specials: &[&str], merges: &[&str]) -> Self {
        let mut tokens: Vec<String> = specials.iter().map(|s| (*s).to_owned()).collect();
        let mut types = vec![3i32; specials.len()];
        tokens.extend(byte_level_alphabet().into_iter().map(String::from));
        for m in merges {
            let merged = m.replacen(' ', "", 1);
            if !tokens.contains(&merged) {
                tokens.push(merged);
            }
        }
        types.resize(tokens.len(), 1);
        let mut w = self
            .meta("tokenizer.ggml.model", "gpt2")
            .meta("tokenizer.ggml.pre", pre)
            .meta_strings("tokenizer.ggml.tokens", &tokens)
            .meta_i32s("tokenizer.ggml.token_type", &types)
            .meta_strings("tokenizer.ggml.merges", merges);
        if !specials.is_empty() {
            w = w.meta("tokenizer.ggml.bos_token_id", 0u32);
        }
        if specials.len() > 1 {
            w = w.meta("tokenizer.ggml.eos_token_id", 1u32);
        }
        w
    }

    fn alignment(&self) -> u64 {
        self.metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .filter(|a| a.is_power_of_two())
            .unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let align = self.alignment() as usize;
        let mut out = Vec::new();
        out.extend_from_slice(&super::MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_string(&mut out, key);
            out.extend_from_slice(&(value.value_type() as u32).to_le_bytes());
            write_value(&mut out, value);
        }
        let mut offset = 0usize;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            write_string(&mut out, &t.name);
            out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for d in &t.shape {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.dtype.id().to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len()).next_multiple_of(align);
        }
        let data_start = out.len().next_multiple_of(align);
        out.resize(data_start, 0);
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + off, 0);
            out.extend_from_slice(&t.data);
        }
        let end = out.len().next_multiple_of(align);
        out.resize(end, 0);
        out
    }

    /// Writes the file to `path`.
    pub fn write_to(&self, path: impl AsRef<Path>) -> io::Result<()> {
        std::fs::write(path, self.to_bytes())
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(s) => write_string(out, s),
        Value::Array(elem, items) => {
            out.extend_from_slice(&(*elem as u32).to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                write_value(out, item);
            }
        }
    }
}

/// GPT-2's printable stand-ins for the 256 byte values, indexed by byte (`' '` is `Ġ`).
pub fn byte_level_alphabet() -> Vec<char> {
    let printable = |b: u32| {
        (u32::from('!')..=u32::from('~')).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b)
    };
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            // Every value here is below 0x200, a valid scalar value.
            char::from_u32(c).unwrap_or('?')
        })
        .collect()
}
