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

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SizingError {
    #[error("--gpu-memory-utilization {0} must be in (0, 1]")]
    Utilization(f64),
    #[error(
        "no room for the KV cache: {usable} bytes usable ({utilization} of {free} free), \
         weights {weights}, activations {activations}, one block {block}"
    )]
    NoRoom {
        usable: u64,
        utilization: f64,
        free: u64,
        weights: u64,
        activations: u64,
        block: u64,
    },
}

/// Number of KV blocks that fit: `(free × utilization − weights − activation peak) / block bytes`,
/// vLLM's rule. At least one block must fit, else an error that says why.
pub fn kv_blocks(budget: &MemoryBudget, layout: &PagedKvLayout) -> Result<u64, SizingError> {
    let u = budget.utilization;
    if !(u > 0.0 && u <= 1.0) {
        return Err(SizingError::Utilization(u));
    }
    // f64 holds byte counts exactly up to 2^53 (8 PiB).
    let usable = (budget.free_bytes as f64 * u).floor() as u64;
    let block = layout.block_bytes();
    let left = usable
        .checked_sub(budget.weight_bytes)
        .and_then(|l| l.checked_sub(budget.activation_peak_bytes))
        .unwrap_or(0);
    let blocks = left.checked_div(block).unwrap_or(0);
    if blocks == 0 {
        return Err(SizingError::NoRoom {
            usable,
            utilization: u,
            free: budget.free_bytes,
            weights: budget.weight_bytes,
            activations: budget.activation_peak_bytes,
            block,
        });
    }
    Ok(blocks)
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
    fn kv_sizing_errors_name_the_cause() {
        let gib = 1u64 << 30;
        let b = MemoryBudget {
            free_bytes: 10 * gib,
            utilization: 0.5,
            weight_bytes: 6 * gib,
            activation_peak_bytes: 0,
        };
        assert!(matches!(
            kv_blocks(&b, &llama8b()),
            Err(SizingError::NoRoom { .. })
        ));
        for u in [0.0, -0.1, 1.01, f64::NAN] {
            let b = MemoryBudget {
                utilization: u,
                ..b
            };
            assert!(matches!(
                kv_blocks(&b, &llama8b()),
                Err(SizingError::Utilization(_))
            ));
        }
    }
}
