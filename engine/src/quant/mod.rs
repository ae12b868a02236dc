//! Tensor element types as GGUF/ggml defines them, and the quantized block formats.
//!
//! Owns the type table (ids, elements per block, bytes per block), scalar dequantization
//! (`dequant`), activation quantization (`q8`), and dot products on quantized blocks: a scalar
//! reference (`scalar`) and SIMD kernels chosen at run time through [`Isa`]. Never allocates per
//! call in hot paths.

pub mod dequant;
pub mod q8;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use dequant::dequantize_row;
pub use q8::{BlockQ8, BlockQ8K};

use std::fmt;

/// Errors from the quantization routines (bad sizes or types; never a panic).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    #[error("{elems} elements is not a whole number of {dtype} blocks")]
    RowLength { dtype: GgmlType, elems: usize },
    #[error("{bytes} bytes do not hold exactly {elems} {dtype} elements")]
    DataLength {
        dtype: GgmlType,
        elems: usize,
        bytes: usize,
    },
    #[error("tensor type {0} is not supported by kvroute's kernels")]
    Unsupported(GgmlType),
}

/// Which instruction set the kernels use. Only constructible through detection (or as the scalar
/// fallback), so a SIMD kernel can never run on a CPU without its features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Isa(IsaKind);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IsaKind {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Isa {
    /// The portable reference kernels.
    pub fn scalar() -> Isa {
        Isa(IsaKind::Scalar)
    }

    /// The best kernels this CPU supports; scalar if env `KVROUTE_FORCE_SCALAR` is set to
    /// anything but `0`.
    pub fn detect() -> Isa {
        if std::env::var("KVROUTE_FORCE_SCALAR").is_ok_and(|v| v != "0") {
            return Isa::scalar();
        }
        Isa::available().last().copied().unwrap_or(Isa::scalar())
    }

    /// Every instruction set usable here, scalar first and best last (tests run them all).
    pub fn available() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut v = vec![Isa(IsaKind::Scalar)];
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if avx2 {
                v.push(Isa(IsaKind::Avx2));
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
                {
                    v.push(Isa(IsaKind::Avx512Vnni));
                }
            }
        }
        v
    }

    /// A short name for logs (`scalar`, `avx2`, `avx512vnni`).
    pub fn name(self) -> &'static str {
        match self.0 {
            IsaKind::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            IsaKind::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            IsaKind::Avx512Vnni => "avx512vnni",
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn has_avx2(self) -> bool {
        !matches!(self.0, IsaKind::Scalar)
    }

    /// The kernel for `wtype` weights against [`BlockQ8`] activations, if that pairing exists.
    pub fn q8_kernel(self, wtype: GgmlType) -> Option<Q8Kernel> {
        match (self.0, wtype) {
            (IsaKind::Scalar, GgmlType::Q4_0) => Some(scalar::q4_0),
            (IsaKind::Scalar, GgmlType::Q4_1) => Some(scalar::q4_1),
            (IsaKind::Scalar, GgmlType::Q8_0) => Some(scalar::q8_0),
            #[cfg(target_arch = "x86_64")]
            (IsaKind::Avx2, GgmlType::Q4_0) => Some(simd::q4_0_avx2),
            #[cfg(target_arch = "x86_64")]
            (IsaKind::Avx2, GgmlType::Q4_1) => Some(simd::q4_1_avx2),
            #[cfg(target_arch = "x86_64")]
            (IsaKind::Avx2, GgmlType::Q8_0) => Some(simd::q8_0_avx2),
            #[cfg(target_arch = "x86_64")]
            (IsaKind::Avx512Vnni, GgmlType::Q4_0) => Some(simd::q4_0_vnni),
            #[cfg(target_arch = "x86_64")]
            (IsaKind::Avx512Vnni, GgmlType::Q4_1) => Some(simd::q4_1_vnni),
            #[cfg(target_arch = "x86_64")]
            (IsaKind::Avx512Vnni, GgmlType::Q8_0) => Some(simd::q8_0_vnni),
            _ => None,
        }
    }

    /// The packed-scales kernel for `wtype` weights (see [`Q8TileKernel`]), where one exists.
    pub fn q8_tile_kernel(self, wtype: GgmlType) -> Option<Q8TileKernel> {
        match (self.0, wtype) {
            #[cfg(target_arch = "x86_64")]
            (IsaKind::Avx2, GgmlType::Q4_1) => Some(simd::q4_1_tile_avx2),
            #[cfg(target_arch = "x86_64")]
            (IsaKind::Avx2, GgmlType::Q8_0) => Some(simd::q8_0_tile_avx2),
            #[cfg(target_arch = "x86_64")]
            (IsaKind::Avx512Vnni, GgmlType::Q4_1) => Some(simd::q4_1_tile_vnni),
            #[cfg(target_arch = "x86_64")]
            (IsaKind::Avx512Vnni, GgmlType::Q8_0) => Some(simd::q8_0_tile_vnni),
            _ => None,
        }
    }

    /// The kernel for `wtype` weights against [`BlockQ8K`] activations (K-quants).
    pub fn q8k_kernel(self, wtype: GgmlType) -> Option<Q8KKernel> {
        match wtype {
            GgmlType::Q4K => Some(scalar::q4k),
            GgmlType::Q6K => Some(scalar::q6k),
            _ => None,
        }
    }

    /// The kernel for float weights against f32 activations.
    pub fn f32_kernel(self, wtype: GgmlType) -> Option<F32Kernel> {
        match wtype {
            GgmlType::F32 => Some(scalar::f32w),
            GgmlType::F16 => Some(scalar::f16w),
            GgmlType::BF16 => Some(scalar::bf16w),
            _ => None,
        }
    }

    /// Quantizes activations to [`BlockQ8`].
    pub fn quantize_q8(self, x: &[f32], out: &mut [BlockQ8]) {
        #[cfg(target_arch = "x86_64")]
        if self.has_avx2() {
            // SAFETY: this Isa was detected with avx2, fma and f16c.
            unsafe { x86::quantize_row_q8(x, out) };
            return;
        }
        q8::quantize_row_q8(x, out)
    }

    /// `Σ a·b` over f32.
    #[inline]
    pub fn dot_f32(self, a: &[f32], b: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if self.has_avx2() {
            // SAFETY: this Isa was detected with avx2, fma and f16c.
            return unsafe { x86::dot_f32(a, b) };
        }
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// `y = y·scale + p·x`.
    #[inline]
    pub fn scale_axpy(self, y: &mut [f32], scale: f32, p: f32, x: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.has_avx2() {
            // SAFETY: this Isa was detected with avx2, fma and f16c.
            unsafe { x86::scale_axpy(y, scale, p, x) };
            return;
        }
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi = *yi * scale + p * xi;
        }
    }

    /// `acc[i] = f16(fma(v[i], s, acc[i]))` (an f16 accumulator, as llama.cpp's flash attention
    /// keeps with an f16 cache), values held as f32.
    #[inline]
    pub fn f16_fma_round(self, acc: &mut [f32], v: &[f32], s: f32) {
        #[cfg(target_arch = "x86_64")]
        if self.has_avx2() {
            // SAFETY: this Isa was detected with avx2, fma and f16c.
            unsafe { x86::f16_fma_round(acc, v, s) };
            return;
        }
        for (a, x) in acc.iter_mut().zip(v) {
            *a = half::f16::from_f32(x.mul_add(s, *a)).to_f32();
        }
    }

    /// llama.cpp's flash attention over an f16 cache, for one query row `q` (head dim
    /// `q.len()`) and `keys` keys (`k`, `v`: `keys` rows of that dim, as f32): key by key,
    /// `s = q·k·scale`; a new maximum rescales the f16 accumulator `acc` by `exp(m − s)`, then
    /// every key adds `exp(s − m)·v` rounded to f16; `m` and `l` (sum of weights) carry over
    /// between calls.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub fn attn_keys_f16acc(
        self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        keys: usize,
        scale: f32,
        m: &mut f32,
        l: &mut f32,
        acc: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        if self.has_avx2() {
            // SAFETY: this Isa was detected with avx2, fma and f16c.
            unsafe { x86::attn_keys_f16acc(q, k, v, keys, scale, m, l, acc) };
            return;
        }
        let hd = q.len();
        for j in 0..keys.min(k.len() / hd.max(1)).min(v.len() / hd.max(1)) {
            let sj = self.dot_f32(q, &k[j * hd..(j + 1) * hd]) * scale;
            let vj = &v[j * hd..(j + 1) * hd];
            if sj > *m {
                let ms = (*m - sj).exp();
                *m = sj;
                self.f16_scale_round(acc, ms);
                self.f16_fma_round(acc, vj, 1.0);
                *l = *l * ms + 1.0;
            } else {
                let vs = (sj - *m).exp();
                self.f16_fma_round(acc, vj, vs);
                *l += vs;
            }
        }
    }

    /// `acc[i] = f16(acc[i] · s)`.
    #[inline]
    pub fn f16_scale_round(self, acc: &mut [f32], s: f32) {
        #[cfg(target_arch = "x86_64")]
        if self.has_avx2() {
            // SAFETY: this Isa was detected with avx2, fma and f16c.
            unsafe { x86::f16_scale_round(acc, s) };
            return;
        }
        for a in acc.iter_mut() {
            *a = half::f16::from_f32(*a * s).to_f32();
        }
    }

    /// f16 bits → f32 (`min(len)` elements).
    #[inline]
    pub fn f16_to_f32(self, src: &[u16], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.has_avx2() {
            // SAFETY: this Isa was detected with avx2, fma and f16c.
            unsafe { x86::f16_to_f32(src, dst) };
            return;
        }
        for (d, s) in dst.iter_mut().zip(src) {
            *d = half::f16::from_bits(*s).to_f32();
        }
    }

    /// f32 → f16 bits, round to nearest even (`min(len)` elements).
    #[inline]
    pub fn f32_to_f16(self, src: &[f32], dst: &mut [u16]) {
        #[cfg(target_arch = "x86_64")]
        if self.has_avx2() {
            // SAFETY: this Isa was detected with avx2, fma and f16c.
            unsafe { x86::f32_to_f16(src, dst) };
            return;
        }
        for (d, s) in dst.iter_mut().zip(src) {
            *d = half::f16::from_f32(*s).to_bits();
        }
    }
}

/// One weight row (raw blocks) against 1..=8 activation rows of [`BlockQ8`]; one result each.
pub type Q8Kernel = fn(&[u8], &[&[BlockQ8]], &mut [f32]);
/// A [`Q8Kernel`] for up to [`KERNEL_ROWS`] activation rows that also takes those rows'
/// per-block scales packed block-major (`d[b * KERNEL_ROWS + t]`, `s[b * KERNEL_ROWS + t]`, see
/// [`pack_q8_scales`]); same results as the plain kernel, bit for bit.
pub type Q8TileKernel = fn(&[u8], &[&[BlockQ8]], &[f32], &[f32], &mut [f32]);
/// One weight row against 1..=8 activation rows of [`BlockQ8K`].
pub type Q8KKernel = fn(&[u8], &[&[BlockQ8K]], &mut [f32]);
/// One float weight row against 1..=8 f32 activation rows.
pub type F32Kernel = fn(&[u8], &[&[f32]], &mut [f32]);

/// Packs the per-block scales of up to [`KERNEL_ROWS`] activation rows block-major for a
/// [`Q8TileKernel`]: `d[b * KERNEL_ROWS + t] = acts[t][b].d`, likewise `s`; lanes of absent
/// rows are zero. `d` and `s` need `nb * KERNEL_ROWS` values.
pub fn pack_q8_scales(acts: &[&[BlockQ8]], nb: usize, d: &mut [f32], s: &mut [f32]) {
    for b in 0..nb {
        for t in 0..KERNEL_ROWS {
            let blk = acts.get(t).and_then(|a| a.get(b));
            d[b * KERNEL_ROWS + t] = blk.map_or(0.0, |x| x.d);
            s[b * KERNEL_ROWS + t] = blk.map_or(0.0, |x| x.s);
        }
    }
}

/// Most activation rows a kernel takes at once.
pub const KERNEL_ROWS: usize = 8;

/// How a weight type wants its activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActFormat {
    Q8,
    Q8K,
    F32,
}

impl GgmlType {
    /// The activation format kvroute's kernels pair with this weight type, or `None` if there is
    /// no kernel for it.
    pub fn act_format(self) -> Option<ActFormat> {
        use GgmlType::*;
        match self {
            Q4_0 | Q4_1 | Q8_0 => Some(ActFormat::Q8),
            Q4K | Q6K => Some(ActFormat::Q8K),
            F32 | F16 | BF16 => Some(ActFormat::F32),
            _ => None,
        }
    }
}

/// Safe wrappers that pick the const-generic row count; only handed out by [`Isa::q8_kernel`]
/// for an `Isa` whose detection saw the kernels' features.
#[cfg(target_arch = "x86_64")]
mod simd {
    use super::x86;
    use super::BlockQ8;

    macro_rules! wrap {
        ($name:ident, $m:ident :: $k:ident) => {
            pub fn $name(w: &[u8], acts: &[&[BlockQ8]], out: &mut [f32]) {
                assert!(out.len() >= acts.len(), "one output per activation row");
                // SAFETY: reachable only through an Isa detected with this kernel's features
                // (see Isa::q8_kernel); the const N matches acts.len() (checked by the match).
                unsafe {
                    // Weight blocks are unpacked once per call and reused for every row, so
                    // calls take as many rows as possible (up to 8).
                    for (a8, o8) in acts.chunks(8).zip(out.chunks_mut(8)) {
                        match a8.len() {
                            8 => x86::$m::$k::<8>(w, a8, o8),
                            7 => x86::$m::$k::<7>(w, a8, o8),
                            6 => x86::$m::$k::<6>(w, a8, o8),
                            5 => x86::$m::$k::<5>(w, a8, o8),
                            4 => x86::$m::$k::<4>(w, a8, o8),
                            3 => x86::$m::$k::<3>(w, a8, o8),
                            2 => x86::$m::$k::<2>(w, a8, o8),
                            _ => x86::$m::$k::<1>(w, a8, o8),
                        }
                    }
                }
            }
        };
    }
    macro_rules! wrap_tile {
        ($name:ident, $m:ident :: $k:ident) => {
            pub fn $name(w: &[u8], acts: &[&[BlockQ8]], d8: &[f32], s8: &[f32], out: &mut [f32]) {
                let n = acts.len();
                assert!(
                    (1..=8).contains(&n) && out.len() >= n,
                    "one output per activation row, at most 8 rows"
                );
                let nb = acts.iter().map(|a| a.len()).min().unwrap_or(0);
                assert!(
                    d8.len() >= nb * 8 && s8.len() >= nb * 8,
                    "packed scales for every block"
                );
                // SAFETY: reachable only through an Isa detected with this kernel's features
                // (see Isa::q8_tile_kernel); the const N matches acts.len().
                unsafe {
                    match n {
                        8 => x86::$m::$k::<8>(w, acts, d8, s8, out),
                        7 => x86::$m::$k::<7>(w, acts, d8, s8, out),
                        6 => x86::$m::$k::<6>(w, acts, d8, s8, out),
                        5 => x86::$m::$k::<5>(w, acts, d8, s8, out),
                        4 => x86::$m::$k::<4>(w, acts, d8, s8, out),
                        3 => x86::$m::$k::<3>(w, acts, d8, s8, out),
                        2 => x86::$m::$k::<2>(w, acts, d8, s8, out),
                        _ => x86::$m::$k::<1>(w, acts, d8, s8, out),
                    }
                }
            }
        };
    }
    wrap_tile!(q4_1_tile_avx2, avx2::q4_1_tile);
    wrap_tile!(q8_0_tile_avx2, avx2::q8_0_tile);
    wrap_tile!(q4_1_tile_vnni, vnni::q4_1_tile);
    wrap_tile!(q8_0_tile_vnni, vnni::q8_0_tile);
    wrap!(q4_0_avx2, avx2::q4_0);
    wrap!(q4_1_avx2, avx2::q4_1);
    wrap!(q8_0_avx2, avx2::q8_0);
    wrap!(q4_0_vnni, vnni::q4_0);
    wrap!(q4_1_vnni, vnni::q4_1);
    wrap!(q8_0_vnni, vnni::q8_0);
}

/// A ggml tensor type. The discriminants are the ids stored in GGUF files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2K = 10,
    Q3K = 11,
    Q4K = 12,
    Q5K = 13,
    Q6K = 14,
    Q8K = 15,
    BF16 = 30,
}

impl GgmlType {
    /// The type with this GGUF id, or `None` for ids kvroute does not know.
    pub fn from_id(id: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            30 => BF16,
            _ => return None,
        })
    }

    /// The GGUF id of this type.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// Elements per block (1 for plain float types).
    pub fn block_elems(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 => 32,
            Q2K | Q3K | Q4K | Q5K | Q6K | Q8K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        use GgmlType::*;
        match self {
            F32 => 4,
            F16 | BF16 => 2,
            Q4_0 => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            Q8_0 => 34,
            Q8_1 => 36,
            Q2K => 84,
            Q3K => 110,
            Q4K => 144,
            Q5K => 176,
            Q6K => 210,
            Q8K => 292,
        }
    }

    /// Bytes taken by `elems` elements, or `None` if `elems` is not a whole number of blocks
    /// (or the size overflows).
    pub fn bytes_for(self, elems: u64) -> Option<u64> {
        let per = self.block_elems() as u64;
        if !elems.is_multiple_of(per) {
            return None;
        }
        (elems / per).checked_mul(self.block_bytes() as u64)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use GgmlType::*;
        let s = match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            Q8K => "Q8_K",
            BF16 => "BF16",
        };
        f.write_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_unknown_ids_are_none() {
        for id in 0..64 {
            if let Some(t) = GgmlType::from_id(id) {
                assert_eq!(t.id(), id);
            }
        }
        assert_eq!(GgmlType::from_id(4), None);
        assert_eq!(GgmlType::from_id(u32::MAX), None);
    }

    #[test]
    fn sizes_follow_block_layouts() {
        assert_eq!(GgmlType::Q4_1.bytes_for(64), Some(40));
        assert_eq!(GgmlType::Q4_1.bytes_for(33), None);
        assert_eq!(GgmlType::Q6K.bytes_for(512), Some(420));
        assert_eq!(GgmlType::F16.bytes_for(3), Some(6));
        assert_eq!(GgmlType::Q8_0.bytes_for(u64::MAX - 31), None);
    }
}

#[cfg(test)]
mod kernel_tests {
    use super::*;
    use half::f16;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn f32(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    /// The fused attention loop equals the key-by-key composition of the SIMD primitives it
    /// replaces, bit for bit (the reference test against llama.cpp depends on every rounding),
    /// for the register paths (head dims 64 and 128) and the fallback (another dim), with
    /// rising and falling scores so both branches run; and the scalar Isa's loop matches its own
    /// primitives.
    #[test]
    fn fused_attention_keys_match_key_by_key() {
        let mut rng = Rng(7);
        for isa in Isa::available() {
            for hd in [64usize, 128, 40] {
                for keys in [1usize, 5, 16] {
                    let q: Vec<f32> = (0..hd).map(|_| rng.f32() * 2.0).collect();
                    let k: Vec<f32> = (0..keys * hd).map(|_| rng.f32() * 3.0).collect();
                    let v: Vec<f32> = (0..keys * hd).map(|_| rng.f32()).collect();
                    let start: Vec<f32> =
                        (0..hd).map(|_| f16::from_f32(rng.f32()).to_f32()).collect();
                    for m0 in [f32::NEG_INFINITY, 0.5] {
                        let (mut m1, mut l1, mut a1) = (m0, 1.0f32, start.clone());
                        isa.attn_keys_f16acc(&q, &k, &v, keys, 0.125, &mut m1, &mut l1, &mut a1);
                        let (mut m2, mut l2, mut a2) = (m0, 1.0f32, start.clone());
                        for j in 0..keys {
                            let sj = isa.dot_f32(&q, &k[j * hd..(j + 1) * hd]) * 0.125;
                            let vj = &v[j * hd..(j + 1) * hd];
                            if sj > m2 {
                                let ms = (m2 - sj).exp();
                                m2 = sj;
                                isa.f16_scale_round(&mut a2, ms);
                                isa.f16_fma_round(&mut a2, vj, 1.0);
                                l2 = l2 * ms + 1.0;
                            } else {
                                let vs = (sj - m2).exp();
                                isa.f16_fma_round(&mut a2, vj, vs);
                                l2 += vs;
                            }
                        }
                        assert_eq!(m1.to_bits(), m2.to_bits(), "{} hd {hd}", isa.name());
                        assert_eq!(l1.to_bits(), l2.to_bits(), "{} hd {hd}", isa.name());
                        let b1: Vec<u32> = a1.iter().map(|x| x.to_bits()).collect();
                        let b2: Vec<u32> = a2.iter().map(|x| x.to_bits()).collect();
                        assert_eq!(b1, b2, "{} hd {hd} keys {keys}", isa.name());
                    }
                }
            }
        }
    }

    /// A random but valid row of `blocks` blocks of `t` (scales are sane f16 values).
    fn random_row(rng: &mut Rng, t: GgmlType, blocks: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..blocks {
            let mut b = rng.bytes(t.block_bytes());
            let put_f16 = |b: &mut Vec<u8>, at: usize, v: f32| {
                b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
            };
            match t {
                GgmlType::Q4_0 | GgmlType::Q8_0 => put_f16(&mut b, 0, rng.f32() * 0.1),
                GgmlType::Q4_1 => {
                    put_f16(&mut b, 0, rng.f32() * 0.1);
                    put_f16(&mut b, 2, rng.f32() * 0.5);
                }
                GgmlType::Q4K => {
                    put_f16(&mut b, 0, rng.f32() * 0.01);
                    put_f16(&mut b, 2, rng.f32() * 0.01);
                }
                GgmlType::Q6K => put_f16(&mut b, 208, rng.f32() * 0.01),
                GgmlType::F16 => {
                    b.clear();
                    for _ in 0..1 {
                        b.extend_from_slice(&f16::from_f32(rng.f32()).to_le_bytes());
                    }
                }
                GgmlType::BF16 => {
                    b.clear();
                    b.extend_from_slice(&half::bf16::from_f32(rng.f32()).to_le_bytes());
                }
                GgmlType::F32 => {
                    b.clear();
                    b.extend_from_slice(&rng.f32().to_le_bytes());
                }
                _ => unreachable!(),
            }
            out.extend_from_slice(&b);
        }
        out
    }

    /// The packed-scale tile kernels give exactly the plain SIMD kernels' results (which the
    /// other tests check against the scalar reference) for every row count 1..=8, on every
    /// instruction set this machine has (AVX2 and AVX-512 VNNI here); the scalar Isa has none
    /// (its matmul path stays the plain one).
    #[test]
    fn tile_kernels_match_plain_kernels_bit_for_bit() {
        let mut rng = Rng(11);
        assert!(Isa::scalar().q8_tile_kernel(GgmlType::Q4_1).is_none());
        for (isa, t) in Isa::available()
            .into_iter()
            .flat_map(|isa| [(isa, GgmlType::Q4_1), (isa, GgmlType::Q8_0)])
        {
            let (Some(tile), Some(plain)) = (isa.q8_tile_kernel(t), isa.q8_kernel(t)) else {
                continue;
            };
            for nb in [1usize, 18, 48] {
                let w = random_row(&mut rng, t, nb);
                let rows: Vec<Vec<BlockQ8>> = (0..KERNEL_ROWS)
                    .map(|_| {
                        let x: Vec<f32> = (0..nb * 32).map(|_| rng.f32() * 4.0).collect();
                        let mut q = vec![BlockQ8::ZERO; nb];
                        isa.quantize_q8(&x, &mut q);
                        q
                    })
                    .collect();
                for m in 1..=KERNEL_ROWS {
                    let a: Vec<&[BlockQ8]> = rows[..m].iter().map(|r| r.as_slice()).collect();
                    let (mut d, mut s) = (vec![0.0; nb * 8], vec![0.0; nb * 8]);
                    pack_q8_scales(&a, nb, &mut d, &mut s);
                    let (mut got, mut want) = (vec![0.0f32; m], vec![0.0f32; m]);
                    tile(&w, &a, &d, &s, &mut got);
                    plain(&w, &a, &mut want);
                    let gb: Vec<u32> = got.iter().map(|x| x.to_bits()).collect();
                    let wb: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
                    assert_eq!(gb, wb, "{} {t} nb {nb} rows {m}", isa.name());
                }
            }
        }
    }

    fn close(a: f32, b: f32, tol: f32) -> bool {
        (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
    }

    #[test]
    fn simd_quantize_matches_scalar_exactly() {
        let mut rng = Rng(7);
        for isa in Isa::available() {
            for _ in 0..50 {
                let x: Vec<f32> = (0..256).map(|_| rng.f32() * 3.0).collect();
                let mut a = vec![BlockQ8::ZERO; 8];
                let mut b = vec![BlockQ8::ZERO; 8];
                q8::quantize_row_q8(&x, &mut a);
                isa.quantize_q8(&x, &mut b);
                assert_eq!(a, b, "isa {}", isa.name());
            }
            let zeros = vec![0.0f32; 32];
            let mut b = vec![BlockQ8::ZERO; 1];
            isa.quantize_q8(&zeros, &mut b);
            assert_eq!(b[0], BlockQ8::ZERO);
        }
    }

    #[test]
    fn quantized_activations_reconstruct_their_input() {
        let mut rng = Rng(3);
        let x: Vec<f32> = (0..512).map(|_| rng.f32()).collect();
        let mut q = vec![BlockQ8::ZERO; 16];
        q8::quantize_row_q8(&x, &mut q);
        for (xb, b) in x.chunks(32).zip(&q) {
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (v, &qi) in xb.iter().zip(&b.qs) {
                assert!((v - qi as f32 * b.d).abs() <= amax / 127.0 * 0.51 + 1e-3 * amax);
            }
            let sum: i32 = b.qs.iter().map(|&v| v as i32).sum();
            assert!(close(b.s, sum as f32 * b.d, 1e-2));
        }
        let mut k = vec![BlockQ8K::ZERO; 2];
        q8::quantize_row_q8k(&x, &mut k);
        for (xb, b) in x.chunks(256).zip(&k) {
            for (v, &qi) in xb.iter().zip(&b.qs) {
                assert!((v - qi as f32 * b.d).abs() <= b.d.abs() * 0.51);
            }
            for (j, s) in b.bsums.iter().enumerate() {
                assert_eq!(
                    *s,
                    b.qs[j * 16..j * 16 + 16]
                        .iter()
                        .map(|&v| v as i16)
                        .sum::<i16>()
                );
            }
        }
    }

    /// Every kernel (scalar and SIMD, every row count) against f32 dot products of the
    /// dequantized weights and dequantized activations: they compute the same sum, so they must
    /// agree to float rounding.
    #[test]
    fn every_kernel_matches_the_dequantized_reference() {
        let mut rng = Rng(11);
        let types = [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q8_0,
            GgmlType::Q4K,
            GgmlType::Q6K,
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
        ];
        for t in types {
            let n = 512;
            for _ in 0..20 {
                let w = random_row(&mut rng, t, n / t.block_elems());
                let mut wf = vec![0.0f32; n];
                dequantize_row(t, &w, &mut wf).unwrap();
                let xs: Vec<Vec<f32>> = (0..10)
                    .map(|_| (0..n).map(|_| rng.f32()).collect())
                    .collect();
                for isa in Isa::available() {
                    let mut got = [0.0f32; 10];
                    let mut want = [0.0f32; 10];
                    match t.act_format().unwrap() {
                        ActFormat::Q8 => {
                            let qs: Vec<Vec<BlockQ8>> = xs
                                .iter()
                                .map(|x| {
                                    let mut q = vec![BlockQ8::ZERO; n / 32];
                                    q8::quantize_row_q8(x, &mut q);
                                    q
                                })
                                .collect();
                            for (i, q) in qs.iter().enumerate() {
                                let mut xf = vec![0.0f32; n];
                                for (b, xb) in q.iter().zip(xf.chunks_mut(32)) {
                                    for (v, &qi) in xb.iter_mut().zip(&b.qs) {
                                        *v = qi as f32 * b.d;
                                    }
                                }
                                // Q4_1's min term uses the f16-rounded block sum.
                                want[i] = if t == GgmlType::Q4_1 {
                                    let mut s = 0.0;
                                    for ((blk, b), wb) in w.chunks(20).zip(q).zip(wf.chunks(32)) {
                                        let m = dequant::f16_at(blk, 2);
                                        let dot: f32 = wb
                                            .iter()
                                            .zip(&b.qs)
                                            .map(|(wv, &qi)| (wv - m) * qi as f32 * b.d)
                                            .sum();
                                        s += dot + m * b.s;
                                    }
                                    s
                                } else {
                                    wf.iter().zip(&xf).map(|(a, b)| a * b).sum()
                                };
                            }
                            let k = isa.q8_kernel(t).unwrap();
                            for rows in 1..=10 {
                                let refs: Vec<&[BlockQ8]> =
                                    qs[..rows].iter().map(|v| v.as_slice()).collect();
                                k(&w, &refs, &mut got[..rows]);
                                for r in 0..rows {
                                    assert!(
                                        close(got[r], want[r], 1e-4),
                                        "{t} {} rows {rows}: {} vs {}",
                                        isa.name(),
                                        got[r],
                                        want[r]
                                    );
                                }
                            }
                        }
                        ActFormat::Q8K => {
                            let qs: Vec<Vec<BlockQ8K>> = xs
                                .iter()
                                .map(|x| {
                                    let mut q = vec![BlockQ8K::ZERO; n / 256];
                                    q8::quantize_row_q8k(x, &mut q);
                                    q
                                })
                                .collect();
                            for (i, q) in qs.iter().enumerate() {
                                let mut s = 0.0f32;
                                for (b, wb) in q.iter().zip(wf.chunks(256)) {
                                    s += wb
                                        .iter()
                                        .zip(&b.qs)
                                        .map(|(wv, &qi)| wv * qi as f32 * b.d)
                                        .sum::<f32>();
                                }
                                want[i] = s;
                            }
                            let k = isa.q8k_kernel(t).unwrap();
                            for rows in 1..=10 {
                                let refs: Vec<&[BlockQ8K]> =
                                    qs[..rows].iter().map(|v| v.as_slice()).collect();
                                k(&w, &refs, &mut got[..rows]);
                                for r in 0..rows {
                                    assert!(
                                        close(got[r], want[r], 1e-4),
                                        "{t} {} rows {rows}: {} vs {}",
                                        isa.name(),
                                        got[r],
                                        want[r]
                                    );
                                }
                            }
                        }
                        ActFormat::F32 => {
                            for (i, x) in xs.iter().enumerate() {
                                want[i] = wf.iter().zip(x).map(|(a, b)| a * b).sum();
                            }
                            let k = isa.f32_kernel(t).unwrap();
                            for rows in 1..=10 {
                                let refs: Vec<&[f32]> =
                                    xs[..rows].iter().map(|v| v.as_slice()).collect();
                                k(&w, &refs, &mut got[..rows]);
                                for r in 0..rows {
                                    assert!(close(got[r], want[r], 1e-4), "{t} {}", isa.name());
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn simd_vector_helpers_match_scalar() {
        let mut rng = Rng(5);
        let s = Isa::scalar();
        for isa in Isa::available() {
            for n in [0usize, 1, 7, 8, 31, 64, 100] {
                let a: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
                let b: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
                assert!(close(isa.dot_f32(&a, &b), s.dot_f32(&a, &b), 1e-5));
                let mut y1 = a.clone();
                let mut y2 = a.clone();
                isa.scale_axpy(&mut y1, 0.7, 1.3, &b);
                s.scale_axpy(&mut y2, 0.7, 1.3, &b);
                for (p, q) in y1.iter().zip(&y2) {
                    assert!(close(*p, *q, 1e-6));
                }
                let mut h1 = vec![0u16; n];
                let mut h2 = vec![0u16; n];
                isa.f32_to_f16(&a, &mut h1);
                s.f32_to_f16(&a, &mut h2);
                assert_eq!(h1, h2);
                let mut y1 = a.clone();
                let mut y2 = a.clone();
                isa.f16_fma_round(&mut y1, &b, 0.37);
                s.f16_fma_round(&mut y2, &b, 0.37);
                assert_eq!(y1, y2);
                isa.f16_scale_round(&mut y1, 1.7);
                s.f16_scale_round(&mut y2, 1.7);
                assert_eq!(y1, y2);
                let mut f1 = vec![0f32; n];
                let mut f2 = vec![0f32; n];
                isa.f16_to_f32(&h1, &mut f1);
                s.f16_to_f32(&h2, &mut f2);
                assert_eq!(f1, f2);
            }
        }
    }

    #[test]
    fn dequantize_rejects_bad_lengths_and_types() {
        let mut out = vec![0.0f32; 32];
        assert!(matches!(
            dequantize_row(GgmlType::Q4_1, &[0u8; 19], &mut out),
            Err(QuantError::DataLength { .. })
        ));
        let mut out = vec![0.0f32; 33];
        assert!(matches!(
            dequantize_row(GgmlType::Q4_1, &[0u8; 20], &mut out),
            Err(QuantError::RowLength { .. })
        ));
        let mut out = vec![0.0f32; 32];
        assert!(matches!(
            dequantize_row(GgmlType::Q5_0, &[0u8; 22], &mut out),
            Err(QuantError::Unsupported(GgmlType::Q5_0))
        ));
    }

    #[test]
    fn dequantize_known_blocks() {
        // Q4_1: d = 0.5, m = -1, nibbles 0..15 / 15..0.
        let mut b = Vec::new();
        b.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b.extend_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        for j in 0..16u8 {
            b.push(j | ((15 - j) << 4));
        }
        let mut out = vec![0.0f32; 32];
        dequantize_row(GgmlType::Q4_1, &b, &mut out).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], j as f32 * 0.5 - 1.0);
            assert_eq!(out[j + 16], (15 - j) as f32 * 0.5 - 1.0);
        }
        // Q8_0: d = 0.25, values -16..16.
        let mut b = f16::from_f32(0.25).to_le_bytes().to_vec();
        b.extend((0..32).map(|j| (j as i8 - 16) as u8));
        dequantize_row(GgmlType::Q8_0, &b, &mut out).unwrap();
        for (j, v) in out.iter().enumerate() {
            assert_eq!(*v, (j as f32 - 16.0) * 0.25);
        }
    }
}
