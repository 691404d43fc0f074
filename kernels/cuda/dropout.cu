__device__ unsigned long long splitmix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

template <typename T>
__device__ void dropout(const u64 n, const u64 stream, const u64 threshold, const float scale,
                        const T *x, T *y) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n;
         i += (u64)blockDim.x * gridDim.x) {
        const u64 draw = splitmix64(stream + i * 0x9E3779B97F4A7C15ULL);
        store(y, i, load(x, i) * ((draw >> 11) < threshold ? scale : 0.0f));
    }
}

extern "C" __global__ void dropout_f32(const u64 n, const u64 stream, const u64 threshold,
                                       const float scale, const float *x, float *y) {
    dropout<float>(n, stream, threshold, scale, x, y);
}

extern "C" __global__ void dropout_bf16(const u64 n, const u64 stream, const u64 threshold,
                                        const float scale, const unsigned short *x,
                                        unsigned short *y) {
    dropout<unsigned short>(n, stream, threshold, scale, x, y);
}
