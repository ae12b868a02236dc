//! Typed launches of the kernels and cuBLAS products. Each checks its buffers' lengths against
//! the shapes it is given before launching, so a wrong shape is an error, never an out-of-bounds
//! access on the GPU. 16-bit tensors are `CudaSlice<u16>` holding bf16 or f16 bits (`Dtype`).

use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{CudaDevice, CudaError, Result};
use crate::kernels::launch::{self, DecodePlan, Dims};
use crate::kernels::layout::PagedKvLayout;
use crate::kernels::reference::DEQUANT_TYPES;
use crate::kernels::Dtype;
use crate::quant::GgmlType;

fn launch_cfg(d: Dims) -> LaunchConfig {
    LaunchConfig {
        grid_dim: d.grid,
        block_dim: d.block,
        shared_mem_bytes: 0,
    }
}

fn check_len<T>(s: &CudaSlice<T>, need: usize, what: &str) -> Result<()> {
    if s.len() < need {
        return Err(CudaError::Invalid(format!(
            "{what}: buffer holds {} elements, needs {need}",
            s.len()
        )));
    }
    Ok(())
}

fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| CudaError::Invalid(format!("{what} = {v} does not fit in i32")))
}

/// Scratch of the decode kernels, sized by a [`DecodePlan`].
pub struct DecodeScratch {
    pub tmp_out: CudaSlice<f32>,
    pub max_logits: CudaSlice<f32>,
    pub exp_sums: CudaSlice<f32>,
}

impl DecodeScratch {
    pub fn new(dev: &CudaDevice, plan: &DecodePlan) -> Result<Self> {
        Ok(DecodeScratch {
            tmp_out: dev.stream.alloc_zeros(plan.tmp_out_elems.max(1))?,
            max_logits: dev.stream.alloc_zeros(plan.stats_elems.max(1))?,
            exp_sums: dev.stream.alloc_zeros(plan.stats_elems.max(1))?,
        })
    }
}

/// Batch metadata for the attention kernels, on the device.
pub struct AttnBatch<'a> {
    pub layout: PagedKvLayout,
    /// `[num_seqs][max_blocks_per_seq]`, checked with `launch::check_block_tables` by the caller.
    pub block_tables: &'a CudaSlice<i32>,
    pub max_blocks_per_seq: usize,
    pub context_lens: &'a CudaSlice<i32>,
    pub num_seqs: usize,
    pub num_heads: usize,
    /// Elements between consecutive query rows (tokens).
    pub q_stride: usize,
    pub scale: f32,
}

impl CudaDevice {
    fn entry(&self, stem: &str, dtype: Dtype) -> Result<&cudarc::driver::CudaFunction> {
        self.kernels.get(&format!("{stem}_{}", dtype.suffix()))
    }

    /// Writes `num_tokens` new K/V rows into their cache slots (`slots[t]`, −1 = skip).
    #[allow(clippy::too_many_arguments)]
    pub fn reshape_and_cache(
        &self,
        k: &CudaSlice<u16>,
        v: &CudaSlice<u16>,
        k_cache: &mut CudaSlice<u16>,
        v_cache: &mut CudaSlice<u16>,
        slots: &CudaSlice<i64>,
        num_tokens: usize,
        row_stride: usize,
        layout: &PagedKvLayout,
    ) -> Result<()> {
        let width = layout.num_kv_heads * layout.head_dim;
        if num_tokens == 0 {
            return Ok(());
        }
        if !row_stride.is_multiple_of(8) || !layout.head_dim.is_multiple_of(8) || row_stride < width
        {
            return Err(CudaError::Invalid(format!(
                "row stride {row_stride} / head_dim must be multiples of 8, stride ≥ {width}"
            )));
        }
        check_len(k, (num_tokens - 1) * row_stride + width, "k")?;
        check_len(v, (num_tokens - 1) * row_stride + width, "v")?;
        check_len(slots, num_tokens, "slot mapping")?;
        let f = self.kernels.get("reshape_and_cache")?;
        let (stride, heads, hd, bs) = (
            int(row_stride, "row stride")?,
            int(layout.num_kv_heads, "kv heads")?,
            int(layout.head_dim, "head_dim")?,
            int(layout.block_size, "block size")?,
        );
        let d = launch::per_row(num_tokens, launch::row_threads(width / 2))?;
        // SAFETY: argument types match the kernel's signature; the cache buffers are sized by the
        // caller for every slot in `slots` (the KV core hands out only ids below its pool size).
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(k)
                .arg(v)
                .arg(k_cache)
                .arg(v_cache)
                .arg(slots)
                .arg(&stride)
                .arg(&heads)
                .arg(&hd)
                .arg(&bs)
                .launch(launch_cfg(d))?;
        }
        Ok(())
    }

    /// Decode attention for one query token per sequence: partitions, then the reduce.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_decode(
        &self,
        dtype: Dtype,
        out: &mut CudaSlice<u16>,
        scratch: &mut DecodeScratch,
        q: &CudaSlice<u16>,
        k_cache: &CudaSlice<u16>,
        v_cache: &CudaSlice<u16>,
        batch: &AttnBatch<'_>,
        plan: &DecodePlan,
    ) -> Result<()> {
        let d = batch.layout.head_dim;
        check_len(
            q,
            batch.num_seqs.saturating_sub(1) * batch.q_stride + batch.num_heads * d,
            "q",
        )?;
        check_len(out, batch.num_seqs * batch.num_heads * d, "out")?;
        check_len(&scratch.tmp_out, plan.tmp_out_elems, "decode scratch")?;
        check_len(&scratch.max_logits, plan.stats_elems, "decode max logits")?;
        check_len(&scratch.exp_sums, plan.stats_elems, "decode exp sums")?;
        check_len(
            batch.block_tables,
            batch.num_seqs * batch.max_blocks_per_seq,
            "block tables",
        )?;
        check_len(batch.context_lens, batch.num_seqs, "context lengths")?;
        if batch.num_heads != batch.layout.num_kv_heads * self.kernels.cfg.gqa
            || d != self.kernels.cfg.head_dim
        {
            return Err(CudaError::Invalid(
                "attention shape differs from the compiled kernels".into(),
            ));
        }
        let (qs, kvh, bs, mb, ms, part) = (
            int(batch.q_stride, "q stride")?,
            int(batch.layout.num_kv_heads, "kv heads")?,
            int(batch.layout.block_size, "block size")?,
            int(batch.max_blocks_per_seq, "max blocks per seq")?,
            int(plan.max_splits, "splits")?,
            int(plan.partition, "partition")?,
        );
        let f = self.entry("paged_attention_decode", dtype)?;
        // SAFETY: types match the kernel; lengths checked above; block ids and context lengths are
        // checked on the host by the caller (`launch::check_block_tables`).
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(&mut scratch.tmp_out)
                .arg(&mut scratch.max_logits)
                .arg(&mut scratch.exp_sums)
                .arg(q)
                .arg(k_cache)
                .arg(v_cache)
                .arg(batch.block_tables)
                .arg(batch.context_lens)
                .arg(&batch.scale)
                .arg(&qs)
                .arg(&kvh)
                .arg(&bs)
                .arg(&mb)
                .arg(&ms)
                .arg(&part)
                .launch(launch_cfg(plan.decode))?;
        }
        let f = self.entry("paged_attention_reduce", dtype)?;
        // SAFETY: as above.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(out)
                .arg(&scratch.tmp_out)
                .arg(&scratch.max_logits)
                .arg(&scratch.exp_sums)
                .arg(batch.context_lens)
                .arg(&ms)
                .arg(&part)
                .launch(launch_cfg(plan.reduce))?;
        }
        Ok(())
    }

    /// Causal prefill attention over the paged cache (`cu_q_lens`: `num_seqs + 1` offsets).
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_attention(
        &self,
        dtype: Dtype,
        out: &mut CudaSlice<u16>,
        q: &CudaSlice<u16>,
        k_cache: &CudaSlice<u16>,
        v_cache: &CudaSlice<u16>,
        cu_q_lens: &CudaSlice<i32>,
        num_tokens: usize,
        max_q_len: usize,
        batch: &AttnBatch<'_>,
    ) -> Result<()> {
        let d = batch.layout.head_dim;
        check_len(
            q,
            num_tokens.saturating_sub(1) * batch.q_stride + batch.num_heads * d,
            "q",
        )?;
        check_len(out, num_tokens * batch.num_heads * d, "out")?;
        check_len(cu_q_lens, batch.num_seqs + 1, "cu_q_lens")?;
        check_len(
            batch.block_tables,
            batch.num_seqs * batch.max_blocks_per_seq,
            "block tables",
        )?;
        check_len(batch.context_lens, batch.num_seqs, "context lengths")?;
        let dims = launch::prefill_dims(
            &self.kernels.cfg,
            batch.num_seqs,
            batch.layout.num_kv_heads,
            max_q_len,
        )?;
        let (qs, kvh, bs, mb) = (
            int(batch.q_stride, "q stride")?,
            int(batch.layout.num_kv_heads, "kv heads")?,
            int(batch.layout.block_size, "block size")?,
            int(batch.max_blocks_per_seq, "max blocks per seq")?,
        );
        let f = self.entry("prefill_attention", dtype)?;
        // SAFETY: types match the kernel; lengths checked above; tables checked by the caller.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(out)
                .arg(q)
                .arg(k_cache)
                .arg(v_cache)
                .arg(batch.block_tables)
                .arg(cu_q_lens)
                .arg(batch.context_lens)
                .arg(&batch.scale)
                .arg(&qs)
                .arg(&kvh)
                .arg(&bs)
                .arg(&mb)
                .launch(launch_cfg(dims))?;
        }
        Ok(())
    }

    /// RMSNorm of `rows` rows of `hidden` elements.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm(
        &self,
        dtype: Dtype,
        out: &mut CudaSlice<u16>,
        x: &CudaSlice<u16>,
        weight: &CudaSlice<u16>,
        rows: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        check_len(x, rows * hidden, "x")?;
        check_len(out, rows * hidden, "out")?;
        check_len(weight, hidden, "weight")?;
        if rows == 0 {
            return Ok(());
        }
        let h = int(hidden, "hidden")?;
        let f = self.entry("rms_norm", dtype)?;
        // SAFETY: types match the kernel; lengths checked above.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(out)
                .arg(x)
                .arg(weight)
                .arg(&h)
                .arg(&eps)
                .launch(launch_cfg(launch::per_row(
                    rows,
                    launch::row_threads(hidden),
                )?))?;
        }
        Ok(())
    }

    /// `residual += x`, then `out = rms_norm(residual)`.
    #[allow(clippy::too_many_arguments)]
    pub fn add_rms_norm(
        &self,
        dtype: Dtype,
        out: &mut CudaSlice<u16>,
        residual: &mut CudaSlice<u16>,
        x: &CudaSlice<u16>,
        weight: &CudaSlice<u16>,
        rows: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        check_len(x, rows * hidden, "x")?;
        check_len(residual, rows * hidden, "residual")?;
        check_len(out, rows * hidden, "out")?;
        check_len(weight, hidden, "weight")?;
        if rows == 0 {
            return Ok(());
        }
        let h = int(hidden, "hidden")?;
        let f = self.entry("add_rms_norm", dtype)?;
        // SAFETY: types match the kernel; lengths checked above.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(out)
                .arg(residual)
                .arg(x)
                .arg(weight)
                .arg(&h)
                .arg(&eps)
                .launch(launch_cfg(launch::per_row(
                    rows,
                    launch::row_threads(hidden),
                )?))?;
        }
        Ok(())
    }

    /// RoPE in place on q and k; `cos_sin` from `reference::rope_cos_sin`. A position outside the
    /// table leaves its token unrotated (the caller checks positions against the table it built).
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        dtype: Dtype,
        q: &mut CudaSlice<u16>,
        k: &mut CudaSlice<u16>,
        cos_sin: &CudaSlice<f32>,
        positions: &CudaSlice<i32>,
        num_tokens: usize,
        heads: (usize, usize),
        head_dim: usize,
        strides: (usize, usize),
        neox: bool,
    ) -> Result<()> {
        let (nh, nkv) = heads;
        let (qs, ks) = strides;
        if num_tokens == 0 {
            return Ok(());
        }
        check_len(q, (num_tokens - 1) * qs + nh * head_dim, "q")?;
        check_len(k, (num_tokens - 1) * ks + nkv * head_dim, "k")?;
        check_len(positions, num_tokens, "positions")?;
        let max_pos = int(cos_sin.len() / head_dim.max(1), "rope table rows")?;
        let args = (
            int(nh, "heads")?,
            int(nkv, "kv heads")?,
            int(head_dim, "head_dim")?,
            int(qs, "q stride")?,
            int(ks, "k stride")?,
            i32::from(neox),
        );
        let f = self.entry("rope", dtype)?;
        let d = launch::per_row(
            num_tokens,
            launch::row_threads((nh + nkv) * head_dim / 2 * 4).min(256),
        )?;
        // SAFETY: types match the kernel; lengths checked above.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(q)
                .arg(k)
                .arg(cos_sin)
                .arg(positions)
                .arg(&max_pos)
                .arg(&args.0)
                .arg(&args.1)
                .arg(&args.2)
                .arg(&args.3)
                .arg(&args.4)
                .arg(&args.5)
                .launch(launch_cfg(d))?;
        }
        Ok(())
    }

    /// `out = silu(gate) * up` over `rows × width` (inputs `in_stride` apart, output packed).
    #[allow(clippy::too_many_arguments)]
    pub fn swiglu(
        &self,
        dtype: Dtype,
        out: &mut CudaSlice<u16>,
        gate: &CudaSlice<u16>,
        up: &CudaSlice<u16>,
        rows: usize,
        width: usize,
        in_stride: usize,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        check_len(gate, (rows - 1) * in_stride + width, "gate")?;
        check_len(up, (rows - 1) * in_stride + width, "up")?;
        check_len(out, rows * width, "out")?;
        let (r, w, s) = (
            int(rows, "rows")?,
            int(width, "width")?,
            int(in_stride, "stride")?,
        );
        let f = self.entry("swiglu", dtype)?;
        // SAFETY: types match the kernel; lengths checked above.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(out)
                .arg(gate)
                .arg(up)
                .arg(&r)
                .arg(&w)
                .arg(&s)
                .launch(launch_cfg(launch::grid_stride(rows * width, self.sm_count)))?;
        }
        Ok(())
    }

    /// `x[r] += bias` for `rows` rows of `width`.
    pub fn add_bias(
        &self,
        dtype: Dtype,
        x: &mut CudaSlice<u16>,
        bias: &CudaSlice<u16>,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        check_len(x, rows * width, "x")?;
        check_len(bias, width, "bias")?;
        if rows == 0 {
            return Ok(());
        }
        let (r, w) = (int(rows, "rows")?, int(width, "width")?);
        let f = self.entry("add_bias", dtype)?;
        // SAFETY: types match the kernel; lengths checked above.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(x)
                .arg(bias)
                .arg(&r)
                .arg(&w)
                .launch(launch_cfg(launch::grid_stride(rows * width, self.sm_count)))?;
        }
        Ok(())
    }

    /// `x += y` over `n` elements.
    pub fn add_inplace(
        &self,
        dtype: Dtype,
        x: &mut CudaSlice<u16>,
        y: &CudaSlice<u16>,
        n: usize,
    ) -> Result<()> {
        check_len(x, n, "x")?;
        check_len(y, n, "y")?;
        if n == 0 {
            return Ok(());
        }
        let count = i64::try_from(n).map_err(|_| CudaError::Invalid("tensor too large".into()))?;
        let f = self.entry("add_inplace", dtype)?;
        // SAFETY: types match the kernel; lengths checked above.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(x)
                .arg(y)
                .arg(&count)
                .launch(launch_cfg(launch::grid_stride(n, self.sm_count)))?;
        }
        Ok(())
    }

    /// `out[t] = table[ids[t]]`; ids outside the vocabulary give zero rows.
    pub fn embedding(
        &self,
        out: &mut CudaSlice<u16>,
        table: &CudaSlice<u16>,
        ids: &CudaSlice<i32>,
        num_tokens: usize,
        hidden: usize,
        vocab: usize,
    ) -> Result<()> {
        check_len(table, vocab * hidden, "embedding table")?;
        check_len(out, num_tokens * hidden, "out")?;
        check_len(ids, num_tokens, "ids")?;
        if num_tokens == 0 {
            return Ok(());
        }
        let (h, v) = (int(hidden, "hidden")?, int(vocab, "vocab")?);
        let f = self.kernels.get("embedding")?;
        // SAFETY: types match the kernel; lengths checked above; the kernel bounds-checks ids.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(out)
                .arg(table)
                .arg(ids)
                .arg(&h)
                .arg(&v)
                .launch(launch_cfg(launch::per_row(num_tokens, 256)?))?;
        }
        Ok(())
    }

    /// Dequantizes `n` elements of a GGUF tensor (raw bytes in `src`) to `dtype`.
    pub fn dequant(
        &self,
        dtype: Dtype,
        ty: GgmlType,
        out: &mut CudaSlice<u16>,
        src: &CudaSlice<u8>,
        n: usize,
    ) -> Result<()> {
        let stem = DEQUANT_TYPES
            .iter()
            .find(|(t, _)| *t == ty)
            .map(|(_, s)| *s)
            .ok_or_else(|| CudaError::Invalid(format!("no CUDA dequantization for {ty}")))?;
        let bytes = ty
            .bytes_for(n as u64)
            .ok_or_else(|| CudaError::Invalid(format!("{n} elements are not whole {ty} blocks")))?;
        check_len(
            src,
            usize::try_from(bytes).unwrap_or(usize::MAX),
            "quantized source",
        )?;
        check_len(out, n, "out")?;
        let count = i64::try_from(n).map_err(|_| CudaError::Invalid("tensor too large".into()))?;
        let f = self
            .kernels
            .get(&format!("dequant_{stem}_{}", dtype.suffix()))?;
        // SAFETY: types match the kernel; lengths checked above.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(out)
                .arg(src)
                .arg(&count)
                .launch(launch_cfg(launch::grid_stride(n, self.sm_count)))?;
        }
        Ok(())
    }

    /// Greedy pick per row of f32 logits.
    pub fn argmax(
        &self,
        out: &mut CudaSlice<i32>,
        logits: &CudaSlice<f32>,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        check_len(logits, rows * vocab, "logits")?;
        check_len(out, rows, "out")?;
        if rows == 0 {
            return Ok(());
        }
        let v = int(vocab, "vocab")?;
        let f = self.kernels.get("argmax_f32")?;
        // SAFETY: types match the kernel; lengths checked above.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(out)
                .arg(logits)
                .arg(&v)
                .launch(launch_cfg(launch::per_row(rows, 1024)?))?;
        }
        Ok(())
    }

    /// The `k` best (value, id) pairs per row, best first.
    pub fn topk(
        &self,
        vals: &mut CudaSlice<f32>,
        idx: &mut CudaSlice<i32>,
        logits: &CudaSlice<f32>,
        rows: usize,
        vocab: usize,
        k: usize,
    ) -> Result<()> {
        check_len(logits, rows * vocab, "logits")?;
        check_len(vals, rows * k, "values")?;
        check_len(idx, rows * k, "indices")?;
        if rows == 0 || k == 0 {
            return Ok(());
        }
        let (v, kk) = (int(vocab, "vocab")?, int(k, "k")?);
        let f = self.kernels.get("topk_f32")?;
        // SAFETY: types match the kernel; lengths checked above.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(vals)
                .arg(idx)
                .arg(logits)
                .arg(&v)
                .arg(&kk)
                .launch(launch_cfg(launch::per_row(rows, 1024)?))?;
        }
        Ok(())
    }

    /// `y[rows][n_out] = x[rows][n_in] · wᵀ` with `w` = `[n_out][n_in]` (ggml's weight layout),
    /// 16-bit inputs, f32 accumulation; `y` is 16-bit (`out_f32` false) or f32 (true).
    #[allow(clippy::too_many_arguments)]
    fn gemm_raw(
        &self,
        dtype: Dtype,
        y: cudarc::driver::sys::CUdeviceptr,
        out_f32: bool,
        x: &CudaSlice<u16>,
        w: &CudaSlice<u16>,
        rows: usize,
        n_in: usize,
        n_out: usize,
    ) -> Result<()> {
        use cudarc::driver::DevicePtr;
        check_len(x, rows * n_in, "matmul input")?;
        check_len(w, n_out * n_in, "matmul weight")?;
        let (m, n, k) = (int(n_out, "n_out")?, int(rows, "rows")?, int(n_in, "n_in")?);
        let t = match dtype {
            Dtype::Bf16 => cudaDataType_t::CUDA_R_16BF,
            Dtype::F16 => cudaDataType_t::CUDA_R_16F,
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (wp, _rw) = w.device_ptr(&self.stream);
        let (xp, _rx) = x.device_ptr(&self.stream);
        // SAFETY: column-major view: C (n_out × rows) = Aᵀ (n_out × n_in) · B (n_in × rows), where A
        // is w read as n_in × n_out with ld n_in and B is x as n_in × rows; lengths checked above,
        // `y` checked by the callers; alpha/beta are f32 as CUBLAS_COMPUTE_32F requires.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                (&alpha as *const f32).cast(),
                wp as *const _,
                t,
                k,
                xp as *const _,
                t,
                k,
                (&beta as *const f32).cast(),
                y as *mut _,
                if out_f32 {
                    cudaDataType_t::CUDA_R_32F
                } else {
                    t
                },
                m,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )?;
        }
        Ok(())
    }

    /// `y = x · wᵀ`, 16-bit output.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        dtype: Dtype,
        y: &mut CudaSlice<u16>,
        x: &CudaSlice<u16>,
        w: &CudaSlice<u16>,
        rows: usize,
        n_in: usize,
        n_out: usize,
    ) -> Result<()> {
        use cudarc::driver::DevicePtrMut;
        check_len(y, rows * n_out, "matmul output")?;
        let (yp, _ry) = y.device_ptr_mut(&self.stream);
        self.gemm_raw(dtype, yp, false, x, w, rows, n_in, n_out)
    }

    /// `y = x · wᵀ`, f32 output (logits).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_f32(
        &self,
        dtype: Dtype,
        y: &mut CudaSlice<f32>,
        x: &CudaSlice<u16>,
        w: &CudaSlice<u16>,
        rows: usize,
        n_in: usize,
        n_out: usize,
    ) -> Result<()> {
        use cudarc::driver::DevicePtrMut;
        check_len(y, rows * n_out, "matmul output")?;
        let (yp, _ry) = y.device_ptr_mut(&self.stream);
        self.gemm_raw(dtype, yp, true, x, w, rows, n_in, n_out)
    }
}
