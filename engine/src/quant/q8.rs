//! Activations quantized to 8 bits, the way llama.cpp feeds its quantized dot products:
//! [`BlockQ8`] (32 values, one scale, plus `s = d·Σq` for Q4_1 weights — ggml's Q8_0/Q8_1) and
//! [`BlockQ8K`] (256 values with per-16 sums, ggml's Q8_K, for K-quant weights).
//!
//! These are in-memory formats only (never written to files), so the scales are kept as f32
//! holding the f16-rounded values llama.cpp would store: the dot products then see the same
//! numbers llama.cpp's do.

// Index loops mirror ggml's reference code line by line, which is what makes them checkable.
#![allow(clippy::needless_range_loop)]

use half::f16;

/// 32 activations quantized to i8 with one scale (ggml `block_q8_0` / `block_q8_1`).
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C, align(8))]
pub struct BlockQ8 {
    /// Scale (an f16 value).
    pub d: f32,
    /// `d · Σ qs` rounded to f16 (ggml's `block_q8_1.s`), used by Q4_1 weights' min term.
    pub s: f32,
    pub qs: [i8; 32],
}

impl BlockQ8 {
    pub const ZERO: BlockQ8 = BlockQ8 {
        d: 0.0,
        s: 0.0,
        qs: [0; 32],
    };
}

/// 256 activations quantized to i8 with one f32 scale and the sums of each 16 (ggml `block_q8_K`).
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C, align(8))]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; 256],
    pub bsums: [i16; 16],
}

impl BlockQ8K {
    pub const ZERO: BlockQ8K = BlockQ8K {
        d: 0.0,
        qs: [0; 256],
        bsums: [0; 16],
    };
}

#[inline(always)]
fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Quantizes `x` (a multiple of 32 long) into `out` (`x.len() / 32` blocks), as ggml's
/// `quantize_row_q8_1` does on x86: `d = max|x| / 127`, `q = round_ties_even(x · 127 / max|x|)`.
pub fn quantize_row_q8(x: &[f32], out: &mut [BlockQ8]) {
    debug_assert_eq!(x.len(), out.len() * 32);
    for (xb, yb) in x.chunks_exact(32).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        // `127 / max` rather than `1 / d`, and ties to even: what llama.cpp's SIMD quantizers do,
        // so the same activations round to the same integers (the model is sensitive to it).
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in yb.qs.iter_mut().zip(xb) {
            let r = (v * id).round_ties_even() as i32;
            *q = r as i8;
            sum += r;
        }
        yb.d = round_f16(d);
        yb.s = round_f16(sum as f32 * d);
    }
}

/// Quantizes `x` (a multiple of 256 long) into `out`, as ggml's `quantize_row_q8_K_ref`.
pub fn quantize_row_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    debug_assert_eq!(x.len(), out.len() * 256);
    for (xb, yb) in x.chunks_exact(256).zip(out.iter_mut()) {
        let mut amax = 0.0f32;
        let mut max = 0.0f32;
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *yb = BlockQ8K::ZERO;
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in yb.qs.iter_mut().zip(xb) {
            *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
        }
        for (s, q16) in yb.bsums.iter_mut().zip(yb.qs.chunks_exact(16)) {
            *s = q16.iter().map(|&q| q as i16).sum();
        }
        yb.d = 1.0 / iscale;
    }
}
