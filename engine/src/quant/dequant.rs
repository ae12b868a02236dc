//! Scalar dequantization of ggml block formats to f32: the reference every fast path is checked
//! against, and what embedding lookups use (one row at a time, never a whole matrix).
//!
//! Layouts follow ggml exactly (`ggml-common.h`): little-endian, blocks packed without padding.

// Index loops mirror ggml's reference code line by line, which is what makes them checkable.
#![allow(clippy::needless_range_loop)]

use super::{GgmlType, QuantError};
use half::{bf16, f16};

/// Reads a little-endian f16 at `b[0..2]`.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// `get_scale_min_k4` of ggml: the 6-bit scale and min of sub-block `j` (0..8) of a Q4_K block.
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Dequantizes `out.len()` elements stored as `dtype` in `data` (which must hold exactly that many
/// elements) into `out`.
pub fn dequantize_row(dtype: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    let n = out.len();
    let need = dtype
        .bytes_for(n as u64)
        .ok_or(QuantError::RowLength { dtype, elems: n })?;
    if data.len() as u64 != need {
        return Err(QuantError::DataLength {
            dtype,
            elems: n,
            bytes: data.len(),
        });
    }
    let bb = dtype.block_bytes();
    let be = dtype.block_elems();
    match dtype {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        GgmlType::Q4_0 => {
            for (y, b) in out.chunks_exact_mut(be).zip(data.chunks_exact(bb)) {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                for j in 0..16 {
                    y[j] = ((qs[j] & 0xF) as i32 - 8) as f32 * d;
                    y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (y, b) in out.chunks_exact_mut(be).zip(data.chunks_exact(bb)) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let qs = &b[4..20];
                for j in 0..16 {
                    y[j] = (qs[j] & 0xF) as f32 * d + m;
                    y[j + 16] = (qs[j] >> 4) as f32 * d + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (y, b) in out.chunks_exact_mut(be).zip(data.chunks_exact(bb)) {
                let d = f16_at(b, 0);
                for (o, &q) in y.iter_mut().zip(&b[2..34]) {
                    *o = q as i8 as f32 * d;
                }
            }
        }
        GgmlType::Q4K => {
            for (y, b) in out.chunks_exact_mut(be).zip(data.chunks_exact(bb)) {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let scales = &b[4..16];
                let qs = &b[16..144];
                for (c, (y64, q32)) in y.chunks_exact_mut(64).zip(qs.chunks_exact(32)).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * c, scales);
                    let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
                    let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                    for l in 0..32 {
                        y64[l] = d1 * (q32[l] & 0xF) as f32 - m1;
                        y64[l + 32] = d2 * (q32[l] >> 4) as f32 - m2;
                    }
                }
            }
        }
        GgmlType::Q6K => {
            for (y, b) in out.chunks_exact_mut(be).zip(data.chunks_exact(bb)) {
                let ql = &b[0..128];
                let qh = &b[128..192];
                let sc = &b[192..208];
                let d = f16_at(b, 208);
                for half_ in 0..2 {
                    let y = &mut y[half_ * 128..half_ * 128 + 128];
                    let ql = &ql[half_ * 64..half_ * 64 + 64];
                    let qh = &qh[half_ * 32..half_ * 32 + 32];
                    let sc = &sc[half_ * 8..half_ * 8 + 8];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * (sc[is] as i8 as f32) * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8 as f32) * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8 as f32) * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8 as f32) * q4 as f32;
                    }
                }
            }
        }
        other => return Err(QuantError::Unsupported(other)),
    }
    Ok(())
}
