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

    /// Runs one step with throw-away buffers sized for it (checks and tools; the engine keeps
    /// a [`StepWorkspace`] and calls [`CudaModel::forward_into`]). Returns the logits of each
    /// sequence's last new token, `[seqs.len()][vocab]` f32, on the device.
    pub fn forward(
        &self,
        dev: &CudaDevice,
        cache: &mut CudaKvCache,
        seqs: &[SeqStep<'_>],
    ) -> Result<CudaSlice<f32>> {
        if seqs.is_empty() {
            return Ok(dev.stream.alloc_zeros::<f32>(1)?);
        }
        let tokens = seqs.iter().map(|s| s.tokens.len()).sum::<usize>();
        let max_ctx = seqs.iter().map(|s| s.context_len).max().unwrap_or(1);
        let mut ws = StepWorkspace::new(dev, self, tokens, seqs.len(), max_ctx, cache.layout)?;
        let all: Vec<usize> = (0..seqs.len()).collect();
        self.forward_into(dev, cache, &mut ws, seqs, &all)?;
        Ok(ws.logits)
    }

    /// Runs one step in `ws`'s buffers (nothing is allocated): writes the new tokens' K/V into
    /// `cache`, and the logits of the last new token of each sequence listed in `logit_seqs`
    /// (indices into `seqs`, in order) into `ws.logits()`, `[logit_seqs.len()][vocab]` f32.
    pub fn forward_into(
        &self,
        dev: &CudaDevice,
        cache: &mut CudaKvCache,
        ws: &mut StepWorkspace,
        seqs: &[SeqStep<'_>],
        logit_seqs: &[usize],
    ) -> Result<()> {
        let c = &self.cfg;
        let dt = self.dtype;
        let layout = cache.layout;
        let bs = layout.block_size;
        // Nothing from an earlier step may be read back if this one fails or is empty.
        ws.logit_rows = 0;
        if layout != ws.layout {
            return Err(bad("the workspace was sized for another KV layout".into()));
        }
        if bs == 0 {
            return Err(bad("KV block size is 0".into()));
        }
        if seqs.is_empty() {
            return Ok(());
        }
        if seqs.len() > ws.max_seqs {
            return Err(bad(format!(
                "{} sequences in one step; the step buffers hold {}",
                seqs.len(),
                ws.max_seqs
            )));
        }
        if logit_seqs.len() > ws.max_seqs {
            return Err(bad(format!("{} logit rows", logit_seqs.len())));
        }
        // Host-side metadata, every value checked, in the workspace's host vectors.
        let max_blocks = seqs
            .iter()
            .map(|s| s.context_len.div_ceil(bs))
            .max()
            .unwrap_or(1)
            .max(1);
        if max_blocks > ws.max_blocks_per_seq {
            return Err(bad(format!(
                "a context of {max_blocks} blocks; the step buffers hold {}",
                ws.max_blocks_per_seq
            )));
        }
        let h_ = &mut ws.host;
        h_.clear();
        h_.tables.resize(seqs.len() * max_blocks, 0);
        h_.cu.push(0);
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
                h_.tables[si * max_blocks + j] = b as i32;
            }
            if h_.ids.len() + q_len > ws.max_tokens {
                return Err(bad(format!(
                    "more than {} tokens in one step",
                    ws.max_tokens
                )));
            }
            for (i, &t) in s.tokens.iter().enumerate() {
                if t as usize >= c.vocab_size {
                    return Err(bad(format!(
                        "sequence {si}: token {t} outside the vocabulary"
                    )));
                }
                let pos = s.context_len - q_len + i;
                h_.ids.push(t as i32);
                h_.positions.push(pos as i32);
                h_.slots.push(
                    layout
                        .slot(s.block_table, pos)
                        .ok_or_else(|| bad("slot past the block table".into()))?,
                );
            }
            h_.cu
                .push(i32::try_from(h_.ids.len()).map_err(|_| bad("too many tokens".into()))?);
            h_.ctx
                .push(i32::try_from(s.context_len).map_err(|_| bad("context too long".into()))?);
        }
        for &si in logit_seqs {
            let end = *h_
                .cu
                .get(si + 1)
                .ok_or_else(|| bad(format!("logits asked of sequence {si} of {}", seqs.len())))?;
            h_.rows.push(end - 1);
        }
        let n = h_.ids.len();
        let rows = h_.rows.len();
        upload(dev, &h_.ids, &mut ws.ids)?;
        upload(dev, &h_.positions, &mut ws.positions)?;
        upload(dev, &h_.slots, &mut ws.slots)?;
        upload(dev, &h_.cu, &mut ws.cu)?;
        upload(dev, &h_.ctx, &mut ws.ctx)?;
        upload(dev, &h_.tables, &mut ws.tables)?;
        upload(dev, &h_.rows, &mut ws.rows)?;

        let (hid, d, inter) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (qd, kvd) = (c.num_heads * d, c.num_kv_heads * d);
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
        let w = &mut ws.bufs;
        let batch = AttnBatch {
            layout,
            block_tables: &ws.tables,
            max_blocks_per_seq: max_blocks,
            context_lens: &ws.ctx,
            num_seqs: seqs.len(),
            num_heads: c.num_heads,
            q_stride: qd,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let neox = c.rope_style == RopeStyle::Neox;

        dev.embedding(&mut w.h, &self.embed, &ws.ids, n, hid, c.vocab_size)?;
        for (li, l) in self.layers.iter().enumerate() {
            dev.rms_norm(dt, &mut w.x, &w.h, &l.attn_norm, n, hid, c.rms_norm_eps)?;
            dev.matmul(dt, &mut w.q, &w.x, &l.wq, n, hid, qd)?;
            dev.matmul(dt, &mut w.k, &w.x, &l.wk, n, hid, kvd)?;
            dev.matmul(dt, &mut w.v, &w.x, &l.wv, n, hid, kvd)?;
            if let Some([bq, bk, bv]) = &l.bias {
                dev.add_bias(dt, &mut w.q, bq, n, qd)?;
                dev.add_bias(dt, &mut w.k, bk, n, kvd)?;
                dev.add_bias(dt, &mut w.v, bv, n, kvd)?;
            }
            dev.rope(
                dt,
                &mut w.q,
                &mut w.k,
                &self.cos_sin,
                &ws.positions,
                n,
                (c.num_heads, c.num_kv_heads),
                d,
                (qd, kvd),
                neox,
            )?;
            let (kc, vc) = (&mut cache.k[li], &mut cache.v[li]);
            dev.reshape_and_cache(&w.k, &w.v, kc, vc, &ws.slots, n, kvd, &layout)?;
            if decode_only {
                dev.paged_decode(
                    dt,
                    &mut w.attn,
                    &mut ws.scratch,
                    &w.q,
                    kc,
                    vc,
                    &batch,
                    &plan,
                )?;
            } else {
                dev.prefill_attention(dt, &mut w.attn, &w.q, kc, vc, &ws.cu, n, max_q, &batch)?;
            }
            dev.matmul(dt, &mut w.o, &w.attn, &l.wo, n, qd, hid)?;
            dev.add_rms_norm(
                dt,
                &mut w.x,
                &mut w.h,
                &w.o,
                &l.ffn_norm,
                n,
                hid,
                c.rms_norm_eps,
            )?;
            dev.matmul(dt, &mut w.gate, &w.x, &l.w_gate, n, hid, inter)?;
            dev.matmul(dt, &mut w.up, &w.x, &l.w_up, n, hid, inter)?;
            dev.swiglu(dt, &mut w.act, &w.gate, &w.up, n, inter, inter)?;
            dev.matmul(dt, &mut w.o, &w.act, &l.w_down, n, inter, hid)?;
            dev.add_inplace(dt, &mut w.h, &w.o, n * hid)?;
        }
        if rows == 0 {
            return Ok(());
        }
        // The rows whose logits are wanted, gathered with the embedding kernel (a row gather
        // over the n token rows of h).
        dev.embedding(&mut w.last, &w.h, &ws.rows, rows, hid, n)?;
        dev.rms_norm(
            dt,
            &mut w.normed,
            &w.last,
            &self.out_norm,
            rows,
            hid,
            c.rms_norm_eps,
        )?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        dev.matmul_f32(dt, &mut ws.logits, &w.normed, head, rows, hid, c.vocab_size)?;
        ws.logit_rows = rows;
        Ok(())
    }

    /// The profiling run the KV sizing rests on: one step of `ws.max_tokens()` new tokens (one
    /// sequence's prefill, the scheduler's largest step) into a scratch cache that is freed
    /// afterwards, with the device-memory readings around it.
    pub fn profile_step(
        &self,
        dev: &CudaDevice,
        ws: &mut StepWorkspace,
    ) -> Result<crate::kernels::layout::ProfileReading> {
        let layout = ws.layout;
        let tokens = ws.max_tokens;
        let nblocks = tokens.div_ceil(layout.block_size.max(1)).max(1);
        let mut cache = CudaKvCache::new(dev, layout, nblocks)?;
        let table: Vec<u32> = (0..nblocks as u32).collect();
        let ids: Vec<u32> = (0..tokens)
            .map(|i| (i % self.cfg.vocab_size) as u32)
            .collect();
        let seqs = [SeqStep {
            tokens: &ids,
            context_len: tokens.min(self.max_pos),
            block_table: &table,
        }];
        let seqs = if tokens > self.max_pos {
            // A model shorter than the step: profile a step of its whole context instead.
            [SeqStep {
                tokens: &ids[..self.max_pos],
                ..seqs[0]
            }]
        } else {
            seqs
        };
        dev.stream.synchronize()?;
        dev.reset_memory_high()?;
        let (pool_used_before, _) = dev.memory_used()?;
        let pool_reserved_before = dev.memory_reserved()?;
        let (free_before, _) = dev.mem_info()?;
        self.forward_into(dev, &mut cache, ws, &seqs, &[0])?;
        dev.stream.synchronize()?;
        let (_, pool_high) = dev.memory_used()?;
        let pool_reserved_after = dev.memory_reserved()?;
        let (free_after, _) = dev.mem_info()?;
        drop(cache);
        dev.stream.synchronize()?;
        Ok(crate::kernels::layout::ProfileReading {
            workspace_bytes: ws.bytes,
            pool_used_before,
            pool_high,
            pool_reserved_before,
            pool_reserved_after,
            free_before: free_before as u64,
            free_after: free_after as u64,
        })
    }

    /// Greedy tokens of the rows [`CudaModel::forward_into`] just computed: argmax on the GPU,
    /// only the ids copied back.
    pub fn argmax_into(&self, dev: &CudaDevice, ws: &mut StepWorkspace) -> Result<()> {
        let rows = ws.logit_rows;
        ws.host.argmax.clear();
        if rows == 0 {
            return Ok(());
        }
        dev.argmax(&mut ws.argmax, &ws.logits, rows, self.cfg.vocab_size)?;
        ws.host.argmax.resize(rows, 0);
        let src = ws
            .argmax
            .try_slice(..rows)
            .ok_or_else(|| bad("argmax rows".into()))?;
        dev.stream.memcpy_dtoh(&src, &mut ws.host.argmax[..])?;
        dev.stream.synchronize()?;
        Ok(())
    }

    /// Copies the rows [`CudaModel::forward_into`] just computed to `out` (resized to
    /// `rows × vocab`).
    pub fn logits_to_host(
        &self,
        dev: &CudaDevice,
        ws: &StepWorkspace,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let len = ws.logit_rows * self.cfg.vocab_size;
        out.resize(len, 0.0);
        if len == 0 {
            return Ok(());
        }
        let src = ws
            .logits
            .try_slice(..len)
            .ok_or_else(|| bad("logit rows".into()))?;
        dev.stream.memcpy_dtoh(&src, &mut out[..])?;
        dev.stream.synchronize()?;
        Ok(())
    }
}

/// Copies `src` into the front of the device buffer `dst` (never past its end).
fn upload<T: cudarc::driver::DeviceRepr>(
    dev: &CudaDevice,
    src: &[T],
    dst: &mut CudaSlice<T>,
) -> Result<()> {
    if src.is_empty() {
        return Ok(());
    }
    let held = dst.len();
    let mut view = dst.try_slice_mut(..src.len()).ok_or_else(|| {
        bad(format!(
            "step metadata of {} elements; the buffer holds {held}",
            src.len()
        ))
    })?;
    dev.stream.memcpy_htod(src, &mut view)?;
    Ok(())
}

/// The 16-bit activations of a step, `max_tokens` rows each.
struct Activations {
    h: CudaSlice<u16>,
    x: CudaSlice<u16>,
    q: CudaSlice<u16>,
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
    attn: CudaSlice<u16>,
    o: CudaSlice<u16>,
    gate: CudaSlice<u16>,
    up: CudaSlice<u16>,
    act: CudaSlice<u16>,
    last: CudaSlice<u16>,
    normed: CudaSlice<u16>,
}

/// Host-side step metadata, reused between steps.
#[derive(Default)]
struct HostMeta {
    ids: Vec<i32>,
    positions: Vec<i32>,
    slots: Vec<i64>,
    cu: Vec<i32>,
    ctx: Vec<i32>,
    tables: Vec<i32>,
    rows: Vec<i32>,
    argmax: Vec<i32>,
}

impl HostMeta {
    fn clear(&mut self) {
        self.ids.clear();
        self.positions.clear();
        self.slots.clear();
        self.cu.clear();
        self.ctx.clear();
        self.tables.clear();
        self.rows.clear();
    }
}

/// Every device buffer a step uses, allocated once for the largest step (`max_tokens` new tokens
/// over at most `max_seqs` sequences, contexts up to `max_context`) and reused: a step allocates
/// nothing.
pub struct StepWorkspace {
    layout: PagedKvLayout,
    max_tokens: usize,
    max_seqs: usize,
    max_blocks_per_seq: usize,
    ids: CudaSlice<i32>,
    positions: CudaSlice<i32>,
    slots: CudaSlice<i64>,
    cu: CudaSlice<i32>,
    ctx: CudaSlice<i32>,
    tables: CudaSlice<i32>,
    rows: CudaSlice<i32>,
    bufs: Activations,
    scratch: DecodeScratch,
    logits: CudaSlice<f32>,
    argmax: CudaSlice<i32>,
    logit_rows: usize,
    host: HostMeta,
    bytes: u64,
}

impl StepWorkspace {
    /// Allocates the buffers of the largest step `model` will run on a cache of `layout`.
    pub fn new(
        dev: &CudaDevice,
        model: &CudaModel,
        max_tokens: usize,
        max_seqs: usize,
        max_context: usize,
        layout: PagedKvLayout,
    ) -> Result<Self> {
        let c = &model.cfg;
        let max_tokens = max_tokens.max(1);
        let max_seqs = max_seqs.clamp(1, max_tokens);
        let max_context = max_context.max(1);
        let max_blocks_per_seq = max_context.div_ceil(layout.block_size.max(1)).max(1);
        let (hid, d, inter) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (qd, kvd) = (c.num_heads * d, c.num_kv_heads * d);
        let mut bytes = 0u64;
        let mut count = |elems: usize, size: usize| -> Result<usize> {
            let b = elems
                .checked_mul(size)
                .ok_or_else(|| bad(format!("step buffers of {elems} elements overflow")))?;
            bytes += b as u64;
            Ok(elems.max(1))
        };
        let s = &dev.stream;
        let mut u16s = |rows: usize, width: usize| -> Result<CudaSlice<u16>> {
            let n = rows
                .checked_mul(width)
                .ok_or_else(|| bad("step buffer size overflows".into()))?;
            Ok(s.alloc_zeros::<u16>(count(n, 2)?)?)
        };
        let bufs = Activations {
            h: u16s(max_tokens, hid)?,
            x: u16s(max_tokens, hid)?,
            q: u16s(max_tokens, qd)?,
            k: u16s(max_tokens, kvd)?,
            v: u16s(max_tokens, kvd)?,
            attn: u16s(max_tokens, qd)?,
            o: u16s(max_tokens, hid)?,
            gate: u16s(max_tokens, inter)?,
            up: u16s(max_tokens, inter)?,
            act: u16s(max_tokens, inter)?,
            last: u16s(max_seqs, hid)?,
            normed: u16s(max_seqs, hid)?,
        };
        let (tmp_out, stats) = launch::decode_scratch_bound(
            &dev.kernels.cfg,
            max_seqs,
            c.num_kv_heads,
            max_context,
            dev.sm_count,
        );
        let scratch = DecodeScratch {
            tmp_out: s.alloc_zeros(count(tmp_out, 4)?)?,
            max_logits: s.alloc_zeros(count(stats, 4)?)?,
            exp_sums: s.alloc_zeros(count(stats, 4)?)?,
        };
        let table_elems = max_seqs
            .checked_mul(max_blocks_per_seq)
            .ok_or_else(|| bad("block tables overflow".into()))?;
        let ws = StepWorkspace {
            layout,
            max_tokens,
            max_seqs,
            max_blocks_per_seq,
            ids: s.alloc_zeros(count(max_tokens, 4)?)?,
            positions: s.alloc_zeros(count(max_tokens, 4)?)?,
            slots: s.alloc_zeros(count(max_tokens, 8)?)?,
            cu: s.alloc_zeros(count(max_seqs + 1, 4)?)?,
            ctx: s.alloc_zeros(count(max_seqs, 4)?)?,
            tables: s.alloc_zeros(count(table_elems, 4)?)?,
            rows: s.alloc_zeros(count(max_seqs, 4)?)?,
            bufs,
            scratch,
            logits: s.alloc_zeros(count(
                max_seqs
                    .checked_mul(c.vocab_size)
                    .ok_or_else(|| bad("logits overflow".into()))?,
                4,
            )?)?,
            argmax: s.alloc_zeros(count(max_seqs, 4)?)?,
            logit_rows: 0,
            host: HostMeta::default(),
            bytes,
        };
        s.synchronize()?;
        Ok(ws)
    }

    /// Device bytes these buffers take.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Most new tokens in one step.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Most sequences in one step.
    pub fn max_seqs(&self) -> usize {
        self.max_seqs
    }

    /// The greedy ids [`CudaModel::argmax_into`] copied back.
    pub fn argmax_ids(&self) -> &[i32] {
        &self.host.argmax
    }
}
