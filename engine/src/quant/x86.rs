//! x86-64 SIMD kernels: AVX2 (+FMA, F16C) and AVX-512 VNNI (256-bit `vpdpbusd`, needs
//! AVX512F/BW/VL/VNNI). Same results as `scalar` up to float summation order.
//!
//! Every function here has `#[target_feature]`: callers (in `unsafe` blocks) must only reach them
//! through an [`super::Isa`] whose detection saw those features. Memory access goes through
//! bounds-checked slices; the only raw loads are of fixed-size blocks inside checked slices.

// Index loops mirror ggml's reference code line by line, which is what makes them checkable.
#![allow(clippy::needless_range_loop)]

use super::q8::BlockQ8;
use std::arch::x86_64::*;

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum_ps(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn f16_bits_to_f32(lo: u8, hi: u8) -> f32 {
    let bits = u16::from_le_bytes([lo, hi]) as i32;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
}

/// The two f16 values in `b[0..4]` (a Q4_1 block's `d` and `m`), one conversion for both.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn f16_pair_to_f32(b: &[u8]) -> (f32, f32) {
    let bits = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// `Σ u8 × i8` over 4-byte groups into 8 i32 lanes, AVX2 flavour.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn mul_sum_avx2(ux: __m256i, sy: __m256i) -> __m256i {
    let d = _mm256_maddubs_epi16(ux, sy);
    _mm256_madd_epi16(d, _mm256_set1_epi16(1))
}

/// `Σ u8 × i8` over 4-byte groups into 8 i32 lanes, one `vpdpbusd`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn mul_sum_vnni(ux: __m256i, sy: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), ux, sy)
}

/// Loads 32 bytes from a slice that is at least 32 long.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn load32(b: &[u8]) -> __m256i {
    assert!(b.len() >= 32);
    // SAFETY: length checked above; unaligned load.
    unsafe { _mm256_loadu_si256(b.as_ptr() as *const __m256i) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn load16(b: &[u8]) -> __m128i {
    assert!(b.len() >= 16);
    // SAFETY: length checked above; unaligned load.
    unsafe { _mm_loadu_si128(b.as_ptr() as *const __m128i) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn load_q8(b: &BlockQ8) -> __m256i {
    // SAFETY: `qs` is exactly 32 bytes; unaligned load.
    unsafe { _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i) }
}

/// Loads 8 f32 from a slice that is at least 8 long.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn load8f(v: &[f32]) -> __m256 {
    assert!(v.len() >= 8);
    // SAFETY: length checked above; unaligned load.
    unsafe { _mm256_loadu_ps(v.as_ptr()) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn store8f(out: &mut [f32; 8], v: __m256) {
    // SAFETY: exactly 8 f32; unaligned store.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) }
}

macro_rules! q8_kernels {
    ($modname:ident, $feat:literal, $mul_sum:ident) => {
        pub mod $modname {
            use super::*;

            /// Q4_1 weights × Q8 activations, `N` activation rows at once.
            #[target_feature(enable = $feat)]
            pub fn q4_1<const N: usize>(w: &[u8], acts: &[&[BlockQ8]], out: &mut [f32]) {
                let acts: &[&[BlockQ8]; N] =
                    acts[..N].try_into().unwrap_or_else(|_| unreachable!());
                let m4 = _mm256_set1_epi8(0x0F);
                let mut acc = [_mm256_setzero_ps(); N];
                let mut mins = [0.0f32; N];
                for (b, blk) in w.chunks_exact(20).enumerate() {
                    let (d, m) = f16_pair_to_f32(&blk[..4]);
                    let raw = load16(&blk[4..]);
                    let x = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), m4);
                    for t in 0..N {
                        let ab = &acts[t][b];
                        let p = $mul_sum(x, load_q8(ab));
                        acc[t] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(p),
                            _mm256_set1_ps(d * ab.d),
                            acc[t],
                        );
                        // FMA, as the C compiler contracts llama.cpp's `summs += m * s`.
                        mins[t] = m.mul_add(ab.s, mins[t]);
                    }
                }
                for t in 0..N {
                    out[t] = hsum_ps(acc[t]) + mins[t];
                }
            }

            /// Q4_1 weights × Q8 activations with the activations' per-block scales packed
            /// block-major for the tile (`d8[b * 8 + t]`, `s8[b * 8 + t]`): the weight scale
            /// times the 8 rows' scales is one vector product and the min term one vector FMA
            /// per block, instead of a scalar product, a broadcast and a scalar FMA per row.
            /// Same operations per row as [`q4_1`], so bit-identical to it.
            #[target_feature(enable = $feat)]
            pub fn q4_1_tile<const N: usize>(
                w: &[u8],
                acts: &[&[BlockQ8]],
                d8: &[f32],
                s8: &[f32],
                out: &mut [f32],
            ) {
                let acts: &[&[BlockQ8]; N] =
                    acts[..N].try_into().unwrap_or_else(|_| unreachable!());
                let m4 = _mm256_set1_epi8(0x0F);
                let mut acc = [_mm256_setzero_ps(); N];
                let mut mins = _mm256_setzero_ps();
                let mut dd = [0.0f32; 8];
                for (b, blk) in w.chunks_exact(20).enumerate() {
                    let (d, m) = f16_pair_to_f32(&blk[..4]);
                    let raw = load16(&blk[4..]);
                    let x = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), m4);
                    let ad = load8f(&d8[b * 8..]);
                    store8f(&mut dd, _mm256_mul_ps(_mm256_set1_ps(d), ad));
                    mins = _mm256_fmadd_ps(_mm256_set1_ps(m), load8f(&s8[b * 8..]), mins);
                    for t in 0..N {
                        let p = $mul_sum(x, load_q8(&acts[t][b]));
                        acc[t] =
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dd[t]), acc[t]);
                    }
                }
                let mut mm = [0.0f32; 8];
                store8f(&mut mm, mins);
                for t in 0..N {
                    out[t] = hsum_ps(acc[t]) + mm[t];
                }
            }

            /// Q8_0 weights × Q8 activations, scales packed as for [`q4_1_tile`];
            /// bit-identical to [`q8_0`].
            #[target_feature(enable = $feat)]
            pub fn q8_0_tile<const N: usize>(
                w: &[u8],
                acts: &[&[BlockQ8]],
                d8: &[f32],
                _s8: &[f32],
                out: &mut [f32],
            ) {
                let acts: &[&[BlockQ8]; N] =
                    acts[..N].try_into().unwrap_or_else(|_| unreachable!());
                let mut acc = [_mm256_setzero_ps(); N];
                let mut dd = [0.0f32; 8];
                for (b, blk) in w.chunks_exact(34).enumerate() {
                    let d = f16_bits_to_f32(blk[0], blk[1]);
                    let x = load32(&blk[2..]);
                    let ax = _mm256_sign_epi8(x, x);
                    store8f(
                        &mut dd,
                        _mm256_mul_ps(_mm256_set1_ps(d), load8f(&d8[b * 8..])),
                    );
                    for t in 0..N {
                        let sy = _mm256_sign_epi8(load_q8(&acts[t][b]), x);
                        let p = $mul_sum(ax, sy);
                        acc[t] =
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dd[t]), acc[t]);
                    }
                }
                for t in 0..N {
                    out[t] = hsum_ps(acc[t]);
                }
            }

            /// Q4_0 weights × Q8 activations.
            #[target_feature(enable = $feat)]
            pub fn q4_0<const N: usize>(w: &[u8], acts: &[&[BlockQ8]], out: &mut [f32]) {
                let acts: &[&[BlockQ8]; N] =
                    acts[..N].try_into().unwrap_or_else(|_| unreachable!());
                let m4 = _mm256_set1_epi8(0x0F);
                let off = _mm256_set1_epi8(8);
                let mut acc = [_mm256_setzero_ps(); N];
                for (b, blk) in w.chunks_exact(18).enumerate() {
                    let d = f16_bits_to_f32(blk[0], blk[1]);
                    let raw = load16(&blk[2..]);
                    let x = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), m4);
                    let x = _mm256_sub_epi8(x, off);
                    let ax = _mm256_sign_epi8(x, x);
                    for t in 0..N {
                        let ab = &acts[t][b];
                        let sy = _mm256_sign_epi8(load_q8(ab), x);
                        let p = $mul_sum(ax, sy);
                        acc[t] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(p),
                            _mm256_set1_ps(d * ab.d),
                            acc[t],
                        );
                    }
                }
                for t in 0..N {
                    out[t] = hsum_ps(acc[t]);
                }
            }

            /// Q8_0 weights × Q8 activations.
            #[target_feature(enable = $feat)]
            pub fn q8_0<const N: usize>(w: &[u8], acts: &[&[BlockQ8]], out: &mut [f32]) {
                let acts: &[&[BlockQ8]; N] =
                    acts[..N].try_into().unwrap_or_else(|_| unreachable!());
                let mut acc = [_mm256_setzero_ps(); N];
                for (b, blk) in w.chunks_exact(34).enumerate() {
                    let d = f16_bits_to_f32(blk[0], blk[1]);
                    let x = load32(&blk[2..]);
                    let ax = _mm256_sign_epi8(x, x);
                    for t in 0..N {
                        let ab = &acts[t][b];
                        let sy = _mm256_sign_epi8(load_q8(ab), x);
                        let p = $mul_sum(ax, sy);
                        acc[t] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(p),
                            _mm256_set1_ps(d * ab.d),
                            acc[t],
                        );
                    }
                }
                for t in 0..N {
                    out[t] = hsum_ps(acc[t]);
                }
            }
        }
    };
}

q8_kernels!(avx2, "avx2,fma,f16c", mul_sum_avx2);
q8_kernels!(
    vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    mul_sum_vnni
);

/// `Σ a[i]·b[i]` in f32.
#[target_feature(enable = "avx2,fma,f16c")]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n bounds both slices.
        let (a0, b0, a1, b1) = unsafe {
            (
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                _mm256_loadu_ps(b.as_ptr().add(i + 8)),
            )
        };
        acc0 = _mm256_fmadd_ps(a0, b0, acc0);
        acc1 = _mm256_fmadd_ps(a1, b1, acc1);
        i += 16;
    }
    let mut s = hsum_ps(_mm256_add_ps(acc0, acc1));
    while i < n {
        s += a[i] * b[i];
        i += 1;
    }
    s
}

/// llama.cpp's flash-attention inner loop for one query row over `keys` keys of an f16 cache
/// (see `Isa::attn_keys_f16acc`), with the accumulator held in registers for head dims 64 and
/// 128. Bit-identical to `dot_f32`, `f16_scale_round` and `f16_fma_round` called key by key.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub fn attn_keys_f16acc(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    keys: usize,
    scale: f32,
    m: &mut f32,
    l: &mut f32,
    acc: &mut [f32],
) {
    let hd = q.len();
    if k.len() < keys * hd || v.len() < keys * hd || acc.len() < hd {
        return;
    }
    match hd {
        64 => attn_keys_reg::<8>(q, k, v, keys, scale, m, l, acc),
        128 => attn_keys_reg::<16>(q, k, v, keys, scale, m, l, acc),
        _ => {
            for j in 0..keys {
                let sj = dot_f32(q, &k[j * hd..(j + 1) * hd]) * scale;
                let vj = &v[j * hd..(j + 1) * hd];
                if sj > *m {
                    let ms = (*m - sj).exp();
                    *m = sj;
                    f16_scale_round(acc, ms);
                    f16_fma_round(acc, vj, 1.0);
                    *l = *l * ms + 1.0;
                } else {
                    let vs = (sj - *m).exp();
                    f16_fma_round(acc, vj, vs);
                    *l += vs;
                }
            }
        }
    }
}

/// `attn_keys_f16acc` for a head dim of `R * 8` (lengths checked by the caller).
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
fn attn_keys_reg<const R: usize>(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    keys: usize,
    scale: f32,
    m: &mut f32,
    l: &mut f32,
    acc: &mut [f32],
) {
    let hd = R * 8;
    let round = |x: __m256| _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x));
    let mut a = [_mm256_setzero_ps(); R];
    for (r, ar) in a.iter_mut().enumerate() {
        // SAFETY: acc.len() >= hd = R * 8 (checked by the caller).
        *ar = unsafe { _mm256_loadu_ps(acc.as_ptr().add(8 * r)) };
    }
    let (mut mm, mut ll) = (*m, *l);
    for j in 0..keys {
        let sj = dot_f32(q, &k[j * hd..(j + 1) * hd]) * scale;
        let vj = &v[j * hd..(j + 1) * hd];
        let s = if sj > mm {
            let ms = (mm - sj).exp();
            mm = sj;
            let vms = _mm256_set1_ps(ms);
            for ar in a.iter_mut() {
                *ar = round(_mm256_mul_ps(*ar, vms));
            }
            ll = ll * ms + 1.0;
            1.0
        } else {
            let vs = (sj - mm).exp();
            ll += vs;
            vs
        };
        let vs = _mm256_set1_ps(s);
        for (r, ar) in a.iter_mut().enumerate() {
            // SAFETY: vj has hd = R * 8 elements.
            let x = unsafe { _mm256_loadu_ps(vj.as_ptr().add(8 * r)) };
            *ar = round(_mm256_fmadd_ps(x, vs, *ar));
        }
    }
    for (r, ar) in a.iter().enumerate() {
        // SAFETY: as above.
        unsafe { _mm256_storeu_ps(acc.as_mut_ptr().add(8 * r), *ar) };
    }
    *m = mm;
    *l = ll;
}

/// `y[i] = y[i]·scale + p·x[i]`.
#[target_feature(enable = "avx2,fma,f16c")]
pub fn scale_axpy(y: &mut [f32], scale: f32, p: f32, x: &[f32]) {
    let n = y.len().min(x.len());
    let vs = _mm256_set1_ps(scale);
    let vp = _mm256_set1_ps(p);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n bounds both slices.
        unsafe {
            let yv = _mm256_loadu_ps(y.as_ptr().add(i));
            let xv = _mm256_loadu_ps(x.as_ptr().add(i));
            _mm256_storeu_ps(
                y.as_mut_ptr().add(i),
                _mm256_fmadd_ps(vp, xv, _mm256_mul_ps(yv, vs)),
            );
        }
        i += 8;
    }
    while i < n {
        y[i] = y[i] * scale + p * x[i];
        i += 1;
    }
}

/// f16 bits → f32.
#[target_feature(enable = "avx2,fma,f16c")]
pub fn f16_to_f32(src: &[u16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n bounds both slices.
        unsafe {
            let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    while i < n {
        dst[i] = half::f16::from_bits(src[i]).to_f32();
        i += 1;
    }
}

/// f32 → f16 bits (round to nearest even).
#[target_feature(enable = "avx2,fma,f16c")]
pub fn f32_to_f16(src: &[f32], dst: &mut [u16]) {
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n bounds both slices.
        unsafe {
            let v = _mm256_loadu_ps(src.as_ptr().add(i));
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h);
        }
        i += 8;
    }
    while i < n {
        dst[i] = half::f16::from_f32(src[i]).to_bits();
        i += 1;
    }
}

/// Quantizes to [`BlockQ8`] exactly like the scalar `quantize_row_q8` (ties to even).
#[target_feature(enable = "avx2,fma,f16c")]
pub fn quantize_row_q8(x: &[f32], out: &mut [BlockQ8]) {
    let sign = _mm256_set1_ps(-0.0);
    for (xb, yb) in x.chunks_exact(32).zip(out.iter_mut()) {
        // SAFETY: xb is exactly 32 long.
        let v = unsafe {
            [
                _mm256_loadu_ps(xb.as_ptr()),
                _mm256_loadu_ps(xb.as_ptr().add(8)),
                _mm256_loadu_ps(xb.as_ptr().add(16)),
                _mm256_loadu_ps(xb.as_ptr().add(24)),
            ]
        };
        let mut mx = _mm256_andnot_ps(sign, v[0]);
        for vi in &v[1..] {
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, *vi));
        }
        let m4 = _mm_max_ps(_mm256_extractf128_ps(mx, 1), _mm256_castps256_ps128(mx));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        let amax = _mm_cvtss_f32(m4);
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let vid = _mm256_set1_ps(id);
        let mut ints = [_mm256_setzero_si256(); 4];
        for k in 0..4 {
            let s = _mm256_mul_ps(v[k], vid);
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(s);
            ints[k] = _mm256_cvtps_epi32(r);
        }
        let sum = _mm256_add_epi32(
            _mm256_add_epi32(ints[0], ints[1]),
            _mm256_add_epi32(ints[2], ints[3]),
        );
        let s4 = _mm_add_epi32(
            _mm256_castsi256_si128(sum),
            _mm256_extracti128_si256(sum, 1),
        );
        let s4 = _mm_hadd_epi32(s4, s4);
        let s4 = _mm_hadd_epi32(s4, s4);
        let isum = _mm_cvtsi128_si32(s4);
        // pack i32 → i16 → i8; packs interleave 128-bit lanes, fix the order with a permute.
        let p01 = _mm256_packs_epi32(ints[0], ints[1]);
        let p23 = _mm256_packs_epi32(ints[2], ints[3]);
        let p = _mm256_packs_epi16(p01, p23);
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: `qs` is exactly 32 bytes.
        unsafe { _mm256_storeu_si256(yb.qs.as_mut_ptr() as *mut __m256i, p) };
        let dh = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(
            _mm_set_ss(d),
        )));
        let sh = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(
            _mm_set_ss(isum as f32 * d),
        )));
        yb.d = dh;
        yb.s = sh;
    }
}

/// `acc[i] = f16(fma(v[i], s, acc[i]))`: llama.cpp's `ggml_vec_mad_f16` on an f16 accumulator.
#[target_feature(enable = "avx2,fma,f16c")]
pub fn f16_fma_round(acc: &mut [f32], v: &[f32], s: f32) {
    let n = acc.len().min(v.len());
    let vs = _mm256_set1_ps(s);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n bounds both slices.
        unsafe {
            let a = _mm256_loadu_ps(acc.as_ptr().add(i));
            let x = _mm256_loadu_ps(v.as_ptr().add(i));
            let r = _mm256_fmadd_ps(x, vs, a);
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(r);
            _mm256_storeu_ps(acc.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    while i < n {
        acc[i] = half::f16::from_f32(v[i].mul_add(s, acc[i])).to_f32();
        i += 1;
    }
}

/// `acc[i] = f16(acc[i] · s)`: llama.cpp's `ggml_vec_scale_f16`.
#[target_feature(enable = "avx2,fma,f16c")]
pub fn f16_scale_round(acc: &mut [f32], s: f32) {
    let n = acc.len();
    let vs = _mm256_set1_ps(s);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n bounds the slice.
        unsafe {
            let a = _mm256_loadu_ps(acc.as_ptr().add(i));
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_mul_ps(a, vs));
            _mm256_storeu_ps(acc.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    while i < n {
        acc[i] = half::f16::from_f32(acc[i] * s).to_f32();
        i += 1;
    }
}
