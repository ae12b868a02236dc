//! Matrix products `out[t][r] = W[r] · x[t]` with weights kept in their quantized file format and
//! activations quantized once per step (the format the weight type pairs with), threads over
//! output rows.

use super::pool::{SyncPtr, ThreadPool};
use super::ModelError;
use crate::quant::{ActFormat, BlockQ8, BlockQ8K, GgmlType, Isa, KERNEL_ROWS};
use crate::weights::{TensorView, WeightSource};
use std::sync::Arc;

/// A weight matrix: `rows` output rows of `cols` inputs each, stored as raw ggml rows.
///
/// Points into the memory of the weight source (huge-page memory or a memory map) that the owning `Model`
/// keeps alive through an `Arc`: no copy of the weights is ever made.
pub struct Mat {
    pub dtype: GgmlType,
    pub rows: usize,
    pub cols: usize,
    row_bytes: usize,
    ptr: *const u8,
    len: usize,
    /// Keeps the bytes alive (the weight source).
    _owner: Arc<dyn WeightSource>,
}

// SAFETY: `Mat` is a read-only view into immutable memory owned by `_owner`, which is itself
// Send + Sync.
unsafe impl Send for Mat {}
// SAFETY: as above.
unsafe impl Sync for Mat {}

impl Mat {
    /// Wraps a tensor of shape `[cols, rows]` (ggml order).
    ///
    /// `owner` must be the source `view` was borrowed from: its tensor data stays at the same
    /// address, unchanged, for as long as it lives (a memory map, or heap buffers never mutated).
    pub(crate) fn new(
        name: &str,
        view: TensorView<'_>,
        owner: Arc<dyn WeightSource>,
    ) -> Result<Mat, ModelError> {
        let (cols, rows) = match view.shape {
            [c, r] => (*c, *r),
            [c] => (*c, 1),
            other => {
                return Err(ModelError::Shape {
                    name: name.to_string(),
                    detail: format!("expected a matrix, got shape {other:?}"),
                })
            }
        };
        if view.dtype.act_format().is_none() {
            return Err(ModelError::UnsupportedType {
                name: name.to_string(),
                dtype: view.dtype,
            });
        }
        let row_bytes = view
            .dtype
            .bytes_for(cols as u64)
            .ok_or_else(|| ModelError::Shape {
                name: name.to_string(),
                detail: format!(
                    "{cols} columns is not a whole number of {} blocks",
                    view.dtype
                ),
            })? as usize;
        if row_bytes.checked_mul(rows) != Some(view.data.len()) {
            return Err(ModelError::Shape {
                name: name.to_string(),
                detail: format!(
                    "{} bytes of data for {rows} rows of {row_bytes} bytes",
                    view.data.len()
                ),
            });
        }
        Ok(Mat {
            dtype: view.dtype,
            rows,
            cols,
            row_bytes,
            ptr: view.data.as_ptr(),
            len: view.data.len(),
            _owner: owner,
        })
    }

    /// The raw bytes of the whole matrix.
    #[inline]
    pub fn data(&self) -> &[u8] {
        // SAFETY: ptr/len came from a slice borrowed from `_owner`, which we keep alive and which
        // never moves or mutates that memory (the contract of `Mat::new`).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The raw bytes of row `r`.
    #[inline]
    pub fn row(&self, r: usize) -> &[u8] {
        &self.data()[r * self.row_bytes..(r + 1) * self.row_bytes]
    }
}

/// Activations of one step, quantized on demand into each format a weight type asks for.
pub struct Acts {
    cols: usize,
    n: usize,
    f32s: Vec<f32>,
    q8: Vec<BlockQ8>,
    /// Per-block scales of `q8` packed for the tile kernels: for each group of
    /// [`KERNEL_ROWS`] rows, `nb * KERNEL_ROWS` values (see `quant::pack_q8_scales`).
    q8_d: Vec<f32>,
    q8_s: Vec<f32>,
    q8k: Vec<BlockQ8K>,
    have_q8: bool,
    have_q8k: bool,
}

impl Acts {
    /// Room for `max_tokens` rows of up to `max_cols` values.
    pub fn new(max_tokens: usize, max_cols: usize) -> Acts {
        Acts {
            cols: 0,
            n: 0,
            f32s: vec![0.0; max_tokens * max_cols],
            q8: vec![BlockQ8::ZERO; max_tokens * max_cols.div_ceil(32)],
            q8_d: vec![0.0; max_tokens.div_ceil(KERNEL_ROWS) * KERNEL_ROWS * max_cols.div_ceil(32)],
            q8_s: vec![0.0; max_tokens.div_ceil(KERNEL_ROWS) * KERNEL_ROWS * max_cols.div_ceil(32)],
            q8k: Vec::new(),
            have_q8: false,
            have_q8k: false,
        }
    }

    /// Takes `n` rows of `cols` values from `x` (row-major); quantization happens lazily.
    pub fn set(&mut self, x: &[f32], n: usize, cols: usize) {
        self.cols = cols;
        self.n = n;
        self.f32s[..n * cols].copy_from_slice(&x[..n * cols]);
        self.have_q8 = false;
        self.have_q8k = false;
    }

    /// Makes sure the format `fmt` is ready.
    pub fn prepare(&mut self, fmt: ActFormat, isa: Isa, pool: &ThreadPool) {
        let (n, cols) = (self.n, self.cols);
        match fmt {
            ActFormat::F32 => {}
            ActFormat::Q8 if !self.have_q8 => {
                let nb = cols / 32;
                let src = &self.f32s;
                let dst = SyncPtr::new(&mut self.q8[..n * nb]);
                let job = |t: usize, _th: usize| {
                    // SAFETY: each item writes its own row t.
                    let out = unsafe { dst.slice(t * nb, nb) };
                    isa.quantize_q8(&src[t * cols..(t + 1) * cols], out);
                };
                if n >= 8 {
                    pool.for_each(n, &job);
                } else {
                    for t in 0..n {
                        job(t, 0);
                    }
                }
                let group = nb * KERNEL_ROWS;
                for (g, rows) in self.q8[..n * nb].chunks(group).enumerate() {
                    let mut a: [&[BlockQ8]; KERNEL_ROWS] = [&[]; KERNEL_ROWS];
                    for (slot, row) in a.iter_mut().zip(rows.chunks(nb)) {
                        *slot = row;
                    }
                    crate::quant::pack_q8_scales(
                        &a[..rows.len() / nb],
                        nb,
                        &mut self.q8_d[g * group..(g + 1) * group],
                        &mut self.q8_s[g * group..(g + 1) * group],
                    );
                }
                self.have_q8 = true;
            }
            ActFormat::Q8K if !self.have_q8k => {
                let nb = cols / 256;
                if self.q8k.len() < n * nb {
                    // First K-quant model step only: sized once, then reused.
                    let cap = self.f32s.len() / 256;
                    self.q8k.resize(cap.max(n * nb), BlockQ8K::ZERO);
                }
                for t in 0..n {
                    crate::quant::q8::quantize_row_q8k(
                        &self.f32s[t * cols..(t + 1) * cols],
                        &mut self.q8k[t * nb..(t + 1) * nb],
                    );
                }
                self.have_q8k = true;
            }
            _ => {}
        }
    }
}

/// One product of a matmul call: `out[t * w.rows + r]`.
pub struct MatJob<'a> {
    pub w: &'a Mat,
    pub out: &'a mut [f32],
}

/// Work items are whole multiples of this many rows.
const ROW_ALIGN: usize = 16;
/// Work items per thread and product: enough for the threads to even out at the end of a call
/// (the last item is at most 1/8 of a thread's share), few enough that handing them out costs
/// nothing next to the rows (each item is one atomic increment on a cache line the threads
/// share, and a contiguous run of rows keeps the hardware prefetcher streaming).
const ITEMS_PER_THREAD: usize = 8;

/// Rows per work item for a product of `rows` rows on `threads` threads.
fn rows_per_item(rows: usize, threads: usize) -> usize {
    if threads <= 1 {
        return rows.max(1);
    }
    rows.div_ceil(threads * ITEMS_PER_THREAD)
        .div_ceil(ROW_ALIGN)
        .max(1)
        * ROW_ALIGN
}
/// Tokens per tile (activations of a tile stay in L2 while a chunk's rows stream); a multiple
/// of `KERNEL_ROWS`, so kernel calls start on the packed-scale groups.
const TOKEN_TILE: usize = 64;
const _: () = assert!(TOKEN_TILE.is_multiple_of(KERNEL_ROWS));

/// Runs every job on the same `n` activation rows. All weights must have `acts.cols` columns
/// (checked when the model is built).
pub fn matmul(pool: &ThreadPool, isa: Isa, acts: &mut Acts, jobs: &mut [MatJob<'_>]) {
    for j in jobs.iter() {
        if let Some(fmt) = j.w.dtype.act_format() {
            acts.prepare(fmt, isa, pool);
        }
    }
    let acts = &*acts;
    let n = acts.n;
    struct Prepared<'a> {
        w: &'a Mat,
        out: SyncPtr<f32>,
        chunks: usize,
        chunk_rows: usize,
    }
    let mut prepared: [Option<Prepared<'_>>; 4] = [None, None, None, None];
    let mut total = 0;
    for (slot, j) in prepared.iter_mut().zip(jobs.iter_mut()) {
        debug_assert!(j.out.len() >= n * j.w.rows);
        let chunk_rows = rows_per_item(j.w.rows, pool.threads());
        let chunks = j.w.rows.div_ceil(chunk_rows);
        total += chunks;
        *slot = Some(Prepared {
            w: j.w,
            out: SyncPtr::new(j.out),
            chunks,
            chunk_rows,
        });
    }
    assert!(
        jobs.len() <= 4,
        "at most four products share one matmul call"
    );
    let run_chunk = |mut c: usize, _thread: usize| {
        for p in prepared.iter().flatten() {
            if c >= p.chunks {
                c -= p.chunks;
                continue;
            }
            let r0 = c * p.chunk_rows;
            let r1 = (r0 + p.chunk_rows).min(p.w.rows);
            rows_product(isa, acts, p.w, r0..r1, n, &p.out);
            return;
        }
    };
    pool.for_each(total, &run_chunk);
}

fn rows_product(
    isa: Isa,
    acts: &Acts,
    w: &Mat,
    rows: std::ops::Range<usize>,
    n: usize,
    out: &SyncPtr<f32>,
) {
    let wrows = w.rows;
    let mut res = [0.0f32; KERNEL_ROWS];
    let write = |t: usize, r: usize, v: f32| {
        // SAFETY: this work item owns rows `rows` of every token's output.
        unsafe { out.write(t * wrows + r, v) };
    };
    match w.dtype.act_format() {
        Some(ActFormat::Q8) => {
            let tile = isa.q8_tile_kernel(w.dtype);
            let Some(k) = isa.q8_kernel(w.dtype).or(Isa::scalar().q8_kernel(w.dtype)) else {
                return;
            };
            let nb = acts.cols / 32;
            let group = nb * KERNEL_ROWS;
            for tt in (0..n).step_by(TOKEN_TILE) {
                let tend = (tt + TOKEN_TILE).min(n);
                for r in rows.clone() {
                    let wr = w.row(r);
                    let mut t = tt;
                    while t < tend {
                        let m = (tend - t).min(KERNEL_ROWS);
                        let mut a: [&[BlockQ8]; KERNEL_ROWS] = [&[]; KERNEL_ROWS];
                        for (i, slot) in a.iter_mut().enumerate().take(m) {
                            *slot = &acts.q8[(t + i) * nb..(t + i + 1) * nb];
                        }
                        match tile {
                            // `t` is a multiple of KERNEL_ROWS: tiles start at multiples of
                            // TOKEN_TILE and advance by KERNEL_ROWS.
                            Some(tk) => {
                                let g = t / KERNEL_ROWS;
                                tk(
                                    wr,
                                    &a[..m],
                                    &acts.q8_d[g * group..(g + 1) * group],
                                    &acts.q8_s[g * group..(g + 1) * group],
                                    &mut res[..m],
                                )
                            }
                            None => k(wr, &a[..m], &mut res[..m]),
                        }
                        for (i, v) in res.iter().enumerate().take(m) {
                            write(t + i, r, *v);
                        }
                        t += m;
                    }
                }
            }
        }
        Some(ActFormat::Q8K) => {
            let Some(k) = isa
                .q8k_kernel(w.dtype)
                .or(Isa::scalar().q8k_kernel(w.dtype))
            else {
                return;
            };
            let nb = acts.cols / 256;
            for r in rows {
                let wr = w.row(r);
                let mut t = 0;
                while t < n {
                    let m = (n - t).min(KERNEL_ROWS);
                    let mut a: [&[BlockQ8K]; KERNEL_ROWS] = [&[]; KERNEL_ROWS];
                    for (i, slot) in a.iter_mut().enumerate().take(m) {
                        *slot = &acts.q8k[(t + i) * nb..(t + i + 1) * nb];
                    }
                    k(wr, &a[..m], &mut res[..m]);
                    for (i, v) in res.iter().enumerate().take(m) {
                        write(t + i, r, *v);
                    }
                    t += m;
                }
            }
        }
        Some(ActFormat::F32) => {
            let Some(k) = isa
                .f32_kernel(w.dtype)
                .or(Isa::scalar().f32_kernel(w.dtype))
            else {
                return;
            };
            let cols = acts.cols;
            for r in rows {
                let wr = w.row(r);
                let mut t = 0;
                while t < n {
                    let m = (n - t).min(KERNEL_ROWS);
                    let mut a: [&[f32]; KERNEL_ROWS] = [&[]; KERNEL_ROWS];
                    for (i, slot) in a.iter_mut().enumerate().take(m) {
                        *slot = &acts.f32s[(t + i) * cols..(t + i + 1) * cols];
                    }
                    k(wr, &a[..m], &mut res[..m]);
                    for (i, v) in res.iter().enumerate().take(m) {
                        write(t + i, r, *v);
                    }
                    t += m;
                }
            }
        }
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_items_cover_every_row_in_aligned_runs() {
        for threads in 1..=16 {
            for rows in [1, 15, 16, 17, 192, 576, 1536, 49152, 49153] {
                let per = rows_per_item(rows, threads);
                let items = rows.div_ceil(per);
                assert!(items * per >= rows && (items - 1) * per < rows);
                if threads == 1 {
                    assert_eq!(items, 1, "one thread: one item");
                } else {
                    assert_eq!(per % ROW_ALIGN, 0, "{rows} rows, {threads} threads");
                    assert!(
                        items <= threads * ITEMS_PER_THREAD,
                        "{rows} rows, {threads} threads"
                    );
                }
            }
        }
    }
}
