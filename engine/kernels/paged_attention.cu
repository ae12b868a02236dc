// Paged-attention decode, flash-decoding style: one query token per sequence.
//
// Grid (max_splits, num_kv_heads, num_seqs), KVR_DECODE_THREADS threads. A block covers one
// partition of `partition` (at most KVR_PARTITION) tokens of one sequence's context for one KV
// head and all KVR_GQA query heads that share it, so each K/V byte is read from memory once per
// step. Threads in groups of head_dim / 8 lanes each take one token at a time and read its head
// vector with 16-byte loads (KVR_UNROLL tokens in flight per thread). Pass 1 puts the scaled
// scores of the partition in shared memory, the block takes their max and exp-sum in fp32, pass 2
// reads V and accumulates the weighted sum. Each block writes its normalized partial output, max
// and exp-sum; the reduce kernel merges the partitions with the usual log-sum-exp rescaling (the
// online-softmax merge).
//
// Layouts: q [num_seqs] rows `q_stride` elements apart, head h at h * head_dim; caches
// [num_blocks][num_kv_heads][block_size][head_dim]; block_tables [num_seqs][max_blocks_per_seq];
// tmp_out [num_seqs][num_heads][max_splits][head_dim] f32; max_logits, exp_sums
// [num_seqs][num_heads][max_splits] f32; out [num_seqs][num_heads][head_dim].

#ifndef KVR_PARTITION
#define KVR_PARTITION 512
#endif
#ifndef KVR_DECODE_THREADS
#define KVR_DECODE_THREADS 128
#endif
#ifndef KVR_UNROLL
#define KVR_UNROLL 4
#endif

template <typename T>
static __device__ void paged_decode(
    float* __restrict__ tmp_out, float* __restrict__ max_logits, float* __restrict__ exp_sums,
    const u16* __restrict__ q, const u16* __restrict__ k_cache, const u16* __restrict__ v_cache,
    const i32* __restrict__ block_tables, const i32* __restrict__ context_lens, float scale,
    int q_stride, int num_kv_heads, int block_size, int max_blocks_per_seq, int max_splits,
    int partition) {
    constexpr int D = KVR_HEAD_DIM;
    constexpr int G = KVR_GQA;
    constexpr int PART = KVR_PARTITION;
    constexpr int THREADS = KVR_DECODE_THREADS;
    constexpr int LPT = D / 8;          // lanes per token: each reads 8 elements (16 bytes)
    constexpr int TPW = 32 / LPT;       // tokens per warp per step
    constexpr int NWARPS = THREADS / 32;
    constexpr int GROUPS = NWARPS * TPW; // tokens per block per step
    constexpr int UNROLL = KVR_UNROLL;
    static_assert(D % 8 == 0 && 32 % LPT == 0, "head_dim must be 64, 128 or 256");

    __shared__ float logits[G][PART];
    __shared__ float out_acc[G][D];
    __shared__ float stats[G][2];

    const int split = blockIdx.x, kvh = blockIdx.y, seq = blockIdx.z;
    const int num_heads = num_kv_heads * G;
    const int ctx = context_lens[seq];
    const int start = split * partition;
    if (start >= ctx) return; // the reduce kernel reads only the partitions that hold tokens
    const int n = min(min(partition, PART), ctx - start);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int l = lane % LPT;
    const int group = warp * TPW + lane / LPT;
    const i32* bt = block_tables + (i64)seq * max_blocks_per_seq;
    const i64 head_stride = (i64)block_size * D;

    for (int i = tid; i < G * D; i += THREADS) (&out_acc[0][0])[i] = 0.0f;

    // Pass 1: scores.
    {
        float qr[G][8];
#pragma unroll
        for (int g = 0; g < G; ++g) {
            const uint4 qv = *reinterpret_cast<const uint4*>(
                q + (i64)seq * q_stride + (i64)(kvh * G + g) * D + l * 8);
            unpack8<T>(qv, qr[g]);
#pragma unroll
            for (int j = 0; j < 8; ++j) qr[g][j] *= scale;
        }
        for (int base = 0; base < n; base += GROUPS * UNROLL) {
            uint4 kv[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int t = base + u * GROUPS + group;
                if (t < n) {
                    const int pos = start + t;
                    const i64 blk = bt[pos / block_size];
                    const i64 off = ((blk * num_kv_heads + kvh) * head_stride) +
                                    (i64)(pos % block_size) * D + l * 8;
                    kv[u] = *reinterpret_cast<const uint4*>(k_cache + off);
                } else {
                    kv[u] = make_uint4(0u, 0u, 0u, 0u);
                }
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int t = base + u * GROUPS + group;
                float kf[8];
                unpack8<T>(kv[u], kf);
#pragma unroll
                for (int g = 0; g < G; ++g) {
                    float s = 0.0f;
#pragma unroll
                    for (int j = 0; j < 8; ++j) s = fmaf(qr[g][j], kf[j], s);
#pragma unroll
                    for (int o = LPT / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
                    if (l == 0 && t < n) logits[g][t] = s;
                }
            }
        }
    }
    __syncthreads();

    // Softmax statistics of this partition, one warp per query head.
    for (int g = warp; g < G; g += NWARPS) {
        float m = -INFINITY;
        for (int t = lane; t < n; t += 32) m = fmaxf(m, logits[g][t]);
        m = warp_max(m);
        float sum = 0.0f;
        for (int t = lane; t < n; t += 32) {
            const float p = __expf(logits[g][t] - m);
            logits[g][t] = p;
            sum += p;
        }
        sum = warp_sum(sum);
        if (lane == 0) {
            stats[g][0] = m;
            stats[g][1] = sum;
        }
    }
    __syncthreads();

    // Pass 2: probability-weighted sum of V.
    {
        float acc[G][8];
#pragma unroll
        for (int g = 0; g < G; ++g)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[g][j] = 0.0f;
        for (int base = 0; base < n; base += GROUPS * UNROLL) {
            uint4 vv[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int t = base + u * GROUPS + group;
                if (t < n) {
                    const int pos = start + t;
                    const i64 blk = bt[pos / block_size];
                    const i64 off = ((blk * num_kv_heads + kvh) * head_stride) +
                                    (i64)(pos % block_size) * D + l * 8;
                    vv[u] = *reinterpret_cast<const uint4*>(v_cache + off);
                }
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int t = base + u * GROUPS + group;
                if (t < n) {
                    float vf[8];
                    unpack8<T>(vv[u], vf);
#pragma unroll
                    for (int g = 0; g < G; ++g) {
                        const float p = logits[g][t];
#pragma unroll
                        for (int j = 0; j < 8; ++j) acc[g][j] = fmaf(p, vf[j], acc[g][j]);
                    }
                }
            }
        }
#pragma unroll
        for (int g = 0; g < G; ++g)
#pragma unroll
            for (int j = 0; j < 8; ++j) atomicAdd(&out_acc[g][l * 8 + j], acc[g][j]);
    }
    __syncthreads();

    for (int i = tid; i < G * D; i += THREADS) {
        const int g = i / D, d = i % D;
        const i64 row = ((i64)seq * num_heads + kvh * G + g) * max_splits + split;
        tmp_out[row * D + d] = out_acc[g][d] / stats[g][1];
    }
    if (tid < G) {
        const i64 row = ((i64)seq * num_heads + kvh * G + tid) * max_splits + split;
        max_logits[row] = stats[tid][0];
        exp_sums[row] = stats[tid][1];
    }
}

// Merge the partitions of each (sequence, query head). Grid (num_heads, num_seqs), any block size.
template <typename T>
static __device__ void paged_decode_reduce(
    u16* __restrict__ out, const float* __restrict__ tmp_out, const float* __restrict__ max_logits,
    const float* __restrict__ exp_sums, const i32* __restrict__ context_lens, int max_splits,
    int partition) {
    constexpr int D = KVR_HEAD_DIM;
    const int head = blockIdx.x, seq = blockIdx.y, num_heads = gridDim.x;
    const int ctx = context_lens[seq];
    const int splits = min(max_splits, (ctx + partition - 1) / partition);
    const i64 row0 = ((i64)seq * num_heads + head) * max_splits;
    float m = -INFINITY;
    for (int s = 0; s < splits; ++s) m = fmaxf(m, max_logits[row0 + s]);
    float total = 0.0f;
    for (int s = 0; s < splits; ++s) total += exp_sums[row0 + s] * __expf(max_logits[row0 + s] - m);
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float o = 0.0f;
        for (int s = 0; s < splits; ++s) {
            const float w = exp_sums[row0 + s] * __expf(max_logits[row0 + s] - m);
            o = fmaf(w, tmp_out[(row0 + s) * D + d], o);
        }
        out[((i64)seq * num_heads + head) * D + d] = Conv<T>::from_f32(o * inv);
    }
}

#define KVR_DECODE_ENTRIES(NAME, T)                                                              \
    extern "C" __global__ void __launch_bounds__(KVR_DECODE_THREADS) paged_attention_decode_##NAME( \
        float* tmp_out, float* max_logits, float* exp_sums, const u16* q, const u16* k_cache,     \
        const u16* v_cache, const i32* block_tables, const i32* context_lens, float scale,        \
        int q_stride, int num_kv_heads, int block_size, int max_blocks_per_seq, int max_splits,   \
        int partition) {                                                                          \
        paged_decode<T>(tmp_out, max_logits, exp_sums, q, k_cache, v_cache, block_tables,         \
                        context_lens, scale, q_stride, num_kv_heads, block_size,                  \
                        max_blocks_per_seq, max_splits, partition);                               \
    }                                                                                             \
    extern "C" __global__ void paged_attention_reduce_##NAME(                                     \
        u16* out, const float* tmp_out, const float* max_logits, const float* exp_sums,           \
        const i32* context_lens, int max_splits, int partition) {                                 \
        paged_decode_reduce<T>(out, tmp_out, max_logits, exp_sums, context_lens, max_splits,      \
                               partition);                                                        \
    }

KVR_DECODE_ENTRIES(bf16, bf16_t)
KVR_DECODE_ENTRIES(f16, f16_t)
