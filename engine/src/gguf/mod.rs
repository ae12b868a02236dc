//! GGUF (v2 and v3) reader over the file's bytes (read into huge-page memory): header, metadata key/values, tensor infos,
//! alignment and the data section.
//!
//! Owns the parsing and validation of the container format. Every byte of a GGUF file is
//! untrusted: each read is bounds-checked, every count is checked against the bytes left before
//! anything is allocated from it, nesting is bounded, and sizes use checked arithmetic. A bad file
//! gives a [`GgufError`] naming the problem and where it is — never a panic. This module never
//! interprets tensor contents (that is `quant`'s and the model's job) and never copies tensor data.

pub mod writer;

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use tracing::debug;

use crate::quant::GgmlType;
use crate::weights::{TensorView, WeightSource};

/// `GGUF` in little-endian byte order at the start of every file.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
pub const MAX_DIMS: u32 = 4;
/// Arrays may nest (an array of arrays); real files nest at most once or twice. The bound stops a
/// crafted file from recursing the parser off the stack.
pub const MAX_ARRAY_DEPTH: usize = 8;

/// Result alias for this module.
pub type Result<T, E = GgufError> = std::result::Result<T, E>;

/// Everything that can be wrong with a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read GGUF file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a GGUF file: bad magic {found:02x?} (expected \"GGUF\")")]
    BadMagic { found: Vec<u8> },
    #[error("unsupported GGUF version {version}{hint} (kvroute reads versions 2 and 3)")]
    UnsupportedVersion { version: u32, hint: &'static str },
    #[error(
        "truncated GGUF file: {what} needs {needed} bytes at offset {offset}, but the file is {len} bytes"
    )]
    Truncated {
        what: &'static str,
        offset: u64,
        needed: u64,
        len: u64,
    },
    #[error("absurd {what} {count} at offset {offset}: only {remaining} bytes remain in the file")]
    AbsurdCount {
        what: &'static str,
        count: u64,
        offset: u64,
        remaining: u64,
    },
    #[error("{what} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { what: &'static str, offset: u64 },
    #[error("unknown metadata value type {id} at offset {offset}")]
    UnknownValueType { id: u32, offset: u64 },
    #[error("metadata arrays nested deeper than {MAX_ARRAY_DEPTH} at offset {offset}")]
    NestingTooDeep { offset: u64 },
    #[error("duplicate metadata key {0:?}")]
    DuplicateKey(String),
    #[error("duplicate tensor name {0:?}")]
    DuplicateTensor(String),
    #[error("general.alignment must be a non-zero power of two, got {0}")]
    BadAlignment(String),
    #[error("tensor {name:?}: unknown ggml tensor type id {id}")]
    UnknownTensorType { name: String, id: u32 },
    #[error("tensor {name:?}: {n_dims} dimensions (ggml supports at most {MAX_DIMS})")]
    TooManyDims { name: String, n_dims: u32 },
    #[error("tensor {name:?}: shape {shape:?} overflows")]
    ShapeOverflow { name: String, shape: Vec<u64> },
    #[error(
        "tensor {name:?}: innermost dimension {dim0} is not a multiple of {dtype}'s block size {block}"
    )]
    BadBlockShape {
        name: String,
        dtype: GgmlType,
        dim0: u64,
        block: usize,
    },
    #[error(
        "tensor {name:?}: data offset {offset} is not a multiple of the alignment {alignment}"
    )]
    MisalignedTensor {
        name: String,
        offset: u64,
        alignment: u64,
    },
    #[error(
        "tensor {name:?} out of bounds: its data spans bytes {start}..{end} but the file is {len} bytes"
    )]
    TensorOutOfBounds {
        name: String,
        start: u64,
        end: u64,
        len: u64,
    },
    #[error("in {context}: {source}")]
    Context {
        context: String,
        #[source]
        source: Box<GgufError>,
    },
}

impl GgufError {
    /// The innermost error, without the `Context` wrappers (what tests and callers match on).
    pub fn root(&self) -> &GgufError {
        match self {
            GgufError::Context { source, .. } => source.root(),
            other => other,
        }
    }

    fn context(self, context: impl FnOnce() -> String) -> Self {
        GgufError::Context {
            context: context(),
            source: Box::new(self),
        }
    }
}

/// The type tag of a metadata value, as stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    /// The value type with this id, or `None` for an unknown id.
    pub fn from_id(id: u32) -> Option<Self> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The smallest number of bytes one value of this type takes in a file; used to reject
    /// element counts the remaining bytes cannot possibly hold before allocating for them.
    fn min_encoded_len(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 => 8,
            String => 8,
            Array => 12,
        }
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    /// An array: its element type (kept so that empty arrays round-trip) and its items, which
    /// all have that type.
    Array(ValueType, Vec<Value>),
}

impl Value {
    /// The type tag of this value.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F32(_) => ValueType::F32,
            Value::F64(_) => ValueType::F64,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(..) => ValueType::Array,
        }
    }

    /// Any integer value that is non-negative, as `u64`. Converters disagree on integer widths
    /// (`u32` here, `i32` there), so readers accept any of them.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer value, as `i64` (when it fits).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => i64::try_from(v).ok(),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => None,
        }
    }

    /// A float value (`f32` or `f64`) as `f64`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    /// A boolean value.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// A string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The items of an array value.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(_, items) => Some(items),
            _ => None,
        }
    }

    /// A short description for error messages ("u32 7", "string", "array of 3 string").
    pub fn describe(&self) -> String {
        match self {
            Value::String(s) => format!("string of {} bytes", s.len()),
            Value::Array(t, items) => format!("array of {} {:?}", items.len(), t),
            Value::Bool(b) => format!("bool {b}"),
            other => format!("{other:?}"),
        }
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::String(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::String(v)
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::U32(v)
    }
}
impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::U64(v)
    }
}
impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Value::I32(v)
    }
}
impl From<f32> for Value {
    fn from(v: f32) -> Self {
        Value::F32(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}

/// One tensor's description from the tensor-info table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: GgmlType,
    /// Shape in ggml order (innermost, contiguous dimension first).
    pub shape: Vec<usize>,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elems(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Reads the whole file into anonymous memory that asks for transparent huge pages, then makes
/// it read-only. Streaming the weights once per decode step through 4 KiB pages costs a TLB miss
/// per page (about 24,000 per step for a 94 MB model, each a nested page walk in a VM); 2 MiB
/// pages cut that to a few dozen. The copy replaces the file mapping (resident weights stay 1×
/// the file), and a file that changes on disk later no longer affects the loaded model.
/// `None` for an empty file (no mapping can be empty).
fn read_into_huge_pages(file: &mut File) -> std::io::Result<Option<Mmap>> {
    use std::io::Read;
    let len = file.metadata()?.len();
    let len = usize::try_from(len).map_err(|_| std::io::Error::other("file too large"))?;
    if len == 0 {
        return Ok(None);
    }
    let mut anon = memmap2::MmapOptions::new().len(len).map_anon()?;
    #[cfg(target_os = "linux")]
    {
        // Advice only: a kernel without transparent huge pages keeps 4 KiB pages.
        let _ = anon.advise(memmap2::Advice::HugePage);
    }
    let mut filled = 0;
    while filled < len {
        let n = file.read(&mut anon[filled..len])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("file shrank while being read ({filled} of {len} bytes)"),
            ));
        }
        filled += n;
    }
    Ok(Some(anon.make_read_only()?))
}

/// Where the file's bytes live: a read-only memory map, or an owned buffer (tests, fuzzing).
enum Backing {
    Mmap(Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// A parsed, validated GGUF file. Tensor data is borrowed from the map on demand.
pub struct Gguf {
    backing: Backing,
    version: u32,
    metadata: Vec<(String, Value)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl fmt::Debug for Gguf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gguf")
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

/// The tokenizer (crate `kvroute-text`) reads its `tokenizer.ggml.*` keys through this.
impl kvroute_text::tokenizer::Metadata for Gguf {
    type Value = Value;
    fn get(&self, key: &str) -> Option<&Value> {
        Gguf::get(self, key)
    }
}

impl kvroute_text::tokenizer::MetaValue for Value {
    fn as_str(&self) -> Option<&str> {
        Value::as_str(self)
    }
    fn as_u64(&self) -> Option<u64> {
        Value::as_u64(self)
    }
    fn as_i64(&self) -> Option<i64> {
        Value::as_i64(self)
    }
    fn as_bool(&self) -> Option<bool> {
        Value::as_bool(self)
    }
    fn items(&self) -> Option<&[Value]> {
        self.as_array()
    }
    fn describe(&self) -> String {
        Value::describe(self)
    }
}

impl Gguf {
    /// Reads the file at `path` into huge-page memory (see `read_into_huge_pages`) and parses it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let io = |source| GgufError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let backing = match read_into_huge_pages(&mut file).map_err(io)? {
            Some(map) => Backing::Mmap(map),
            None => Backing::Owned(Vec::new()),
        };
        let gguf = Self::parse(backing).map_err(|e| {
            let shown = path.display().to_string();
            e.context(|| format!("GGUF file {shown}"))
        })?;
        debug!(
            path = %path.display(),
            version = gguf.version,
            tensors = gguf.tensors.len(),
            metadata = gguf.metadata.len(),
            "opened GGUF"
        );
        Ok(gguf)
    }

    /// Parses a GGUF file held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::parse(Backing::Owned(bytes))
    }

    fn parse(backing: Backing) -> Result<Self> {
        let header = parse_header(backing.bytes())?;
        Ok(Gguf {
            backing,
            version: header.version,
            metadata: header.metadata,
            meta_index: header.meta_index,
            tensors: header.tensors,
            tensor_index: header.tensor_index,
            alignment: header.alignment,
            data_offset: header.data_offset,
        })
    }

    /// The format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of the data section and tensors.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// All metadata, in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// The metadata value for `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// All tensor infos, in file order.
    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The info of the tensor called `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// Total size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.backing.bytes().len() as u64
    }

    fn view<'a>(&'a self, info: &'a TensorInfo) -> TensorView<'a> {
        // Bounds were checked when parsing: data_offset + offset + size <= file length, all of it
        // computed with checked arithmetic, so these conversions and the slice cannot fail.
        let start = (self.data_offset + info.offset) as usize;
        let end = start + info.size as usize;
        TensorView {
            dtype: info.dtype,
            shape: &info.shape,
            data: &self.backing.bytes()[start..end],
        }
    }
}

impl WeightSource for Gguf {
    fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        self.tensor_info(name).map(|info| self.view(info))
    }

    fn names(&self) -> Vec<String> {
        self.tensors.iter().map(|t| t.name.clone()).collect()
    }
}

struct Header {
    version: u32,
    metadata: Vec<(String, Value)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

/// A bounds-checked little-endian reader over the file bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what,
                offset: self.offset(),
                needed: n,
                len: self.buf.len() as u64,
            });
        }
        // n <= remaining, which fits in usize.
        let n = n as usize;
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let bytes = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Checks that `count` items of at least `min_len` bytes each can fit in what is left,
    /// so that a lying count is rejected before anything is allocated for it.
    fn check_count(&self, count: u64, min_len: u64, what: &'static str) -> Result<usize> {
        let fits = count
            .checked_mul(min_len)
            .is_some_and(|need| need <= self.remaining());
        if !fits {
            return Err(GgufError::AbsurdCount {
                what,
                count,
                offset: self.offset(),
                remaining: self.remaining(),
            });
        }
        // count * min_len <= remaining (a usize) and min_len >= 1, so count fits in usize.
        Ok(count as usize)
    }

    fn string(&mut self, what: &'static str) -> Result<String> {
        let len_at = self.offset();
        let len = self.u64(what)?;
        if len > self.remaining() {
            return Err(GgufError::AbsurdCount {
                what: "string length",
                count: len,
                offset: len_at,
                remaining: self.remaining(),
            });
        }
        let at = self.offset();
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::InvalidUtf8 { what, offset: at })
    }

    fn value(&mut self, ty: ValueType, depth: usize) -> Result<Value> {
        const W: &str = "metadata value";
        Ok(match ty {
            ValueType::U8 => Value::U8(self.u8(W)?),
            ValueType::I8 => Value::I8(self.u8(W)? as i8),
            ValueType::U16 => Value::U16(self.u16(W)?),
            ValueType::I16 => Value::I16(self.u16(W)? as i16),
            ValueType::U32 => Value::U32(self.u32(W)?),
            ValueType::I32 => Value::I32(self.u32(W)? as i32),
            ValueType::F32 => Value::F32(f32::from_bits(self.u32(W)?)),
            ValueType::U64 => Value::U64(self.u64(W)?),
            ValueType::I64 => Value::I64(self.u64(W)? as i64),
            ValueType::F64 => Value::F64(f64::from_bits(self.u64(W)?)),
            // GGUF says a bool is one byte, 0 or 1; be lenient like llama.cpp (non-zero = true).
            ValueType::Bool => Value::Bool(self.u8(W)? != 0),
            ValueType::String => Value::String(self.string("metadata string")?),
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::NestingTooDeep {
                        offset: self.offset(),
                    });
                }
                let ty_at = self.offset();
                let elem_id = self.u32("array element type")?;
                let elem = ValueType::from_id(elem_id).ok_or(GgufError::UnknownValueType {
                    id: elem_id,
                    offset: ty_at,
                })?;
                let count = self.u64("array length")?;
                let n = self.check_count(count, elem.min_encoded_len(), "array length")?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1)?);
                }
                Value::Array(elem, items)
            }
        })
    }
}

fn parse_header(buf: &[u8]) -> Result<Header> {
    let mut c = Cursor { buf, pos: 0 };
    let magic = c.array::<4>("magic").map_err(|_| GgufError::BadMagic {
        found: buf.to_vec(),
    })?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic {
            found: magic.to_vec(),
        });
    }
    let version = c.u32("version")?;
    if version != 2 && version != 3 {
        let hint = if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
            " (a big-endian file?)"
        } else if version == 1 {
            " (GGUF v1 is obsolete; re-convert the model)"
        } else {
            ""
        };
        return Err(GgufError::UnsupportedVersion { version, hint });
    }
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.u64("metadata key/value count")?;

    // A key/value is at least a key length (8), a value type (4) and one byte of value.
    let n_kv = c.check_count(n_kv, 13, "metadata key/value count")?;
    let mut metadata = Vec::with_capacity(n_kv);
    let mut meta_index = HashMap::with_capacity(n_kv);
    for i in 0..n_kv {
        let key = c
            .string("metadata key")
            .map_err(|e| e.context(|| format!("metadata key #{i}")))?;
        let kv = (|| {
            let ty_at = c.offset();
            let ty_id = c.u32("metadata value type")?;
            let ty = ValueType::from_id(ty_id).ok_or(GgufError::UnknownValueType {
                id: ty_id,
                offset: ty_at,
            })?;
            c.value(ty, 0)
        })()
        .map_err(|e| e.context(|| format!("metadata key {key:?}")))?;
        if meta_index.insert(key.clone(), i).is_some() {
            return Err(GgufError::DuplicateKey(key));
        }
        metadata.push((key, kv));
    }

    let alignment = match meta_index.get("general.alignment").map(|&i| &metadata[i].1) {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() => a,
            _ => return Err(GgufError::BadAlignment(v.describe())),
        },
    };

    // A tensor info is at least a name length (8), n_dims (4), a type (4) and an offset (8).
    let n_tensors = c.check_count(n_tensors, 24, "tensor count")?;
    let mut raw = Vec::with_capacity(n_tensors);
    let mut tensor_index = HashMap::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = c
            .string("tensor name")
            .map_err(|e| e.context(|| format!("tensor info #{i}")))?;
        let info = read_tensor_info(&mut c, &name)
            .map_err(|e| e.context(|| format!("tensor info #{i} ({name:?})")))?;
        if tensor_index.insert(name.clone(), i).is_some() {
            return Err(GgufError::DuplicateTensor(name));
        }
        raw.push((name, info));
    }

    let end_of_infos = c.offset();
    // end_of_infos <= file length, so rounding up cannot overflow a u64.
    let data_offset = end_of_infos.div_ceil(alignment) * alignment;
    let len = buf.len() as u64;

    let mut tensors = Vec::with_capacity(raw.len());
    for (name, (dims, type_id, offset)) in raw {
        let dtype = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownTensorType {
            name: name.clone(),
            id: type_id,
        })?;
        let elems = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&e| e <= usize::MAX as u64 && e <= i64::MAX as u64);
        let Some(elems) = elems else {
            return Err(GgufError::ShapeOverflow { name, shape: dims });
        };
        let block = dtype.block_elems();
        let dim0 = dims.first().copied().unwrap_or(1);
        if !dim0.is_multiple_of(block as u64) {
            return Err(GgufError::BadBlockShape {
                name,
                dtype,
                dim0,
                block,
            });
        }
        let Some(size) = dtype.bytes_for(elems) else {
            return Err(GgufError::ShapeOverflow { name, shape: dims });
        };
        if !offset.is_multiple_of(alignment) {
            return Err(GgufError::MisalignedTensor {
                name,
                offset,
                alignment,
            });
        }
        let start = data_offset.checked_add(offset);
        let end = start.and_then(|s| s.checked_add(size));
        match (start, end) {
            (Some(_), Some(end)) if end <= len => {}
            _ => {
                return Err(GgufError::TensorOutOfBounds {
                    name,
                    start: data_offset.saturating_add(offset),
                    end: data_offset.saturating_add(offset).saturating_add(size),
                    len,
                })
            }
        }
        let shape: Option<Vec<usize>> = dims.iter().map(|&d| usize::try_from(d).ok()).collect();
        let Some(shape) = shape else {
            return Err(GgufError::ShapeOverflow { name, shape: dims });
        };
        tensors.push(TensorInfo {
            name,
            dtype,
            shape,
            offset,
            size,
        });
    }

    Ok(Header {
        version,
        metadata,
        meta_index,
        tensors,
        tensor_index,
        alignment,
        data_offset,
    })
}

/// Reads one tensor info after its name: dims, type id and offset (validated later, once the
/// data section's position is known).
fn read_tensor_info(c: &mut Cursor<'_>, name: &str) -> Result<(Vec<u64>, u32, u64)> {
    let n_dims = c.u32("tensor dimension count")?;
    if n_dims > MAX_DIMS {
        return Err(GgufError::TooManyDims {
            name: name.to_owned(),
            n_dims,
        });
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        dims.push(c.u64("tensor dimension")?);
    }
    let type_id = c.u32("tensor type")?;
    let offset = c.u64("tensor data offset")?;
    Ok((dims, type_id, offset))
}

#[cfg(test)]
mod tests;
