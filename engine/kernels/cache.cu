// reshape_and_cache: write the new tokens' K and V into their paged slots.
//
// Cache layout (both K and V, one pair of buffers per layer):
//   cache[num_blocks][num_kv_heads][block_size][head_dim]
// so one (block, KV head) is one contiguous run of block_size * head_dim elements, and a token's
// head vector is head_dim contiguous elements (16-byte vector loads in the attention kernels).
//
// Inputs k, v: [num_tokens] rows of num_kv_heads * head_dim elements, `row_stride` elements apart
// (the rows may sit inside a fused QKV buffer). slot_mapping[t] = block * block_size + offset, or -1
// for a token that is not cached (padding). The copy is of 16-bit values, so one entry serves bf16
// and f16. Grid: (num_tokens), block: any multiple of 32 threads; each thread moves 16 bytes.

extern "C" __global__ void reshape_and_cache(
    const u16* __restrict__ k, const u16* __restrict__ v, u16* __restrict__ k_cache,
    u16* __restrict__ v_cache, const i64* __restrict__ slot_mapping, int row_stride,
    int num_kv_heads, int head_dim, int block_size) {
    const int t = blockIdx.x;
    const i64 slot = slot_mapping[t];
    if (slot < 0) return;
    const i64 block = slot / block_size;
    const int offset = (int)(slot % block_size);
    const int vecs_per_head = head_dim / 8;
    const int total = num_kv_heads * vecs_per_head;
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
        const int h = i / vecs_per_head, c = i % vecs_per_head;
        const i64 src = (i64)t * row_stride + (i64)h * head_dim + c * 8;
        const i64 dst = ((block * num_kv_heads + h) * block_size + offset) * (i64)head_dim + c * 8;
        *reinterpret_cast<uint4*>(k_cache + dst) = *reinterpret_cast<const uint4*>(k + src);
        *reinterpret_cast<uint4*>(v_cache + dst) = *reinterpret_cast<const uint4*>(v + src);
    }
}
