//! Portable reference dot products on quantized blocks. Every SIMD kernel is tested against these;
//! they also run on machines without a supported vector unit (and under `force_scalar`).
//!
//! Signature of every kernel: one weight row `w` (raw ggml blocks) against up to four activation
//! rows, one result per activation row in `out`.

// Index loops mirror ggml's reference code line by line, which is what makes them checkable.
#![allow(clippy::needless_range_loop)]

use super::dequant::{f16_at, scale_min_k4};
use super::q8::{BlockQ8, BlockQ8K};
use half::{bf16, f16};

pub fn q4_0(w: &[u8], acts: &[&[BlockQ8]], out: &mut [f32]) {
    for (a, o) in acts.iter().zip(out.iter_mut()) {
        let mut sum = 0.0f32;
        for (blk, ab) in w.chunks_exact(18).zip(a.iter()) {
            let d = f16_at(blk, 0);
            let qs = &blk[2..18];
            let mut sumi = 0i32;
            for j in 0..16 {
                sumi += ((qs[j] & 0xF) as i32 - 8) * ab.qs[j] as i32;
                sumi += ((qs[j] >> 4) as i32 - 8) * ab.qs[j + 16] as i32;
            }
            sum += sumi as f32 * d * ab.d;
        }
        *o = sum;
    }
}

pub fn q4_1(w: &[u8], acts: &[&[BlockQ8]], out: &mut [f32]) {
    for (a, o) in acts.iter().zip(out.iter_mut()) {
        let mut sum = 0.0f32;
        for (blk, ab) in w.chunks_exact(20).zip(a.iter()) {
            let d = f16_at(blk, 0);
            let m = f16_at(blk, 2);
            let qs = &blk[4..20];
            let mut sumi = 0i32;
            for j in 0..16 {
                sumi += (qs[j] & 0xF) as i32 * ab.qs[j] as i32;
                sumi += (qs[j] >> 4) as i32 * ab.qs[j + 16] as i32;
            }
            sum += sumi as f32 * d * ab.d + m * ab.s;
        }
        *o = sum;
    }
}

pub fn q8_0(w: &[u8], acts: &[&[BlockQ8]], out: &mut [f32]) {
    for (a, o) in acts.iter().zip(out.iter_mut()) {
        let mut sum = 0.0f32;
        for (blk, ab) in w.chunks_exact(34).zip(a.iter()) {
            let d = f16_at(blk, 0);
            let mut sumi = 0i32;
            for (&q, &x) in blk[2..34].iter().zip(ab.qs.iter()) {
                sumi += q as i8 as i32 * x as i32;
            }
            sum += sumi as f32 * d * ab.d;
        }
        *o = sum;
    }
}

/// Decodes the 8 six-bit scales and 8 mins of a Q4_K block (ggml's `utmp` shuffle).
#[inline(always)]
pub(crate) fn q4k_scales_mins(scales: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, scales);
        sc[j] = s;
        mn[j] = m;
    }
    (sc, mn)
}

pub fn q4k(w: &[u8], acts: &[&[BlockQ8K]], out: &mut [f32]) {
    for (a, o) in acts.iter().zip(out.iter_mut()) {
        let mut sum = 0.0f32;
        for (blk, ab) in w.chunks_exact(144).zip(a.iter()) {
            let d = f16_at(blk, 0) * ab.d;
            let dmin = f16_at(blk, 2) * ab.d;
            let (sc, mn) = q4k_scales_mins(&blk[4..16]);
            let qs = &blk[16..144];
            let mut sumi_mins = 0i32;
            for j in 0..16 {
                sumi_mins += ab.bsums[j] as i32 * mn[j / 2] as i32;
            }
            let mut aux = 0i32;
            for c in 0..4 {
                let q32 = &qs[c * 32..c * 32 + 32];
                let y = &ab.qs[c * 64..c * 64 + 64];
                let mut lo = 0i32;
                let mut hi = 0i32;
                for l in 0..32 {
                    lo += (q32[l] & 0xF) as i32 * y[l] as i32;
                    hi += (q32[l] >> 4) as i32 * y[l + 32] as i32;
                }
                aux += lo * sc[2 * c] as i32 + hi * sc[2 * c + 1] as i32;
            }
            sum += d * aux as f32 - dmin * sumi_mins as f32;
        }
        *o = sum;
    }
}

/// The 256 signed 6-bit values (−32..31) of a Q6_K block, in element order.
#[inline(always)]
pub(crate) fn q6k_values(blk: &[u8], vals: &mut [i8; 256]) {
    let ql = &blk[0..128];
    let qh = &blk[128..192];
    for h in 0..2 {
        let ql = &ql[h * 64..h * 64 + 64];
        let qh = &qh[h * 32..h * 32 + 32];
        let v = &mut vals[h * 128..h * 128 + 128];
        for l in 0..32 {
            v[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
            v[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            v[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            v[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
        }
    }
}

pub fn q6k(w: &[u8], acts: &[&[BlockQ8K]], out: &mut [f32]) {
    let mut vals = [0i8; 256];
    for o in out.iter_mut().take(acts.len()) {
        *o = 0.0;
    }
    for (bi, blk) in w.chunks_exact(210).enumerate() {
        q6k_values(blk, &mut vals);
        let d = f16_at(blk, 208);
        let sc = &blk[192..208];
        for (a, o) in acts.iter().zip(out.iter_mut()) {
            let ab = &a[bi];
            let mut aux = 0i32;
            for j in 0..16 {
                let mut s = 0i32;
                for l in 0..16 {
                    s += vals[j * 16 + l] as i32 * ab.qs[j * 16 + l] as i32;
                }
                aux += s * sc[j] as i8 as i32;
            }
            *o += d * ab.d * aux as f32;
        }
    }
}

pub fn f32w(w: &[u8], acts: &[&[f32]], out: &mut [f32]) {
    for (a, o) in acts.iter().zip(out.iter_mut()) {
        let mut s = [0.0f32; 8];
        for (wc, ac) in w.chunks_exact(32).zip(a.chunks_exact(8)) {
            for k in 0..8 {
                let b = &wc[k * 4..k * 4 + 4];
                s[k] += f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * ac[k];
            }
        }
        let mut tail = 0.0;
        let done = a.len() / 8 * 8;
        for i in done..a.len() {
            let b = &w[i * 4..i * 4 + 4];
            tail += f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * a[i];
        }
        *o = s.iter().sum::<f32>() + tail;
    }
}

pub fn f16w(w: &[u8], acts: &[&[f32]], out: &mut [f32]) {
    for (a, o) in acts.iter().zip(out.iter_mut()) {
        let mut s = [0.0f32; 8];
        for (wc, ac) in w.chunks_exact(16).zip(a.chunks_exact(8)) {
            for k in 0..8 {
                s[k] +=
                    f16::from_bits(u16::from_le_bytes([wc[2 * k], wc[2 * k + 1]])).to_f32() * ac[k];
            }
        }
        let mut tail = 0.0;
        for i in a.len() / 8 * 8..a.len() {
            tail += f16::from_bits(u16::from_le_bytes([w[2 * i], w[2 * i + 1]])).to_f32() * a[i];
        }
        *o = s.iter().sum::<f32>() + tail;
    }
}

pub fn bf16w(w: &[u8], acts: &[&[f32]], out: &mut [f32]) {
    for (a, o) in acts.iter().zip(out.iter_mut()) {
        let mut s = [0.0f32; 8];
        for (wc, ac) in w.chunks_exact(16).zip(a.chunks_exact(8)) {
            for k in 0..8 {
                s[k] += bf16::from_bits(u16::from_le_bytes([wc[2 * k], wc[2 * k + 1]])).to_f32()
                    * ac[k];
            }
        }
        let mut tail = 0.0;
        for i in a.len() / 8 * 8..a.len() {
            tail += bf16::from_bits(u16::from_le_bytes([w[2 * i], w[2 * i + 1]])).to_f32() * a[i];
        }
        *o = s.iter().sum::<f32>() + tail;
    }
}
