// Prefill attention over the paged KV cache: causal, for chunked prefill.
//
// Sequence s has q_len = cu_q_lens[s + 1] - cu_q_lens[s] new query tokens (rows cu_q_lens[s].. of
// q), already written into the cache, and context_lens[s] cached tokens in all, so its query i sits
// at position context_lens[s] - q_len + i and attends to every cached position up to its own.
//
// Grid (ceil(max_q_len * KVR_GQA / 16), num_kv_heads, num_seqs), 128 threads. A block takes 16
// (query token, query head) rows of one KV group; each of its 4 warps owns 4 rows. K/V are staged in
// shared memory 32 tokens at a time (one per lane for the scores), with an fp32 online softmax per
// row. head_dim at most 128.
//
// Layouts: q [num_tokens] rows `q_stride` elements apart, head h at h * head_dim; caches as in
// cache.cu; out [num_tokens][num_heads][head_dim].

#define KVR_PREFILL_ROWS 16
#define KVR_PREFILL_TILE 32

template <typename T>
static __device__ void prefill_attention(
    u16* __restrict__ out, const u16* __restrict__ q, const u16* __restrict__ k_cache,
    const u16* __restrict__ v_cache, const i32* __restrict__ block_tables,
    const i32* __restrict__ cu_q_lens, const i32* __restrict__ context_lens, float scale,
    int q_stride, int num_kv_heads, int block_size, int max_blocks_per_seq) {
    constexpr int D = KVR_HEAD_DIM;
    constexpr int G = KVR_GQA;
    constexpr int ROWS = KVR_PREFILL_ROWS;
    constexpr int TILE = KVR_PREFILL_TILE;
    constexpr int RPW = ROWS / 4; // rows per warp
    constexpr int DPL = (D + 31) / 32; // output elements per lane
    static_assert(D <= 128 && D % 8 == 0, "prefill supports head_dim up to 128");

    __shared__ float qs[ROWS][D];
    __shared__ float ks[TILE][D + 1];
    __shared__ float vs[TILE][D + 1];

    const int seq = blockIdx.z, kvh = blockIdx.y;
    const int q0 = cu_q_lens[seq];
    const int q_len = cu_q_lens[seq + 1] - q0;
    const int ctx = context_lens[seq];
    const int row0 = blockIdx.x * ROWS;
    if (row0 >= q_len * G) return;
    const int num_heads = num_kv_heads * G;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const i32* bt = block_tables + (i64)seq * max_blocks_per_seq;

    // Stage this block's query rows (pre-scaled) in shared memory.
    for (int i = tid; i < ROWS * D; i += blockDim.x) {
        const int r = i / D, d = i % D;
        const int row = row0 + r;
        float v = 0.0f;
        if (row < q_len * G) {
            const int tok = row / G, g = row % G;
            v = Conv<T>::to_f32(q[(i64)(q0 + tok) * q_stride + (i64)(kvh * G + g) * D + d]) * scale;
        }
        qs[r][d] = v;
    }

    const int last_row = min(row0 + ROWS, q_len * G) - 1;
    const int kv_end = ctx - q_len + last_row / G + 1; // one past the last position any row sees

    float m[RPW], lsum[RPW], acc[RPW][DPL];
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        m[r] = -INFINITY;
        lsum[r] = 0.0f;
#pragma unroll
        for (int k = 0; k < DPL; ++k) acc[r][k] = 0.0f;
    }

    for (int t0 = 0; t0 < kv_end; t0 += TILE) {
        __syncthreads();
        for (int i = tid; i < TILE * (D / 8); i += blockDim.x) {
            const int t = i / (D / 8), c = i % (D / 8);
            const int pos = t0 + t;
            float kf[8], vf[8];
            if (pos < kv_end) {
                const i64 blk = bt[pos / block_size];
                const i64 off = ((blk * num_kv_heads + kvh) * block_size + pos % block_size) * D + c * 8;
                unpack8<T>(*reinterpret_cast<const uint4*>(k_cache + off), kf);
                unpack8<T>(*reinterpret_cast<const uint4*>(v_cache + off), vf);
            } else {
#pragma unroll
                for (int j = 0; j < 8; ++j) kf[j] = vf[j] = 0.0f;
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                ks[t][c * 8 + j] = kf[j];
                vs[t][c * 8 + j] = vf[j];
            }
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
            const int lr = warp * RPW + r;
            const int row = row0 + lr;
            if (row >= q_len * G) continue; // warp-uniform
            const int qpos = ctx - q_len + row / G;
            const int kpos = t0 + lane;
            float s = 0.0f;
#pragma unroll 8
            for (int d = 0; d < D; ++d) s = fmaf(qs[lr][d], ks[lane][d], s);
            if (kpos > qpos) s = -INFINITY;
            const float m_new = fmaxf(m[r], warp_max(s)); // finite: position t0 <= qpos always
            const float p = __expf(s - m_new);
            const float corr = __expf(m[r] - m_new);
            lsum[r] = lsum[r] * corr + warp_sum(p);
            m[r] = m_new;
#pragma unroll
            for (int k = 0; k < DPL; ++k) acc[r][k] *= corr;
            for (int j = 0; j < TILE; ++j) {
                const float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
                for (int k = 0; k < DPL; ++k) {
                    const int d = lane + 32 * k;
                    if (d < D) acc[r][k] = fmaf(pj, vs[j][d], acc[r][k]);
                }
            }
        }
    }

#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        const int row = row0 + warp * RPW + r;
        if (row >= q_len * G) continue;
        const int tok = row / G, g = row % G;
        const float inv = 1.0f / lsum[r];
        u16* o = out + ((i64)(q0 + tok) * num_heads + kvh * G + g) * D;
#pragma unroll
        for (int k = 0; k < DPL; ++k) {
            const int d = lane + 32 * k;
            if (d < D) o[d] = Conv<T>::from_f32(acc[r][k] * inv);
        }
    }
}

#define KVR_PREFILL_ENTRY(NAME, T)                                                              \
    extern "C" __global__ void __launch_bounds__(128) prefill_attention_##NAME(                 \
        u16* out, const u16* q, const u16* k_cache, const u16* v_cache, const i32* block_tables, \
        const i32* cu_q_lens, const i32* context_lens, float scale, int q_stride,               \
        int num_kv_heads, int block_size, int max_blocks_per_seq) {                             \
        prefill_attention<T>(out, q, k_cache, v_cache, block_tables, cu_q_lens, context_lens,   \
                             scale, q_stride, num_kv_heads, block_size, max_blocks_per_seq);    \
    }

KVR_PREFILL_ENTRY(bf16, bf16_t)
KVR_PREFILL_ENTRY(f16, f16_t)
