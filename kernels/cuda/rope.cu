/* One thread per entry of the (B, H, L, D) side; the other side is (B, L, H, D). */
template <typename T>
__device__ void rope(const T *x, const T *cos, const T *sin, T *out, u64 batch, u64 heads,
                     u64 len, u64 dim, float sign, int to_heads_major, int per_row) {
    const u64 count = batch * heads * len * dim, half = dim / 2;
    for (u64 e = blockIdx.x * (u64)blockDim.x + threadIdx.x; e < count;
         e += (u64)blockDim.x * gridDim.x) {
        const u64 d = e % dim, l = (e / dim) % len, h = (e / (dim * len)) % heads;
        const u64 b = e / (dim * len * heads);
        const u64 heads_major = e - d, seq_major = ((b * len + l) * heads + h) * dim;
        const u64 from = to_heads_major ? seq_major : heads_major;
        const u64 to = to_heads_major ? heads_major : seq_major;
        const u64 partner = d < half ? d + half : d - half;
        const float side = d < half ? -sign : sign;
        const u64 table = (per_row ? b * len + l : l) * dim + d;
        store(out, to + d, load(x, from + d) * load(cos, table)
                           + side * load(sin, table) * load(x, from + partner));
    }
}

extern "C" __global__ void rope_f32(const float *x, const float *cos, const float *sin,
                                    float *out, u64 batch, u64 heads, u64 len, u64 dim,
                                    float sign, int to_heads_major, int per_row) {
    rope<float>(x, cos, sin, out, batch, heads, len, dim, sign, to_heads_major, per_row);
}

extern "C" __global__ void rope_bf16(const unsigned short *x, const unsigned short *cos,
                                     const unsigned short *sin, unsigned short *out,
                                     u64 batch, u64 heads, u64 len, u64 dim, float sign,
                                     int to_heads_major, int per_row) {
    rope<unsigned short>(x, cos, sin, out, batch, heads, len, dim, sign, to_heads_major,
                         per_row);
}
