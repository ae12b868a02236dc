// Row-wise and element-wise layers: RMSNorm (plain and fused with the residual add), rotary
// embeddings in both pairings, SwiGLU, embedding lookup, residual add. All arithmetic in f32.

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight. Grid (rows), block 256..1024 threads.
template <typename T>
static __device__ void rms_norm(u16* __restrict__ out, const u16* __restrict__ x,
                                const u16* __restrict__ weight, int hidden, float eps) {
    __shared__ float scratch[32];
    const i64 base = (i64)blockIdx.x * hidden;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float v = Conv<T>::to_f32(x[base + i]);
        ss = fmaf(v, v, ss);
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / (float)hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float v = Conv<T>::to_f32(x[base + i]) * inv * Conv<T>::to_f32(weight[i]);
        out[base + i] = Conv<T>::from_f32(v);
    }
}

// residual[r] += x[r] (rounded to T), then out[r] = rms_norm(residual[r]).
template <typename T>
static __device__ void add_rms_norm(u16* __restrict__ out, u16* __restrict__ residual,
                                    const u16* __restrict__ x, const u16* __restrict__ weight,
                                    int hidden, float eps) {
    __shared__ float scratch[32];
    const i64 base = (i64)blockIdx.x * hidden;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const u16 h = Conv<T>::from_f32(Conv<T>::to_f32(residual[base + i]) +
                                        Conv<T>::to_f32(x[base + i]));
        residual[base + i] = h;
        const float v = Conv<T>::to_f32(h);
        ss = fmaf(v, v, ss);
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / (float)hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float v = Conv<T>::to_f32(residual[base + i]) * inv * Conv<T>::to_f32(weight[i]);
        out[base + i] = Conv<T>::from_f32(v);
    }
}

// Rotary embeddings in place on q and k. cos_sin [max_pos][head_dim]: head_dim / 2 cosines then
// head_dim / 2 sines for each position (computed on the host in f64). neox = 0: pairs (2i, 2i+1)
// (llama.cpp's GGUF llama); neox = 1: pairs (i, i + head_dim / 2) (Hugging Face, qwen2).
// A position outside the table [0, max_pos) leaves its token unrotated rather than read past it
// (the host checks positions before launch). Grid (num_tokens), any block size.
template <typename T>
static __device__ void rope(u16* __restrict__ q, u16* __restrict__ k, const float* __restrict__ cos_sin,
                            const i32* __restrict__ positions, int max_pos, int num_heads,
                            int num_kv_heads, int head_dim, int q_stride, int k_stride, int neox) {
    const int t = blockIdx.x;
    const int half = head_dim / 2;
    const int pos = positions[t];
    if (pos < 0 || pos >= max_pos) return;
    const float* cs = cos_sin + (i64)pos * head_dim;
    const int total = (num_heads + num_kv_heads) * half;
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
        const int h = i / half, p = i % half;
        u16* row = h < num_heads ? q + (i64)t * q_stride + (i64)h * head_dim
                                 : k + (i64)t * k_stride + (i64)(h - num_heads) * head_dim;
        const int a = neox ? p : 2 * p;
        const int b = neox ? p + half : 2 * p + 1;
        const float c = cs[p], s = cs[half + p];
        const float x0 = Conv<T>::to_f32(row[a]), x1 = Conv<T>::to_f32(row[b]);
        row[a] = Conv<T>::from_f32(x0 * c - x1 * s);
        row[b] = Conv<T>::from_f32(x0 * s + x1 * c);
    }
}

// out = silu(gate) * up, for `n` elements; gate and up rows `stride` elements apart, `width` wide.
// Grid-stride over rows * width elements.
template <typename T>
static __device__ void swiglu(u16* __restrict__ out, const u16* __restrict__ gate,
                              const u16* __restrict__ up, int rows, int width, int in_stride) {
    const i64 n = (i64)rows * width;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const i64 r = i / width, c = i % width;
        const float g = Conv<T>::to_f32(gate[r * in_stride + c]);
        const float u = Conv<T>::to_f32(up[r * in_stride + c]);
        out[i] = Conv<T>::from_f32(g / (1.0f + __expf(-g)) * u);
    }
}

// x += y element-wise (n elements). Grid-stride.
template <typename T>
static __device__ void add_inplace(u16* __restrict__ x, const u16* __restrict__ y, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        x[i] = Conv<T>::from_f32(Conv<T>::to_f32(x[i]) + Conv<T>::to_f32(y[i]));
    }
}

// x[r] += bias for `rows` rows of `width` (q/k/v biases of qwen2). Grid-stride.
template <typename T>
static __device__ void add_bias(u16* __restrict__ x, const u16* __restrict__ bias, int rows, int width) {
    const i64 n = (i64)rows * width;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        x[i] = Conv<T>::from_f32(Conv<T>::to_f32(x[i]) + Conv<T>::to_f32(bias[i % width]));
    }
}

#define KVR_ELEMENTWISE_ENTRIES(NAME, T)                                                         \
    extern "C" __global__ void __launch_bounds__(1024) rms_norm_##NAME(u16* out, const u16* x, const u16* weight,        \
                                               int hidden, float eps) {                          \
        rms_norm<T>(out, x, weight, hidden, eps);                                                \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(1024) add_rms_norm_##NAME(u16* out, u16* residual, const u16* x,        \
                                                   const u16* weight, int hidden, float eps) {   \
        add_rms_norm<T>(out, residual, x, weight, hidden, eps);                                  \
    }                                                                                            \
    extern "C" __global__ void rope_##NAME(u16* q, u16* k, const float* cos_sin,                 \
                                           const i32* positions, int max_pos, int num_heads,     \
                                           int num_kv_heads, int head_dim, int q_stride,         \
                                           int k_stride, int neox) {                             \
        rope<T>(q, k, cos_sin, positions, max_pos, num_heads, num_kv_heads, head_dim, q_stride,  \
                k_stride, neox);                                                                 \
    }                                                                                            \
    extern "C" __global__ void swiglu_##NAME(u16* out, const u16* gate, const u16* up, int rows, \
                                             int width, int in_stride) {                         \
        swiglu<T>(out, gate, up, rows, width, in_stride);                                        \
    }                                                                                            \
    extern "C" __global__ void add_inplace_##NAME(u16* x, const u16* y, i64 n) {                 \
        add_inplace<T>(x, y, n);                                                                 \
    }                                                                                            \
    extern "C" __global__ void add_bias_##NAME(u16* x, const u16* bias, int rows, int width) {   \
        add_bias<T>(x, bias, rows, width);                                                       \
    }

KVR_ELEMENTWISE_ENTRIES(bf16, bf16_t)
KVR_ELEMENTWISE_ENTRIES(f16, f16_t)

// Embedding lookup: out[t] = table[ids[t]] (16-bit rows, so one entry serves bf16 and f16).
// Ids outside [0, vocab) give a zero row (the host rejects them before launch; this keeps a bad id
// from reading out of bounds). Grid (num_tokens), any block size.
extern "C" __global__ void embedding(u16* __restrict__ out, const u16* __restrict__ table,
                                     const i32* __restrict__ ids, int hidden, int vocab) {
    const int t = blockIdx.x;
    const int id = ids[t];
    const bool ok = id >= 0 && id < vocab;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        out[(i64)t * hidden + i] = ok ? table[(i64)id * hidden + i] : (u16)0;
    }
}

// f32 -> T (e.g. logits or references), n elements, grid-stride.
extern "C" __global__ void cast_f32_bf16(u16* out, const float* x, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        out[i] = f32_to_bf16(x[i]);
}
extern "C" __global__ void cast_f32_f16(u16* out, const float* x, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        out[i] = f32_to_f16(x[i]);
}
