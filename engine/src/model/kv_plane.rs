//! One layer's K (or V) cache in its storage type: 16-bit floats (llama.cpp's default cache
//! type, `f16`) or 8-bit integers with one f16 scale per 32 values (llama.cpp's `q8_0` block:
//! 34 bytes per 32 values instead of 64, so a KV budget holds 1.88× the blocks).
//!
//! Values are addressed by element offset, as in an f16 plane; a `q8_0` plane keeps its scales
//! in a second array at `offset / 32`. Rows (one position of one KV head, `head_dim` values)
//! start at multiples of `head_dim`, so `q8_0` needs `head_dim % 32 == 0` (checked where the
//! cache is made). Quantization follows ggml's `quantize_row_q8_0_ref`: `d = max|x| / 127`,
//! `q = round(x / d)`, `d` stored as f16; reading gives `q · d`.

use crate::quant::Isa;

/// Values per `q8_0` scale.
pub const Q8_GROUP: usize = 32;

/// The KV cache's element type (`--kv-cache-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheDtype {
    /// 16-bit floats.
    #[default]
    F16,
    /// 8-bit integers, one f16 scale per 32 values.
    Q8_0,
}

impl KvCacheDtype {
    /// The name users write (`f16`, `q8_0`), as llama.cpp and vLLM users know them.
    pub fn name(self) -> &'static str {
        match self {
            KvCacheDtype::F16 => "f16",
            KvCacheDtype::Q8_0 => "q8_0",
        }
    }

    /// Bytes `n` values take (`n` a multiple of [`Q8_GROUP`] for `q8_0`).
    pub fn bytes(self, n: usize) -> usize {
        match self {
            KvCacheDtype::F16 => 2 * n,
            KvCacheDtype::Q8_0 => n + 2 * n.div_ceil(Q8_GROUP),
        }
    }
}

impl std::str::FromStr for KvCacheDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f16" | "fp16" | "float16" => Ok(KvCacheDtype::F16),
            "q8_0" => Ok(KvCacheDtype::Q8_0),
            "fp8" | "fp8_e4m3" | "fp8_e5m2" => Err(format!(
                "{s:?} is not supported yet (the CPU backend has f16 and q8_0)"
            )),
            _ => Err(format!(
                "unknown KV cache type {s:?} (expected f16 or q8_0)"
            )),
        }
    }
}

/// See the module docs.
pub(crate) enum Plane {
    F16(Vec<u16>),
    Q8 { q: Vec<i8>, d: Vec<u16> },
}

impl Plane {
    /// `n` zero values (`n` a multiple of [`Q8_GROUP`] for `q8_0`).
    pub(crate) fn new(dtype: KvCacheDtype, n: usize) -> Plane {
        match dtype {
            KvCacheDtype::F16 => Plane::F16(vec![0; n]),
            KvCacheDtype::Q8_0 => Plane::Q8 {
                q: vec![0; n],
                d: vec![0; n.div_ceil(Q8_GROUP)],
            },
        }
    }

    /// Stores `src` at element `off` (both multiples of [`Q8_GROUP`] for `q8_0`).
    #[inline]
    pub(crate) fn store(&mut self, off: usize, src: &[f32], isa: Isa) {
        match self {
            Plane::F16(v) => isa.f32_to_f16(src, &mut v[off..off + src.len()]),
            Plane::Q8 { q, d } => {
                quantize_q8_0(src, &mut q[off..off + src.len()], &mut d[off / Q8_GROUP..]);
            }
        }
    }

    /// Reads `dst.len()` values from element `off` into `dst`.
    #[inline]
    pub(crate) fn load(&self, off: usize, dst: &mut [f32], isa: Isa) {
        match self {
            Plane::F16(v) => isa.f16_to_f32(&v[off..off + dst.len()], dst),
            Plane::Q8 { q, d } => {
                dequantize_q8_0(&q[off..off + dst.len()], &d[off / Q8_GROUP..], dst);
            }
        }
    }

    /// Copies `n` values from element `src_off` here to `dst_off` in `dst` (same type).
    pub(crate) fn copy_to(&self, src_off: usize, dst: &mut Plane, dst_off: usize, n: usize) {
        match (self, dst) {
            (Plane::F16(a), Plane::F16(b)) => {
                b[dst_off..dst_off + n].copy_from_slice(&a[src_off..src_off + n])
            }
            (Plane::Q8 { q: qa, d: da }, Plane::Q8 { q: qb, d: db }) => {
                qb[dst_off..dst_off + n].copy_from_slice(&qa[src_off..src_off + n]);
                let (gs, gd, gn) = (src_off / Q8_GROUP, dst_off / Q8_GROUP, n / Q8_GROUP);
                db[gd..gd + gn].copy_from_slice(&da[gs..gs + gn]);
            }
            // Both planes of a cache are made with one type.
            _ => unreachable!("KV planes of different types"),
        }
    }
}

/// ggml's reference q8_0 quantization: per 32 values, `d = max|x| / 127`, `q = round(x / d)`.
pub fn quantize_q8_0(src: &[f32], q: &mut [i8], d: &mut [u16]) {
    for ((x, q), d) in src
        .chunks(Q8_GROUP)
        .zip(q.chunks_mut(Q8_GROUP))
        .zip(d.iter_mut())
    {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for (qi, &xi) in q.iter_mut().zip(x) {
            *qi = (xi * inv).round().clamp(-127.0, 127.0) as i8;
        }
        *d = half::f16::from_f32(scale).to_bits();
    }
}

/// `q · d` per 32 values.
pub fn dequantize_q8_0(q: &[i8], d: &[u16], dst: &mut [f32]) {
    for ((out, q), d) in dst
        .chunks_mut(Q8_GROUP)
        .zip(q.chunks(Q8_GROUP))
        .zip(d.iter())
    {
        let s = half::f16::from_bits(*d).to_f32();
        for (o, &qi) in out.iter_mut().zip(q) {
            *o = f32::from(qi) * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_unsupported_types_say_so() {
        assert_eq!("q8_0".parse::<KvCacheDtype>(), Ok(KvCacheDtype::Q8_0));
        assert_eq!(" F16 ".parse::<KvCacheDtype>(), Ok(KvCacheDtype::F16));
        let e = "fp8_e4m3".parse::<KvCacheDtype>().unwrap_err();
        assert!(e.contains("not supported yet"), "{e}");
        let e = "int4".parse::<KvCacheDtype>().unwrap_err();
        assert!(e.contains("expected f16 or q8_0"), "{e}");
    }

    #[test]
    fn q8_0_takes_34_bytes_per_32_values() {
        assert_eq!(KvCacheDtype::Q8_0.bytes(64), 68);
        assert_eq!(KvCacheDtype::F16.bytes(64), 128);
    }

    #[test]
    fn q8_0_round_trip_error_is_within_half_a_step_of_each_group() {
        let x: Vec<f32> = (0..96)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let mut q = vec![0i8; 96];
        let mut d = vec![0u16; 3];
        quantize_q8_0(&x, &mut q, &mut d);
        let mut y = vec![0.0; 96];
        dequantize_q8_0(&q, &d, &mut y);
        for (g, (xs, ys)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
            let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let step = amax / 127.0;
            for (a, b) in xs.iter().zip(ys) {
                // Half a step, plus the f16 rounding of the scale (relative 2^-11) at 127 steps.
                assert!(
                    (a - b).abs() <= 0.5 * step + 127.0 * step / 2048.0 + 1e-7,
                    "group {g}: {a} vs {b}"
                );
            }
        }
        // All zeros stay zeros (no division by zero).
        let mut q = vec![1i8; 32];
        let mut d = vec![1u16; 1];
        quantize_q8_0(&[0.0; 32], &mut q, &mut d);
        dequantize_q8_0(&q, &d, &mut y[..32]);
        assert!(y[..32].iter().all(|v| *v == 0.0));
    }

    #[test]
    fn planes_store_load_and_copy_whole_rows() {
        let isa = Isa::detect();
        for dtype in [KvCacheDtype::F16, KvCacheDtype::Q8_0] {
            let mut a = Plane::new(dtype, 128);
            let mut b = Plane::new(dtype, 128);
            let row: Vec<f32> = (0..64).map(|i| i as f32 / 64.0 - 0.5).collect();
            a.store(64, &row, isa);
            a.copy_to(64, &mut b, 0, 64);
            let mut out = vec![0.0; 64];
            b.load(0, &mut out, isa);
            for (x, y) in row.iter().zip(&out) {
                assert!((x - y).abs() < 0.01, "{dtype:?}: {x} vs {y}");
            }
        }
    }
}
