//! The CUDA backend as the engine's step runner: opens the GPU, uploads the weights, allocates
//! the step buffers once for the largest step, sizes the KV cache like vLLM from a measured
//! profiling step, and runs the scheduler's batches.
//!
//! Owns the device, the model's weights on it, the paged KV cache and the step buffers. Block
//! accounting stays in `engine::kv`; sampling stays on the host (the greedy pick may run on the
//! GPU, see [`CudaRunner::step_greedy`]). Never panics on a batch: every id, position and block
//! is checked before a launch.

use super::model::{CudaKvCache, CudaModel, SeqStep, StepWorkspace};
use super::{CudaDevice, CudaError, Result};
use crate::config::ModelConfig;
pub use crate::kernels::device::{CudaOptions, GpuKvBudget};
use crate::kernels::layout::{self, MemoryBudget};
use crate::kernels::KernelConfig;
use crate::model::SeqInput;
use crate::weights::WeightSource;

/// The largest step the scheduler will hand the runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepLimits {
    pub block_size: usize,
    /// Most new tokens in one step.
    pub max_tokens: usize,
    /// Most sequences in one step.
    pub max_seqs: usize,
    /// Longest context (prompt + output).
    pub max_context: usize,
}

/// What the KV sizing found, logged at start.
#[derive(Debug, Clone, PartialEq)]
pub struct KvSizing {
    pub device: String,
    pub total_bytes: u64,
    /// Free device memory before the weights were loaded.
    pub free_before_load: u64,
    pub budget: GpuKvBudget,
    pub weight_bytes: u64,
    /// Step buffers, allocated once.
    pub workspace_bytes: u64,
    /// Workspace plus what the profiling step took on top.
    pub activation_peak_bytes: u64,
    pub block_bytes: u64,
    pub num_blocks: usize,
}

/// The model on one GPU, ready to run steps.
pub struct CudaRunner {
    dev: CudaDevice,
    model: CudaModel,
    cache: CudaKvCache,
    ws: StepWorkspace,
    logits: Vec<f32>,
    ids: Vec<u32>,
    logit_seqs: Vec<usize>,
    sizing: KvSizing,
}

impl CudaRunner {
    /// Opens the GPU, loads the weights, allocates the step buffers for `limits`, profiles the
    /// largest step and sizes and allocates the KV cache.
    pub fn start(
        cfg: &ModelConfig,
        weights: &dyn WeightSource,
        opts: &CudaOptions,
        limits: StepLimits,
    ) -> Result<Self> {
        let kc = KernelConfig::new(cfg.head_dim, cfg.num_heads, cfg.num_kv_heads)?;
        if !kc.prefill_supported() {
            return Err(CudaError::Invalid(format!(
                "head_dim {}: the CUDA prefill kernel supports at most 128",
                cfg.head_dim
            )));
        }
        if limits.block_size == 0 {
            return Err(CudaError::Invalid("KV block size is 0".into()));
        }
        let dev = CudaDevice::open(opts.ordinal, &kc)?;
        let (free_before_load, total) = dev.mem_info()?;
        let model = CudaModel::load(&dev, cfg, weights, opts.dtype)?;
        let kv_layout = model.kv_layout(limits.block_size);
        let mut ws = StepWorkspace::new(
            &dev,
            &model,
            limits.max_tokens,
            limits.max_seqs,
            limits.max_context,
            kv_layout,
        )?;
        let reading = model.profile_step(&dev, &mut ws)?;
        let peak = layout::activation_peak(&reading);
        let blocks = match opts.kv {
            GpuKvBudget::Utilization(u) => layout::kv_blocks(
                &MemoryBudget {
                    free_bytes: free_before_load as u64,
                    utilization: u,
                    weight_bytes: model.weight_bytes,
                    activation_peak_bytes: peak,
                },
                &kv_layout,
            )?,
            GpuKvBudget::Bytes(b) => {
                // What is free now already excludes the weights and the held step buffers; the
                // step's transient memory must stay free too.
                let (free_now, _) = dev.mem_info()?;
                let transient = peak.saturating_sub(ws.bytes());
                layout::kv_blocks_for_bytes(
                    b,
                    (free_now as u64).saturating_sub(transient),
                    &kv_layout,
                )?
            }
        };
        let num_blocks = usize::try_from(blocks)
            .map_err(|_| CudaError::Invalid(format!("{blocks} KV blocks")))?;
        let cache = CudaKvCache::new(&dev, kv_layout, num_blocks)?;
        dev.stream.synchronize()?;
        let sizing = KvSizing {
            device: dev.name.clone(),
            total_bytes: total as u64,
            free_before_load: free_before_load as u64,
            budget: opts.kv,
            weight_bytes: model.weight_bytes,
            workspace_bytes: ws.bytes(),
            activation_peak_bytes: peak,
            block_bytes: kv_layout.block_bytes(),
            num_blocks,
        };
        Ok(CudaRunner {
            logits: Vec::with_capacity(ws.max_seqs() * cfg.vocab_size),
            ids: Vec::with_capacity(ws.max_seqs()),
            logit_seqs: Vec::with_capacity(ws.max_seqs()),
            dev,
            model,
            cache,
            ws,
            sizing,
        })
    }

    pub fn sizing(&self) -> &KvSizing {
        &self.sizing
    }

    pub fn num_blocks(&self) -> usize {
        self.cache.num_blocks
    }

    fn run(&mut self, batch: &[SeqInput<'_>]) -> Result<()> {
        self.logit_seqs.clear();
        let mut steps = Vec::with_capacity(batch.len());
        for (i, s) in batch.iter().enumerate() {
            steps.push(SeqStep {
                tokens: s.tokens,
                context_len: s.start_pos.saturating_add(s.tokens.len()),
                block_table: s.block_table,
            });
            if s.want_logits {
                self.logit_seqs.push(i);
            }
        }
        self.model.forward_into(
            &self.dev,
            &mut self.cache,
            &mut self.ws,
            &steps,
            &self.logit_seqs,
        )
    }

    /// Runs one step; returns the logits (`vocab_size` each) of the last token of every
    /// sequence with `want_logits`, in batch order, copied to the host.
    pub fn step(&mut self, batch: &[SeqInput<'_>]) -> Result<&[f32]> {
        self.run(batch)?;
        self.model
            .logits_to_host(&self.dev, &self.ws, &mut self.logits)?;
        Ok(&self.logits)
    }

    /// Runs one step and picks each `want_logits` sequence's greedy token on the GPU (ties to
    /// the lower id, NaN never wins: the host sampler's rule); only the ids come back.
    pub fn step_greedy(&mut self, batch: &[SeqInput<'_>]) -> Result<&[u32]> {
        self.run(batch)?;
        self.model.argmax_into(&self.dev, &mut self.ws)?;
        self.ids.clear();
        self.ids
            .extend(self.ws.argmax_ids().iter().map(|&i| i.max(0) as u32));
        Ok(&self.ids)
    }
}
