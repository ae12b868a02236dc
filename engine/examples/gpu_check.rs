//! The GPU check: numerics of every CUDA kernel against the f32 CPU references, and the
//! paged-attention decode bandwidth against a device-to-device copy, written as JSON.
//!
//! Run by `engine/gpu-check.sh` on the accelerator machine (built here with
//! `cargo build --release -p kvroute-engine --features cuda --example gpu_check`).
//! `--model PATH` (or `$KVROUTE_MODEL_PATH`): the default model's GGUF, for its first-step logits
//! against the CPU reference and llama.cpp, and for the tokens/s figures (else a synthetic model
//! of its shape). `--dry-run` does what needs no GPU (loads NVRTC, compiles every kernel for sm_90, writes the
//! JSON) and stops before opening the device. `--out DIR` (default `$OUT`, else `.`) is
//! where `gpu_check.json` goes.

use std::process::ExitCode;
use std::time::Instant;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaSlice;
use kvroute_engine::config::{Arch as ModelArch, ModelConfig, RopeStyle};
use kvroute_engine::cuda::model::{CudaKvCache, CudaModel, SeqStep, StepWorkspace};
use kvroute_engine::cuda::ops::{AttnBatch, DecodeScratch};
use kvroute_engine::cuda::{self, CudaDevice, CudaError};
use kvroute_engine::gguf::Gguf;
use kvroute_engine::kernels::layout::PagedKvLayout;
use kvroute_engine::kernels::reference::{self as r, PagedKv};
use kvroute_engine::kernels::{self, launch, Arch, Dtype, KernelConfig, Nvrtc};
use kvroute_engine::quant::GgmlType;
use serde_json::{json, Value};

/// splitmix64: deterministic inputs, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const DT: Dtype = Dtype::Bf16;

fn bits(x: &[f32]) -> Vec<u16> {
    x.iter().map(|&v| r::to_bits(DT, v)).collect()
}
fn unbits(x: &[u16]) -> Vec<f32> {
    x.iter().map(|&b| r::from_bits(DT, b)).collect()
}
/// Inputs as the GPU sees them: rounded to bf16.
fn rounded(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| r::round(DT, v)).collect()
}

/// max |a − b| and whether every |a − b| ≤ abs + rel·|b|.
fn compare(got: &[f32], want: &[f32], abs: f32, rel: f32) -> (f32, bool) {
    let mut worst = 0f32;
    let mut ok = got.len() == want.len();
    for (g, w) in got.iter().zip(want) {
        let e = (g - w).abs();
        if e.is_nan() || e > abs + rel * w.abs() {
            ok = false;
        }
        if e > worst || e.is_nan() {
            worst = if e.is_nan() { f32::INFINITY } else { e };
        }
    }
    (worst, ok)
}

struct Report {
    checks: Vec<Value>,
    failed: usize,
}
impl Report {
    fn add(&mut self, name: &str, err: (f32, bool), bound: &str) {
        println!(
            "{:<28} max_abs_err {:<12.3e} bound {bound:<28} {}",
            name,
            err.0,
            if err.1 { "ok" } else { "FAIL" }
        );
        if !err.1 {
            self.failed += 1;
        }
        self.checks
            .push(json!({"check": name, "max_abs_err": err.0, "bound": bound, "pass": err.1}));
    }
}

type Res<T> = Result<T, CudaError>;

fn up<T: cudarc::driver::DeviceRepr>(dev: &CudaDevice, x: &[T]) -> Res<CudaSlice<T>> {
    Ok(dev.stream.clone_htod(x)?)
}
fn down<T: cudarc::driver::DeviceRepr + Default + Clone>(
    dev: &CudaDevice,
    x: &CudaSlice<T>,
) -> Res<Vec<T>> {
    Ok(dev.stream.clone_dtoh(x)?)
}

/// Random raw GGUF blocks with finite, modest scales.
fn random_quant(rng: &mut Rng, ty: GgmlType, n: usize) -> Vec<u8> {
    let bb = ty.block_bytes();
    let blocks = n / ty.block_elems();
    let mut raw: Vec<u8> = (0..blocks * bb).map(|_| rng.next() as u8).collect();
    let f16b = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes();
    for b in raw.chunks_exact_mut(bb) {
        let (r3, r5, r7, r9) = (
            b[3] as f32 / 255.0,
            b[5] as f32 / 255.0,
            b[7] as f32 / 255.0,
            b[9] as f32 / 255.0,
        );
        match ty {
            GgmlType::Q4_0 | GgmlType::Q8_0 => b[..2].copy_from_slice(&f16b(0.01 + 0.02 * r5)),
            GgmlType::Q4_1 | GgmlType::Q4K => {
                b[..2].copy_from_slice(&f16b(0.01 + 0.01 * r7));
                b[2..4].copy_from_slice(&f16b(0.005 + 0.01 * r9));
            }
            GgmlType::Q6K => b[208..210].copy_from_slice(&f16b(0.001 + 0.001 * r3)),
            _ => {}
        }
    }
    match ty {
        GgmlType::F32 => rng.vec(n).iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => rng.vec(n).iter().flat_map(|&v| f16b(v)).collect(),
        GgmlType::BF16 => rng
            .vec(n)
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
        _ => raw,
    }
}

fn numerics(dev: &CudaDevice, cfg: &KernelConfig, rep: &mut Report) -> Res<()> {
    let mut rng = Rng(42);
    // bf16 stores 8 significant bits: one rounding of the result is 2^-8 relative.
    let one_rounding = "abs 1e-6 + rel 2^-7";

    for &(ty, _) in r::DEQUANT_TYPES {
        let n = 256 * 64;
        let raw = random_quant(&mut rng, ty, n);
        let want =
            rounded(&r::dequant(ty, &raw, n).map_err(|e| CudaError::Invalid(e.to_string()))?);
        let src = up(dev, &raw)?;
        let mut out = dev.stream.alloc_zeros::<u16>(n)?;
        dev.dequant(DT, ty, &mut out, &src, n)?;
        let got = unbits(&down(dev, &out)?);
        rep.add(
            &format!("dequant_{ty}"),
            compare(&got, &want, 1e-6, 1.0 / 128.0),
            one_rounding,
        );
    }

    let (rows, hidden, eps) = (7usize, 576usize, 1e-5f32);
    let x = rounded(&rng.vec(rows * hidden));
    let res = rounded(&rng.vec(rows * hidden));
    let w = rounded(&rng.vec(hidden));
    let (dx, dw) = (up(dev, &bits(&x))?, up(dev, &bits(&w))?);
    let mut out = dev.stream.alloc_zeros::<u16>(rows * hidden)?;
    dev.rms_norm(DT, &mut out, &dx, &dw, rows, hidden, eps)?;
    let want = r::rms_norm(&x, &w, hidden, eps);
    rep.add(
        "rms_norm",
        compare(&unbits(&down(dev, &out)?), &want, 1e-3, 1.0 / 128.0),
        "abs 1e-3 + rel 2^-7",
    );

    let mut dres = up(dev, &bits(&res))?;
    dev.add_rms_norm(DT, &mut out, &mut dres, &dx, &dw, rows, hidden, eps)?;
    let summed = rounded(&res.iter().zip(&x).map(|(a, b)| a + b).collect::<Vec<_>>());
    let want = r::rms_norm(&summed, &w, hidden, eps);
    rep.add(
        "add_rms_norm",
        compare(&unbits(&down(dev, &out)?), &want, 1e-3, 1.0 / 128.0),
        "abs 1e-3 + rel 2^-7",
    );
    rep.add(
        "add_rms_norm.residual",
        compare(&unbits(&down(dev, &dres)?), &summed, 0.0, 0.0),
        "exact",
    );

    let (d, nh, nkv, tokens) = (cfg.head_dim, 4 * cfg.gqa, 4usize, 5usize);
    let cs = r::rope_cos_sin(4096, d, 10_000.0);
    let dcs = up(dev, &cs)?;
    for neox in [false, true] {
        let q = rounded(&rng.vec(tokens * nh * d));
        let k = rounded(&rng.vec(tokens * nkv * d));
        let pos: Vec<usize> = (0..tokens).map(|_| rng.below(4096)).collect();
        let dpos = up(dev, &pos.iter().map(|&p| p as i32).collect::<Vec<_>>())?;
        let (mut dq, mut dk) = (up(dev, &bits(&q))?, up(dev, &bits(&k))?);
        dev.rope(
            DT,
            &mut dq,
            &mut dk,
            &dcs,
            &dpos,
            tokens,
            (nh, nkv),
            d,
            (nh * d, nkv * d),
            neox,
        )?;
        let (mut wq, mut wk) = (q.clone(), k.clone());
        r::rope(&mut wq, &pos, d, &cs, neox);
        r::rope(&mut wk, &pos, d, &cs, neox);
        let name = if neox {
            "rope_neox"
        } else {
            "rope_interleaved"
        };
        let mut got = unbits(&down(dev, &dq)?);
        got.extend(unbits(&down(dev, &dk)?));
        wq.extend(wk);
        rep.add(
            name,
            compare(&got, &wq, 1e-5, 1.0 / 128.0),
            "abs 1e-5 + rel 2^-7",
        );
    }

    let (rows, width) = (6usize, 1536usize);
    let g = rounded(
        &rng.vec(rows * width)
            .iter()
            .map(|v| v * 6.0)
            .collect::<Vec<_>>(),
    );
    let u = rounded(&rng.vec(rows * width));
    let mut out = dev.stream.alloc_zeros::<u16>(rows * width)?;
    dev.swiglu(
        DT,
        &mut out,
        &up(dev, &bits(&g))?,
        &up(dev, &bits(&u))?,
        rows,
        width,
        width,
    )?;
    rep.add(
        "swiglu",
        compare(
            &unbits(&down(dev, &out)?),
            &r::swiglu(&g, &u),
            1e-5,
            1.0 / 128.0,
        ),
        one_rounding,
    );

    let (vocab, hidden) = (1000usize, 576usize);
    let table = bits(&rng.vec(vocab * hidden));
    let ids: Vec<i32> = (0..9).map(|_| rng.below(vocab) as i32).collect();
    let mut out = dev.stream.alloc_zeros::<u16>(ids.len() * hidden)?;
    dev.embedding(
        &mut out,
        &up(dev, &table)?,
        &up(dev, &ids)?,
        ids.len(),
        hidden,
        vocab,
    )?;
    let want: Vec<f32> = ids
        .iter()
        .flat_map(|&i| unbits(&table[i as usize * hidden..(i as usize + 1) * hidden]))
        .collect();
    rep.add(
        "embedding",
        compare(&unbits(&down(dev, &out)?), &want, 0.0, 0.0),
        "exact",
    );

    // Sampling: distinct values so the order is unique; one planted tie checks the tie rule.
    let (rows, vocab, k) = (3usize, 49_152usize, 40usize);
    let mut logits: Vec<f32> = (0..rows * vocab)
        .map(|i| (i as f32 * 0.618_034).fract() * 20.0 - 10.0)
        .collect();
    logits[vocab + 17] = 50.0;
    logits[vocab + 4] = 50.0;
    let dl = up(dev, &logits)?;
    let mut am = dev.stream.alloc_zeros::<i32>(rows)?;
    dev.argmax(&mut am, &dl, rows, vocab)?;
    let got: Vec<f32> = down(dev, &am)?.iter().map(|&i| i as f32).collect();
    let want: Vec<f32> = logits
        .chunks(vocab)
        .map(|row| r::argmax(row) as f32)
        .collect();
    rep.add("argmax", compare(&got, &want, 0.0, 0.0), "exact");
    let (mut tv, mut ti) = (
        dev.stream.alloc_zeros::<f32>(rows * k)?,
        dev.stream.alloc_zeros::<i32>(rows * k)?,
    );
    dev.topk(&mut tv, &mut ti, &dl, rows, vocab, k)?;
    let got: Vec<f32> = down(dev, &ti)?
        .iter()
        .map(|&i| i as f32)
        .chain(down(dev, &tv)?)
        .collect();
    let want_pairs: Vec<(f32, usize)> = logits
        .chunks(vocab)
        .flat_map(|row| r::topk(row, k))
        .collect();
    let want: Vec<f32> = want_pairs
        .iter()
        .map(|p| p.1 as f32)
        .chain(want_pairs.iter().map(|p| p.0))
        .collect();
    rep.add("topk", compare(&got, &want, 0.0, 0.0), "exact");

    // cuBLAS: y = x · wᵀ, bf16 in, f32 accumulate; bf16 and f32 outputs.
    let (m, n_in, n_out) = (5usize, 576usize, 1536usize);
    let x = rounded(&rng.vec(m * n_in));
    let w = rounded(&rng.vec(n_out * n_in));
    let want: Vec<f32> = (0..m)
        .flat_map(|i| {
            let (x, w) = (&x, &w);
            (0..n_out).map(move |o| {
                (0..n_in)
                    .map(|j| x[i * n_in + j] * w[o * n_in + j])
                    .sum::<f32>()
            })
        })
        .collect();
    let (dx, dw) = (up(dev, &bits(&x))?, up(dev, &bits(&w))?);
    let mut y = dev.stream.alloc_zeros::<u16>(m * n_out)?;
    dev.matmul(DT, &mut y, &dx, &dw, m, n_in, n_out)?;
    rep.add(
        "matmul_bf16_out",
        compare(&unbits(&down(dev, &y)?), &want, 1e-2, 1.0 / 128.0),
        "abs 1e-2 + rel 2^-7",
    );
    let mut yf = dev.stream.alloc_zeros::<f32>(m * n_out)?;
    dev.matmul_f32(DT, &mut yf, &dx, &dw, m, n_in, n_out)?;
    rep.add(
        "matmul_f32_out",
        compare(&down(dev, &yf)?, &want, 1e-3, 1e-4),
        "abs 1e-3 + rel 1e-4",
    );

    attention_numerics(dev, cfg, &mut rng, rep)
}

/// A random paged batch: shuffled block ids, ragged context lengths.
struct Paged {
    layout: PagedKvLayout,
    k: Vec<f32>,
    v: Vec<f32>,
    tables: Vec<i32>,
    max_blocks: usize,
    ctx: Vec<i32>,
}

fn random_paged(rng: &mut Rng, cfg: &KernelConfig, nkv: usize, ctx: Vec<i32>) -> Paged {
    let layout = PagedKvLayout {
        num_layers: 1,
        num_kv_heads: nkv,
        head_dim: cfg.head_dim,
        block_size: 16,
        elem_bytes: 2,
    };
    let max_blocks = ctx
        .iter()
        .map(|&c| (c as usize).div_ceil(16))
        .max()
        .unwrap_or(1)
        .max(1);
    let total = ctx.len() * max_blocks;
    let mut ids: Vec<i32> = (0..total as i32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i + 1));
    }
    let elems = layout.layer_elems(total).unwrap_or(0);
    Paged {
        layout,
        k: rounded(&rng.vec(elems)),
        v: rounded(&rng.vec(elems)),
        tables: ids,
        max_blocks,
        ctx,
    }
}

fn attention_numerics(
    dev: &CudaDevice,
    cfg: &KernelConfig,
    rng: &mut Rng,
    rep: &mut Report,
) -> Res<()> {
    let nkv = 2usize;
    let nh = nkv * cfg.gqa;
    let d = cfg.head_dim;
    let scale = 1.0 / (d as f32).sqrt();
    let p = random_paged(rng, cfg, nkv, vec![1, 17, 500, 1300, 2048, 0, 33]);
    let kv = PagedKv {
        layout: p.layout,
        k: &p.k,
        v: &p.v,
        block_tables: &p.tables,
        max_blocks_per_seq: p.max_blocks,
    };
    let (dk, dv) = (up(dev, &bits(&p.k))?, up(dev, &bits(&p.v))?);
    let (dt, dc) = (up(dev, &p.tables)?, up(dev, &p.ctx)?);
    launch::check_block_tables(&p.tables, p.max_blocks, &p.ctx, 16, p.tables.len())?;
    let batch = AttnBatch {
        layout: p.layout,
        block_tables: &dt,
        max_blocks_per_seq: p.max_blocks,
        context_lens: &dc,
        num_seqs: p.ctx.len(),
        num_heads: nh,
        q_stride: nh * d,
        scale,
    };

    // Decode, with several SM counts so both large and small partitions are exercised.
    let q = rounded(&rng.vec(p.ctx.len() * nh * d));
    let dq = up(dev, &bits(&q))?;
    let want = r::decode_attention(&kv, &q, nh, &p.ctx, scale);
    for sms in [dev.sm_count, 1] {
        let plan = launch::decode_plan(cfg, p.ctx.len(), nkv, 2048, sms)?;
        let mut scratch = DecodeScratch::new(dev, &plan)?;
        let mut out = dev.stream.alloc_zeros::<u16>(p.ctx.len() * nh * d)?;
        dev.paged_decode(DT, &mut out, &mut scratch, &dq, &dk, &dv, &batch, &plan)?;
        rep.add(
            &format!("paged_decode_p{}", plan.partition),
            compare(&unbits(&down(dev, &out)?), &want, 2e-3, 1.0 / 128.0),
            "abs 2e-3 + rel 2^-7",
        );
    }

    // Chunked prefill: each sequence's last q_len tokens are the new chunk.
    if cfg.prefill_supported() {
        let qlens: Vec<i32> = p.ctx.iter().map(|&c| c.min(37)).collect();
        let mut cu = vec![0i32];
        for l in &qlens {
            cu.push(cu.last().copied().unwrap_or(0) + l);
        }
        let tokens = *cu.last().unwrap_or(&0) as usize;
        let q = rounded(&rng.vec(tokens * nh * d));
        let want = r::prefill_attention(&kv, &q, nh, &cu, &p.ctx, scale);
        let mut out = dev.stream.alloc_zeros::<u16>(tokens.max(1) * nh * d)?;
        let max_q = qlens.iter().copied().max().unwrap_or(0) as usize;
        dev.prefill_attention(
            DT,
            &mut out,
            &up(dev, &bits(&q))?,
            &dk,
            &dv,
            &up(dev, &cu)?,
            tokens,
            max_q,
            &batch,
        )?;
        let got = unbits(&down(dev, &out)?);
        rep.add(
            "prefill_attention",
            compare(&got[..tokens * nh * d], &want, 2e-3, 1.0 / 128.0),
            "abs 2e-3 + rel 2^-7",
        );
    }

    // reshape_and_cache: scatter rows into slots, read the cache back.
    let layout = p.layout;
    let ntok = 20usize;
    let width = nkv * d;
    let rows = bits(&rng.vec(ntok * width));
    let slots: Vec<i64> = (0..ntok)
        .map(|t| {
            if t == 3 {
                -1
            } else {
                (t * 37 % (p.tables.len() * 16)) as i64
            }
        })
        .collect();
    let elems = layout.layer_elems(p.tables.len()).unwrap_or(0);
    let (mut kc, mut vc) = (
        dev.stream.alloc_zeros::<u16>(elems)?,
        dev.stream.alloc_zeros::<u16>(elems)?,
    );
    let drows = up(dev, &rows)?;
    dev.reshape_and_cache(
        &drows,
        &drows,
        &mut kc,
        &mut vc,
        &up(dev, &slots)?,
        ntok,
        width,
        &layout,
    )?;
    let (gk, gv) = (down(dev, &kc)?, down(dev, &vc)?);
    let mut want = vec![0u16; elems];
    for (t, &s) in slots.iter().enumerate() {
        if s < 0 {
            continue;
        }
        for h in 0..nkv {
            let o = layout.offset(s as usize / 16, h, s as usize % 16);
            want[o..o + d].copy_from_slice(&rows[t * width + h * d..t * width + (h + 1) * d]);
        }
    }
    let ok = gk == want && gv == want;
    rep.add(
        "reshape_and_cache",
        (if ok { 0.0 } else { f32::INFINITY }, ok),
        "exact",
    );
    Ok(())
}

/// Decode bandwidth: 64 seqs × 4,096 tokens, 8 KV heads, head_dim 128, bf16; L2 flushed
/// between runs; against a device-to-device copy of the same bytes.
fn bandwidth(dev: &CudaDevice) -> Res<Value> {
    let (seqs, ctx, nkv, d, gqa, bs) = (64usize, 4096usize, 8usize, 128usize, 4usize, 16usize);
    let cfg = KernelConfig::new(d, nkv * gqa, nkv)?;
    if cfg != dev.kernels.cfg {
        return Err(CudaError::Invalid(
            "bandwidth check needs the device opened with head_dim 128, gqa 4".into(),
        ));
    }
    let layout = PagedKvLayout {
        num_layers: 1,
        num_kv_heads: nkv,
        head_dim: d,
        block_size: bs,
        elem_bytes: 2,
    };
    let blocks_per_seq = ctx / bs;
    let nblocks = seqs * blocks_per_seq;
    let elems = layout.layer_elems(nblocks).unwrap_or(0);
    let mut rng = Rng(7);
    let t0 = Instant::now();
    // Random bf16 in ±[0.5, 1): random sign and mantissa, fixed exponent.
    let host: Vec<u16> = (0..elems)
        .map(|_| {
            let x = rng.next();
            0x3F00 | (x as u16 & 0x7F) | ((x >> 20) as u16 & 0x8000)
        })
        .collect();
    let mut ids: Vec<i32> = (0..nblocks as i32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i + 1));
    }
    let kc = up(dev, &host)?;
    let vc = up(dev, &host)?;
    drop(host);
    let q = up(dev, &bits(&rng.vec(seqs * nkv * gqa * d)))?;
    let dt = up(dev, &ids)?;
    let dc = up(dev, &vec![ctx as i32; seqs])?;
    println!(
        "bandwidth inputs ready in {:.1} s",
        t0.elapsed().as_secs_f32()
    );
    let batch = AttnBatch {
        layout,
        block_tables: &dt,
        max_blocks_per_seq: blocks_per_seq,
        context_lens: &dc,
        num_seqs: seqs,
        num_heads: nkv * gqa,
        q_stride: nkv * gqa * d,
        scale: 1.0 / (d as f32).sqrt(),
    };
    let plan = launch::decode_plan(&cfg, seqs, nkv, ctx, dev.sm_count)?;
    let mut scratch = DecodeScratch::new(dev, &plan)?;
    let mut out = dev.stream.alloc_zeros::<u16>(seqs * nkv * gqa * d)?;
    let flush_elems = (2 * dev.l2_bytes).max(256 << 20) / 4;
    let mut flush = dev.stream.alloc_zeros::<u32>(flush_elems)?;
    let mut copy_dst = dev.stream.alloc_zeros::<u16>(elems)?;
    let timed = |f: &mut dyn FnMut() -> Res<()>, flush: &mut CudaSlice<u32>| -> Res<Vec<f32>> {
        let mut times = Vec::new();
        for i in 0..23 {
            dev.stream.memset_zeros(flush)?;
            let a = dev
                .stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            f()?;
            let b = dev
                .stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            b.synchronize()?;
            if i >= 3 {
                times.push(a.elapsed_ms(&b)?);
            }
        }
        times.sort_by(f32::total_cmp);
        Ok(times)
    };
    let dec = timed(
        &mut || dev.paged_decode(DT, &mut out, &mut scratch, &q, &kc, &vc, &batch, &plan),
        &mut flush,
    )?;
    let cp = timed(
        &mut || Ok(dev.stream.memcpy_dtod(&kc, &mut copy_dst)?),
        &mut flush,
    )?;
    let kv_bytes = 2.0 * elems as f64 * 2.0;
    let med = |t: &[f32]| t[t.len() / 2] as f64 / 1e3;
    let dec_bw = kv_bytes / med(&dec);
    // A copy moves its bytes twice (read + write): count both, as copy bandwidth is quoted.
    let copy_bw = 2.0 * (elems as f64 * 2.0) / med(&cp);
    let v = json!({
        "shape": {"seqs": seqs, "context": ctx, "kv_heads": nkv, "query_heads": nkv * gqa, "head_dim": d, "dtype": "bf16", "block_size": bs},
        "plan": {"partition": plan.partition, "splits": plan.max_splits, "grid": [plan.decode.grid.0, plan.decode.grid.1, plan.decode.grid.2]},
        "kv_bytes": kv_bytes,
        "decode_ms_median": med(&dec) * 1e3,
        "decode_ms_min": dec[0],
        "decode_bytes_per_s": dec_bw,
        "copy_ms_median": med(&cp) * 1e3,
        "copy_bytes_per_s_read_plus_write": copy_bw,
        "fraction_of_copy": dec_bw / copy_bw,
        "target_fraction": 0.85,
        "l2_flush_bytes": flush_elems * 4,
        "runs": dec.len(),
    });
    println!(
        "decode {:.3} ms, {:.2} TB/s; copy {:.2} TB/s; fraction {:.3}",
        med(&dec) * 1e3,
        dec_bw / 1e12,
        copy_bw / 1e12,
        dec_bw / copy_bw
    );
    Ok(v)
}

fn model_cfg(
    arch: ModelArch,
    vocab: usize,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: (usize, usize),
    d: usize,
) -> ModelConfig {
    ModelConfig {
        arch,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_layers: layers,
        num_heads: heads.0,
        num_kv_heads: heads.1,
        head_dim: d,
        rope_theta: if arch == ModelArch::Qwen2 {
            1_000_000.0
        } else {
            100_000.0
        },
        rope_style: if arch == ModelArch::Qwen2 {
            RopeStyle::Neox
        } else {
            RopeStyle::Interleaved
        },
        rms_norm_eps: 1e-5,
        max_position_embeddings: 8192,
        tie_word_embeddings: arch == ModelArch::Qwen2,
    }
}

/// Block tables for `n` sequences of up to `tokens` each, from a shuffled pool.
fn tables(rng: &mut Rng, n: usize, tokens: usize, bs: usize) -> (Vec<Vec<u32>>, usize) {
    let per = tokens.div_ceil(bs);
    let mut ids: Vec<u32> = (0..(n * per) as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i + 1));
    }
    (ids.chunks(per).map(|c| c.to_vec()).collect(), n * per)
}

/// The forward pass on a small synthetic model against the f32 reference (bf16 rounding emulated),
/// through a chunked prefill, a mixed step and a decode step.
fn forward_numerics(dev: &CudaDevice, rep: &mut Report) -> Res<()> {
    let inv =
        |e: kvroute_engine::kernels::reference::ForwardError| CudaError::Invalid(e.to_string());
    for arch in [ModelArch::Llama, ModelArch::Qwen2] {
        // head_dim 128 and 4 query heads per KV head: the kernels the device was opened with.
        let cfg = model_cfg(arch, 512, 256, 512, 2, (8, 2), 128);
        let w = r::SyntheticWeights::new(&cfg, 11, GgmlType::Q8_0);
        let model = CudaModel::load(dev, &cfg, &w, DT)?;
        let mut rng = Rng(5);
        let (tabs, nblocks) = tables(&mut rng, 2, 64, 16);
        let mut cache = CudaKvCache::new(dev, model.kv_layout(16), nblocks)?;
        let a: Vec<u32> = (0..42).map(|_| rng.below(512) as u32).collect();
        let b: Vec<u32> = (0..14).map(|_| rng.below(512) as u32).collect();
        // (a's chunk end, b's end) per step: prefill chunk + full prompt; second chunk + decode;
        // decode + decode.
        let steps = [
            ((0, 25), (0, 13)),
            ((25, 41), (13, 14)),
            ((41, 42), (14, 14)),
        ];
        for (i, &((a0, a1), (b0, b1))) in steps.iter().enumerate() {
            let mut seqs = vec![SeqStep {
                tokens: &a[a0..a1],
                context_len: a1,
                block_table: &tabs[0],
            }];
            let mut prefixes = vec![&a[..a1]];
            if b1 > b0 {
                seqs.push(SeqStep {
                    tokens: &b[b0..b1],
                    context_len: b1,
                    block_table: &tabs[1],
                });
                prefixes.push(&b[..b1]);
            }
            let got = down(dev, &model.forward(dev, &mut cache, &seqs)?)?;
            let mut want = Vec::new();
            for p in &prefixes {
                want.extend(r::forward_logits(&cfg, &w, p, Some(DT)).map_err(inv)?);
            }
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = compare(&got, &want, 0.03 * scale, 0.0);
            let same_argmax = got
                .chunks(512)
                .zip(want.chunks(512))
                .all(|(g, w)| r::argmax(g) == r::argmax(w));
            let name = format!(
                "forward_{}_step{}",
                if arch == ModelArch::Qwen2 {
                    "qwen2"
                } else {
                    "llama"
                },
                i + 1
            );
            rep.add(&name, err, "abs 0.03 × max|logit|");
            rep.checks
                .push(json!({"check": format!("{name}.argmax_agrees"), "pass": same_argmax}));
        }
    }
    Ok(())
}

/// The default model's prompt "The capital of France is" and llama.cpp's first-step top-10
/// (token id, logit), from the shared fixture `smollm2-reference.json` (llama-cpp-python 0.3.36).
const PROMPT: [u32; 5] = [504, 3575, 282, 4649, 314];
const LLAMA_CPP_TOP: [(u32, f32); 5] = [
    (7042, 17.344_099),
    (260, 14.804_186),
    (4528, 13.207_772),
    (1315, 13.149_427),
    (5145, 13.120_67),
];

/// The default model (a GGUF file at `path`): its first-step logits on the GPU against the f32
/// reference forward pass on the CPU and against llama.cpp's.
fn default_model_logits(
    dev: &CudaDevice,
    model: &CudaModel,
    gguf: &Gguf,
    rep: &mut Report,
) -> Res<()> {
    let cfg = &model.cfg;
    let table: Vec<u32> = (0..4).collect();
    let mut cache = CudaKvCache::new(dev, model.kv_layout(16), 4)?;
    let seqs = [SeqStep {
        tokens: &PROMPT,
        context_len: PROMPT.len(),
        block_table: &table,
    }];
    let got = down(dev, &model.forward(dev, &mut cache, &seqs)?)?;
    let want = r::forward_logits(cfg, gguf, &PROMPT, None)
        .map_err(|e| CudaError::Invalid(e.to_string()))?;
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    rep.add(
        "default_model_logits_vs_cpu_f32",
        compare(&got, &want, 0.05 * scale, 0.0),
        "abs 0.05 × max|logit|",
    );
    let vs_llama: Vec<f32> = LLAMA_CPP_TOP
        .iter()
        .map(|&(i, _)| got[i as usize])
        .collect();
    let llama: Vec<f32> = LLAMA_CPP_TOP.iter().map(|p| p.1).collect();
    rep.add(
        "default_model_top5_vs_llama_cpp",
        compare(&vs_llama, &llama, 0.5, 0.0),
        "abs 0.5",
    );
    let top1 = r::argmax(&got) as u32 == LLAMA_CPP_TOP[0].0;
    rep.add(
        "default_model_greedy_token",
        (if top1 { 0.0 } else { f32::INFINITY }, top1),
        "equal to llama.cpp's",
    );
    Ok(())
}

/// Decode tokens/s at batch 1, 16, 64: a 128-token prompt per sequence, then 32 greedy decode
/// steps (argmax on the GPU, ids back to the host each step, as a serving loop does).
fn e2e_decode(dev: &CudaDevice, model: &CudaModel, label: &str) -> Res<Value> {
    let cfg = &model.cfg;
    let mut rng = Rng(9);
    let (prompt, steps) = (128usize, 32usize);
    let mut out = json!({"model": label, "prompt": prompt, "decode_steps": steps});
    for batch in [1usize, 16, 64] {
        let (tabs, nblocks) = tables(&mut rng, batch, prompt + steps + 1, 16);
        let mut cache = CudaKvCache::new(dev, model.kv_layout(16), nblocks)?;
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|_| {
                (0..prompt)
                    .map(|_| rng.below(cfg.vocab_size) as u32)
                    .collect()
            })
            .collect();
        let seqs: Vec<SeqStep<'_>> = (0..batch)
            .map(|i| SeqStep {
                tokens: &prompts[i],
                context_len: prompt,
                block_table: &tabs[i],
            })
            .collect();
        // The engine's path: step buffers allocated once, argmax on the GPU, ids copied back.
        let mut ws = StepWorkspace::new(
            dev,
            model,
            batch * prompt,
            batch,
            prompt + steps + 1,
            model.kv_layout(16),
        )?;
        let all: Vec<usize> = (0..batch).collect();
        let tp = Instant::now();
        model.forward_into(dev, &mut cache, &mut ws, &seqs, &all)?;
        model.argmax_into(dev, &mut ws)?;
        let mut next: Vec<u32> = ws.argmax_ids().iter().map(|&i| i as u32).collect();
        let prefill_s = tp.elapsed().as_secs_f64();
        let td = Instant::now();
        for step in 0..steps {
            let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
            let seqs: Vec<SeqStep<'_>> = (0..batch)
                .map(|i| SeqStep {
                    tokens: &toks[i],
                    context_len: prompt + step + 1,
                    block_table: &tabs[i],
                })
                .collect();
            model.forward_into(dev, &mut cache, &mut ws, &seqs, &all)?;
            model.argmax_into(dev, &mut ws)?;
            next = ws.argmax_ids().iter().map(|&i| i as u32).collect();
        }
        let secs = td.elapsed().as_secs_f64();
        let tps = (batch * steps) as f64 / secs;
        println!(
            "e2e decode batch {batch}: {tps:.0} tok/s ({:.2} ms/step), prefill {:.1} ms",
            secs * 1e3 / steps as f64,
            prefill_s * 1e3
        );
        out[format!("batch_{batch}")] = json!({"tokens_per_s": tps, "ms_per_step": secs * 1e3 / steps as f64, "prefill_ms": prefill_s * 1e3});
    }
    Ok(out)
}

/// KV blocks the way the agent sizes them: free memory before loading × 0.9 − weights − the
/// activation peak (step buffers for 2,048-token steps plus what the profiling step took on top),
/// ÷ block bytes (block size 16).
fn kv_sizing(dev: &CudaDevice, model: &CudaModel, free_before: u64) -> Res<Value> {
    let layout = model.kv_layout(16);
    let tokens = 2048;
    let mut ws = StepWorkspace::new(dev, model, tokens, 256, 8192, layout)?;
    let reading = model.profile_step(dev, &mut ws)?;
    let peak = kvroute_engine::kernels::layout::activation_peak(&reading);
    drop(ws);
    let budget = kvroute_engine::kernels::layout::MemoryBudget {
        free_bytes: free_before,
        utilization: 0.9,
        weight_bytes: model.weight_bytes,
        activation_peak_bytes: peak,
    };
    let blocks = kvroute_engine::kernels::layout::kv_blocks(&budget, &layout)
        .map_err(|e| CudaError::Invalid(e.to_string()))?;
    println!(
        "KV sizing: free {} MiB, weights {} MiB, step buffers {} MiB, activation peak {} MiB ({tokens} tokens) -> {blocks} blocks of {} KiB",
        free_before >> 20,
        model.weight_bytes >> 20,
        reading.workspace_bytes >> 20,
        peak >> 20,
        layout.block_bytes() >> 10
    );
    Ok(
        json!({"free_before_load": free_before, "utilization": 0.9, "weight_bytes": model.weight_bytes,
        "profile": {"workspace_bytes": reading.workspace_bytes, "pool_used_before": reading.pool_used_before,
        "pool_high": reading.pool_high, "pool_reserved_before": reading.pool_reserved_before,
        "pool_reserved_after": reading.pool_reserved_after, "free_before": reading.free_before, "free_after": reading.free_after},
        "activation_peak_bytes": peak, "peak_step_tokens": tokens, "block_bytes": layout.block_bytes(), "blocks": blocks}),
    )
}

fn model_run(path: Option<&str>, rep: &mut Report) -> Res<Value> {
    let inv = |e: String| CudaError::Invalid(e);
    if let Some(p) = path {
        let gguf = Gguf::open(p).map_err(|e| inv(format!("{p}: {e}")))?;
        let cfg = ModelConfig::from_gguf(&gguf).map_err(|e| inv(e.to_string()))?;
        let dev = CudaDevice::open(
            0,
            &KernelConfig::new(cfg.head_dim, cfg.num_heads, cfg.num_kv_heads)?,
        )?;
        let (free_before, _) = dev.mem_info()?;
        let model = CudaModel::load(&dev, &cfg, &gguf, DT)?;
        default_model_logits(&dev, &model, &gguf, rep)?;
        let sizing = kv_sizing(&dev, &model, free_before as u64)?;
        let mut v = e2e_decode(&dev, &model, &format!("{p} (weights dequantized to bf16)"))?;
        v["kv_sizing"] = sizing;
        Ok(v)
    } else {
        let cfg = model_cfg(ModelArch::Llama, 49_152, 576, 1536, 30, (9, 3), 64);
        let dev = CudaDevice::open(0, &KernelConfig::new(64, 9, 3)?)?;
        let (free_before, _) = dev.mem_info()?;
        let w = r::SyntheticWeights::new(&cfg, 3, GgmlType::Q8_0);
        let model = CudaModel::load(&dev, &cfg, &w, DT)?;
        rep.checks.push(json!({"check": "default_model_logits", "pass": null, "note": "not run: no --model GGUF given"}));
        let sizing = kv_sizing(&dev, &model, free_before as u64)?;
        let label = "synthetic Q8_0 weights, SmolLM2-135M shapes (30 layers, hidden 576, 9/3 heads, head_dim 64, vocab 49152)";
        let mut v = e2e_decode(&dev, &model, label)?;
        v["kv_sizing"] = sizing;
        Ok(v)
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dry = args.iter().any(|a| a == "--dry-run");
    let out_dir = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| std::env::var("OUT").ok())
        .unwrap_or_else(|| ".".into());
    let model_path = args
        .iter()
        .position(|a| a == "--model")
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| {
            std::env::var("KVROUTE_MODEL_PATH")
                .ok()
                .filter(|p| !p.is_empty())
        });
    let mut result = json!({"tool": "kvroute gpu_check", "dry_run": dry, "model": model_path});
    let code = run(dry, model_path, &mut result);
    let path = std::path::Path::new(&out_dir).join("gpu_check.json");
    match serde_json::to_string_pretty(&result).map(|s| std::fs::write(&path, s)) {
        Ok(Ok(())) => println!("wrote {}", path.display()),
        _ => eprintln!("could not write {}", path.display()),
    }
    code
}

fn run(dry: bool, model_path: Option<String>, result: &mut Value) -> ExitCode {
    // 1. NVRTC, for Hopper: needs no GPU.
    let nvrtc = match Nvrtc::global() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("gpu_check: {e}");
            result["error"] = json!(e.to_string());
            return ExitCode::from(2);
        }
    };
    let cfg = match KernelConfig::new(128, 32, 8) {
        Ok(c) => c,
        Err(e) => return fail(result, &e.to_string()),
    };
    let t = Instant::now();
    for src in kernels::SOURCES {
        if let Err(e) = nvrtc.compile(
            src.name,
            &kernels::full_source(src),
            &kernels::compile_options(Arch::SM90, &cfg),
        ) {
            return fail(result, &e.to_string());
        }
    }
    println!(
        "NVRTC {:?} from {} compiled every kernel for sm_90 in {:.1} s",
        nvrtc.version(),
        nvrtc.path().display(),
        t.elapsed().as_secs_f32()
    );
    result["nvrtc"] = json!({"version": format!("{}.{}", nvrtc.version().0, nvrtc.version().1), "path": nvrtc.path().display().to_string()});

    // The model file, read and checked on the host.
    if let Some(p) = model_path.as_deref() {
        let checked = Gguf::open(p).map_err(|e| e.to_string()).and_then(|g| {
            let c = ModelConfig::from_gguf(&g).map_err(|e| e.to_string())?;
            KernelConfig::new(c.head_dim, c.num_heads, c.num_kv_heads)
                .map_err(|e| e.to_string())?;
            Ok(c)
        });
        match checked {
            Ok(c) => println!(
                "model {p}: {} layers, hidden {}, {}/{} heads, head_dim {}",
                c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
            ),
            Err(e) => return fail(result, &format!("model {p}: {e}")),
        }
    }

    // 2. The GPU.
    if dry {
        println!(
            "dry run: stopping before the GPU (driver present: {})",
            cuda::driver_present()
        );
        result["stopped"] = json!("dry run: before opening the GPU");
        return ExitCode::SUCCESS;
    }
    let dev = match CudaDevice::open(0, &cfg) {
        Ok(d) => d,
        Err(e) => return fail(result, &format!("cannot open the GPU: {e}")),
    };
    let (free, total) = dev.mem_info().unwrap_or((0, 0));
    println!(
        "device: {} ({}), {} SMs, L2 {} MiB, memory {} / {} MiB free",
        dev.name,
        dev.arch,
        dev.sm_count,
        dev.l2_bytes >> 20,
        free >> 20,
        total >> 20
    );
    result["device"] = json!({"name": dev.name, "arch": dev.arch.to_string(), "sm_count": dev.sm_count, "l2_bytes": dev.l2_bytes, "total_bytes": total});

    let mut rep = Report {
        checks: Vec::new(),
        failed: 0,
    };
    let num = numerics(&dev, &cfg, &mut rep).and_then(|()| forward_numerics(&dev, &mut rep));
    result["numerics"] = json!(rep.checks);
    if let Err(e) = num {
        return fail(result, &format!("numerics: {e}"));
    }
    match bandwidth(&dev) {
        Ok(v) => result["decode_bandwidth"] = v,
        Err(e) => return fail(result, &format!("bandwidth: {e}")),
    }
    // The default model (when its GGUF is given) or a synthetic model of its shape, with kernels
    // compiled for head_dim 64 / GQA 3.
    match model_run(model_path.as_deref(), &mut rep) {
        Ok(v) => result["e2e_decode"] = v,
        Err(e) => {
            eprintln!("gpu_check: model run: {e}");
            result["e2e_decode"] = json!({"error": e.to_string()});
            rep.failed += 1;
        }
    }
    result["numerics"] = json!(rep.checks);
    result["numerics_failed"] = json!(rep.failed);
    if rep.failed > 0 {
        eprintln!("gpu_check: {} numerics check(s) failed", rep.failed);
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

fn fail(result: &mut Value, msg: &str) -> ExitCode {
    eprintln!("gpu_check: {msg}");
    result["error"] = json!(msg);
    ExitCode::from(2)
}
