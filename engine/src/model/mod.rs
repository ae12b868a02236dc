//! The Llama-family forward pass on the CPU (llama; qwen2 with q/k/v biases).
//!
//! Owns: the model's weights as views into the weight source (never dequantized copies), the
//! paged KV storage ([`KvStorage`]), per-step scratch buffers, and a persistent thread pool.
//! One [`CpuRunner::step`] runs a whole batch — prefill chunks and decode tokens of many
//! sequences concatenated into one activation matrix, so every weight matrix is read once per
//! step — and attention reads each sequence's K/V through its block table.
//!
//! Never allocates per token: scratch is sized at start for the most tokens a step may hold.
//! Block accounting (which blocks a sequence owns) is not done here; that is `engine::kv`'s job.

pub mod kv_plane;
pub mod matmul;
pub mod pool;

pub use pool::ThreadPool;

use crate::config::{Arch, ModelConfig, RopeStyle};
use crate::quant::{dequantize_row, GgmlType, Isa};
use crate::weights::WeightSource;
pub use kv_plane::KvCacheDtype;
use kv_plane::Plane;
use matmul::{matmul, Acts, Mat, MatJob};
use pool::SyncPtr;
use std::sync::{Arc, Mutex};

/// Why a model could not be built or a step could not run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    #[error("the weights have no tensor named {0}")]
    MissingTensor(String),
    #[error("tensor {name}: {detail}")]
    Shape { name: String, detail: String },
    #[error("tensor {name} has type {dtype}, which kvroute's CPU kernels do not support")]
    UnsupportedType { name: String, dtype: GgmlType },
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("invalid batch: {0}")]
    Batch(String),
}

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy)]
pub struct SeqInput<'a> {
    /// Tokens to run now (a prefill chunk, or one decode token).
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`; positions `0..start_pos` are already in the KV cache.
    pub start_pos: usize,
    /// KV block ids: block `i` holds positions `i*block_size..(i+1)*block_size`.
    pub block_table: &'a [u32],
    /// Return logits for the last token of this chunk.
    pub want_logits: bool,
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: Mat,
    wk: Mat,
    wv: Mat,
    wo: Mat,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    gate: Mat,
    up: Mat,
    down: Mat,
}

/// A loaded model: configuration and weights (views into the source's memory).
pub struct Model {
    cfg: ModelConfig,
    isa: Isa,
    tok_embd: Mat,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    /// `None` when the output projection is the token embedding (tied).
    output: Option<Mat>,
    /// `theta_base^(-2/head_dim)`: RoPE angles are `pos · theta_scale^k`, built by repeated f32
    /// multiplication exactly as llama.cpp builds its rope cache.
    theta_scale: f32,
    attn: AttnPrecision,
}

/// How attention rounds.
///
/// The default model is numerically chaotic: its 8-bit activation rounding turns a last-bit
/// difference anywhere into visibly different logits a few layers later (the scalar and SIMD
/// kernels, which differ only in float summation order, disagree by a few tenths of a logit).
/// So to reproduce llama.cpp's greedy output kvroute also rounds where llama.cpp rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttnPrecision {
    /// As llama.cpp's CPU flash attention over an f16 cache: Q rounded to f16, the V
    /// accumulator kept in f16, keys visited one by one with an online softmax.
    #[default]
    LlamaCpp,
    /// Everything in f32 (blockwise online softmax).
    F32,
}

fn vector(src: &dyn WeightSource, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
    let t = src
        .tensor(name)
        .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
    if t.elems() != len {
        return Err(ModelError::Shape {
            name: name.to_string(),
            detail: format!("expected {len} values, got shape {:?}", t.shape),
        });
    }
    let mut v = vec![0.0; len];
    dequantize_row(t.dtype, t.data, &mut v).map_err(|e| ModelError::Shape {
        name: name.to_string(),
        detail: e.to_string(),
    })?;
    Ok(v)
}

fn matrix(
    src: &Arc<dyn WeightSource>,
    name: &str,
    cols: usize,
    rows: usize,
) -> Result<Mat, ModelError> {
    let t = src
        .tensor(name)
        .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
    let m = Mat::new(name, t, src.clone())?;
    if m.cols != cols || m.rows != rows {
        return Err(ModelError::Shape {
            name: name.to_string(),
            detail: format!("expected [{cols}, {rows}] (ggml order), got {:?}", t.shape),
        });
    }
    Ok(m)
}

impl Model {
    /// Builds the model from `source` (kept alive by the model) and a validated config.
    pub fn new(source: Arc<dyn WeightSource>, cfg: ModelConfig) -> Result<Model, ModelError> {
        let c = &cfg;
        for (what, v) in [
            ("vocab_size", c.vocab_size),
            ("hidden_size", c.hidden_size),
            ("intermediate_size", c.intermediate_size),
            ("num_layers", c.num_layers),
            ("num_heads", c.num_heads),
            ("num_kv_heads", c.num_kv_heads),
            ("head_dim", c.head_dim),
        ] {
            if v == 0 {
                return Err(ModelError::Config(format!("{what} is 0")));
            }
        }
        if !c.num_heads.is_multiple_of(c.num_kv_heads) {
            return Err(ModelError::Config(format!(
                "{} heads do not split into {} KV-head groups",
                c.num_heads, c.num_kv_heads
            )));
        }
        if !c.head_dim.is_multiple_of(2) {
            return Err(ModelError::Config(format!(
                "head_dim {} is odd (RoPE pairs dimensions)",
                c.head_dim
            )));
        }
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let qd = c.num_heads * c.head_dim;
        let kvd = c.num_kv_heads * c.head_dim;
        let src = &source;
        let tok_embd = matrix(src, "token_embd.weight", h, c.vocab_size)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let n = |s: &str| format!("blk.{l}.{s}");
            let bias = |s: &str, len: usize| -> Result<Option<Vec<f32>>, ModelError> {
                if c.arch == Arch::Qwen2 || source.tensor(&n(s)).is_some() {
                    vector(source.as_ref(), &n(s), len).map(Some)
                } else {
                    Ok(None)
                }
            };
            layers.push(Layer {
                attn_norm: vector(source.as_ref(), &n("attn_norm.weight"), h)?,
                wq: matrix(src, &n("attn_q.weight"), h, qd)?,
                wk: matrix(src, &n("attn_k.weight"), h, kvd)?,
                wv: matrix(src, &n("attn_v.weight"), h, kvd)?,
                wo: matrix(src, &n("attn_output.weight"), qd, h)?,
                bq: bias("attn_q.bias", qd)?,
                bk: bias("attn_k.bias", kvd)?,
                bv: bias("attn_v.bias", kvd)?,
                ffn_norm: vector(source.as_ref(), &n("ffn_norm.weight"), h)?,
                gate: matrix(src, &n("ffn_gate.weight"), h, i)?,
                up: matrix(src, &n("ffn_up.weight"), h, i)?,
                down: matrix(src, &n("ffn_down.weight"), i, h)?,
            });
        }
        let output_norm = vector(source.as_ref(), "output_norm.weight", h)?;
        let output = if source.tensor("output.weight").is_some() {
            Some(matrix(src, "output.weight", h, c.vocab_size)?)
        } else if c.tie_word_embeddings || source.tensor("output.weight").is_none() {
            None
        } else {
            return Err(ModelError::MissingTensor("output.weight".into()));
        };
        let theta_scale = c.rope_theta.powf(-2.0 / c.head_dim as f32);
        Ok(Model {
            cfg,
            isa: Isa::detect(),
            tok_embd,
            layers,
            output_norm,
            output,
            theta_scale,
            attn: AttnPrecision::default(),
        })
    }

    /// Uses these kernels instead of the detected best (tests: the scalar reference).
    pub fn with_isa(mut self, isa: Isa) -> Model {
        self.isa = isa;
        self
    }

    /// Uses this attention rounding (tests: [`AttnPrecision::F32`] against an f32 reference).
    pub fn with_attention(mut self, attn: AttnPrecision) -> Model {
        self.attn = attn;
        self
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Bytes of weight data this model computes with (all views into the source).
    pub fn weight_bytes(&self) -> usize {
        let mut n = self.tok_embd.data().len();
        for l in &self.layers {
            for m in [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down] {
                n += m.data().len();
            }
        }
        n + self.output.as_ref().map_or(0, |m| m.data().len())
    }
}

/// The paged KV cache's memory: per layer, `num_blocks` blocks, each `block_size` positions ×
/// `kv_heads` × `head_dim`, as f16 (llama.cpp's default cache type) or q8_0 (see
/// [`kv_plane`]). Laid out `[block][kv_head][slot][dim]` so one head's block is contiguous for
/// the attention kernel.
pub struct KvStorage {
    block_size: usize,
    num_blocks: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: KvCacheDtype,
    k: Vec<Plane>,
    v: Vec<Plane>,
    /// The host tier's slots (see [`crate::kv::host`]), same layout, per layer; empty without
    /// one. On the CPU both tiers are host memory: what the tier saves here is the recompute.
    host_k: Vec<Plane>,
    host_v: Vec<Plane>,
    host_slots: usize,
}

impl KvStorage {
    /// Bytes one f16 block takes over all layers, K and V.
    pub fn block_bytes(cfg: &ModelConfig, block_size: usize) -> usize {
        Self::block_bytes_of(cfg, block_size, KvCacheDtype::F16)
    }

    /// Bytes one block of `dtype` takes over all layers, K and V.
    pub fn block_bytes_of(cfg: &ModelConfig, block_size: usize, dtype: KvCacheDtype) -> usize {
        2 * cfg.num_layers * dtype.bytes(cfg.num_kv_heads * cfg.head_dim * block_size)
    }

    /// An f16 cache.
    pub fn new(
        cfg: &ModelConfig,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<Self, ModelError> {
        Self::new_of(cfg, block_size, num_blocks, KvCacheDtype::F16)
    }

    /// A cache of `dtype` (`q8_0` needs a head size that is a multiple of 32).
    pub fn new_of(
        cfg: &ModelConfig,
        block_size: usize,
        num_blocks: usize,
        dtype: KvCacheDtype,
    ) -> Result<Self, ModelError> {
        if block_size == 0 {
            return Err(ModelError::Config("KV block size is 0".into()));
        }
        if dtype == KvCacheDtype::Q8_0 && !cfg.head_dim.is_multiple_of(kv_plane::Q8_GROUP) {
            return Err(ModelError::Config(format!(
                "--kv-cache-dtype q8_0 needs a head size that is a multiple of {}; this model's is {}",
                kv_plane::Q8_GROUP,
                cfg.head_dim
            )));
        }
        let per_layer = num_blocks
            .checked_mul(block_size * cfg.num_kv_heads * cfg.head_dim)
            .ok_or_else(|| ModelError::Config("KV cache size overflows".into()))?;
        Ok(KvStorage {
            block_size,
            num_blocks,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            dtype,
            k: (0..cfg.num_layers)
                .map(|_| Plane::new(dtype, per_layer))
                .collect(),
            v: (0..cfg.num_layers)
                .map(|_| Plane::new(dtype, per_layer))
                .collect(),
            host_k: Vec::new(),
            host_v: Vec::new(),
            host_slots: 0,
        })
    }

    /// The element type.
    pub fn dtype(&self) -> KvCacheDtype {
        self.dtype
    }

    /// Allocates `slots` host-tier slots (replacing any).
    pub fn set_host_slots(&mut self, slots: usize) -> Result<(), ModelError> {
        let per_layer = slots
            .checked_mul(self.block_elems())
            .ok_or_else(|| ModelError::Config("KV host tier size overflows".into()))?;
        let layers = self.k.len();
        self.host_k = (0..layers)
            .map(|_| Plane::new(self.dtype, per_layer))
            .collect();
        self.host_v = (0..layers)
            .map(|_| Plane::new(self.dtype, per_layer))
            .collect();
        self.host_slots = slots;
        Ok(())
    }

    /// Elements of one block of one layer's K (or V).
    #[inline]
    fn block_elems(&self) -> usize {
        self.kv_heads * self.block_size * self.head_dim
    }

    /// Performs a step's host-tier copies: every offload, then every reload (see
    /// [`crate::kv::KvCopies`]).
    pub fn copy_blocks(&mut self, copies: &crate::kv::KvCopies) -> Result<(), ModelError> {
        let n = self.block_elems();
        let (blocks, slots) = (self.num_blocks, self.host_slots);
        let check = move |b: usize, s: usize| {
            let beyond = |what: &str, i: usize, max: usize| {
                Err(ModelError::Batch(format!(
                    "KV copy names {what} {i}, beyond the {max} there are"
                )))
            };
            if b >= blocks {
                return beyond("block", b, blocks);
            }
            if s >= slots {
                return beyond("host slot", s, slots);
            }
            Ok((b * n, s * n))
        };
        for &(b, s) in &copies.offload {
            let (at, to) = check(b as usize, s as usize)?;
            for l in 0..self.k.len() {
                self.k[l].copy_to(at, &mut self.host_k[l], to, n);
                self.v[l].copy_to(at, &mut self.host_v[l], to, n);
            }
        }
        for &(s, b) in &copies.reload {
            let (to, from) = check(b as usize, s as usize)?;
            for l in 0..self.k.len() {
                self.host_k[l].copy_to(from, &mut self.k[l], to, n);
                self.host_v[l].copy_to(from, &mut self.v[l], to, n);
            }
        }
        Ok(())
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    #[inline]
    fn offset(&self, block: usize, head: usize, slot: usize) -> usize {
        ((block * self.kv_heads + head) * self.block_size + slot) * self.head_dim
    }
}

/// Per-thread buffers of the attention kernel.
struct AttnScratch {
    k: Vec<f32>,
    v: Vec<f32>,
    scores: Vec<f32>,
    acc: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

/// Query tokens per attention work item (with all query heads of one KV head).
const ATTN_QCHUNK: usize = 16;

struct Scratch {
    max_tokens: usize,
    pos: Vec<usize>,
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    tmp: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    acts: Acts,
    logits: Vec<f32>,
    seq_offsets: Vec<usize>,
    logit_tokens: Vec<usize>,
    items: Vec<(u32, u32, u32, u32)>,
    f16_tmp: Vec<u16>,
    attn_scratch: Vec<Mutex<AttnScratch>>,
}

/// The CPU backend: a model, its KV storage, scratch and threads. Runs steps.
pub struct CpuRunner {
    model: Arc<Model>,
    kv: KvStorage,
    s: Scratch,
    pool: ThreadPool,
}

impl CpuRunner {
    /// A runner with `num_blocks` KV blocks of `block_size` tokens, steps of at most
    /// `max_batch_tokens` tokens, on `threads` threads.
    pub fn new(
        model: Arc<Model>,
        block_size: usize,
        num_blocks: usize,
        max_batch_tokens: usize,
        threads: usize,
    ) -> Result<CpuRunner, ModelError> {
        if max_batch_tokens == 0 {
            return Err(ModelError::Config("max batched tokens is 0".into()));
        }
        let c = model.config().clone();
        let kv = KvStorage::new(&c, block_size, num_blocks)?;
        let pool = ThreadPool::new(threads);
        let t = max_batch_tokens;
        let qd = c.num_heads * c.head_dim;
        let kvd = c.num_kv_heads * c.head_dim;
        let max_cols = c.hidden_size.max(qd).max(c.intermediate_size);
        let group = c.num_heads / c.num_kv_heads;
        let attn_scratch = (0..pool.threads())
            .map(|_| {
                Mutex::new(AttnScratch {
                    k: vec![0.0; block_size * c.head_dim],
                    v: vec![0.0; block_size * c.head_dim],
                    scores: vec![0.0; block_size],
                    acc: vec![0.0; ATTN_QCHUNK * group * c.head_dim],
                    m: vec![0.0; ATTN_QCHUNK * group],
                    l: vec![0.0; ATTN_QCHUNK * group],
                })
            })
            .collect();
        let s = Scratch {
            max_tokens: t,
            pos: vec![0; t],
            x: vec![0.0; t * c.hidden_size],
            xn: vec![0.0; t * c.hidden_size],
            q: vec![0.0; t * qd],
            k: vec![0.0; t * kvd],
            v: vec![0.0; t * kvd],
            attn: vec![0.0; t * qd],
            tmp: vec![0.0; t * c.hidden_size],
            gate: vec![0.0; t * c.intermediate_size],
            up: vec![0.0; t * c.intermediate_size],
            cos: vec![0.0; t * c.head_dim / 2],
            sin: vec![0.0; t * c.head_dim / 2],
            acts: Acts::new(t, max_cols),
            logits: Vec::new(),
            seq_offsets: Vec::with_capacity(t),
            logit_tokens: Vec::with_capacity(t),
            items: Vec::with_capacity(t * c.num_kv_heads),
            f16_tmp: vec![0; 1024],
            attn_scratch,
        };
        Ok(CpuRunner { model, kv, s, pool })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn kv(&self) -> &KvStorage {
        &self.kv
    }

    /// The KV cache, to add a host tier or perform copies.
    pub fn kv_mut(&mut self) -> &mut KvStorage {
        &mut self.kv
    }

    /// Makes the KV cache hold `dtype` (same blocks; call before the first step: the cache is
    /// made anew, empty).
    pub fn set_kv_dtype(&mut self, dtype: KvCacheDtype) -> Result<(), ModelError> {
        if dtype != self.kv.dtype {
            let c = self.model.config();
            self.kv = KvStorage::new_of(c, self.kv.block_size, self.kv.num_blocks, dtype)?;
        }
        Ok(())
    }

    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    pub fn max_batch_tokens(&self) -> usize {
        self.s.max_tokens
    }

    fn validate(&self, batch: &[SeqInput<'_>]) -> Result<usize, ModelError> {
        let c = self.model.config();
        let bs = self.kv.block_size;
        let mut total = 0usize;
        for (i, s) in batch.iter().enumerate() {
            if s.tokens.is_empty() {
                return Err(ModelError::Batch(format!("sequence {i} has no tokens")));
            }
            total += s.tokens.len();
            let end = s.start_pos + s.tokens.len();
            let need = end.div_ceil(bs);
            if s.block_table.len() < need {
                return Err(ModelError::Batch(format!(
                    "sequence {i} reaches position {} but its block table covers {} positions",
                    end - 1,
                    s.block_table.len() * bs
                )));
            }
            if let Some(b) = s.block_table[..need]
                .iter()
                .find(|&&b| b as usize >= self.kv.num_blocks)
            {
                return Err(ModelError::Batch(format!(
                    "sequence {i} uses block {b}; the cache has {}",
                    self.kv.num_blocks
                )));
            }
            if let Some(t) = s.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(ModelError::Batch(format!(
                    "token id {t} is outside the vocabulary ({})",
                    c.vocab_size
                )));
            }
        }
        if total > self.s.max_tokens {
            return Err(ModelError::Batch(format!(
                "{total} tokens in one step; at most {}",
                self.s.max_tokens
            )));
        }
        Ok(total)
    }

    /// Runs one step. Returns the logits (`vocab_size` each) of the last token of every sequence
    /// with `want_logits`, in batch order.
    pub fn step(&mut self, batch: &[SeqInput<'_>]) -> Result<&[f32], ModelError> {
        let n = self.validate(batch)?;
        let model = &*self.model;
        let c = &model.cfg;
        let isa = model.isa;
        let pool = &self.pool;
        let s = &mut self.s;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let qd = c.num_heads * hd;
        let kvd = c.num_kv_heads * hd;
        let im = c.intermediate_size;
        let half = hd / 2;

        s.seq_offsets.clear();
        s.logit_tokens.clear();
        let mut t = 0;
        for seq in batch {
            s.seq_offsets.push(t);
            for (i, _) in seq.tokens.iter().enumerate() {
                s.pos[t + i] = seq.start_pos + i;
            }
            t += seq.tokens.len();
            if seq.want_logits {
                s.logit_tokens.push(t - 1);
            }
        }

        // Embeddings and RoPE tables.
        {
            let x = SyncPtr::new(&mut s.x[..n * h]);
            let cos = SyncPtr::new(&mut s.cos[..n * half]);
            let sin = SyncPtr::new(&mut s.sin[..n * half]);
            let tokens_of = |t: usize| -> u32 {
                let si = s.seq_offsets.partition_point(|&o| o <= t) - 1;
                batch[si].tokens[t - s.seq_offsets[si]]
            };
            let pos = &s.pos;
            let theta_scale = model.theta_scale;
            let job = |t: usize, _: usize| {
                // SAFETY: item t writes only row t of each buffer.
                let (xr, cr, sr) = unsafe {
                    (
                        x.slice(t * h, h),
                        cos.slice(t * half, half),
                        sin.slice(t * half, half),
                    )
                };
                let tok = tokens_of(t) as usize;
                // Sizes were validated when the model was built; a failure here is impossible.
                let _ = dequantize_row(model.tok_embd.dtype, model.tok_embd.row(tok), xr);
                let mut theta = pos[t] as f32;
                for k in 0..half {
                    cr[k] = theta.cos();
                    sr[k] = theta.sin();
                    theta *= theta_scale;
                }
            };
            par(pool, n, &job);
        }

        for layer in 0..c.num_layers {
            let lw = &model.layers[layer];
            // Attention block.
            rms_norm_rows(
                pool,
                &s.x[..n * h],
                &mut s.xn[..n * h],
                &lw.attn_norm,
                h,
                c.rms_norm_eps,
            );
            s.acts.set(&s.xn, n, h);
            matmul(
                pool,
                isa,
                &mut s.acts,
                &mut [
                    MatJob {
                        w: &lw.wq,
                        out: &mut s.q[..n * qd],
                    },
                    MatJob {
                        w: &lw.wk,
                        out: &mut s.k[..n * kvd],
                    },
                    MatJob {
                        w: &lw.wv,
                        out: &mut s.v[..n * kvd],
                    },
                ],
            );
            for (b, buf, d) in [
                (&lw.bq, &mut s.q, qd),
                (&lw.bk, &mut s.k, kvd),
                (&lw.bv, &mut s.v, kvd),
            ] {
                if let Some(b) = b {
                    for row in buf[..n * d].chunks_exact_mut(d) {
                        for (x, bb) in row.iter_mut().zip(b) {
                            *x += bb;
                        }
                    }
                }
            }
            rope(c.rope_style, &mut s.q[..n * qd], &s.cos, &s.sin, hd, n);
            rope(c.rope_style, &mut s.k[..n * kvd], &s.cos, &s.sin, hd, n);
            if model.attn == AttnPrecision::LlamaCpp {
                // llama.cpp converts Q to the cache type (f16) for its K·Q dot products.
                for chunk in s.q[..n * qd].chunks_mut(s.f16_tmp.len()) {
                    let tmp = &mut s.f16_tmp[..chunk.len()];
                    isa.f32_to_f16(chunk, tmp);
                    isa.f16_to_f32(tmp, chunk);
                }
            }
            write_kv(&mut self.kv, layer, batch, &s.seq_offsets, &s.k, &s.v, isa);
            attention(
                pool,
                isa,
                model.attn,
                c,
                &self.kv,
                layer,
                batch,
                &s.seq_offsets,
                &s.q,
                &mut s.attn,
                &mut s.items,
                &s.attn_scratch,
            );
            s.acts.set(&s.attn, n, qd);
            matmul(
                pool,
                isa,
                &mut s.acts,
                &mut [MatJob {
                    w: &lw.wo,
                    out: &mut s.tmp[..n * h],
                }],
            );
            for (x, d) in s.x[..n * h].iter_mut().zip(&s.tmp[..n * h]) {
                *x += d;
            }
            // MLP block.
            rms_norm_rows(
                pool,
                &s.x[..n * h],
                &mut s.xn[..n * h],
                &lw.ffn_norm,
                h,
                c.rms_norm_eps,
            );
            s.acts.set(&s.xn, n, h);
            matmul(
                pool,
                isa,
                &mut s.acts,
                &mut [
                    MatJob {
                        w: &lw.gate,
                        out: &mut s.gate[..n * im],
                    },
                    MatJob {
                        w: &lw.up,
                        out: &mut s.up[..n * im],
                    },
                ],
            );
            for (g, u) in s.gate[..n * im].iter_mut().zip(&s.up[..n * im]) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            s.acts.set(&s.gate, n, im);
            matmul(
                pool,
                isa,
                &mut s.acts,
                &mut [MatJob {
                    w: &lw.down,
                    out: &mut s.tmp[..n * h],
                }],
            );
            for (x, d) in s.x[..n * h].iter_mut().zip(&s.tmp[..n * h]) {
                *x += d;
            }
        }

        // Logits for the rows that want them.
        let nl = s.logit_tokens.len();
        if nl == 0 {
            return Ok(&s.logits[..0]);
        }
        for (i, &t) in s.logit_tokens.iter().enumerate() {
            s.xn[i * h..(i + 1) * h].copy_from_slice(&s.x[t * h..(t + 1) * h]);
        }
        rms_norm_rows(
            pool,
            &s.xn[..nl * h],
            &mut s.tmp[..nl * h],
            &model.output_norm,
            h,
            c.rms_norm_eps,
        );
        let v = c.vocab_size;
        if s.logits.len() < nl * v {
            // Grows to the largest number of logit rows seen, then stays.
            s.logits.resize(nl * v, 0.0);
        }
        s.acts.set(&s.tmp, nl, h);
        let out_w = model.output.as_ref().unwrap_or(&model.tok_embd);
        matmul(
            pool,
            isa,
            &mut s.acts,
            &mut [MatJob {
                w: out_w,
                out: &mut s.logits[..nl * v],
            }],
        );
        Ok(&s.logits[..nl * v])
    }
}

/// Stores the step's new K/V rows (after RoPE) into their cache slots as f16.
fn write_kv(
    kv: &mut KvStorage,
    layer: usize,
    batch: &[SeqInput<'_>],
    seq_offsets: &[usize],
    k: &[f32],
    v: &[f32],
    isa: Isa,
) {
    let (kvh, hd, bs) = (kv.kv_heads, kv.head_dim, kv.block_size);
    let kvd = kvh * hd;
    for (si, seq) in batch.iter().enumerate() {
        let base = seq_offsets[si];
        for i in 0..seq.tokens.len() {
            let p = seq.start_pos + i;
            let blk = seq.block_table[p / bs] as usize;
            let t = base + i;
            for g in 0..kvh {
                let off = kv.offset(blk, g, p % bs);
                let src = t * kvd + g * hd..t * kvd + (g + 1) * hd;
                kv.k[layer].store(off, &k[src.clone()], isa);
                kv.v[layer].store(off, &v[src], isa);
            }
        }
    }
}

/// Runs `f(t)` for `t in 0..n`, in parallel when there is enough work to pay for it.
fn par(pool: &ThreadPool, n: usize, f: &(dyn Fn(usize, usize) + Sync)) {
    if n >= 8 {
        pool.for_each(n, f);
    } else {
        for t in 0..n {
            f(t, 0);
        }
    }
}

/// `y = x / sqrt(mean(x²) + eps) · w`, row by row (f32 squares summed in f64, as ggml does).
fn rms_norm_rows(pool: &ThreadPool, x: &[f32], y: &mut [f32], w: &[f32], d: usize, eps: f32) {
    let n = x.len() / d;
    let yp = SyncPtr::new(y);
    par(pool, n, &|t, _| {
        let xr = &x[t * d..(t + 1) * d];
        // SAFETY: item t writes only row t.
        let yr = unsafe { yp.slice(t * d, d) };
        let ss: f64 = xr.iter().map(|&v| (v * v) as f64).sum();
        let scale = 1.0 / ((ss / d as f64) as f32 + eps).sqrt();
        for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
            *o = v * scale * g;
        }
    });
}

/// Rotates every head of every row in place with the step's per-token cos/sin tables.
fn rope(style: RopeStyle, x: &mut [f32], cos: &[f32], sin: &[f32], hd: usize, n: usize) {
    let half = hd / 2;
    let width = x.len() / n.max(1);
    for t in 0..n {
        let (c, s) = (
            &cos[t * half..(t + 1) * half],
            &sin[t * half..(t + 1) * half],
        );
        for head in x[t * width..(t + 1) * width].chunks_exact_mut(hd) {
            match style {
                RopeStyle::Interleaved => {
                    for k in 0..half {
                        let (a, b) = (head[2 * k], head[2 * k + 1]);
                        // FMA where a C compiler contracts llama.cpp's rotation.
                        head[2 * k] = a.mul_add(c[k], -(b * s[k]));
                        head[2 * k + 1] = a.mul_add(s[k], b * c[k]);
                    }
                }
                RopeStyle::Neox => {
                    for k in 0..half {
                        let (a, b) = (head[k], head[k + half]);
                        head[k] = a.mul_add(c[k], -(b * s[k]));
                        head[k + half] = a.mul_add(s[k], b * c[k]);
                    }
                }
            }
        }
    }
}

/// Causal attention over the paged cache. Work items are (sequence, KV head, chunk of query
/// tokens); each reads its KV head's blocks once and serves every query head of the group and
/// every query token of the chunk with an online softmax.
#[allow(clippy::too_many_arguments)]
fn attention(
    pool: &ThreadPool,
    isa: Isa,
    prec: AttnPrecision,
    c: &ModelConfig,
    kv: &KvStorage,
    layer: usize,
    batch: &[SeqInput<'_>],
    seq_offsets: &[usize],
    q: &[f32],
    out: &mut [f32],
    items: &mut Vec<(u32, u32, u32, u32)>,
    scratch: &[Mutex<AttnScratch>],
) {
    let hd = c.head_dim;
    let kvh = c.num_kv_heads;
    let group = c.num_heads / kvh;
    let qd = c.num_heads * hd;
    let bs = kv.block_size;
    let scale = 1.0 / (hd as f32).sqrt();
    items.clear();
    for (si, seq) in batch.iter().enumerate() {
        for g in 0..kvh {
            let mut q0 = 0;
            while q0 < seq.tokens.len() {
                let q1 = (q0 + ATTN_QCHUNK).min(seq.tokens.len());
                items.push((si as u32, g as u32, q0 as u32, q1 as u32));
                q0 = q1;
            }
        }
    }
    let outp = SyncPtr::new(out);
    let kl = &kv.k[layer];
    let vl = &kv.v[layer];
    let items = &*items;
    pool.for_each(items.len(), &|it, th| {
        let (si, g, q0, q1) = items[it];
        let (si, g, q0, q1) = (si as usize, g as usize, q0 as usize, q1 as usize);
        let seq = &batch[si];
        let base = seq_offsets[si];
        let mut guard = scratch[th].lock().unwrap_or_else(|p| p.into_inner());
        let sc = &mut *guard;
        let rows = (q1 - q0) * group;
        sc.m[..rows].fill(f32::NEG_INFINITY);
        sc.l[..rows].fill(0.0);
        sc.acc[..rows * hd].fill(0.0);
        let last_pos = seq.start_pos + q1 - 1;
        for b in 0..=last_pos / bs {
            let blk = seq.block_table[b] as usize;
            let kstart = b * bs;
            let nvalid = bs.min(last_pos + 1 - kstart);
            let off = kv.offset(blk, g, 0);
            kl.load(off, &mut sc.k[..nvalid * hd], isa);
            vl.load(off, &mut sc.v[..nvalid * hd], isa);
            for qi in q0..q1 {
                let pos = seq.start_pos + qi;
                if pos < kstart {
                    continue;
                }
                let jmax = nvalid.min(pos - kstart + 1);
                for hh in 0..group {
                    let r = (qi - q0) * group + hh;
                    let head = g * group + hh;
                    let qv = &q[(base + qi) * qd + head * hd..(base + qi) * qd + (head + 1) * hd];
                    if prec == AttnPrecision::LlamaCpp {
                        // Key by key, as ggml's flash attention: a new maximum rescales the f16
                        // accumulator, every key adds `exp(s - max) · v` rounded to f16.
                        isa.attn_keys_f16acc(
                            qv,
                            &sc.k[..jmax * hd],
                            &sc.v[..jmax * hd],
                            jmax,
                            scale,
                            &mut sc.m[r],
                            &mut sc.l[r],
                            &mut sc.acc[r * hd..(r + 1) * hd],
                        );
                        continue;
                    }
                    let mut mb = f32::NEG_INFINITY;
                    for j in 0..jmax {
                        let sj = isa.dot_f32(qv, &sc.k[j * hd..(j + 1) * hd]) * scale;
                        sc.scores[j] = sj;
                        mb = mb.max(sj);
                    }
                    let m_old = sc.m[r];
                    let m_new = m_old.max(mb);
                    let corr = if m_old == f32::NEG_INFINITY {
                        0.0
                    } else {
                        (m_old - m_new).exp()
                    };
                    let acc = &mut sc.acc[r * hd..(r + 1) * hd];
                    let mut l = sc.l[r] * corr;
                    for j in 0..jmax {
                        let p = (sc.scores[j] - m_new).exp();
                        l += p;
                        isa.scale_axpy(
                            acc,
                            if j == 0 { corr } else { 1.0 },
                            p,
                            &sc.v[j * hd..(j + 1) * hd],
                        );
                    }
                    sc.l[r] = l;
                    sc.m[r] = m_new;
                }
            }
        }
        for qi in q0..q1 {
            for hh in 0..group {
                let r = (qi - q0) * group + hh;
                let head = g * group + hh;
                // SAFETY: this item owns heads g*group..(g+1)*group of tokens q0..q1 of seq si.
                let o = unsafe { outp.slice((base + qi) * qd + head * hd, hd) };
                let inv = if sc.l[r] > 0.0 { 1.0 / sc.l[r] } else { 0.0 };
                for (ov, a) in o.iter_mut().zip(&sc.acc[r * hd..(r + 1) * hd]) {
                    *ov = a * inv;
                }
            }
        }
    });
}
