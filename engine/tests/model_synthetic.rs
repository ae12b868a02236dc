#![allow(clippy::unwrap_used)]
//! The CPU forward pass on tiny random models against a naive dense f32 reference written here
//! (no paging, no batching, obviously-correct loops).

use half::f16;
use kvroute_engine::config::{Arch, ModelConfig, RopeStyle};
use kvroute_engine::model::{AttnPrecision, CpuRunner, Model, ModelError, SeqInput};
use kvroute_engine::quant::{dequantize_row, GgmlType, Isa};
use kvroute_engine::weights::{TensorView, WeightSource};
use std::collections::HashMap;
use std::sync::Arc;

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
}

struct MemSource(HashMap<String, (GgmlType, Vec<usize>, Vec<u8>)>);
impl WeightSource for MemSource {
    fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        self.0.get(name).map(|(t, s, d)| TensorView {
            dtype: *t,
            shape: s,
            data: d,
        })
    }
    fn names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
}

fn encode(t: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    match t {
        GgmlType::F32 => x
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        GgmlType::F16 => x
            .iter()
            .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        GgmlType::Q8_0 => {
            for b in x.chunks(32) {
                let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                for v in b {
                    out.push((if d > 0.0 { (v / d).round() } else { 0.0 }) as i8 as u8);
                }
            }
        }
        GgmlType::Q4_1 => {
            for b in x.chunks(32) {
                let mn = b.iter().cloned().fold(f32::INFINITY, f32::min);
                let mx = b.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let d = (mx - mn) / 15.0;
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(mn).to_le_bytes());
                let q = |v: f32| -> u8 {
                    if d > 0.0 {
                        ((v - mn) / d).round().clamp(0.0, 15.0) as u8
                    } else {
                        0
                    }
                };
                for j in 0..16 {
                    out.push(q(b[j]) | (q(b[j + 16]) << 4));
                }
            }
        }
        _ => unreachable!(),
    }
    out
}

/// A random model. `mat_type` for the big matrices, `embd_type` for the embedding.
fn build(
    cfg: &ModelConfig,
    seed: u64,
    mat_type: GgmlType,
    embd_type: GgmlType,
    tied: bool,
) -> MemSource {
    let mut rng = Rng(seed);
    let mut m = HashMap::new();
    let mut put =
        |name: String, t: GgmlType, cols: usize, rows: usize, scale: f32, rng: &mut Rng| {
            let x: Vec<f32> = (0..cols * rows).map(|_| rng.f32() * scale).collect();
            let shape = if rows == 1 {
                vec![cols]
            } else {
                vec![cols, rows]
            };
            m.insert(name, (t, shape, encode(t, &x)));
        };
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let qd = cfg.num_heads * cfg.head_dim;
    let kvd = cfg.num_kv_heads * cfg.head_dim;
    put("token_embd.weight".into(), embd_type, h, v, 1.0, &mut rng);
    if !tied {
        put("output.weight".into(), mat_type, h, v, 0.3, &mut rng);
    }
    put(
        "output_norm.weight".into(),
        GgmlType::F32,
        h,
        1,
        1.0,
        &mut rng,
    );
    for l in 0..cfg.num_layers {
        let n = |s: &str| format!("blk.{l}.{s}");
        put(n("attn_norm.weight"), GgmlType::F32, h, 1, 1.0, &mut rng);
        put(n("ffn_norm.weight"), GgmlType::F32, h, 1, 1.0, &mut rng);
        put(n("attn_q.weight"), mat_type, h, qd, 0.5, &mut rng);
        put(n("attn_k.weight"), mat_type, h, kvd, 0.5, &mut rng);
        put(n("attn_v.weight"), mat_type, h, kvd, 0.5, &mut rng);
        put(n("attn_output.weight"), mat_type, qd, h, 0.3, &mut rng);
        put(n("ffn_gate.weight"), mat_type, h, i, 0.3, &mut rng);
        put(n("ffn_up.weight"), mat_type, h, i, 0.3, &mut rng);
        put(n("ffn_down.weight"), mat_type, i, h, 0.3, &mut rng);
        if cfg.arch == Arch::Qwen2 {
            put(n("attn_q.bias"), GgmlType::F32, qd, 1, 0.5, &mut rng);
            put(n("attn_k.bias"), GgmlType::F32, kvd, 1, 0.5, &mut rng);
            put(n("attn_v.bias"), GgmlType::F32, kvd, 1, 0.5, &mut rng);
        }
    }
    MemSource(m)
}

fn tiny(arch: Arch, style: RopeStyle, tied: bool) -> ModelConfig {
    ModelConfig {
        arch,
        vocab_size: 50,
        hidden_size: 64,
        intermediate_size: 96,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rope_theta: 10000.0,
        rope_style: style,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 256,
        tie_word_embeddings: tied,
    }
}

/// The obviously-correct reference: dense f32 everything, K/V rounded to f16 as the cache stores them.
struct Reference {
    cfg: ModelConfig,
    w: HashMap<String, Vec<f32>>,
}

impl Reference {
    fn new(src: &MemSource, cfg: &ModelConfig) -> Reference {
        let mut w = HashMap::new();
        for (name, (t, shape, data)) in &src.0 {
            let mut v = vec![0.0; shape.iter().product()];
            dequantize_row(*t, data, &mut v).unwrap();
            w.insert(name.clone(), v);
        }
        Reference {
            cfg: cfg.clone(),
            w,
        }
    }

    fn matvec(&self, name: &str, x: &[f32]) -> Vec<f32> {
        let w = &self.w[name];
        let cols = x.len();
        w.chunks(cols)
            .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
            .collect()
    }

    fn norm(&self, name: &str, x: &[f32]) -> Vec<f32> {
        let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        let s = 1.0 / (ms + self.cfg.rms_norm_eps).sqrt();
        x.iter()
            .zip(&self.w[name])
            .map(|(v, g)| v * s * g)
            .collect()
    }

    fn rope(&self, x: &mut [f32], pos: usize) {
        let hd = self.cfg.head_dim;
        for head in x.chunks_mut(hd) {
            for k in 0..hd / 2 {
                let theta =
                    pos as f64 * (self.cfg.rope_theta as f64).powf(-2.0 * k as f64 / hd as f64);
                let (c, s) = (theta.cos() as f32, theta.sin() as f32);
                let (i, j) = match self.cfg.rope_style {
                    RopeStyle::Interleaved => (2 * k, 2 * k + 1),
                    RopeStyle::Neox => (k, k + hd / 2),
                };
                let (a, b) = (head[i], head[j]);
                head[i] = a * c - b * s;
                head[j] = a * s + b * c;
            }
        }
    }

    /// Logits after each token of `tokens`.
    fn run(&self, tokens: &[u32]) -> Vec<Vec<f32>> {
        let c = &self.cfg;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let group = c.num_heads / c.num_kv_heads;
        let mut ks: Vec<Vec<Vec<f32>>> = vec![Vec::new(); c.num_layers];
        let mut vs: Vec<Vec<Vec<f32>>> = vec![Vec::new(); c.num_layers];
        let mut out = Vec::new();
        for (pos, &tok) in tokens.iter().enumerate() {
            let mut x =
                self.w["token_embd.weight"][tok as usize * h..(tok as usize + 1) * h].to_vec();
            for l in 0..c.num_layers {
                let n = |s: &str| format!("blk.{l}.{s}");
                let xn = self.norm(&n("attn_norm.weight"), &x);
                let mut q = self.matvec(&n("attn_q.weight"), &xn);
                let mut k = self.matvec(&n("attn_k.weight"), &xn);
                let mut v = self.matvec(&n("attn_v.weight"), &xn);
                if c.arch == Arch::Qwen2 {
                    for (a, b) in q.iter_mut().zip(&self.w[&n("attn_q.bias")]) {
                        *a += b;
                    }
                    for (a, b) in k.iter_mut().zip(&self.w[&n("attn_k.bias")]) {
                        *a += b;
                    }
                    for (a, b) in v.iter_mut().zip(&self.w[&n("attn_v.bias")]) {
                        *a += b;
                    }
                }
                self.rope(&mut q, pos);
                self.rope(&mut k, pos);
                let r16 = |v: Vec<f32>| {
                    v.into_iter()
                        .map(|x| f16::from_f32(x).to_f32())
                        .collect::<Vec<_>>()
                };
                ks[l].push(r16(k));
                vs[l].push(r16(v));
                let mut att = vec![0.0f32; c.num_heads * hd];
                for head in 0..c.num_heads {
                    let g = head / group;
                    let qh = &q[head * hd..(head + 1) * hd];
                    let scores: Vec<f32> = (0..=pos)
                        .map(|p| {
                            qh.iter()
                                .zip(&ks[l][p][g * hd..(g + 1) * hd])
                                .map(|(a, b)| a * b)
                                .sum::<f32>()
                                / (hd as f32).sqrt()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f32 = e.iter().sum();
                    for p in 0..=pos {
                        for d in 0..hd {
                            att[head * hd + d] += e[p] / z * vs[l][p][g * hd + d];
                        }
                    }
                }
                let o = self.matvec(&n("attn_output.weight"), &att);
                for (a, b) in x.iter_mut().zip(&o) {
                    *a += b;
                }
                let xn = self.norm(&n("ffn_norm.weight"), &x);
                let g = self.matvec(&n("ffn_gate.weight"), &xn);
                let u = self.matvec(&n("ffn_up.weight"), &xn);
                let act: Vec<f32> = g
                    .iter()
                    .zip(&u)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                let d = self.matvec(&n("ffn_down.weight"), &act);
                for (a, b) in x.iter_mut().zip(&d) {
                    *a += b;
                }
            }
            let xn = self.norm("output_norm.weight", &x);
            let wname = if self.w.contains_key("output.weight") {
                "output.weight"
            } else {
                "token_embd.weight"
            };
            out.push(self.matvec(wname, &xn));
        }
        out
    }
}

fn assert_close(got: &[f32], want: &[f32], rel: f32, what: &str) {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rel * scale,
            "{what}: logit {i}: {g} vs {w} (scale {scale})"
        );
    }
}

/// Runs two sequences through the paged runner — interleaved, prefill in uneven chunks, blocks
/// shuffled — and checks every logits row against the dense reference.
fn paged_matches_dense(cfg: ModelConfig, src: MemSource, isa: Isa, prec: AttnPrecision, rel: f32) {
    let reference = Reference::new(&src, &cfg);
    let model = Arc::new(
        Model::new(Arc::new(src), cfg.clone())
            .unwrap()
            .with_isa(isa)
            .with_attention(prec),
    );
    let mut runner = CpuRunner::new(model, 4, 32, 64, 2).unwrap();
    let a: Vec<u32> = vec![3, 17, 42, 8, 8, 1, 0, 49, 23, 5, 11];
    let b: Vec<u32> = vec![7, 7, 30, 2, 19, 44, 12];
    let ref_a = reference.run(&a);
    let ref_b = reference.run(&b);
    // Non-contiguous, interleaved block ids.
    let table_a: Vec<u32> = vec![9, 2, 31, 14];
    let table_b: Vec<u32> = vec![0, 27, 5];
    // Step 1: a's first 5 tokens (prefill chunk), b's first 3.
    let logits = runner
        .step(&[
            SeqInput {
                tokens: &a[..5],
                start_pos: 0,
                block_table: &table_a,
                want_logits: true,
            },
            SeqInput {
                tokens: &b[..3],
                start_pos: 0,
                block_table: &table_b,
                want_logits: true,
            },
        ])
        .unwrap()
        .to_vec();
    let v = cfg.vocab_size;
    assert_close(&logits[..v], &ref_a[4], rel, "a after chunk 1");
    assert_close(&logits[v..2 * v], &ref_b[2], rel, "b after chunk 1");
    // Step 2: rest of a's prompt without logits, b decodes one token.
    let logits = runner
        .step(&[
            SeqInput {
                tokens: &a[5..9],
                start_pos: 5,
                block_table: &table_a,
                want_logits: false,
            },
            SeqInput {
                tokens: &b[3..4],
                start_pos: 3,
                block_table: &table_b,
                want_logits: true,
            },
        ])
        .unwrap()
        .to_vec();
    assert_eq!(logits.len(), v);
    assert_close(&logits, &ref_b[3], rel, "b decode");
    // Then both decode token by token.
    for i in 0..2 {
        let logits = runner
            .step(&[
                SeqInput {
                    tokens: &b[4 + i..5 + i],
                    start_pos: 4 + i,
                    block_table: &table_b,
                    want_logits: true,
                },
                SeqInput {
                    tokens: &a[9 + i..10 + i],
                    start_pos: 9 + i,
                    block_table: &table_a,
                    want_logits: true,
                },
            ])
            .unwrap()
            .to_vec();
        assert_close(&logits[..v], &ref_b[4 + i], rel, "b decode loop");
        assert_close(&logits[v..], &ref_a[9 + i], rel, "a decode loop");
    }
}

#[test]
fn llama_f32_weights_paged_equals_dense_reference() {
    let cfg = tiny(Arch::Llama, RopeStyle::Interleaved, true);
    for isa in Isa::available() {
        paged_matches_dense(
            cfg.clone(),
            build(&cfg, 1, GgmlType::F32, GgmlType::F32, true),
            isa,
            AttnPrecision::F32,
            1e-4,
        );
    }
}

/// llama.cpp-style attention keeps its V accumulator in f16 (11-bit mantissa): close to the f32
/// reference, not equal to it.
#[test]
fn llamacpp_attention_rounding_stays_close_to_the_dense_reference() {
    let cfg = tiny(Arch::Llama, RopeStyle::Interleaved, true);
    for isa in Isa::available() {
        paged_matches_dense(
            cfg.clone(),
            build(&cfg, 1, GgmlType::F32, GgmlType::F32, true),
            isa,
            AttnPrecision::LlamaCpp,
            5e-3,
        );
    }
}

#[test]
fn qwen2_biases_neox_f16_untied_paged_equals_dense_reference() {
    let cfg = tiny(Arch::Qwen2, RopeStyle::Neox, false);
    for isa in Isa::available() {
        paged_matches_dense(
            cfg.clone(),
            build(&cfg, 2, GgmlType::F16, GgmlType::F16, false),
            isa,
            AttnPrecision::F32,
            1e-4,
        );
    }
}

/// Quantized weights: the kernels quantize activations to 8 bits (as llama.cpp does), so the
/// reference (f32 activations) is only matched to within that rounding: a few percent.
#[test]
fn quantized_weights_are_close_to_the_reference_on_every_isa() {
    let cfg = tiny(Arch::Llama, RopeStyle::Interleaved, true);
    for isa in Isa::available() {
        paged_matches_dense(
            cfg.clone(),
            build(&cfg, 3, GgmlType::Q4_1, GgmlType::Q8_0, true),
            isa,
            AttnPrecision::LlamaCpp,
            0.05,
        );
    }
}

#[test]
fn simd_and_scalar_kernels_agree_on_a_quantized_model() {
    let cfg = tiny(Arch::Llama, RopeStyle::Interleaved, true);
    let tokens: Vec<u32> = (0..20).map(|i| (i * 7 % 50) as u32).collect();
    let table: Vec<u32> = (0..5).collect();
    let mut outs = Vec::new();
    for isa in Isa::available() {
        let src = build(&cfg, 4, GgmlType::Q4_1, GgmlType::Q8_0, true);
        let model = Arc::new(
            Model::new(Arc::new(src), cfg.clone())
                .unwrap()
                .with_isa(isa),
        );
        let mut runner = CpuRunner::new(model, 4, 8, 32, 2).unwrap();
        let l = runner
            .step(&[SeqInput {
                tokens: &tokens,
                start_pos: 0,
                block_table: &table,
                want_logits: true,
            }])
            .unwrap()
            .to_vec();
        outs.push(l);
    }
    for o in &outs[1..] {
        assert_close(o, &outs[0], 1e-3, "simd vs scalar");
    }
}

#[test]
fn bad_batches_are_errors_not_panics() {
    let cfg = tiny(Arch::Llama, RopeStyle::Interleaved, true);
    let src = build(&cfg, 5, GgmlType::F32, GgmlType::F32, true);
    let model = Arc::new(Model::new(Arc::new(src), cfg).unwrap());
    let mut r = CpuRunner::new(model, 4, 8, 16, 1).unwrap();
    let t = [1u32, 2, 3, 4, 5];
    let err = |r: &mut CpuRunner, s: SeqInput<'_>| r.step(&[s]).unwrap_err();
    assert!(matches!(
        err(
            &mut r,
            SeqInput {
                tokens: &t,
                start_pos: 0,
                block_table: &[0],
                want_logits: true
            }
        ),
        ModelError::Batch(_)
    ));
    assert!(matches!(
        err(
            &mut r,
            SeqInput {
                tokens: &t,
                start_pos: 0,
                block_table: &[0, 8],
                want_logits: true
            }
        ),
        ModelError::Batch(_)
    ));
    assert!(matches!(
        err(
            &mut r,
            SeqInput {
                tokens: &[50],
                start_pos: 0,
                block_table: &[0],
                want_logits: true
            }
        ),
        ModelError::Batch(_)
    ));
    assert!(matches!(
        err(
            &mut r,
            SeqInput {
                tokens: &[0; 17],
                start_pos: 0,
                block_table: &[0, 1, 2, 3, 4],
                want_logits: true
            }
        ),
        ModelError::Batch(_)
    ));
    assert!(matches!(
        err(
            &mut r,
            SeqInput {
                tokens: &[],
                start_pos: 0,
                block_table: &[0],
                want_logits: true
            }
        ),
        ModelError::Batch(_)
    ));
}

#[test]
fn missing_or_misshapen_tensors_are_named() {
    let cfg = tiny(Arch::Llama, RopeStyle::Interleaved, true);
    let mut src = build(&cfg, 6, GgmlType::F32, GgmlType::F32, true);
    src.0.remove("blk.1.ffn_up.weight");
    match Model::new(Arc::new(src), cfg.clone()) {
        Err(ModelError::MissingTensor(n)) => assert_eq!(n, "blk.1.ffn_up.weight"),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("built without a tensor"),
    }
    let mut src = build(&cfg, 6, GgmlType::F32, GgmlType::F32, true);
    src.0.get_mut("blk.0.attn_k.weight").unwrap().1 = vec![64, 16];
    assert!(matches!(
        Model::new(Arc::new(src), cfg.clone()),
        Err(ModelError::Shape { .. })
    ));
    let mut src = build(&cfg, 6, GgmlType::F32, GgmlType::F32, true);
    src.0.get_mut("blk.0.attn_k.weight").unwrap().2.pop();
    assert!(matches!(
        Model::new(Arc::new(src), cfg),
        Err(ModelError::Shape { .. })
    ));
}
