//! Engine throughput measurement (what `kvroute-agent bench` reports): prefill and decode
//! tokens per second for a batch of independent sequences, as llama.cpp's `llama-batched-bench`
//! measures them (`-npp prompt_tokens -ntg gen_tokens -npl batch`).
//!
//! A benchmark measures; it asserts nothing. It drives the model runner directly (no scheduler,
//! no sampling beyond argmax) so the figures are the forward pass's.

use crate::model::{CpuRunner, Model, ModelError, SeqInput};
use crate::sample::argmax;
use std::sync::Arc;
use std::time::Instant;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchConfig {
    /// Prompt tokens per sequence.
    pub prompt_tokens: usize,
    /// Tokens generated per sequence after the prompt.
    pub gen_tokens: usize,
    /// Sequences run in parallel.
    pub batch: usize,
    /// CPU threads (0 = all available cores).
    pub threads: usize,
    /// The KV cache's element type.
    pub kv_cache_dtype: crate::model::KvCacheDtype,
}

/// Results: rates summed over the batch's sequences.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BenchResult {
    /// Prompt tokens of all sequences / time to prefill them all.
    pub prefill_tok_s: f64,
    /// Generated tokens of all sequences / time to generate them.
    pub decode_tok_s: f64,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    /// CPU time all threads of the process spent in each phase (Linux; 0 elsewhere). On a
    /// machine shared with other work, tokens per CPU-second shows the engine's own cost.
    pub prefill_cpu_secs: f64,
    pub decode_cpu_secs: f64,
    /// Peak resident memory of the process so far (0 where the OS does not say).
    pub peak_rss_bytes: u64,
}

/// Most tokens one prefill step takes (prompts of a large batch are split across steps).
const PREFILL_STEP_TOKENS: usize = 2048;
const BLOCK_SIZE: usize = 16;

/// Runs the benchmark on `model`.
pub fn run(model: Arc<Model>, cfg: BenchConfig) -> Result<BenchResult, ModelError> {
    if cfg.prompt_tokens == 0 || cfg.batch == 0 {
        return Err(ModelError::Config(
            "bench needs at least one prompt token and one sequence".into(),
        ));
    }
    let threads = if cfg.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        cfg.threads
    };
    let vocab = model.config().vocab_size as u32;
    let per_seq_blocks = (cfg.prompt_tokens + cfg.gen_tokens).div_ceil(BLOCK_SIZE);
    let max_step = PREFILL_STEP_TOKENS.max(cfg.batch).max(cfg.prompt_tokens);
    let mut runner = CpuRunner::new(
        model,
        BLOCK_SIZE,
        per_seq_blocks * cfg.batch,
        max_step,
        threads,
    )?;
    runner.set_kv_dtype(cfg.kv_cache_dtype)?;
    let tables: Vec<Vec<u32>> = (0..cfg.batch)
        .map(|s| ((s * per_seq_blocks) as u32..((s + 1) * per_seq_blocks) as u32).collect())
        .collect();
    // Distinct pseudo-random prompts (no shared prefixes), away from special tokens.
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let prompts: Vec<Vec<u32>> = (0..cfg.batch)
        .map(|_| {
            (0..cfg.prompt_tokens)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    100 + (x % (vocab.max(101) as u64 - 100)) as u32
                })
                .collect()
        })
        .collect();

    let mut last = vec![0u32; cfg.batch];
    let c0 = process_cpu_secs();
    let t0 = Instant::now();
    // Prefill: whole prompts, as many sequences per step as fit.
    let mut s = 0;
    while s < cfg.batch {
        let mut batch = Vec::new();
        let mut tokens = 0;
        while s < cfg.batch && (batch.is_empty() || tokens + cfg.prompt_tokens <= max_step) {
            batch.push(SeqInput {
                tokens: &prompts[s],
                start_pos: 0,
                block_table: &tables[s],
                want_logits: true,
            });
            tokens += cfg.prompt_tokens;
            s += 1;
        }
        let first = s - batch.len();
        let logits = runner.step(&batch)?;
        let v = vocab as usize;
        for (i, row) in logits.chunks_exact(v).enumerate() {
            last[first + i] = argmax(row);
        }
    }
    let prefill_secs = t0.elapsed().as_secs_f64();
    let c1 = process_cpu_secs();

    let t1 = Instant::now();
    let mut toks = vec![[0u32; 1]; cfg.batch];
    for step in 0..cfg.gen_tokens {
        for (t, l) in toks.iter_mut().zip(&last) {
            t[0] = *l;
        }
        let batch: Vec<SeqInput<'_>> = (0..cfg.batch)
            .map(|i| SeqInput {
                tokens: &toks[i],
                start_pos: cfg.prompt_tokens + step,
                block_table: &tables[i],
                want_logits: true,
            })
            .collect();
        let logits = runner.step(&batch)?;
        for (i, row) in logits.chunks_exact(vocab as usize).enumerate() {
            last[i] = argmax(row);
        }
    }
    let decode_secs = t1.elapsed().as_secs_f64();
    let c2 = process_cpu_secs();
    let rate = |n: usize, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    Ok(BenchResult {
        prefill_tok_s: rate(cfg.batch * cfg.prompt_tokens, prefill_secs),
        decode_tok_s: rate(cfg.batch * cfg.gen_tokens, decode_secs),
        prefill_secs,
        decode_secs,
        prefill_cpu_secs: c1 - c0,
        decode_cpu_secs: c2 - c1,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// Peak resident set size of this process (Linux `VmHWM`), 0 elsewhere.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// CPU time (user + system) of every thread of this process, from `/proc/self/task/*/schedstat`
/// (nanoseconds on the CPU); 0 where that does not exist.
pub fn process_cpu_secs() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let mut ns = 0u64;
    for e in dir.flatten() {
        if let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) {
            ns += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    ns as f64 / 1e9
}
