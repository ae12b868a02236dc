// Dequantization of GGUF tensors to bf16/f16, with ggml's exact block layouts (ggml-common.h):
//   Q4_0 {f16 d; u8 qs[16]}            x = (nibble - 8) * d; low nibbles are elements 0..15
//   Q4_1 {f16 d; f16 m; u8 qs[16]}     x = nibble * d + m
//   Q8_0 {f16 d; i8 qs[32]}            x = q * d
//   Q4_K {f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}   256 elements, 8 sub-blocks of 32 with
//        6-bit scales and mins packed as ggml's get_scale_min_k4
//   Q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}   256 elements, 6-bit values - 32
// One thread per output element: this runs once, at load, so it is written to be plainly right.
// Grid-stride over n elements; `src` is the tensor's raw bytes.

KVR_DEVICE u16 ld16(const u8* p) { return (u16)(p[0] | (p[1] << 8)); }
KVR_DEVICE float ldf16(const u8* p) { return f16_to_f32(ld16(p)); }

KVR_DEVICE float deq_f32(const u8* s, i64 i) {
    const u8* p = s + 4 * i;
    return __uint_as_float((u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24));
}
KVR_DEVICE float deq_f16(const u8* s, i64 i) { return ldf16(s + 2 * i); }
KVR_DEVICE float deq_bf16(const u8* s, i64 i) { return bf16_to_f32(ld16(s + 2 * i)); }

KVR_DEVICE float deq_q4_0(const u8* s, i64 i) {
    const u8* b = s + (i / 32) * 18;
    const int j = (int)(i % 32);
    const int q = j < 16 ? (b[2 + j] & 0xF) : (b[2 + j - 16] >> 4);
    return (float)(q - 8) * ldf16(b);
}
KVR_DEVICE float deq_q4_1(const u8* s, i64 i) {
    const u8* b = s + (i / 32) * 20;
    const int j = (int)(i % 32);
    const int q = j < 16 ? (b[4 + j] & 0xF) : (b[4 + j - 16] >> 4);
    return (float)q * ldf16(b) + ldf16(b + 2);
}
KVR_DEVICE float deq_q8_0(const u8* s, i64 i) {
    const u8* b = s + (i / 32) * 34;
    return (float)((i8)b[2 + i % 32]) * ldf16(b);
}
KVR_DEVICE void scale_min_k4(int j, const u8* q, int* sc, int* m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}
KVR_DEVICE float deq_q4_k(const u8* s, i64 i) {
    const u8* b = s + (i / 256) * 144;
    const int j = (int)(i % 256);
    const int chunk = j / 64, w = j % 64;
    const u8 byte = b[16 + chunk * 32 + (w % 32)];
    const int q = w < 32 ? (byte & 0xF) : (byte >> 4);
    int sc, m;
    scale_min_k4(2 * chunk + (w >= 32), b + 4, &sc, &m);
    return ldf16(b) * (float)sc * (float)q - ldf16(b + 2) * (float)m;
}
KVR_DEVICE float deq_q6_k(const u8* s, i64 i) {
    const u8* b = s + (i / 256) * 210;
    const int j = (int)(i % 256);
    const int half = j / 128, r = j % 128, quarter = r / 32, l = r % 32;
    const u8* ql = b + half * 64;
    const u8* qh = b + 128 + half * 32;
    const i8* sc = (const i8*)(b + 192) + half * 8;
    const int lo = (quarter & 1) ? ql[l + 32] : ql[l];
    const int nib = quarter < 2 ? (lo & 0xF) : (lo >> 4);
    const int hi = (qh[l] >> (2 * quarter)) & 3;
    const int q = (nib | (hi << 4)) - 32;
    return ldf16(b + 208) * (float)sc[l / 16 + 2 * quarter] * (float)q;
}

#define KVR_DEQUANT_ENTRY(SRC, NAME, T)                                                       \
    extern "C" __global__ void dequant_##SRC##_##NAME(u16* __restrict__ out,                  \
                                                      const u8* __restrict__ src, i64 n) {    \
        for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n;                       \
             i += (i64)gridDim.x * blockDim.x)                                                \
            out[i] = Conv<T>::from_f32(deq_##SRC(src, i));                                    \
    }
#define KVR_DEQUANT_ALL(NAME, T)          \
    KVR_DEQUANT_ENTRY(f32, NAME, T)       \
    KVR_DEQUANT_ENTRY(f16, NAME, T)       \
    KVR_DEQUANT_ENTRY(bf16, NAME, T)      \
    KVR_DEQUANT_ENTRY(q4_0, NAME, T)      \
    KVR_DEQUANT_ENTRY(q4_1, NAME, T)      \
    KVR_DEQUANT_ENTRY(q8_0, NAME, T)      \
    KVR_DEQUANT_ENTRY(q4_k, NAME, T)      \
    KVR_DEQUANT_ENTRY(q6_k, NAME, T)

KVR_DEQUANT_ALL(bf16, bf16_t)
KVR_DEQUANT_ALL(f16, f16_t)
