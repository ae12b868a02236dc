use super::writer::GgufWriter;
use super::*;
use proptest::prelude::*;

/// A small valid file with every value type, a nested array and tensors of several types.
fn sample() -> GgufWriter {
    GgufWriter::new()
        .meta("general.architecture", "llama")
        .meta("u8", Value::U8(7))
        .meta("i8", Value::I8(-7))
        .meta("u16", Value::U16(700))
        .meta("i16", Value::I16(-700))
        .meta("u32", 70_000u32)
        .meta("i32", -70_000i32)
        .meta("u64", Value::U64(7_000_000_000))
        .meta("i64", Value::I64(-7_000_000_000))
        .meta("f32", 0.5f32)
        .meta("f64", Value::F64(-0.25))
        .meta("bool", true)
        .meta_strings("strings", &["a", "bé", ""])
        .meta(
            "nested",
            Value::Array(
                ValueType::Array,
                vec![
                    Value::Array(ValueType::U32, vec![Value::U32(1), Value::U32(2)]),
                    Value::Array(ValueType::String, vec![]),
                ],
            ),
        )
        .tensor_f32(
            "a.weight",
            &[4, 2],
            &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
        )
        .tensor_f16("b.weight", &[3], &[1.0, -2.0, 0.5])
        .tensor_raw("q.weight", GgmlType::Q4_1, &[64, 2], vec![0xAB; 80])
        .tensor_raw("k.weight", GgmlType::Q6K, &[256], vec![0xCD; 210])
}

/// One tensor named "t" of 32 F32s and no metadata: the header fields sit at fixed offsets.
fn one_tensor() -> Vec<u8> {
    GgufWriter::new()
        .tensor_f32("t", &[32], &[0.0; 32])
        .to_bytes()
}
// Offsets of `one_tensor()`'s fields.
const N_TENSORS_AT: usize = 8;
const N_KV_AT: usize = 16;
const N_DIMS_AT: usize = 33;
const DIM0_AT: usize = 37;
const TYPE_AT: usize = 45;
const OFFSET_AT: usize = 49;

fn err(bytes: Vec<u8>) -> GgufError {
    match Gguf::from_bytes(bytes) {
        Ok(g) => panic!("expected an error, parsed {g:?}"),
        Err(e) => e,
    }
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn round_trips_metadata_and_tensors_v3_and_v2() {
    for version in [2, 3] {
        let w = sample().version(version);
        let g = Gguf::from_bytes(w.to_bytes()).unwrap();
        assert_eq!(g.version(), version);
        assert_eq!(g.alignment(), 32);
        assert_eq!(g.data_offset() % 32, 0);
        assert_eq!(g.metadata().len(), 14);
        assert_eq!(
            g.get("general.architecture").unwrap().as_str(),
            Some("llama")
        );
        assert_eq!(g.get("i8"), Some(&Value::I8(-7)));
        assert_eq!(g.get("i16"), Some(&Value::I16(-700)));
        assert_eq!(g.get("u64").unwrap().as_u64(), Some(7_000_000_000));
        assert_eq!(g.get("i64").unwrap().as_i64(), Some(-7_000_000_000));
        assert_eq!(g.get("i32").unwrap().as_u64(), None);
        assert_eq!(g.get("f32").unwrap().as_f64(), Some(0.5));
        assert_eq!(g.get("bool").unwrap().as_bool(), Some(true));
        let strings = g.get("strings").unwrap().as_array().unwrap();
        assert_eq!(strings[1].as_str(), Some("bé"));
        assert_eq!(strings[2].as_str(), Some(""));
        let nested = g.get("nested").unwrap().as_array().unwrap();
        assert_eq!(
            nested[0],
            Value::Array(ValueType::U32, vec![Value::U32(1), Value::U32(2)])
        );
        assert_eq!(nested[1], Value::Array(ValueType::String, vec![]));

        assert_eq!(
            g.names(),
            vec!["a.weight", "b.weight", "q.weight", "k.weight"]
        );
        let a = g.tensor("a.weight").unwrap();
        assert_eq!(a.dtype, GgmlType::F32);
        assert_eq!(a.shape, &[4, 2]);
        assert_eq!(a.elems(), 8);
        let floats: Vec<f32> = a
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(floats, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        let b = g.tensor("b.weight").unwrap();
        assert_eq!(b.dtype, GgmlType::F16);
        assert_eq!(
            half::f16::from_le_bytes([b.data[2], b.data[3]]).to_f32(),
            -2.0
        );
        let q = g.tensor("q.weight").unwrap();
        assert_eq!((q.dtype, q.data.len()), (GgmlType::Q4_1, 80));
        assert!(q.data.iter().all(|&x| x == 0xAB));
        let k = g.tensor("k.weight").unwrap();
        assert_eq!((k.dtype, k.data.len()), (GgmlType::Q6K, 210));
        for info in g.tensor_infos() {
            assert_eq!(info.offset % g.alignment(), 0, "{}", info.name);
        }
        assert!(g.tensor("missing").is_none());
    }
}

#[test]
fn honours_general_alignment() {
    let bytes = GgufWriter::new()
        .meta("general.alignment", 64u32)
        .tensor_f32("x", &[3], &[1.0, 2.0, 3.0])
        .tensor_f32("y", &[1], &[4.0])
        .to_bytes();
    let g = Gguf::from_bytes(bytes).unwrap();
    assert_eq!(g.alignment(), 64);
    assert_eq!(g.data_offset() % 64, 0);
    assert_eq!(g.tensor_info("y").unwrap().offset, 64);
    assert_eq!(g.tensor("y").unwrap().data, 4.0f32.to_le_bytes());
}

#[test]
fn every_supported_tensor_type_is_sized_by_its_blocks() {
    let types = [
        (GgmlType::F32, 4 * 256),
        (GgmlType::F16, 2 * 256),
        (GgmlType::BF16, 2 * 256),
        (GgmlType::Q8_0, 8 * 34),
        (GgmlType::Q4_0, 8 * 18),
        (GgmlType::Q4_1, 8 * 20),
        (GgmlType::Q4K, 144),
        (GgmlType::Q6K, 210),
    ];
    let mut w = GgufWriter::new();
    for (i, (t, size)) in types.iter().enumerate() {
        w = w.tensor_raw(format!("t{i}"), *t, &[256], vec![i as u8; *size]);
    }
    let g = Gguf::from_bytes(w.to_bytes()).unwrap();
    for (i, (t, size)) in types.iter().enumerate() {
        let v = g.tensor(&format!("t{i}")).unwrap();
        assert_eq!(v.dtype, *t);
        assert_eq!(v.data.len(), *size);
        assert!(v.data.iter().all(|&b| b == i as u8));
    }
}

#[test]
fn bad_magic() {
    let mut b = one_tensor();
    b[0..4].copy_from_slice(b"GGML");
    assert!(matches!(err(b), GgufError::BadMagic { found } if found == b"GGML"));
    assert!(matches!(err(b"GG".to_vec()), GgufError::BadMagic { .. }));
    assert!(matches!(err(Vec::new()), GgufError::BadMagic { .. }));
    let e = err(b"\x7fELF\x02\x01\x01\x00".to_vec());
    assert!(e.to_string().contains("bad magic"), "{e}");
}

#[test]
fn unsupported_versions() {
    for (v, hint) in [
        (1u32, "obsolete"),
        (4, ""),
        (3u32.swap_bytes(), "big-endian"),
    ] {
        let mut b = one_tensor();
        put_u32(&mut b, 4, v);
        let e = err(b);
        assert!(
            matches!(e, GgufError::UnsupportedVersion { version, .. } if version == v),
            "{e}"
        );
        assert!(e.to_string().contains(hint), "{e}");
    }
}

#[test]
fn every_truncation_is_an_error_naming_the_field() {
    let full = sample().to_bytes();
    let g = Gguf::from_bytes(full.clone()).unwrap();
    let data_offset = g.data_offset() as usize;
    let data_end = g
        .tensor_infos()
        .iter()
        .map(|t| data_offset + (t.offset + t.size) as usize)
        .max()
        .unwrap();
    // Past the last tensor's data there is only padding, which a reader does not need.
    assert!(Gguf::from_bytes(full[..data_end].to_vec()).is_ok());
    for cut in 0..data_end {
        let e = err(full[..cut].to_vec());
        match e.root() {
            GgufError::BadMagic { .. } => assert!(cut < 4),
            GgufError::Truncated { offset, len, .. } => {
                assert_eq!(*len, cut as u64);
                assert!(*offset <= cut as u64);
                assert!(cut < data_offset);
            }
            // A cut inside a string or array leaves a length that the rest cannot hold.
            GgufError::AbsurdCount { .. } => assert!(cut < data_offset),
            GgufError::TensorOutOfBounds { len, .. } => {
                assert_eq!(*len, cut as u64);
            }
            other => panic!("cut at {cut}: unexpected {other}"),
        }
    }
    // The message names the field and offset.
    let small = GgufWriter::new()
        .meta("general.architecture", "llama")
        .to_bytes();
    let e = err(small[..54].to_vec());
    let msg = e.to_string();
    assert!(
        msg.contains("truncated")
            && msg.contains("metadata value type")
            && msg.contains("offset 52")
            && msg.contains("general.architecture"),
        "{msg}"
    );
}

#[test]
fn unknown_tensor_type() {
    let mut b = one_tensor();
    put_u32(&mut b, TYPE_AT, 4); // id 4 was Q4_2, removed from ggml
    let e = err(b);
    assert!(
        matches!(&e, GgufError::UnknownTensorType { name, id: 4 } if name == "t"),
        "{e}"
    );
    assert!(e.to_string().contains("unknown ggml tensor type id 4"));
}

#[test]
fn tensor_out_of_bounds() {
    let mut b = one_tensor();
    put_u64(&mut b, OFFSET_AT, 1 << 20);
    let e = err(b);
    assert!(
        matches!(&e, GgufError::TensorOutOfBounds { name, .. } if name == "t"),
        "{e}"
    );
    // Bigger dimension than the data present.
    let mut b = one_tensor();
    put_u64(&mut b, DIM0_AT, 64);
    assert!(matches!(err(b), GgufError::TensorOutOfBounds { .. }));
    // Offsets that would wrap around.
    let mut b = one_tensor();
    put_u64(&mut b, OFFSET_AT, u64::MAX - 31);
    assert!(matches!(err(b), GgufError::TensorOutOfBounds { .. }));
}

#[test]
fn misaligned_tensor() {
    let mut b = one_tensor();
    put_u64(&mut b, OFFSET_AT, 4);
    assert!(matches!(
        err(b),
        GgufError::MisalignedTensor {
            offset: 4,
            alignment: 32,
            ..
        }
    ));
}

#[test]
fn overflowing_shapes() {
    let b = GgufWriter::new()
        .tensor_raw("big", GgmlType::F32, &[1 << 32, 1 << 32], vec![])
        .to_bytes();
    assert!(matches!(err(b), GgufError::ShapeOverflow { .. }));
    // The element count fits but the byte size does not.
    let b = GgufWriter::new()
        .tensor_raw("big", GgmlType::F32, &[1 << 62], vec![])
        .to_bytes();
    assert!(matches!(err(b), GgufError::ShapeOverflow { .. }));
    let mut b = one_tensor();
    put_u32(&mut b, N_DIMS_AT, 5);
    assert!(matches!(
        err(b).root(),
        GgufError::TooManyDims { n_dims: 5, .. }
    ));
}

#[test]
fn quantized_rows_must_be_whole_blocks() {
    let b = GgufWriter::new()
        .tensor_raw("q", GgmlType::Q8_0, &[16, 4], vec![0; 68])
        .to_bytes();
    assert!(matches!(
        err(b),
        GgufError::BadBlockShape {
            dim0: 16,
            block: 32,
            ..
        }
    ));
}

#[test]
fn absurd_counts_are_rejected_before_allocating() {
    let mut b = one_tensor();
    put_u64(&mut b, N_TENSORS_AT, u64::MAX);
    assert!(matches!(
        err(b),
        GgufError::AbsurdCount {
            what: "tensor count",
            ..
        }
    ));
    let mut b = one_tensor();
    put_u64(&mut b, N_KV_AT, 1 << 40);
    assert!(matches!(err(b), GgufError::AbsurdCount { .. }));

    // An array claiming 2^60 u64s.
    let mut b = GgufWriter::new()
        .meta("arr", Value::Array(ValueType::U64, vec![Value::U64(1)]))
        .to_bytes();
    let len_at = 24 + 8 + 3 + 4 + 4;
    put_u64(&mut b, len_at, 1 << 60);
    let e = err(b);
    assert!(
        matches!(e.root(), GgufError::AbsurdCount { what: "array length", count, .. } if *count == 1 << 60),
        "{e}"
    );
    assert!(e.to_string().contains("\"arr\""), "names the key: {e}");

    // A string claiming u64::MAX bytes.
    let mut b = GgufWriter::new().meta("s", "hello").to_bytes();
    put_u64(&mut b, 24 + 8 + 1 + 4, u64::MAX);
    assert!(matches!(err(b).root(), GgufError::AbsurdCount { .. }));
}

#[test]
fn unknown_value_type_and_bad_utf8() {
    let mut b = GgufWriter::new().meta("k", 1u32).to_bytes();
    put_u32(&mut b, 24 + 8 + 1, 13);
    let e = err(b);
    assert!(
        matches!(e.root(), GgufError::UnknownValueType { id: 13, .. }),
        "{e}"
    );

    let mut b = GgufWriter::new().meta("k", "ab").to_bytes();
    let at = 24 + 8 + 1 + 4 + 8;
    b[at] = 0xFF;
    assert!(matches!(err(b).root(), GgufError::InvalidUtf8 { .. }));
}

#[test]
fn nesting_is_bounded() {
    let mut v = Value::Array(ValueType::U8, vec![]);
    for _ in 0..MAX_ARRAY_DEPTH + 1 {
        v = Value::Array(ValueType::Array, vec![v]);
    }
    let b = GgufWriter::new().meta("deep", v).to_bytes();
    assert!(matches!(err(b).root(), GgufError::NestingTooDeep { .. }));
}

#[test]
fn duplicates_and_bad_alignment() {
    let b = GgufWriter::new().meta("k", 1u32).meta("k", 2u32).to_bytes();
    assert!(matches!(err(b), GgufError::DuplicateKey(k) if k == "k"));
    let b = GgufWriter::new()
        .tensor_f32("t", &[1], &[1.0])
        .tensor_f32("t", &[1], &[1.0])
        .to_bytes();
    assert!(matches!(err(b), GgufError::DuplicateTensor(k) if k == "t"));
    for bad in [
        Value::U32(0),
        Value::U32(48),
        Value::from("32"),
        Value::I32(-32),
    ] {
        let b = GgufWriter::new().meta("general.alignment", bad).to_bytes();
        assert!(matches!(err(b), GgufError::BadAlignment(_)));
    }
}

#[test]
fn open_reports_missing_files_with_path() {
    let e = Gguf::open("/nonexistent/kvroute/model.gguf").unwrap_err();
    assert!(matches!(e, GgufError::Io { .. }));
    assert!(e.to_string().contains("/nonexistent/kvroute/model.gguf"));
}

#[test]
fn open_maps_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    sample().write_to(&path).unwrap();
    let g = Gguf::open(&path).unwrap();
    assert_eq!(g.tensor("k.weight").unwrap().data.len(), 210);
    assert_eq!(g.file_len(), std::fs::metadata(&path).unwrap().len());
    // Errors from a file name it.
    std::fs::write(&path, b"GGUF\x09\x00\x00\x00").unwrap();
    let e = Gguf::open(&path).unwrap_err();
    assert!(e.to_string().contains("m.gguf"), "{e}");
    assert!(matches!(
        e.root(),
        GgufError::UnsupportedVersion { version: 9, .. }
    ));
    // An empty file is a clear error too (it cannot be mapped; it is not read as one byte).
    std::fs::write(&path, b"").unwrap();
    let e = Gguf::open(&path).unwrap_err();
    assert!(e.to_string().contains("m.gguf"), "{e}");
}

#[test]
fn open_copies_the_bytes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    sample().write_to(&path).unwrap();
    let on_disk = std::fs::read(&path).unwrap();
    let from_disk = Gguf::open(&path).unwrap();
    let in_memory = Gguf::from_bytes(on_disk).unwrap();
    assert_eq!(
        from_disk.tensor("k.weight").unwrap().data,
        in_memory.tensor("k.weight").unwrap().data
    );
    // The loaded model no longer depends on the file.
    std::fs::write(&path, b"overwritten").unwrap();
    assert_eq!(from_disk.tensor("k.weight").unwrap().data.len(), 210);
}

proptest! {
    /// Flipped, overwritten, truncated or extended bytes give an error or a file — never a panic —
    /// and every tensor view handed out lies inside the file.
    #[test]
    fn mutated_files_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in prop::option::of(any::<prop::sample::Index>()),
        tail in prop::collection::vec(any::<u8>(), 0..4),
    ) {
        let mut b = sample().to_bytes();
        for (at, byte) in edits {
            let i = at.index(b.len());
            b[i] = byte;
        }
        if let Some(cut) = cut {
            b.truncate(cut.index(b.len()));
        }
        b.extend_from_slice(&tail);
        let len = b.len();
        if let Ok(g) = Gguf::from_bytes(b) {
            for name in g.names() {
                let t = g.tensor(&name).unwrap();
                prop_assert!(t.data.len() <= len);
                prop_assert_eq!(t.data.len() as u64, t.dtype.bytes_for(t.elems() as u64).unwrap());
            }
        }
    }

    /// Entirely random bytes after a valid magic and version.
    #[test]
    fn random_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..512), v2 in any::<bool>()) {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&(if v2 { 2u32 } else { 3 }).to_le_bytes());
        b.extend_from_slice(&body);
        let _ = Gguf::from_bytes(b);
    }
}

#[test]
fn fuzz_seed_is_a_complete_model_file() {
    // The fuzz target's seed (written by hand, not by GgufWriter) must stay a valid file that
    // reaches the config and tokenizer readers, or fuzzing starts from nothing.
    let seed = include_bytes!("../../fuzz/corpus/gguf/seed-llama.gguf");
    let g = Gguf::from_bytes(seed.to_vec()).unwrap();
    assert_eq!(g.tensor_infos().len(), 3);
    assert_eq!(
        g.tensor("blk.0.attn_q.weight").unwrap().dtype,
        GgmlType::Q8_0
    );
    let cfg = crate::config::ModelConfig::from_gguf(&g).unwrap();
    assert_eq!((cfg.hidden_size, cfg.vocab_size), (64, 4));
    let t = crate::tokenizer::Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(t.encode("<s>hi", true).unwrap(), vec![0, 3]);
}
