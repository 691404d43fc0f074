#define NEG_INF __int_as_float(0xff800000)

/* (max, Σ exp(x − max)) pairs merged; an empty pair is (−∞, 0). */
__device__ __forceinline__ void merge(float &m, float &s, float m2, float s2) {
    const float top = fmaxf(m, m2);
    if (top == NEG_INF) return;
    s = (m == NEG_INF ? 0.0f : s * __expf(m - top)) + (m2 == NEG_INF ? 0.0f : s2 * __expf(m2 - top));
    m = top;
}

template <typename T>
__device__ void rows(const T *logits, const unsigned int *targets, const float *mask,
                     float *out, u64 count, u64 vocab) {
    __shared__ float maxima[32], sums[32];
    const u64 row = blockIdx.x;
    const T *x = logits + row * vocab;
    float m = NEG_INF, s = 0.0f;
    for (u64 c = threadIdx.x; c < vocab; c += blockDim.x) {
        const float v = load(x, c);
        if (v > m) {
            s = (m == NEG_INF ? 0.0f : s * __expf(m - v)) + 1.0f;
            m = v;
        } else {
            s += __expf(v - m);
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        merge(m, s, __shfl_xor_sync(0xffffffff, m, o), __shfl_xor_sync(0xffffffff, s, o));
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        maxima[warp] = m;
        sums[warp] = s;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)((blockDim.x + 31) / 32); ++w) merge(m, s, maxima[w], sums[w]);
        const float lse = m + logf(s);
        const unsigned int target = targets[row];
        const float picked = target < vocab ? load(x, target) : __int_as_float(0x7fc00000);
        out[row] = lse;
        out[count + row] = mask[row] == 0.0f ? 0.0f : (lse - picked) * mask[row];
    }
}

template <typename T>
__device__ void gradient(const T *logits, const unsigned int *targets, const float *mask,
                         const float *statistics, T *out, u64 count, u64 vocab) {
    const u64 row = blockIdx.x;
    const float lse = statistics[row], weight = mask[row];
    const unsigned int target = targets[row];
    for (u64 c = threadIdx.x; c < vocab; c += blockDim.x) {
        const float p = __expf(load(logits, row * vocab + c) - lse);
        store(out, row * vocab + c, weight == 0.0f ? 0.0f : (p - (c == target ? 1.0f : 0.0f)) * weight);
    }
}

#define INSTANTIATE(NAME, T)                                                                 \
extern "C" __global__ void cross_entropy_rows_##NAME(const T *logits,                       \
    const unsigned int *targets, const float *mask, float *out, u64 count, u64 vocab) {    \
    rows<T>(logits, targets, mask, out, count, vocab);                                     \
}                                                                                          \
extern "C" __global__ void cross_entropy_gradient_##NAME(const T *logits,                   \
    const unsigned int *targets, const float *mask, const float *statistics, T *out,       \
    u64 count, u64 vocab) {                                                                \
    gradient<T>(logits, targets, mask, statistics, out, count, vocab);                     \
}

INSTANTIATE(f32, float)
INSTANTIATE(bf16, unsigned short)
