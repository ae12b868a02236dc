// kvroute CUDA kernels: shared helpers. Prepended to every kernel source before NVRTC compiles it
// (no #include, so NVRTC needs no header search path and no CUDA toolkit headers).
//
// 16-bit floats are carried as raw `unsigned short` and converted with explicit code: bf16 by bit
// shifts (exact), f16 by the PTX `cvt` instructions. Everything accumulates in f32.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef int i32;
typedef long long i64;

#define KVR_DEVICE __device__ __forceinline__
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

// Element types, selected by template parameter.
struct bf16_t { u16 bits; };
struct f16_t { u16 bits; };

KVR_DEVICE float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }
KVR_DEVICE u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0u) {
        return (u16)((u >> 16) | 0x0040u); // quiet NaN
    }
    u32 rounding = 0x7fffu + ((u >> 16) & 1u); // round to nearest, ties to even
    return (u16)((u + rounding) >> 16);
}
KVR_DEVICE float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
KVR_DEVICE u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

template <typename T> struct Conv;
template <> struct Conv<bf16_t> {
    static KVR_DEVICE float to_f32(u16 h) { return bf16_to_f32(h); }
    static KVR_DEVICE u16 from_f32(float f) { return f32_to_bf16(f); }
};
template <> struct Conv<f16_t> {
    static KVR_DEVICE float to_f32(u16 h) { return f16_to_f32(h); }
    static KVR_DEVICE u16 from_f32(float f) { return f32_to_f16(f); }
};

// Eight 16-bit values in one 16-byte vector, unpacked to f32.
template <typename T> KVR_DEVICE void unpack8(const uint4 v, float out[8]) {
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        out[2 * i] = Conv<T>::to_f32((u16)(w[i] & 0xffffu));
        out[2 * i + 1] = Conv<T>::to_f32((u16)(w[i] >> 16));
    }
}

KVR_DEVICE float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
KVR_DEVICE float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a whole block (blockDim.x a multiple of 32, at most 1024). `scratch` holds 32 floats.
KVR_DEVICE float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int nwarps = (blockDim.x + 31) >> 5;
    v = lane < nwarps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

#ifndef KVR_HEAD_DIM
#define KVR_HEAD_DIM 128
#endif
#ifndef KVR_GQA
#define KVR_GQA 4
#endif
