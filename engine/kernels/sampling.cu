// Greedy and top-k selection over f32 logits [rows][vocab]. One block per row (1024 threads).
// Order: larger value first, ties to the lower token id, so results are deterministic and match
// the CPU sampler's. NaN never wins.

KVR_DEVICE bool better(float v, int i, float bv, int bi) {
    return v > bv || (v == bv && i < bi);
}

// Block-wide best (value, index) pair; every thread gets the answer.
KVR_DEVICE void block_best(float* v, int* i, float* sv, int* si) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, *v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, *i, o);
        if (better(ov, oi, *v, *i)) { *v = ov; *i = oi; }
    }
    __syncthreads();
    if (lane == 0) { sv[warp] = *v; si[warp] = *i; }
    __syncthreads();
    const int nwarps = (blockDim.x + 31) >> 5;
    *v = lane < nwarps ? sv[lane] : -INFINITY;
    *i = lane < nwarps ? si[lane] : 0x7fffffff;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, *v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, *i, o);
        if (better(ov, oi, *v, *i)) { *v = ov; *i = oi; }
    }
}

extern "C" __global__ void __launch_bounds__(1024) argmax_f32(i32* __restrict__ out, const float* __restrict__ logits,
                                      int vocab) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const float* row = logits + (i64)blockIdx.x * vocab;
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        if (better(row[i], i, bv, bi)) { bv = row[i]; bi = i; }
    block_best(&bv, &bi, sv, si);
    if (threadIdx.x == 0) out[blockIdx.x] = bi == 0x7fffffff ? 0 : bi;
}

// The k best (value, index) pairs of each row, best first: k passes, each taking the best pair
// strictly after the previous one in the order above. k is small (sampling's top-k).
extern "C" __global__ void __launch_bounds__(1024) topk_f32(float* __restrict__ out_vals, i32* __restrict__ out_idx,
                                    const float* __restrict__ logits, int vocab, int k) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const float* row = logits + (i64)blockIdx.x * vocab;
    float pv = INFINITY;
    int pi = -1;
    for (int r = 0; r < k; ++r) {
        float bv = -INFINITY;
        int bi = 0x7fffffff;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float v = row[i];
            if (better(pv, pi, v, i) && better(v, i, bv, bi)) { bv = v; bi = i; }
        }
        block_best(&bv, &bi, sv, si);
        if (threadIdx.x == 0) {
            out_vals[(i64)blockIdx.x * k + r] = bv;
            out_idx[(i64)blockIdx.x * k + r] = bi == 0x7fffffff ? -1 : bi;
        }
        pv = bv;
        pi = bi;
    }
}
