//! Step-time models: how long one engine step takes for the work the real scheduler planned.
//!
//! - [`Roofline`]: a GPU serving a transformer. A step reads every weight once and the KV of
//!   every token the batch attends to, and does two FLOPs per weight per token fed plus the
//!   attention products; its time is the larger of the memory time and the compute time (decode
//!   is bandwidth-bound, prefill compute-bound), at the given efficiencies, plus a fixed
//!   per-step overhead (kernel launches, sampling, the host's scheduling).
//! - [`Measured`]: a CPU agent, from `kvroute-agent bench --json` lines: prefill at the measured
//!   prompt tokens per second, decode at the measured tokens per second of the nearest batch
//!   sizes (interpolated), so the model is calibrated on the machine it describes.

use serde::Deserialize;

/// The shape of one step, as the scheduler planned it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepShape {
    /// Prompt tokens fed (prefill and chunked-prefill work).
    pub prefill_tokens: u64,
    /// Sequences fed exactly one generated token (decode).
    pub decode_seqs: u64,
    /// Tokens whose KV the step reads: every fed sequence's length after the step.
    pub context_tokens: u64,
    /// Query × key pairs of the attention (Σ over fed tokens of their position + 1).
    pub attention_pairs: u64,
}

/// A model's size, as the roofline model needs it.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    /// Parameters (e.g. 8.03e9).
    pub params: f64,
    /// Bytes per weight (2 for bf16, 1 for fp8).
    pub bytes_per_param: f64,
    pub layers: u32,
    /// Query heads × head size (the model's hidden size for most).
    pub q_dim: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    /// Bytes per KV element (2 for bf16, 1 for fp8).
    pub kv_bytes_per_elem: f64,
}

impl ModelShape {
    /// Llama 3.1 8B in bf16.
    pub const LLAMA_3_1_8B: ModelShape = ModelShape {
        params: 8.03e9,
        bytes_per_param: 2.0,
        layers: 32,
        q_dim: 4096,
        kv_heads: 8,
        head_dim: 128,
        kv_bytes_per_elem: 2.0,
    };

    /// Llama 3.1 70B in fp8 (weights and KV).
    pub const LLAMA_3_1_70B_FP8: ModelShape = ModelShape {
        params: 70.6e9,
        bytes_per_param: 1.0,
        layers: 80,
        q_dim: 8192,
        kv_heads: 8,
        head_dim: 128,
        kv_bytes_per_elem: 1.0,
    };

    /// A named preset.
    pub fn preset(name: &str) -> Option<ModelShape> {
        match name {
            "llama-3.1-8b" => Some(Self::LLAMA_3_1_8B),
            "llama-3.1-70b-fp8" => Some(Self::LLAMA_3_1_70B_FP8),
            _ => None,
        }
    }

    /// KV bytes one token takes (keys and values, every layer).
    pub fn kv_bytes_per_token(&self) -> f64 {
        2.0 * f64::from(self.layers)
            * f64::from(self.kv_heads)
            * f64::from(self.head_dim)
            * self.kv_bytes_per_elem
    }

    /// Weight bytes.
    pub fn weight_bytes(&self) -> f64 {
        self.params * self.bytes_per_param
    }
}

/// A GPU, as the roofline model needs it.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    /// Memory bandwidth, bytes per second.
    pub hbm_bytes_per_s: f64,
    /// Dense 16-bit tensor FLOP/s.
    pub flops_per_s: f64,
    /// Device memory, bytes.
    pub memory_bytes: f64,
}

impl Gpu {
    /// NVIDIA H100 SXM: 3.35 TB/s, 989 TFLOP/s dense bf16, 80 GB.
    pub const H100: Gpu = Gpu {
        hbm_bytes_per_s: 3.35e12,
        flops_per_s: 989e12,
        memory_bytes: 80e9,
    };
    /// NVIDIA H200: 4.8 TB/s, 989 TFLOP/s dense bf16, 141 GB.
    pub const H200: Gpu = Gpu {
        hbm_bytes_per_s: 4.8e12,
        flops_per_s: 989e12,
        memory_bytes: 141e9,
    };

    /// A named preset.
    pub fn preset(name: &str) -> Option<Gpu> {
        match name {
            "h100" => Some(Self::H100),
            "h200" => Some(Self::H200),
            _ => None,
        }
    }
}

/// The roofline step-time model of one GPU serving one model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Roofline {
    pub gpu: Gpu,
    pub model: ModelShape,
    /// Fraction of peak FLOP/s reached (0..=1].
    pub compute_efficiency: f64,
    /// Fraction of peak bandwidth reached (0..=1].
    pub memory_efficiency: f64,
    /// Fixed time per step, seconds.
    pub overhead_s: f64,
}

impl Roofline {
    /// Seconds one step of `shape` takes.
    pub fn step_s(&self, shape: &StepShape) -> f64 {
        let tokens = (shape.prefill_tokens + shape.decode_seqs) as f64;
        if tokens == 0.0 {
            return 0.0;
        }
        let m = &self.model;
        // Q·K and P·V: two multiply-adds per pair, per layer, over the query width.
        let attention_flops =
            4.0 * f64::from(m.layers) * f64::from(m.q_dim) * shape.attention_pairs as f64;
        let flops = 2.0 * m.params * tokens + attention_flops;
        let bytes = m.weight_bytes() + m.kv_bytes_per_token() * shape.context_tokens as f64;
        let compute = flops / (self.gpu.flops_per_s * self.compute_efficiency);
        let memory = bytes / (self.gpu.hbm_bytes_per_s * self.memory_efficiency);
        compute.max(memory) + self.overhead_s
    }

    /// KV blocks of `block_size` tokens that fit in `memory_fraction` of the GPU's memory once
    /// the weights are loaded (activations are inside the fraction left out, as vLLM's
    /// `gpu_memory_utilization`).
    pub fn kv_blocks(&self, memory_fraction: f64, block_size: u32) -> u64 {
        let free = self.gpu.memory_bytes * memory_fraction - self.model.weight_bytes();
        let per_block = self.model.kv_bytes_per_token() * f64::from(block_size);
        if free <= 0.0 || per_block <= 0.0 {
            return 0;
        }
        (free / per_block) as u64
    }
}

/// One line of `kvroute-agent bench --json`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct BenchPoint {
    pub batch: u32,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
}

/// A step-time model measured on a CPU agent (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    /// By batch, ascending; at least one point, every speed > 0.
    points: Vec<BenchPoint>,
    /// Prompt tokens per second (the mean over the points).
    prefill_tok_s: f64,
}

impl Measured {
    /// From `kvroute-agent bench --json` output: one JSON object per line (blank lines and
    /// lines that are not JSON objects, such as a heading, are skipped).
    pub fn from_bench_lines(text: &str) -> Result<Measured, String> {
        let mut points = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if !line.starts_with('{') {
                continue;
            }
            let p: BenchPoint =
                serde_json::from_str(line).map_err(|e| format!("bench line {}: {e}", i + 1))?;
            points.push(p);
        }
        Self::new(points)
    }

    /// From measured points (batch sizes distinct, speeds finite and > 0).
    pub fn new(mut points: Vec<BenchPoint>) -> Result<Measured, String> {
        if points.is_empty() {
            return Err("no bench points (expected lines of `kvroute-agent bench --json`)".into());
        }
        for p in &points {
            let ok = |v: f64| v.is_finite() && v > 0.0;
            if p.batch == 0 || !ok(p.prefill_tok_s) || !ok(p.decode_tok_s) {
                return Err(format!(
                    "bench point batch={} prefill_tok_s={} decode_tok_s={}: batch must be ≥ 1 \
                     and speeds finite and > 0",
                    p.batch, p.prefill_tok_s, p.decode_tok_s
                ));
            }
        }
        points.sort_by_key(|p| p.batch);
        if points.windows(2).any(|w| w[0].batch == w[1].batch) {
            return Err("two bench points have the same batch size".into());
        }
        let prefill_tok_s =
            points.iter().map(|p| p.prefill_tok_s).sum::<f64>() / points.len() as f64;
        Ok(Measured {
            points,
            prefill_tok_s,
        })
    }

    /// Seconds of one decode step of `batch` sequences: `batch / tokens per second`, the speed
    /// interpolated linearly between the measured batch sizes (flat beyond them).
    pub fn decode_step_s(&self, batch: u64) -> f64 {
        if batch == 0 {
            return 0.0;
        }
        let b = batch as f64;
        let speed = match self.points.iter().position(|p| u64::from(p.batch) >= batch) {
            Some(0) => self.points[0].decode_tok_s * b / f64::from(self.points[0].batch),
            Some(i) => {
                let (lo, hi) = (self.points[i - 1], self.points[i]);
                let t = (b - f64::from(lo.batch)) / f64::from(hi.batch - lo.batch);
                lo.decode_tok_s + t * (hi.decode_tok_s - lo.decode_tok_s)
            }
            None => self.points[self.points.len() - 1].decode_tok_s,
        };
        b / speed
    }

    /// Seconds one step of `shape` takes.
    pub fn step_s(&self, shape: &StepShape) -> f64 {
        shape.prefill_tokens as f64 / self.prefill_tok_s + self.decode_step_s(shape.decode_seqs)
    }
}

/// Either model.
#[derive(Debug, Clone, PartialEq)]
pub enum StepModel {
    Roofline(Roofline),
    Measured(Measured),
}

impl StepModel {
    pub fn step_s(&self, shape: &StepShape) -> f64 {
        match self {
            StepModel::Roofline(r) => r.step_s(shape),
            StepModel::Measured(m) => m.step_s(shape),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h100_8b() -> Roofline {
        Roofline {
            gpu: Gpu::H100,
            model: ModelShape::LLAMA_3_1_8B,
            compute_efficiency: 1.0,
            memory_efficiency: 1.0,
            overhead_s: 0.0,
        }
    }

    #[test]
    fn decode_is_bandwidth_bound_and_prefill_compute_bound() {
        let r = h100_8b();
        // One decode token at a short context: the weights' read dominates.
        let decode = StepShape {
            decode_seqs: 1,
            context_tokens: 100,
            attention_pairs: 100,
            ..StepShape::default()
        };
        let weights_s = 8.03e9 * 2.0 / 3.35e12;
        let t = r.step_s(&decode);
        assert!(t >= weights_s && t < weights_s * 1.01, "{t} vs {weights_s}");
        // Batching decode is nearly free until compute catches up with memory.
        let batch = StepShape {
            decode_seqs: 64,
            context_tokens: 6400,
            attention_pairs: 6400,
            ..StepShape::default()
        };
        assert!(r.step_s(&batch) < 1.5 * t);
        // A 4,096-token prefill is compute-bound: 2 × params × tokens / FLOP/s and more.
        let prefill = StepShape {
            prefill_tokens: 4096,
            context_tokens: 4096,
            attention_pairs: 4096 * 4097 / 2,
            ..StepShape::default()
        };
        let compute_s = 2.0 * 8.03e9 * 4096.0 / 989e12;
        assert!(r.step_s(&prefill) > compute_s);
        assert!(r.step_s(&prefill) > 4.0 * t);
    }

    #[test]
    fn efficiency_and_overhead_slow_a_step_as_stated() {
        let shape = StepShape {
            decode_seqs: 8,
            context_tokens: 8000,
            attention_pairs: 8000,
            ..StepShape::default()
        };
        let base = h100_8b();
        let slow = Roofline {
            memory_efficiency: 0.5,
            compute_efficiency: 0.5,
            overhead_s: 0.001,
            ..base
        };
        let expect = 2.0 * base.step_s(&shape) + 0.001;
        assert!((slow.step_s(&shape) - expect).abs() < 1e-9);
        assert_eq!(base.step_s(&StepShape::default()), 0.0);
    }

    #[test]
    fn kv_blocks_fill_what_the_weights_leave() {
        let r = h100_8b();
        // 8B bf16: 128 KiB of KV per token; 80 GB × 0.9 − 16.06 GB left.
        assert_eq!(ModelShape::LLAMA_3_1_8B.kv_bytes_per_token(), 131_072.0);
        let blocks = r.kv_blocks(0.9, 16);
        let expect = ((80e9 * 0.9 - 16.06e9) / (131_072.0 * 16.0)) as u64;
        assert_eq!(blocks, expect);
        assert!(
            h100_8b().kv_blocks(0.1, 16) == 0,
            "weights do not fit in 8 GB"
        );
        let h200 = Roofline {
            gpu: Gpu::H200,
            ..r
        };
        // 126.9 − 16.06 GB against 72 − 16.06 GB: about twice the blocks.
        let ratio = h200.kv_blocks(0.9, 16) as f64 / blocks as f64;
        assert!((1.95..2.0).contains(&ratio), "{ratio}");
    }

    #[test]
    fn measured_model_interpolates_the_bench_points() {
        let text = "batch  prefill\n\
            {\"batch\":1,\"prefill_tok_s\":400.0,\"decode_tok_s\":50.0,\"isa\":\"avx2\"}\n\
            \n\
            {\"batch\":4,\"prefill_tok_s\":600.0,\"decode_tok_s\":110.0}\n";
        let m = Measured::from_bench_lines(text).unwrap();
        assert!((m.decode_step_s(1) - 1.0 / 50.0).abs() < 1e-12);
        assert!((m.decode_step_s(4) - 4.0 / 110.0).abs() < 1e-12);
        // Batch 2: a third of the way from 50 to 110 tok/s.
        assert!((m.decode_step_s(2) - 2.0 / 70.0).abs() < 1e-12);
        // Beyond the last point: its speed.
        assert!((m.decode_step_s(8) - 8.0 / 110.0).abs() < 1e-12);
        let shape = StepShape {
            prefill_tokens: 500,
            decode_seqs: 1,
            ..StepShape::default()
        };
        assert!((m.step_s(&shape) - (1.0 + 1.0 / 50.0)).abs() < 1e-12);
    }

    #[test]
    fn bad_bench_input_is_a_clear_error() {
        for (text, want) in [
            ("", "no bench points"),
            ("{\"batch\":1}", "bench line 1"),
            (
                "{\"batch\":0,\"prefill_tok_s\":1,\"decode_tok_s\":1}",
                "batch must be",
            ),
            (
                "{\"batch\":1,\"prefill_tok_s\":-1,\"decode_tok_s\":1}",
                "finite and > 0",
            ),
            (
                "{\"batch\":2,\"prefill_tok_s\":1,\"decode_tok_s\":1}\n{\"batch\":2,\"prefill_tok_s\":1,\"decode_tok_s\":1}",
                "same batch",
            ),
        ] {
            let e = Measured::from_bench_lines(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
