//! The paged KV cache's layout on the GPU, and how many blocks fit (sized like vLLM).
//!
//! Per layer, one K and one V buffer, each `[num_blocks][num_kv_heads][block_size][head_dim]`:
//! a (block, KV head) is one contiguous run, a token's head vector is `head_dim` contiguous
//! elements, so attention reads whole 16-byte vectors and whole blocks. Block ids are the KV
//! core's (`engine::kv`); this module only turns them into offsets and bytes.

/// Shape of the paged KV cache of one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedKvLayout {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Bytes per element (2 for bf16/f16).
    pub elem_bytes: usize,
}

impl PagedKvLayout {
    /// Elements in one block of one layer's K (or V) buffer.
    pub fn block_elems(&self) -> usize {
        self.num_kv_heads * self.block_size * self.head_dim
    }

    /// Bytes one block takes across all layers, K and V.
    pub fn block_bytes(&self) -> u64 {
        2 * self.num_layers as u64 * self.block_elems() as u64 * self.elem_bytes as u64
    }

    /// Element offset of token `slot` (0..block_size) of KV head `head` in block `block`, within
    /// one layer's K or V buffer.
    pub fn offset(&self, block: usize, head: usize, slot: usize) -> usize {
        ((block * self.num_kv_heads + head) * self.block_size + slot) * self.head_dim
    }

    /// The slot-mapping value (`block * block_size + offset`) of the token at `pos` of a sequence
    /// whose blocks are `block_table`; `None` past the table's end.
    pub fn slot(&self, block_table: &[u32], pos: usize) -> Option<i64> {
        let block = *block_table.get(pos / self.block_size)?;
        Some(block as i64 * self.block_size as i64 + (pos % self.block_size) as i64)
    }

    /// Elements of one layer's K (or V) buffer holding `num_blocks` blocks.
    pub fn layer_elems(&self, num_blocks: usize) -> Option<usize> {
        num_blocks.checked_mul(self.block_elems())
    }
}

/// What KV sizing needs to know, all in bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryBudget {
    /// Free device memory measured before the model was loaded.
    pub free_bytes: u64,
    /// Share of that memory kvroute may use (`--gpu-memory-utilization`), in (0, 1].
    pub utilization: f64,
    /// Device memory the weights take.
    pub weight_bytes: u64,
    /// Peak memory of a forward pass at the largest batch, measured by a profiling run.
    pub activation_peak_bytes: u64,
}

/// Most KV blocks a GPU cache may have: the kernels take block ids as `i32`.
pub const MAX_GPU_BLOCKS: u64 = i32::MAX as u64;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SizingError {
    #[error("--gpu-memory-utilization {0} must be in (0, 1]")]
    Utilization(f64),
    #[error(
        "--gpu-memory-utilization {utilization}: no room for the KV cache: {utilization} × {} free \
         = {} usable, minus weights {} and activation peak {} leaves {}, and one KV block takes {} \
         (raise --gpu-memory-utilization, lower --max-num-seqs or --max-model-len, or free the GPU)",
        mib(*free), mib(*usable), mib(*weights), mib(*activations), mib(*left), mib(*block)
    )]
    NoRoom {
        usable: u64,
        utilization: f64,
        free: u64,
        weights: u64,
        activations: u64,
        left: u64,
        block: u64,
    },
    #[error(
        "--kv-memory {}: {} KV block(s) of {} do not fit in the {} left on the GPU after the \
         weights and activations",
        mib(*requested), blocks, mib(*block), mib(*available)
    )]
    TooMuch {
        requested: u64,
        blocks: u64,
        block: u64,
        available: u64,
    },
    #[error("--kv-memory {}: less than one KV block ({})", mib(*requested), mib(*block))]
    LessThanABlock { requested: u64, block: u64 },
}

/// A byte count for messages: MiB with two decimals and the exact bytes.
pub fn mib(bytes: u64) -> String {
    format!(
        "{:.2} MiB ({bytes} bytes)",
        bytes as f64 / (1u64 << 20) as f64
    )
}

/// Number of KV blocks that fit: `(free × utilization − weights − activation peak) / block bytes`,
/// vLLM's rule, capped at [`MAX_GPU_BLOCKS`]. At least one block must fit, else an error that
/// names the flag and every number that went in.
pub fn kv_blocks(budget: &MemoryBudget, layout: &PagedKvLayout) -> Result<u64, SizingError> {
    let u = budget.utilization;
    if !(u > 0.0 && u <= 1.0) {
        return Err(SizingError::Utilization(u));
    }
    // f64 holds byte counts exactly up to 2^53 (8 PiB).
    let usable = (budget.free_bytes as f64 * u).floor() as u64;
    let block = layout.block_bytes();
    let left = usable
        .saturating_sub(budget.weight_bytes)
        .saturating_sub(budget.activation_peak_bytes);
    let blocks = left.checked_div(block).unwrap_or(0);
    if blocks == 0 {
        return Err(SizingError::NoRoom {
            usable,
            utilization: u,
            free: budget.free_bytes,
            weights: budget.weight_bytes,
            activations: budget.activation_peak_bytes,
            left,
            block,
        });
    }
    Ok(blocks.min(MAX_GPU_BLOCKS))
}

/// Number of KV blocks in a fixed budget of `requested` bytes (`--kv-memory` on the GPU), checked
/// against the `available` device memory once the weights and activations are in place.
pub fn kv_blocks_for_bytes(
    requested: u64,
    available: u64,
    layout: &PagedKvLayout,
) -> Result<u64, SizingError> {
    let block = layout.block_bytes();
    let blocks = requested.checked_div(block).unwrap_or(0);
    if blocks == 0 {
        return Err(SizingError::LessThanABlock { requested, block });
    }
    if blocks.saturating_mul(block) > available {
        return Err(SizingError::TooMuch {
            requested,
            blocks,
            block,
            available,
        });
    }
    Ok(blocks.min(MAX_GPU_BLOCKS))
}

/// Device-memory readings around the profiling step (one step of the largest size, run once at
/// start with the step buffers and a scratch KV cache already allocated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProfileReading {
    /// Bytes of the step buffers the runner keeps for its whole life.
    pub workspace_bytes: u64,
    /// Stream-ordered pool: bytes in use just before the step, and its high-water mark during it.
    pub pool_used_before: u64,
    pub pool_high: u64,
    /// Stream-ordered pool: bytes reserved from the device before and after the step.
    pub pool_reserved_before: u64,
    pub pool_reserved_after: u64,
    /// Free device memory (`cuMemGetInfo`) before and after the step.
    pub free_before: u64,
    pub free_after: u64,
}

/// The activation peak a step may need on top of the weights and the KV cache: the step buffers,
/// what the step took from the pool for a moment, and what it took from outside the pool and kept
/// (cuBLAS's workspace, allocated on first use).
pub fn activation_peak(r: &ProfileReading) -> u64 {
    let pool_transient = r.pool_high.saturating_sub(r.pool_used_before);
    let device_growth = r.free_before.saturating_sub(r.free_after);
    let pool_growth = r.pool_reserved_after.saturating_sub(r.pool_reserved_before);
    let outside_pool = device_growth.saturating_sub(pool_growth);
    r.workspace_bytes
        .saturating_add(pool_transient)
        .saturating_add(outside_pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama8b() -> PagedKvLayout {
        PagedKvLayout {
            num_layers: 32,
            num_kv_heads: 8,
            head_dim: 128,
            block_size: 16,
            elem_bytes: 2,
        }
    }

    #[test]
    fn block_bytes_count_k_and_v_of_every_layer() {
        // 2 (K,V) × 32 layers × 8 heads × 16 tokens × 128 × 2 bytes = 2 MiB: vLLM's figure for
        // Llama-3-8B at block size 16.
        assert_eq!(llama8b().block_bytes(), 2 * 1024 * 1024);
    }

    #[test]
    fn offsets_are_block_major_then_head_then_slot_and_never_overlap() {
        let l = PagedKvLayout {
            num_layers: 1,
            num_kv_heads: 3,
            head_dim: 8,
            block_size: 4,
            elem_bytes: 2,
        };
        let mut seen = std::collections::HashSet::new();
        for b in 0..5 {
            for h in 0..3 {
                for s in 0..4 {
                    let o = l.offset(b, h, s);
                    assert_eq!(o % 8, 0);
                    assert!(seen.insert(o), "offset {o} twice");
                    assert!(o + 8 <= l.layer_elems(5).unwrap());
                }
            }
        }
        assert_eq!(l.offset(1, 0, 0), l.block_elems());
        assert_eq!(l.offset(0, 1, 0), 4 * 8);
        assert_eq!(l.offset(0, 0, 1), 8);
    }

    #[test]
    fn slots_follow_the_block_table() {
        let l = llama8b();
        let table = [7u32, 2, 9];
        assert_eq!(l.slot(&table, 0), Some(7 * 16));
        assert_eq!(l.slot(&table, 17), Some(2 * 16 + 1));
        assert_eq!(l.slot(&table, 47), Some(9 * 16 + 15));
        assert_eq!(l.slot(&table, 48), None);
    }

    #[test]
    fn kv_blocks_follow_vllms_rule() {
        let gib = 1u64 << 30;
        let b = MemoryBudget {
            free_bytes: 140 * gib,
            utilization: 0.9,
            weight_bytes: 16 * gib,
            activation_peak_bytes: 2 * gib,
        };
        // 140 × 0.9 = 126 GiB; − 18 GiB = 108 GiB; / 2 MiB = 55,296 blocks.
        assert_eq!(kv_blocks(&b, &llama8b()), Ok(55_296));
    }

    #[test]
    fn kv_sizing_errors_name_the_flag_and_the_numbers() {
        let gib = 1u64 << 30;
        let b = MemoryBudget {
            free_bytes: 10 * gib,
            utilization: 0.5,
            weight_bytes: 6 * gib,
            activation_peak_bytes: 0,
        };
        let e = kv_blocks(&b, &llama8b()).unwrap_err();
        assert!(matches!(e, SizingError::NoRoom { left: 0, .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.starts_with("--gpu-memory-utilization 0.5: no room"),
            "{msg}"
        );
        for n in ["10240.00 MiB", "5120.00 MiB", "6144.00 MiB", "2.00 MiB"] {
            assert!(msg.contains(n), "{n} missing from {msg}");
        }
        for u in [0.0, -0.1, 1.01, f64::NAN, f64::INFINITY] {
            let b = MemoryBudget {
                utilization: u,
                ..b
            };
            let e = kv_blocks(&b, &llama8b()).unwrap_err();
            assert!(matches!(e, SizingError::Utilization(_)), "{u}: {e:?}");
            assert!(e.to_string().starts_with("--gpu-memory-utilization"));
        }
    }

    #[test]
    fn kv_sizing_edges() {
        let l = llama8b();
        let block = l.block_bytes();
        let at = |free: u64, weights: u64, act: u64| {
            kv_blocks(
                &MemoryBudget {
                    free_bytes: free,
                    utilization: 1.0,
                    weight_bytes: weights,
                    activation_peak_bytes: act,
                },
                &l,
            )
        };
        // Exactly one block left; one byte short of it; activations alone overflow the budget.
        assert_eq!(at(100 + block, 60, 40), Ok(1));
        assert!(matches!(
            at(100 + block - 1, 60, 40),
            Err(SizingError::NoRoom { .. })
        ));
        assert!(matches!(
            at(100, 0, u64::MAX),
            Err(SizingError::NoRoom { .. })
        ));
        assert!(matches!(at(0, 0, 0), Err(SizingError::NoRoom { .. })));
        // A partial block is never counted; an absurd budget is capped at the kernels' id range.
        assert_eq!(at(3 * block - 1, 0, 0), Ok(2));
        let tiny = PagedKvLayout {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 8,
            block_size: 1,
            elem_bytes: 2,
        };
        let huge = MemoryBudget {
            free_bytes: 1 << 50,
            utilization: 1.0,
            weight_bytes: 0,
            activation_peak_bytes: 0,
        };
        assert_eq!(kv_blocks(&huge, &tiny), Ok(MAX_GPU_BLOCKS));
    }

    #[test]
    fn a_fixed_kv_budget_on_the_gpu_must_fit() {
        let l = llama8b();
        let block = l.block_bytes();
        assert_eq!(kv_blocks_for_bytes(10 * block + 5, 10 * block, &l), Ok(10));
        let e = kv_blocks_for_bytes(11 * block, 10 * block, &l).unwrap_err();
        assert!(e.to_string().starts_with("--kv-memory 22.00 MiB"), "{e}");
        assert!(matches!(e, SizingError::TooMuch { blocks: 11, .. }));
        let e = kv_blocks_for_bytes(block - 1, u64::MAX, &l).unwrap_err();
        assert!(matches!(e, SizingError::LessThanABlock { .. }), "{e}");
    }

    #[test]
    fn the_activation_peak_adds_workspace_pool_transients_and_outside_growth() {
        let mib = 1u64 << 20;
        let r = ProfileReading {
            workspace_bytes: 100 * mib,
            pool_used_before: 1000 * mib,
            pool_high: 1030 * mib,
            pool_reserved_before: 1000 * mib,
            pool_reserved_after: 1000 * mib,
            free_before: 5000 * mib,
            free_after: 4968 * mib,
        };
        // 100 held + 30 taken from the pool for a moment + 32 taken outside it (cuBLAS).
        assert_eq!(activation_peak(&r), 162 * mib);
        // Pool growth the device saw is not counted twice.
        let r2 = ProfileReading {
            pool_reserved_after: 1030 * mib,
            free_after: 4938 * mib,
            ..r
        };
        assert_eq!(activation_peak(&r2), 162 * mib);
        // Memory freed during the step (free went up) never makes the peak smaller than the buffers.
        let r3 = ProfileReading {
            free_after: 6000 * mib,
            pool_high: 0,
            ..r
        };
        assert_eq!(activation_peak(&r3), 100 * mib);
    }
}
