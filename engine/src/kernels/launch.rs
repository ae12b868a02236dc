//! Launch shapes: grid and block sizes, decode partitions, scratch sizes, and the checks that
//! keep a kernel from reading outside its buffers. Pure arithmetic, mirrored by the `.cu` sources
//! (whose comments state the grid each kernel expects).

use super::{KernelConfig, DECODE_THREADS, PREFILL_ROWS, PREFILL_THREADS};

/// A kernel launch's grid and block, in CUDA's (x, y, z) order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
}

/// CUDA's limit on grid.y and grid.z.
const GRID_YZ_MAX: usize = 65_535;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("{what} = {value} exceeds the launch limit {limit}")]
    TooLarge {
        what: &'static str,
        value: usize,
        limit: usize,
    },
    #[error("prefill attention supports head_dim up to 128, not {0}")]
    PrefillHeadDim(usize),
    #[error("sequence {seq}: {detail}")]
    BadSequence { seq: usize, detail: String },
}

fn fits(what: &'static str, value: usize, limit: usize) -> Result<u32, ShapeError> {
    if value > limit {
        return Err(ShapeError::TooLarge { what, value, limit });
    }
    u32::try_from(value).map_err(|_| ShapeError::TooLarge { what, value, limit })
}

/// How one decode step's attention is split up (flash-decoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodePlan {
    /// Tokens per split (a multiple of 32, at most the config's `max_partition`).
    pub partition: usize,
    /// Splits of the longest context; grid.x of the decode kernel.
    pub max_splits: usize,
    pub decode: Dims,
    pub reduce: Dims,
    /// f32 elements of the partial-output scratch: seqs × heads × max_splits × head_dim.
    pub tmp_out_elems: usize,
    /// f32 elements of each of the max-logit and exp-sum scratch buffers.
    pub stats_elems: usize,
}

/// Smallest partition the decode planner picks: below this the reduce step and partial outputs
/// cost more than the parallelism gains.
pub const MIN_PARTITION: usize = 128;

/// Plans the decode kernels for `num_seqs` sequences whose longest context is `max_context`, on a
/// device with `sm_count` multiprocessors. Picks the largest partition that still gives at least
/// two blocks per multiprocessor, so short batches of long sequences fill the GPU too.
pub fn decode_plan(
    cfg: &KernelConfig,
    num_seqs: usize,
    num_kv_heads: usize,
    max_context: usize,
    sm_count: usize,
) -> Result<DecodePlan, ShapeError> {
    let seqs = fits("num_seqs", num_seqs, GRID_YZ_MAX)?;
    let kv = fits("num_kv_heads", num_kv_heads, GRID_YZ_MAX)?;
    let work = num_seqs * num_kv_heads;
    let target = 2 * sm_count.max(1);
    let mut partition = cfg.max_partition;
    while partition / 2 >= MIN_PARTITION
        && work * max_context.div_ceil(partition).max(1) < target
        && max_context.div_ceil(partition / 2) > max_context.div_ceil(partition)
    {
        partition /= 2;
    }
    let max_splits = max_context.div_ceil(partition).max(1);
    let splits = fits("decode splits", max_splits, i32::MAX as usize)?;
    let heads = num_kv_heads * cfg.gqa;
    let heads_x = fits("num_heads", heads, i32::MAX as usize)?;
    let rows = num_seqs * heads * max_splits;
    Ok(DecodePlan {
        partition,
        max_splits,
        decode: Dims {
            grid: (splits, kv, seqs),
            block: (DECODE_THREADS as u32, 1, 1),
        },
        reduce: Dims {
            grid: (heads_x, seqs, 1),
            block: (cfg.head_dim.min(128) as u32, 1, 1),
        },
        tmp_out_elems: rows * cfg.head_dim,
        stats_elems: rows,
    })
}

/// The decode scratch (f32 elements of the partial outputs, and of each statistics buffer) that
/// covers every [`decode_plan`] of at most `max_seqs` sequences with contexts up to
/// `max_context`: what a runner allocates once at start.
///
/// Without halving, a plan has at most `ceil(max_context / max_partition)` splits. The planner
/// halves the partition only while `seqs × kv_heads × splits < 2 × sm_count`, and a halving at
/// most doubles the splits, so a halved plan has fewer than `2 × (2 × sm_count)` (seq, KV head,
/// split) items.
pub fn decode_scratch_bound(
    cfg: &KernelConfig,
    max_seqs: usize,
    num_kv_heads: usize,
    max_context: usize,
    sm_count: usize,
) -> (usize, usize) {
    let target = 2 * sm_count.max(1);
    let unhalved = max_seqs
        .saturating_mul(num_kv_heads)
        .saturating_mul(max_context.div_ceil(cfg.max_partition.max(1)).max(1));
    let rows = unhalved.max(2 * target).saturating_mul(cfg.gqa);
    (rows.saturating_mul(cfg.head_dim), rows)
}

/// Grid of the prefill-attention kernel for a batch whose longest query chunk is `max_q_len`.
pub fn prefill_dims(
    cfg: &KernelConfig,
    num_seqs: usize,
    num_kv_heads: usize,
    max_q_len: usize,
) -> Result<Dims, ShapeError> {
    if !cfg.prefill_supported() {
        return Err(ShapeError::PrefillHeadDim(cfg.head_dim));
    }
    let x = fits(
        "prefill row blocks",
        (max_q_len * cfg.gqa).div_ceil(PREFILL_ROWS).max(1),
        i32::MAX as usize,
    )?;
    Ok(Dims {
        grid: (
            x,
            fits("num_kv_heads", num_kv_heads, GRID_YZ_MAX)?,
            fits("num_seqs", num_seqs, GRID_YZ_MAX)?,
        ),
        block: (PREFILL_THREADS as u32, 1, 1),
    })
}

/// One block per row (norms, embedding, sampling), `threads` per block.
pub fn per_row(rows: usize, threads: u32) -> Result<Dims, ShapeError> {
    Ok(Dims {
        grid: (fits("rows", rows, i32::MAX as usize)?, 1, 1),
        block: (threads, 1, 1),
    })
}

/// Threads per block for a row reduction over `width` elements: a multiple of 32, 64 to 1024.
pub fn row_threads(width: usize) -> u32 {
    (width.div_ceil(4).next_multiple_of(32)).clamp(64, 1024) as u32
}

/// A grid-stride launch over `n` elements: 256 threads, at most 8 blocks per multiprocessor.
pub fn grid_stride(n: usize, sm_count: usize) -> Dims {
    let blocks = n.div_ceil(256).clamp(1, 8 * sm_count.max(1)) as u32;
    Dims {
        grid: (blocks, 1, 1),
        block: (256, 1, 1),
    }
}

/// Checks a batch's block tables before the attention kernels trust them: every context fits its
/// table row, every block id it uses is below `num_blocks`. `block_tables` is row-major with
/// `max_blocks_per_seq` ids per sequence.
pub fn check_block_tables(
    block_tables: &[i32],
    max_blocks_per_seq: usize,
    context_lens: &[i32],
    block_size: usize,
    num_blocks: usize,
) -> Result<(), ShapeError> {
    if block_tables.len() != context_lens.len() * max_blocks_per_seq {
        return Err(ShapeError::BadSequence {
            seq: 0,
            detail: format!(
                "block table has {} ids, expected {} × {max_blocks_per_seq}",
                block_tables.len(),
                context_lens.len()
            ),
        });
    }
    for (seq, &ctx) in context_lens.iter().enumerate() {
        let bad = |detail: String| ShapeError::BadSequence { seq, detail };
        let ctx =
            usize::try_from(ctx).map_err(|_| bad(format!("negative context length {ctx}")))?;
        let used = ctx.div_ceil(block_size);
        if used > max_blocks_per_seq {
            return Err(bad(format!(
                "context {ctx} needs {used} blocks, table holds {max_blocks_per_seq}"
            )));
        }
        let row = &block_tables[seq * max_blocks_per_seq..seq * max_blocks_per_seq + used];
        if let Some(&b) = row.iter().find(|&&b| b < 0 || b as usize >= num_blocks) {
            return Err(bad(format!(
                "block id {b} outside the pool of {num_blocks}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> KernelConfig {
        KernelConfig::new(128, 32, 8).unwrap()
    }

    #[test]
    fn the_benchmark_batch_uses_full_partitions() {
        // 64 seqs × 4,096 tokens × 8 KV heads on an H200 (132 SMs).
        let p = decode_plan(&cfg(), 64, 8, 4096, 132).unwrap();
        assert_eq!(p.partition, 512);
        assert_eq!(p.max_splits, 8);
        assert_eq!(p.decode.grid, (8, 8, 64));
        assert_eq!(p.decode.block, (128, 1, 1));
        assert_eq!(p.reduce.grid, (32, 64, 1));
        assert_eq!(p.tmp_out_elems, 64 * 32 * 8 * 128);
        assert_eq!(p.stats_elems, 64 * 32 * 8);
    }

    #[test]
    fn a_lone_long_sequence_gets_smaller_partitions_to_fill_the_gpu() {
        let p = decode_plan(&cfg(), 1, 8, 4096, 132).unwrap();
        assert_eq!(p.partition, MIN_PARTITION);
        assert_eq!(p.max_splits, 32);
        // Short contexts are not split finer than they need.
        let p = decode_plan(&cfg(), 1, 8, 100, 132).unwrap();
        assert_eq!(p.max_splits, 1);
    }

    #[test]
    fn every_token_lands_in_exactly_one_split() {
        for ctx in [0usize, 1, 31, 128, 513, 4096, 10_000] {
            for seqs in [1usize, 3, 64] {
                let p = decode_plan(&cfg(), seqs, 8, ctx, 132).unwrap();
                assert!(p.partition.is_multiple_of(32) && p.partition <= 512);
                assert!(p.max_splits * p.partition >= ctx);
                assert!(ctx == 0 || (p.max_splits - 1) * p.partition < ctx);
            }
        }
    }

    #[test]
    fn launch_limits_are_errors() {
        assert!(matches!(
            decode_plan(&cfg(), 70_000, 8, 16, 132),
            Err(ShapeError::TooLarge { .. })
        ));
        let big = KernelConfig::new(256, 8, 8).unwrap();
        assert_eq!(
            prefill_dims(&big, 1, 8, 10),
            Err(ShapeError::PrefillHeadDim(256))
        );
    }

    #[test]
    fn prefill_grid_covers_every_row() {
        let d = prefill_dims(&cfg(), 3, 8, 100).unwrap();
        // 100 tokens × 4 heads per group = 400 rows, 16 per block.
        assert_eq!(d.grid, (25, 8, 3));
        assert_eq!(prefill_dims(&cfg(), 1, 8, 0).unwrap().grid.0, 1);
    }

    #[test]
    fn row_and_grid_stride_shapes_stay_in_limits() {
        assert_eq!(row_threads(576), 160);
        assert_eq!(row_threads(10), 64);
        assert_eq!(row_threads(1 << 20), 1024);
        assert_eq!(grid_stride(1 << 30, 132).grid.0, 1056);
        assert_eq!(grid_stride(0, 132).grid.0, 1);
    }

    #[test]
    fn block_tables_are_checked_before_launch() {
        let tables = [0, 1, -1, 2, 3, 4];
        assert_eq!(check_block_tables(&tables, 3, &[17, 48], 16, 5), Ok(()));
        assert!(check_block_tables(&tables, 3, &[17, 49], 16, 5).is_err());
        assert!(check_block_tables(&tables, 3, &[33, 1], 16, 5).is_err()); // uses the -1
        assert!(check_block_tables(&tables, 3, &[1, 48], 16, 4).is_err()); // id 4 ≥ 4 blocks
        assert!(check_block_tables(&tables, 3, &[-1, 1], 16, 5).is_err());
        assert!(check_block_tables(&tables[..5], 3, &[1, 1], 16, 5).is_err());
    }
    #[test]
    fn the_decode_scratch_bound_covers_every_plan() {
        for (c, kv, sms) in [
            (cfg(), 8, 132),
            (KernelConfig::new(64, 9, 3).unwrap(), 3, 132),
            (KernelConfig::new(64, 9, 3).unwrap(), 3, 4),
        ] {
            let (max_seqs, max_ctx) = (12, 3000);
            let (tmp, stats) = decode_scratch_bound(&c, max_seqs, kv, max_ctx, sms);
            let mut worst = (0, 0);
            for seqs in 1..=max_seqs {
                for ctx in 0..=max_ctx {
                    let p = decode_plan(&c, seqs, kv, ctx, sms).unwrap();
                    assert!(
                        p.tmp_out_elems <= tmp,
                        "seqs {seqs} ctx {ctx}: {p:?} > {tmp}"
                    );
                    assert!(p.stats_elems <= stats, "seqs {seqs} ctx {ctx}");
                    worst = (worst.0.max(p.tmp_out_elems), worst.1.max(p.stats_elems));
                }
            }
            // Not wildly above what is needed: within 2× of the worst plan.
            assert!(
                tmp <= 2 * worst.0 && stats <= 2 * worst.1,
                "{tmp} vs {worst:?}"
            );
        }
    }
}
