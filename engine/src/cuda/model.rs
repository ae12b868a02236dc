//! A Llama-family forward pass on the GPU: weights dequantized to bf16/f16 at load, cuBLAS for
//! the projections, kvroute's kernels for everything else, K/V in the paged cache.
//!
//! Reads weights through [`WeightSource`] (GGUF canonical names) and shapes from [`ModelConfig`],
//! the same contracts the CPU backend uses. A step takes any mix of prefill chunks and decode
//! tokens; every id, position and block it is given is checked on the host before a launch.

use cudarc::driver::CudaSlice;

use super::ops::{AttnBatch, DecodeScratch};
use super::{CudaDevice, CudaError, Result};
use crate::config::{Arch as ModelArch, ModelConfig, RopeStyle};
use crate::kernels::layout::PagedKvLayout;
use crate::kernels::{launch, reference, Dtype};
use crate::weights::WeightSource;

struct Layer {
    attn_norm: CudaSlice<u16>,
    wq: CudaSlice<u16>,
    wk: CudaSlice<u16>,
    wv: CudaSlice<u16>,
    bias: Option<[CudaSlice<u16>; 3]>,
    wo: CudaSlice<u16>,
    ffn_norm: CudaSlice<u16>,
    w_gate: CudaSlice<u16>,
    w_up: CudaSlice<u16>,
    w_down: CudaSlice<u16>,
}

/// The model's weights on one GPU.
pub struct CudaModel {
    pub cfg: ModelConfig,
    pub dtype: Dtype,
    embed: CudaSlice<u16>,
    layers: Vec<Layer>,
    out_norm: CudaSlice<u16>,
    /// `None`: tied to the embedding.
    lm_head: Option<CudaSlice<u16>>,
    cos_sin: CudaSlice<f32>,
    max_pos: usize,
    /// Device bytes the weights take.
    pub weight_bytes: u64,
}

/// One layer's K and V caches per layer, in [`PagedKvLayout`].
pub struct CudaKvCache {
    pub layout: PagedKvLayout,
    pub num_blocks: usize,
    k: Vec<CudaSlice<u16>>,
    v: Vec<CudaSlice<u16>>,
}

impl CudaKvCache {
    pub fn new(dev: &CudaDevice, layout: PagedKvLayout, num_blocks: usize) -> Result<Self> {
        let elems = layout
            .layer_elems(num_blocks)
            .ok_or_else(|| CudaError::Invalid(format!("{num_blocks} KV blocks overflow")))?;
        let mut k = Vec::with_capacity(layout.num_layers);
        let mut v = Vec::with_capacity(layout.num_layers);
        for _ in 0..layout.num_layers {
            k.push(dev.stream.alloc_zeros::<u16>(elems.max(1))?);
            v.push(dev.stream.alloc_zeros::<u16>(elems.max(1))?);
        }
        Ok(CudaKvCache {
            layout,
            num_blocks,
            k,
            v,
        })
    }
}

/// One sequence's part of a step: its new tokens (a prefill chunk, or one decode token), its
/// cached length once they are written, and its block table.
#[derive(Debug, Clone, Copy)]
pub struct SeqStep<'a> {
    pub tokens: &'a [u32],
    pub context_len: usize,
    pub block_table: &'a [u32],
}

fn bad(msg: String) -> CudaError {
    CudaError::Invalid(msg)
}

impl CudaModel {
    /// Uploads and dequantizes every weight. The device's kernels must have been compiled for
    /// this model's head size and GQA group (`KernelConfig::new(head_dim, heads, kv_heads)`).
    pub fn load(
        dev: &CudaDevice,
        cfg: &ModelConfig,
        w: &dyn WeightSource,
        dtype: Dtype,
    ) -> Result<Self> {
        let kc = dev.kernels.cfg;
        if kc.head_dim != cfg.head_dim || kc.gqa * cfg.num_kv_heads != cfg.num_heads {
            return Err(bad(
                "the device's kernels were compiled for another attention shape".into(),
            ));
        }
        let mut bytes = 0u64;
        let mut get = |name: &str, elems: usize| -> Result<CudaSlice<u16>> {
            let t = w
                .tensor(name)
                .ok_or_else(|| bad(format!("weight {name} missing")))?;
            if t.elems() != elems {
                return Err(bad(format!(
                    "weight {name} has {} elements, expected {elems}",
                    t.elems()
                )));
            }
            let raw = dev.stream.clone_htod(t.data)?;
            let mut out = dev.stream.alloc_zeros::<u16>(elems)?;
            dev.dequant(dtype, t.dtype, &mut out, &raw, elems)?;
            bytes += 2 * elems as u64;
            Ok(out)
        };
        let (hid, d) = (cfg.hidden_size, cfg.head_dim);
        let (qd, kvd, inter) = (
            cfg.num_heads * d,
            cfg.num_kv_heads * d,
            cfg.intermediate_size,
        );
        let embed = get("token_embd.weight", cfg.vocab_size * hid)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let n = |s: &str| format!("blk.{i}.{s}");
            let bias = if cfg.arch == ModelArch::Qwen2 {
                Some([
                    get(&n("attn_q.bias"), qd)?,
                    get(&n("attn_k.bias"), kvd)?,
                    get(&n("attn_v.bias"), kvd)?,
                ])
            } else {
                None
            };
            layers.push(Layer {
                attn_norm: get(&n("attn_norm.weight"), hid)?,
                wq: get(&n("attn_q.weight"), qd * hid)?,
                wk: get(&n("attn_k.weight"), kvd * hid)?,
                wv: get(&n("attn_v.weight"), kvd * hid)?,
                bias,
                wo: get(&n("attn_output.weight"), hid * qd)?,
                ffn_norm: get(&n("ffn_norm.weight"), hid)?,
                w_gate: get(&n("ffn_gate.weight"), inter * hid)?,
                w_up: get(&n("ffn_up.weight"), inter * hid)?,
                w_down: get(&n("ffn_down.weight"), hid * inter)?,
            });
        }
        let out_norm = get("output_norm.weight", hid)?;
        let lm_head = if cfg.tie_word_embeddings || w.tensor("output.weight").is_none() {
            None
        } else {
            Some(get("output.weight", cfg.vocab_size * hid)?)
        };
        let max_pos = cfg.max_position_embeddings.clamp(1, 1 << 17);
        let cos_sin =
            dev.stream
                .clone_htod(&reference::rope_cos_sin(max_pos, d, cfg.rope_theta))?;
        dev.stream.synchronize()?;
        Ok(CudaModel {
            cfg: cfg.clone(),
            dtype,
            embed,
            layers,
            out_norm,
            lm_head,
            cos_sin,
            max_pos,
            weight_bytes: bytes,
        })
    }

    /// The paged layout this model's KV cache needs, with `block_size` tokens per block.
    pub fn kv_layout(&self, block_size: usize) -> PagedKvLayout {
        PagedKvLayout {
            num_layers: self.cfg.num_layers,
            num_kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            block_size,
            elem_bytes: 2,
        }
    }

    /// Measures the activation peak of a forward step over `tokens` new tokens of one sequence
    /// (the largest step the scheduler will build): the device memory a step allocates on top of
    /// what is already held, read from the allocator's high-water mark. Writes into `cache`
    /// blocks `block_table` (which must cover `tokens` positions); run it before serving.
    pub fn measure_activation_peak(
        &self,
        dev: &CudaDevice,
        cache: &mut CudaKvCache,
        tokens: usize,
        block_table: &[u32],
    ) -> Result<u64> {
        let ids = vec![0u32; tokens.max(1)];
        let seqs = [SeqStep {
            tokens: &ids,
            context_len: ids.len(),
            block_table,
        }];
        dev.reset_memory_high()?;
        let (before, _) = dev.memory_used()?;
        let logits = self.forward(dev, cache, &seqs)?;
        dev.stream.synchronize()?;
        drop(logits);
        let (_, high) = dev.memory_used()?;
        Ok(high.saturating_sub(before))
    }

    /// Runs one step: writes the new tokens' K/V into `cache` and returns the logits of each
    /// sequence's last new token, `[seqs.len()][vocab]` f32, on the device.
    pub fn forward(
        &self,
        dev: &CudaDevice,
        cache: &mut CudaKvCache,
        seqs: &[SeqStep<'_>],
    ) -> Result<CudaSlice<f32>> {
        let c = &self.cfg;
        let dt = self.dtype;
        let layout = cache.layout;
        let bs = layout.block_size;
        if seqs.is_empty() {
            return Ok(dev.stream.alloc_zeros::<f32>(1)?);
        }
        // Host-side metadata, every value checked.
        let max_blocks = seqs
            .iter()
            .map(|s| s.context_len.div_ceil(bs))
            .max()
            .unwrap_or(1)
            .max(1);
        let (mut ids, mut positions, mut slots) = (Vec::new(), Vec::new(), Vec::new());
        let (mut cu, mut ctx, mut tables) =
            (vec![0i32], Vec::new(), vec![0i32; seqs.len() * max_blocks]);
        for (si, s) in seqs.iter().enumerate() {
            let q_len = s.tokens.len();
            if q_len == 0 || q_len > s.context_len {
                return Err(bad(format!(
                    "sequence {si}: {q_len} new tokens, context {}",
                    s.context_len
                )));
            }
            if s.context_len > self.max_pos {
                return Err(bad(format!(
                    "sequence {si}: context {} beyond {} positions",
                    s.context_len, self.max_pos
                )));
            }
            let used = s.context_len.div_ceil(bs);
            if s.block_table.len() < used {
                return Err(bad(format!(
                    "sequence {si}: {used} blocks needed, table has {}",
                    s.block_table.len()
                )));
            }
            for (j, &b) in s.block_table[..used].iter().enumerate() {
                if b as usize >= cache.num_blocks {
                    return Err(bad(format!(
                        "sequence {si}: block {b} outside the pool of {}",
                        cache.num_blocks
                    )));
                }
                tables[si * max_blocks + j] = b as i32;
            }
            for (i, &t) in s.tokens.iter().enumerate() {
                if t as usize >= c.vocab_size {
                    return Err(bad(format!(
                        "sequence {si}: token {t} outside the vocabulary"
                    )));
                }
                let pos = s.context_len - q_len + i;
                ids.push(t as i32);
                positions.push(pos as i32);
                slots.push(
                    layout
                        .slot(s.block_table, pos)
                        .ok_or_else(|| bad("slot past the block table".into()))?,
                );
            }
            cu.push(i32::try_from(ids.len()).map_err(|_| bad("too many tokens".into()))?);
            ctx.push(i32::try_from(s.context_len).map_err(|_| bad("context too long".into()))?);
        }
        let n = ids.len();
        let s = &dev.stream;
        let (d_ids, d_pos, d_slots) = (
            s.clone_htod(&ids)?,
            s.clone_htod(&positions)?,
            s.clone_htod(&slots)?,
        );
        let (d_cu, d_ctx, d_tables) = (
            s.clone_htod(&cu)?,
            s.clone_htod(&ctx)?,
            s.clone_htod(&tables)?,
        );

        let (hid, d, inter) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (qd, kvd) = (c.num_heads * d, c.num_kv_heads * d);
        let mut h = s.alloc_zeros::<u16>(n * hid)?;
        let mut x = s.alloc_zeros::<u16>(n * hid)?;
        let mut q = s.alloc_zeros::<u16>(n * qd)?;
        let mut k = s.alloc_zeros::<u16>(n * kvd)?;
        let mut v = s.alloc_zeros::<u16>(n * kvd)?;
        let mut attn = s.alloc_zeros::<u16>(n * qd)?;
        let mut o = s.alloc_zeros::<u16>(n * hid)?;
        let mut gate = s.alloc_zeros::<u16>(n * inter)?;
        let mut up = s.alloc_zeros::<u16>(n * inter)?;
        let mut act = s.alloc_zeros::<u16>(n * inter)?;

        let decode_only = seqs.iter().all(|s| s.tokens.len() == 1);
        let max_ctx = seqs.iter().map(|s| s.context_len).max().unwrap_or(0);
        let max_q = seqs.iter().map(|s| s.tokens.len()).max().unwrap_or(0);
        let plan = launch::decode_plan(
            &dev.kernels.cfg,
            seqs.len(),
            c.num_kv_heads,
            max_ctx,
            dev.sm_count,
        )?;
        let mut scratch = if decode_only {
            Some(DecodeScratch::new(dev, &plan)?)
        } else {
            None
        };
        let batch = AttnBatch {
            layout,
            block_tables: &d_tables,
            max_blocks_per_seq: max_blocks,
            context_lens: &d_ctx,
            num_seqs: seqs.len(),
            num_heads: c.num_heads,
            q_stride: qd,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let neox = c.rope_style == RopeStyle::Neox;

        dev.embedding(&mut h, &self.embed, &d_ids, n, hid, c.vocab_size)?;
        for (li, l) in self.layers.iter().enumerate() {
            dev.rms_norm(dt, &mut x, &h, &l.attn_norm, n, hid, c.rms_norm_eps)?;
            dev.matmul(dt, &mut q, &x, &l.wq, n, hid, qd)?;
            dev.matmul(dt, &mut k, &x, &l.wk, n, hid, kvd)?;
            dev.matmul(dt, &mut v, &x, &l.wv, n, hid, kvd)?;
            if let Some([bq, bk, bv]) = &l.bias {
                dev.add_bias(dt, &mut q, bq, n, qd)?;
                dev.add_bias(dt, &mut k, bk, n, kvd)?;
                dev.add_bias(dt, &mut v, bv, n, kvd)?;
            }
            dev.rope(
                dt,
                &mut q,
                &mut k,
                &self.cos_sin,
                &d_pos,
                n,
                (c.num_heads, c.num_kv_heads),
                d,
                (qd, kvd),
                neox,
            )?;
            let (kc, vc) = (&mut cache.k[li], &mut cache.v[li]);
            dev.reshape_and_cache(&k, &v, kc, vc, &d_slots, n, kvd, &layout)?;
            match scratch.as_mut() {
                Some(sc) => dev.paged_decode(dt, &mut attn, sc, &q, kc, vc, &batch, &plan)?,
                None => {
                    dev.prefill_attention(dt, &mut attn, &q, kc, vc, &d_cu, n, max_q, &batch)?
                }
            }
            dev.matmul(dt, &mut o, &attn, &l.wo, n, qd, hid)?;
            dev.add_rms_norm(dt, &mut x, &mut h, &o, &l.ffn_norm, n, hid, c.rms_norm_eps)?;
            dev.matmul(dt, &mut gate, &x, &l.w_gate, n, hid, inter)?;
            dev.matmul(dt, &mut up, &x, &l.w_up, n, hid, inter)?;
            dev.swiglu(dt, &mut act, &gate, &up, n, inter, inter)?;
            dev.matmul(dt, &mut o, &act, &l.w_down, n, inter, hid)?;
            dev.add_inplace(dt, &mut h, &o, n * hid)?;
        }
        // The last new token of each sequence.
        let mut last = s.alloc_zeros::<u16>(seqs.len() * hid)?;
        for si in 0..seqs.len() {
            let row = cu[si + 1] as usize - 1;
            s.memcpy_dtod(
                &h.slice(row * hid..(row + 1) * hid),
                &mut last.slice_mut(si * hid..(si + 1) * hid),
            )?;
        }
        let mut normed = s.alloc_zeros::<u16>(seqs.len() * hid)?;
        dev.rms_norm(
            dt,
            &mut normed,
            &last,
            &self.out_norm,
            seqs.len(),
            hid,
            c.rms_norm_eps,
        )?;
        let mut logits = s.alloc_zeros::<f32>(seqs.len() * c.vocab_size)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        dev.matmul_f32(
            dt,
            &mut logits,
            &normed,
            head,
            seqs.len(),
            hid,
            c.vocab_size,
        )?;
        Ok(logits)
    }
}
