//! Plain f32 CPU references of every CUDA kernel, written for clarity, not speed: the GPU check
//! compares the kernels against these on random inputs, and the tests here pin down the layouts
//! (block formats, paged cache, RoPE pairing) the kernels must share with them.

use crate::config::ModelConfig;
use crate::quant::GgmlType;
use crate::weights::{TensorView, WeightSource};
use half::{bf16, f16};

use super::layout::PagedKvLayout;
use super::Dtype;

/// `x` rounded to `dtype` and back, as a kernel storing it would.
pub fn round(dtype: Dtype, x: f32) -> f32 {
    match dtype {
        Dtype::Bf16 => bf16::from_f32(x).to_f32(),
        Dtype::F16 => f16::from_f32(x).to_f32(),
    }
}

/// The 16-bit pattern of `x` in `dtype`.
pub fn to_bits(dtype: Dtype, x: f32) -> u16 {
    match dtype {
        Dtype::Bf16 => bf16::from_f32(x).to_bits(),
        Dtype::F16 => f16::from_f32(x).to_bits(),
    }
}

/// The value of the 16-bit pattern `b` in `dtype`.
pub fn from_bits(dtype: Dtype, b: u16) -> f32 {
    match dtype {
        Dtype::Bf16 => bf16::from_bits(b).to_f32(),
        Dtype::F16 => f16::from_bits(b).to_f32(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DequantError {
    #[error("dequantizing {0} is not supported by the CUDA backend")]
    Unsupported(GgmlType),
    #[error("{ty}: {elems} elements need {need} bytes, got {got}")]
    Size {
        ty: GgmlType,
        elems: usize,
        need: u64,
        got: usize,
    },
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// The ggml types the CUDA dequantization kernels handle, with their kernel-name stems.
pub const DEQUANT_TYPES: &[(GgmlType, &str)] = &[
    (GgmlType::F32, "f32"),
    (GgmlType::F16, "f16"),
    (GgmlType::BF16, "bf16"),
    (GgmlType::Q4_0, "q4_0"),
    (GgmlType::Q4_1, "q4_1"),
    (GgmlType::Q8_0, "q8_0"),
    (GgmlType::Q4K, "q4_k"),
    (GgmlType::Q6K, "q6_k"),
];

/// Dequantizes `elems` elements of type `ty` from `raw` (ggml's block layouts).
pub fn dequant(ty: GgmlType, raw: &[u8], elems: usize) -> Result<Vec<f32>, DequantError> {
    let need = ty.bytes_for(elems as u64).unwrap_or(u64::MAX);
    if need != raw.len() as u64 {
        return Err(DequantError::Size {
            ty,
            elems,
            need,
            got: raw.len(),
        });
    }
    let mut out = Vec::with_capacity(elems);
    let bb = ty.block_bytes();
    match ty {
        GgmlType::F32 => out.extend(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlType::F16 => out.extend(raw.chunks_exact(2).map(|c| f16_at(c, 0))),
        GgmlType::BF16 => out.extend(
            raw.chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()),
        ),
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let q0 = if ty == GgmlType::Q4_0 { 2 } else { 4 };
            for b in raw.chunks_exact(bb) {
                let d = f16_at(b, 0);
                let (m, off) = if ty == GgmlType::Q4_0 {
                    (0.0, 8.0)
                } else {
                    (f16_at(b, 2), 0.0)
                };
                let qs = &b[q0..q0 + 16];
                out.extend(qs.iter().map(|q| ((q & 0xF) as f32 - off) * d + m));
                out.extend(qs.iter().map(|q| ((q >> 4) as f32 - off) * d + m));
            }
        }
        GgmlType::Q8_0 => {
            for b in raw.chunks_exact(bb) {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
            }
        }
        GgmlType::Q4K => {
            for b in raw.chunks_exact(bb) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let scale_min = |j: usize| -> (f32, f32) {
                    if j < 4 {
                        ((scales[j] & 63) as f32, (scales[j + 4] & 63) as f32)
                    } else {
                        (
                            ((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4)) as f32,
                            ((scales[j + 4] >> 4) | ((scales[j] >> 6) << 4)) as f32,
                        )
                    }
                };
                for chunk in 0..4 {
                    let q = &b[16 + chunk * 32..16 + chunk * 32 + 32];
                    let (s1, m1) = scale_min(2 * chunk);
                    let (s2, m2) = scale_min(2 * chunk + 1);
                    out.extend(q.iter().map(|&x| d * s1 * (x & 0xF) as f32 - dmin * m1));
                    out.extend(q.iter().map(|&x| d * s2 * (x >> 4) as f32 - dmin * m2));
                }
            }
        }
        GgmlType::Q6K => {
            for b in raw.chunks_exact(bb) {
                let d = f16_at(b, 208);
                let mut y = [0f32; 256];
                for half in 0..2 {
                    let ql = &b[half * 64..half * 64 + 64];
                    let qh = &b[128 + half * 32..128 + half * 32 + 32];
                    let sc = &b[192 + half * 8..192 + half * 8 + 8];
                    for l in 0..32 {
                        let is = l / 16;
                        let q = [
                            (ql[l] & 0xF) | ((qh[l] & 3) << 4),
                            (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
                            (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                            (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
                        ];
                        for (k, &qk) in q.iter().enumerate() {
                            let s = sc[is + 2 * k] as i8 as f32;
                            y[half * 128 + k * 32 + l] = d * s * (qk as i32 - 32) as f32;
                        }
                    }
                }
                out.extend_from_slice(&y);
            }
        }
        other => return Err(DequantError::Unsupported(other)),
    }
    Ok(out)
}

/// RMSNorm of each `hidden`-wide row of `x`.
pub fn rms_norm(x: &[f32], weight: &[f32], hidden: usize, eps: f32) -> Vec<f32> {
    x.chunks_exact(hidden)
        .flat_map(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / hidden as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            row.iter().zip(weight).map(move |(v, w)| v * inv * w)
        })
        .collect()
}

/// The RoPE table the kernel reads: per position, `head_dim / 2` cosines then as many sines of
/// `pos × theta^(−2i / head_dim)`, computed in f64.
pub fn rope_cos_sin(max_pos: usize, head_dim: usize, theta: f32) -> Vec<f32> {
    let half = head_dim / 2;
    let mut t = Vec::with_capacity(max_pos * head_dim);
    for pos in 0..max_pos {
        let angles: Vec<f64> = (0..half)
            .map(|i| pos as f64 * (theta as f64).powf(-2.0 * i as f64 / head_dim as f64))
            .collect();
        t.extend(angles.iter().map(|a| a.cos() as f32));
        t.extend(angles.iter().map(|a| a.sin() as f32));
    }
    t
}

/// RoPE in place on `x` = `[tokens][heads][head_dim]`; `neox` pairs (i, i + d/2), else (2i, 2i+1).
pub fn rope(x: &mut [f32], positions: &[usize], head_dim: usize, cos_sin: &[f32], neox: bool) {
    let half = head_dim / 2;
    let per_token = x.len() / positions.len().max(1);
    for (t, &pos) in positions.iter().enumerate() {
        let cs = &cos_sin[pos * head_dim..(pos + 1) * head_dim];
        for head in x[t * per_token..(t + 1) * per_token].chunks_exact_mut(head_dim) {
            for p in 0..half {
                let (a, b) = if neox {
                    (p, p + half)
                } else {
                    (2 * p, 2 * p + 1)
                };
                let (c, s) = (cs[p], cs[half + p]);
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * c - x1 * s;
                head[b] = x0 * s + x1 * c;
            }
        }
    }
}

/// silu(gate) × up.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
        .collect()
}

/// A paged cache in f32 with its layout and block tables, as the attention references read it.
pub struct PagedKv<'a> {
    pub layout: PagedKvLayout,
    pub k: &'a [f32],
    pub v: &'a [f32],
    /// `[num_seqs][max_blocks_per_seq]` block ids.
    pub block_tables: &'a [i32],
    pub max_blocks_per_seq: usize,
}

impl PagedKv<'_> {
    fn row(&self, cache: &[f32], seq: usize, head: usize, pos: usize) -> std::ops::Range<usize> {
        let l = &self.layout;
        let block = self.block_tables[seq * self.max_blocks_per_seq + pos / l.block_size] as usize;
        let o = l.offset(block, head, pos % l.block_size);
        debug_assert!(o + l.head_dim <= cache.len());
        o..o + l.head_dim
    }
}

/// Softmax-weighted sum over cached positions `0..n` of `seq` for one query head vector.
fn attend(
    kv: &PagedKv<'_>,
    q: &[f32],
    seq: usize,
    kv_head: usize,
    n: usize,
    scale: f32,
) -> Vec<f32> {
    let d = kv.layout.head_dim;
    let scores: Vec<f32> = (0..n)
        .map(|pos| {
            let k = &kv.k[kv.row(kv.k, seq, kv_head, pos)];
            q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale
        })
        .collect();
    let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let p: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
    let total: f32 = p.iter().sum();
    let mut out = vec![0f32; d];
    for (pos, &w) in p.iter().enumerate() {
        let v = &kv.v[kv.row(kv.v, seq, kv_head, pos)];
        for (o, x) in out.iter_mut().zip(v) {
            *o += w * x;
        }
    }
    if total > 0.0 {
        out.iter_mut().for_each(|o| *o /= total);
    }
    out
}

/// Decode attention: `q` = `[seqs][num_heads][head_dim]`, each sequence attends to its
/// `context_lens[s]` cached tokens; query head h reads KV head h / (num_heads / num_kv_heads).
pub fn decode_attention(
    kv: &PagedKv<'_>,
    q: &[f32],
    num_heads: usize,
    context_lens: &[i32],
    scale: f32,
) -> Vec<f32> {
    let d = kv.layout.head_dim;
    let gqa = num_heads / kv.layout.num_kv_heads;
    let mut out = Vec::with_capacity(q.len());
    for (seq, &ctx) in context_lens.iter().enumerate() {
        for h in 0..num_heads {
            let qh = &q[(seq * num_heads + h) * d..(seq * num_heads + h + 1) * d];
            out.extend(attend(kv, qh, seq, h / gqa, ctx.max(0) as usize, scale));
        }
    }
    out
}

/// Causal prefill attention over the paged cache: sequence s's queries are rows
/// `cu_q_lens[s]..cu_q_lens[s+1]` of `q` = `[tokens][num_heads][head_dim]`, its query i at
/// position `context_lens[s] − q_len + i`, attending to positions up to its own.
pub fn prefill_attention(
    kv: &PagedKv<'_>,
    q: &[f32],
    num_heads: usize,
    cu_q_lens: &[i32],
    context_lens: &[i32],
    scale: f32,
) -> Vec<f32> {
    let d = kv.layout.head_dim;
    let gqa = num_heads / kv.layout.num_kv_heads;
    let mut out = vec![0f32; q.len()];
    for (seq, &ctx) in context_lens.iter().enumerate() {
        let (q0, q1) = (cu_q_lens[seq] as usize, cu_q_lens[seq + 1] as usize);
        for tok in q0..q1 {
            let pos = ctx as usize - (q1 - q0) + (tok - q0);
            for h in 0..num_heads {
                let r = (tok * num_heads + h) * d..(tok * num_heads + h + 1) * d;
                let o = attend(kv, &q[r.clone()], seq, h / gqa, pos + 1, scale);
                out[r].copy_from_slice(&o);
            }
        }
    }
    out
}

/// Index of the largest value, ties to the lowest index; NaN never wins.
pub fn argmax(row: &[f32]) -> usize {
    topk(row, 1).first().map_or(0, |&(_, i)| i)
}

/// The `k` largest (value, index) pairs, best first, ties to the lower index; NaNs skipped.
pub fn topk(row: &[f32], k: usize) -> Vec<(f32, usize)> {
    let mut v: Vec<(f32, usize)> = row
        .iter()
        .copied()
        .zip(0..)
        .filter(|(x, _)| !x.is_nan())
        .collect();
    v.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    v.truncate(k);
    v
}

/// Weights made up from a seed, in memory, for a model of any shape: what the GPU check and the
/// tests run the forward pass on when no model file is at hand. Matrices are stored as `matrix`
/// (F32, F16, BF16, Q8_0 or Q4_0), norms as F32, like a GGUF file.
pub struct SyntheticWeights {
    tensors: std::collections::BTreeMap<String, (GgmlType, Vec<usize>, Vec<u8>)>,
}

impl SyntheticWeights {
    pub fn new(cfg: &ModelConfig, seed: u64, matrix: GgmlType) -> Self {
        let mut state = seed;
        let mut next = move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let mut tensors = std::collections::BTreeMap::new();
        let (hid, d, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let (qd, kvd) = (cfg.num_heads * d, cfg.num_kv_heads * d);
        let mut add = |name: String, ty: GgmlType, shape: Vec<usize>, scale: f32, offset: f32| {
            let n: usize = shape.iter().product();
            let vals: Vec<f32> = (0..n).map(|_| offset + scale * next()).collect();
            tensors.insert(name, (ty, shape, encode(ty, &vals)));
        };
        let ws = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
        add(
            "token_embd.weight".into(),
            matrix,
            vec![hid, cfg.vocab_size],
            1.0,
            0.0,
        );
        for i in 0..cfg.num_layers {
            let n = |s: &str| format!("blk.{i}.{s}");
            add(n("attn_norm.weight"), GgmlType::F32, vec![hid], 0.2, 1.0);
            add(n("attn_q.weight"), matrix, vec![hid, qd], ws(hid), 0.0);
            add(n("attn_k.weight"), matrix, vec![hid, kvd], ws(hid), 0.0);
            add(n("attn_v.weight"), matrix, vec![hid, kvd], ws(hid), 0.0);
            if cfg.arch == crate::config::Arch::Qwen2 {
                add(n("attn_q.bias"), GgmlType::F32, vec![qd], 0.1, 0.0);
                add(n("attn_k.bias"), GgmlType::F32, vec![kvd], 0.1, 0.0);
                add(n("attn_v.bias"), GgmlType::F32, vec![kvd], 0.1, 0.0);
            }
            add(n("attn_output.weight"), matrix, vec![qd, hid], ws(qd), 0.0);
            add(n("ffn_norm.weight"), GgmlType::F32, vec![hid], 0.2, 1.0);
            add(n("ffn_gate.weight"), matrix, vec![hid, inter], ws(hid), 0.0);
            add(n("ffn_up.weight"), matrix, vec![hid, inter], ws(hid), 0.0);
            add(
                n("ffn_down.weight"),
                matrix,
                vec![inter, hid],
                ws(inter),
                0.0,
            );
        }
        add(
            "output_norm.weight".into(),
            GgmlType::F32,
            vec![hid],
            0.2,
            1.0,
        );
        if !cfg.tie_word_embeddings {
            add(
                "output.weight".into(),
                matrix,
                vec![hid, cfg.vocab_size],
                ws(hid),
                0.0,
            );
        }
        SyntheticWeights { tensors }
    }

    /// Total bytes of the stored tensors.
    pub fn bytes(&self) -> usize {
        self.tensors.values().map(|t| t.2.len()).sum()
    }
}

/// `vals` in type `ty` (F32, F16, BF16, Q8_0 or Q4_0; anything else is stored as F32).
fn encode(ty: GgmlType, vals: &[f32]) -> Vec<u8> {
    match ty {
        GgmlType::F16 => vals
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
        GgmlType::BF16 => vals
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
        GgmlType::Q8_0 | GgmlType::Q4_0 if vals.len().is_multiple_of(32) => {
            let mut out = Vec::new();
            for b in vals.chunks_exact(32) {
                let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                if ty == GgmlType::Q8_0 {
                    let d = amax / 127.0;
                    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                    out.extend(f16::from_f32(d).to_bits().to_le_bytes());
                    out.extend(
                        b.iter()
                            .map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8),
                    );
                } else {
                    let d = amax / 7.0;
                    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                    out.extend(f16::from_f32(d).to_bits().to_le_bytes());
                    let q = |v: f32| ((v * inv).round() + 8.0).clamp(0.0, 15.0) as u8;
                    out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
                }
            }
            out
        }
        _ => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

impl WeightSource for SyntheticWeights {
    fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        let (dtype, shape, data) = self.tensors.get(name)?;
        let dtype = match dtype {
            GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0 | GgmlType::Q4_0 => *dtype,
            _ => GgmlType::F32,
        };
        Some(TensorView { dtype, shape, data })
    }
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("weight {0} missing")]
    Missing(String),
    #[error(transparent)]
    Dequant(#[from] DequantError),
}

/// The logits after the last of `tokens`, by a plain f32 Llama forward pass over the whole
/// sequence (no cache). With `round` set, weights and every stored activation are rounded to that
/// type where the CUDA kernels store them, so the two can be compared closely.
pub fn forward_logits(
    cfg: &ModelConfig,
    w: &dyn WeightSource,
    tokens: &[u32],
    round_to: Option<Dtype>,
) -> Result<Vec<f32>, ForwardError> {
    let rd = |v: &mut Vec<f32>| {
        if let Some(dt) = round_to {
            v.iter_mut().for_each(|x| *x = round(dt, *x));
        }
    };
    let get = |name: &str| -> Result<Vec<f32>, ForwardError> {
        let t = w
            .tensor(name)
            .ok_or_else(|| ForwardError::Missing(name.to_string()))?;
        let mut v = dequant(t.dtype, t.data, t.elems())?;
        rd(&mut v);
        Ok(v)
    };
    // y[rows][n_out] = x[rows][n_in] · wᵀ
    let mm = |x: &[f32], w: &[f32], n_in: usize| -> Vec<f32> {
        x.chunks_exact(n_in)
            .flat_map(|row| {
                w.chunks_exact(n_in)
                    .map(move |wr| row.iter().zip(wr).map(|(a, b)| a * b).sum::<f32>())
            })
            .collect()
    };
    let (hid, d, n) = (cfg.hidden_size, cfg.head_dim, tokens.len());
    let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
    let (qd, kvd) = (nh * d, nkv * d);
    let embed = get("token_embd.weight")?;
    let mut h: Vec<f32> = tokens
        .iter()
        .flat_map(|&t| embed[t as usize * hid..(t as usize + 1) * hid].to_vec())
        .collect();
    let cs = rope_cos_sin(n, d, cfg.rope_theta);
    let positions: Vec<usize> = (0..n).collect();
    let neox = cfg.rope_style == crate::config::RopeStyle::Neox;
    for i in 0..cfg.num_layers {
        let p = |s: &str| format!("blk.{i}.{s}");
        let mut x = rms_norm(&h, &get(&p("attn_norm.weight"))?, hid, cfg.rms_norm_eps);
        rd(&mut x);
        let mut q = mm(&x, &get(&p("attn_q.weight"))?, hid);
        let mut k = mm(&x, &get(&p("attn_k.weight"))?, hid);
        let mut v = mm(&x, &get(&p("attn_v.weight"))?, hid);
        rd(&mut q);
        rd(&mut k);
        rd(&mut v);
        if cfg.arch == crate::config::Arch::Qwen2 {
            for (t, w) in [
                (&mut q, "attn_q.bias"),
                (&mut k, "attn_k.bias"),
                (&mut v, "attn_v.bias"),
            ] {
                let b = get(&p(w))?;
                t.iter_mut()
                    .zip(b.iter().cycle())
                    .for_each(|(x, b)| *x += b);
                rd(t);
            }
        }
        rope(&mut q, &positions, d, &cs, neox);
        rope(&mut k, &positions, d, &cs, neox);
        rd(&mut q);
        rd(&mut k);
        let mut attn = vec![0f32; n * qd];
        let scale = 1.0 / (d as f32).sqrt();
        for t in 0..n {
            for head in 0..nh {
                let kh = head / (nh / nkv);
                let qv = &q[t * qd + head * d..t * qd + (head + 1) * d];
                let s: Vec<f32> = (0..=t)
                    .map(|u| {
                        qv.iter()
                            .zip(&k[u * kvd + kh * d..u * kvd + (kh + 1) * d])
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                            * scale
                    })
                    .collect();
                let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for (u, wgt) in e.iter().enumerate() {
                    for j in 0..d {
                        attn[t * qd + head * d + j] += wgt / z * v[u * kvd + kh * d + j];
                    }
                }
            }
        }
        rd(&mut attn);
        let mut o = mm(&attn, &get(&p("attn_output.weight"))?, qd);
        rd(&mut o);
        h.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        rd(&mut h);
        let mut x = rms_norm(&h, &get(&p("ffn_norm.weight"))?, hid, cfg.rms_norm_eps);
        rd(&mut x);
        let mut g = mm(&x, &get(&p("ffn_gate.weight"))?, hid);
        let mut u = mm(&x, &get(&p("ffn_up.weight"))?, hid);
        rd(&mut g);
        rd(&mut u);
        let mut a = swiglu(&g, &u);
        rd(&mut a);
        let mut dn = mm(&a, &get(&p("ffn_down.weight"))?, cfg.intermediate_size);
        rd(&mut dn);
        h.iter_mut().zip(&dn).for_each(|(a, b)| *a += b);
        rd(&mut h);
    }
    let last = &h[(n - 1) * hid..n * hid];
    let mut x = rms_norm(last, &get("output_norm.weight")?, hid, cfg.rms_norm_eps);
    rd(&mut x);
    let head = if cfg.tie_word_embeddings || w.tensor("output.weight").is_none() {
        embed
    } else {
        get("output.weight")?
    };
    Ok(mm(&x, &head, hid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_0_and_q4_1_put_low_nibbles_first() {
        let mut b = vec![0u8; 18];
        b[..2].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        b[2] = 0x9F; // element 0: 15 - 8 = 7, element 16: 9 - 8 = 1
        let x = dequant(GgmlType::Q4_0, &b, 32).unwrap();
        assert_eq!((x[0], x[16], x[1]), (3.5, 0.5, -4.0));
        let mut b = vec![0u8; 20];
        b[..2].copy_from_slice(&f16::from_f32(2.0).to_bits().to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(-1.0).to_bits().to_le_bytes());
        b[4] = 0x31;
        let x = dequant(GgmlType::Q4_1, &b, 32).unwrap();
        assert_eq!((x[0], x[16], x[5]), (1.0, 5.0, -1.0));
    }

    #[test]
    fn q8_0_is_signed_bytes_times_scale() {
        let mut b = vec![0u8; 34];
        b[..2].copy_from_slice(&f16::from_f32(0.25).to_bits().to_le_bytes());
        b[2] = 0xFF;
        b[33] = 8;
        let x = dequant(GgmlType::Q8_0, &b, 32).unwrap();
        assert_eq!((x[0], x[31]), (-0.25, 2.0));
    }

    #[test]
    fn q4_k_uses_six_bit_scales_and_mins() {
        let mut b = vec![0u8; 144];
        b[..2].copy_from_slice(&f16::from_f32(1.0).to_bits().to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        b[4] = 3; // sub-block 0 scale 3
        b[8] = 4; // sub-block 0 min 4
                  // sub-block 4 (j ≥ 4): scale = (s[8] & 0xF) | (s[0] >> 6) << 4, min = (s[8] >> 4) | (s[4] >> 6) << 4
        b[4 + 8] = 0x21; // scale low 1, min low 2
        b[4] |= 0x40; // scale high bits 1 → 17
        b[16] = 0x5A; // chunk 0: element 0 = 0xA, element 32 = 0x5
        b[16 + 64] = 0x07; // chunk 2, element 128 = 7 (sub-block 4)
        let x = dequant(GgmlType::Q4K, &b, 256).unwrap();
        assert_eq!(x[0], 3.0 * 10.0 - 0.5 * 4.0);
        assert_eq!(x[128], 17.0 * 7.0 - 0.5 * 2.0);
    }

    #[test]
    fn q6_k_combines_low_and_high_bits() {
        let mut b = vec![0u8; 210];
        b[208..210].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        b[192] = 2; // scale for elements 0..16
        b[192 + 6] = (-1i8) as u8; // scale for quarter 3, l < 16 → elements 96..112
        b[0] = 0x3F; // element 0 low 0xF, element 64 low 0x3
        b[128] = 0b1100_0011; // element 0 high 3; element 96 high 3
        let x = dequant(GgmlType::Q6K, &b, 256).unwrap();
        assert_eq!(x[0], 0.5 * 2.0 * ((0xF | 3 << 4) - 32) as f32);
        assert_eq!(x[96], -0.5 * ((3 << 4) - 32) as f32);
        assert!(dequant(GgmlType::Q6K, &b[..209], 256).is_err());
        assert!(dequant(GgmlType::Q5K, &[0u8; 176], 256).is_err());
    }

    #[test]
    fn rope_rotates_the_chosen_pairs_and_keeps_norms() {
        let d = 8;
        let cs = rope_cos_sin(4, d, 10_000.0);
        assert_eq!(&cs[..d], &[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        let x0: Vec<f32> = (0..d).map(|i| i as f32 + 1.0).collect();
        for neox in [false, true] {
            let mut x = x0.clone();
            rope(&mut x, &[3], d, &cs, neox);
            let n0: f32 = x0.iter().map(|v| v * v).sum();
            let n1: f32 = x.iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-3);
            let (a, b) = if neox { (0, 4) } else { (0, 1) };
            let (c, s) = (3f32.cos(), 3f32.sin());
            assert!((x[a] - (x0[a] * c - x0[b] * s)).abs() < 1e-5);
            assert!((x[b] - (x0[a] * s + x0[b] * c)).abs() < 1e-5);
        }
    }

    fn cache(l: &PagedKvLayout, blocks: usize, seed: u32) -> Vec<f32> {
        (0..l.layer_elems(blocks).unwrap())
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn decode_equals_the_last_row_of_a_full_prefill() {
        let l = PagedKvLayout {
            num_layers: 1,
            num_kv_heads: 2,
            head_dim: 8,
            block_size: 4,
            elem_bytes: 2,
        };
        let (k, v) = (cache(&l, 6, 1), cache(&l, 6, 2));
        let tables = [5, 0, 3, 1, 2, 4];
        let kv = PagedKv {
            layout: l,
            k: &k,
            v: &v,
            block_tables: &tables,
            max_blocks_per_seq: 3,
        };
        let heads = 4;
        let ctx = [11, 9];
        let q: Vec<f32> = (0..(11 + 9) * heads * 8)
            .map(|i| ((i * 7) % 13) as f32 / 13.0 - 0.5)
            .collect();
        let pre = prefill_attention(&kv, &q, heads, &[0, 11, 20], &ctx, 0.35);
        let last: Vec<f32> = [10usize, 19]
            .iter()
            .flat_map(|&t| q[t * heads * 8..(t + 1) * heads * 8].to_vec())
            .collect();
        let dec = decode_attention(&kv, &last, heads, &ctx, 0.35);
        for (s, &t) in [10usize, 19].iter().enumerate() {
            let a = &pre[t * heads * 8..(t + 1) * heads * 8];
            let b = &dec[s * heads * 8..(s + 1) * heads * 8];
            assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6));
        }
        // The first query of a full prefill sees only itself: its output is V at position 0.
        let v0 = &v[l.offset(5, 0, 0)..l.offset(5, 0, 0) + 8];
        assert!(pre[..8].iter().zip(v0).all(|(x, y)| (x - y).abs() < 1e-6));
    }

    #[test]
    fn topk_orders_by_value_then_index_and_skips_nan() {
        let row = [1.0, 3.0, f32::NAN, 3.0, -1.0];
        assert_eq!(topk(&row, 3), vec![(3.0, 1), (3.0, 3), (1.0, 0)]);
        assert_eq!(argmax(&row), 1);
        assert_eq!(topk(&row, 10).len(), 4);
    }

    #[test]
    fn norms_and_swiglu() {
        let y = rms_norm(&[3.0, 4.0], &[1.0, 2.0], 2, 0.0);
        let s = (12.5f32).sqrt();
        assert_eq!(y, vec![3.0 / s, 8.0 / s]);
        assert_eq!(swiglu(&[0.0], &[5.0]), vec![0.0]);
        assert_eq!(round(Dtype::Bf16, 1.0 + 1.0 / 512.0), 1.0);
        assert_eq!(from_bits(Dtype::F16, to_bits(Dtype::F16, 0.5)), 0.5);
    }

    pub(crate) fn tiny(arch: crate::config::Arch) -> ModelConfig {
        ModelConfig {
            arch,
            vocab_size: 96,
            hidden_size: 64,
            intermediate_size: 96,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            rope_theta: 10_000.0,
            rope_style: if arch == crate::config::Arch::Qwen2 {
                crate::config::RopeStyle::Neox
            } else {
                crate::config::RopeStyle::Interleaved
            },
            rms_norm_eps: 1e-5,
            max_position_embeddings: 64,
            tie_word_embeddings: arch == crate::config::Arch::Qwen2,
        }
    }

    #[test]
    fn synthetic_weights_cover_every_tensor_the_forward_pass_reads() {
        for arch in [crate::config::Arch::Llama, crate::config::Arch::Qwen2] {
            let cfg = tiny(arch);
            for ty in [
                GgmlType::F32,
                GgmlType::Q8_0,
                GgmlType::Q4_0,
                GgmlType::BF16,
            ] {
                let w = SyntheticWeights::new(&cfg, 1, ty);
                let logits = forward_logits(&cfg, &w, &[1, 5, 9], None).unwrap();
                assert_eq!(logits.len(), cfg.vocab_size);
                assert!(logits.iter().all(|x| x.is_finite()));
                let t = w.tensor("blk.1.ffn_down.weight").unwrap();
                assert_eq!(t.shape, &[96, 64]);
                assert_eq!(t.dtype, ty);
            }
        }
    }

    #[test]
    fn quantized_synthetic_weights_decode_close_to_their_values() {
        let vals: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        for (ty, tol) in [
            (GgmlType::Q8_0, 0.005),
            (GgmlType::Q4_0, 0.08),
            (GgmlType::F16, 1e-3),
        ] {
            let back = dequant(ty, &encode(ty, &vals), 64).unwrap();
            assert!(
                vals.iter().zip(&back).all(|(a, b)| (a - b).abs() <= tol),
                "{ty}"
            );
        }
    }

    #[test]
    fn forward_is_deterministic_depends_on_every_token_and_rounding_stays_close() {
        let cfg = tiny(crate::config::Arch::Llama);
        let w = SyntheticWeights::new(&cfg, 3, GgmlType::F32);
        let a = forward_logits(&cfg, &w, &[4, 8, 15, 16], None).unwrap();
        let b = forward_logits(&cfg, &w, &[4, 8, 15, 16], None).unwrap();
        assert_eq!(a, b);
        let c = forward_logits(&cfg, &w, &[4, 8, 15], None).unwrap();
        assert_ne!(a, c);
        let r = forward_logits(&cfg, &w, &[4, 8, 15, 16], Some(Dtype::Bf16)).unwrap();
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(a.iter().zip(&r).all(|(x, y)| (x - y).abs() <= 0.05 * scale));
    }
}
