/* The sum of `v` over the block, returned to every thread. */
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < (int)((blockDim.x + 31) / 32) ? partial[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

template <typename T>
__device__ void rms_norm_forward(const T *x, const T *w, T *y, u64 n, float eps) {
    const u64 row = (u64)blockIdx.x * n;
    float squares = 0.0f;
    for (u64 c = threadIdx.x; c < n; c += blockDim.x) {
        const float v = load(x, row + c);
        squares += v * v;
    }
    const float r = rsqrtf(block_sum(squares) / (float)n + eps);
    for (u64 c = threadIdx.x; c < n; c += blockDim.x) store(y, row + c, load(x, row + c) * r * load(w, c));
}

/* dx_j = g_j w_j r − x_j r³/n · Σ_i g_i w_i x_i */
template <typename T>
__device__ void rms_norm_backward(const T *x, const T *w, const T *g, T *dx, u64 n, float eps) {
    const u64 row = (u64)blockIdx.x * n;
    float squares = 0.0f, projection = 0.0f;
    for (u64 c = threadIdx.x; c < n; c += blockDim.x) {
        const float v = load(x, row + c);
        squares += v * v;
        projection += load(g, row + c) * load(w, c) * v;
    }
    const float r = rsqrtf(block_sum(squares) / (float)n + eps);
    const float correction = block_sum(projection) * r * r * r / (float)n;
    for (u64 c = threadIdx.x; c < n; c += blockDim.x) {
        store(dx, row + c, load(g, row + c) * load(w, c) * r - load(x, row + c) * correction);
    }
}

template <typename T>
__device__ void swiglu_forward(const T *gate, const T *up, T *out, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)blockDim.x * gridDim.x) {
        const float g = load(gate, i);
        store(out, i, g / (1.0f + __expf(-g)) * load(up, i));
    }
}

/* d gate = dy·u·s·(1 + g(1 − s)), d up = dy·g·s, s = σ(g); d up after all of d gate. */
template <typename T>
__device__ void swiglu_backward(const T *gate, const T *up, const T *grad, T *both, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)blockDim.x * gridDim.x) {
        const float g = load(gate, i), dy = load(grad, i);
        const float s = 1.0f / (1.0f + __expf(-g));
        store(both, i, dy * load(up, i) * s * (1.0f + g * (1.0f - s)));
        store(both, n + i, dy * g * s);
    }
}

#define INSTANTIATE(NAME, T)                                                                 \
extern "C" __global__ void rms_norm_forward_##NAME(const T *x, const T *w, T *y, u64 n,     \
                                                    float eps) {                           \
    rms_norm_forward<T>(x, w, y, n, eps);                                                  \
}                                                                                          \
extern "C" __global__ void rms_norm_backward_##NAME(const T *x, const T *w, const T *g,     \
                                                     T *dx, u64 n, float eps) {            \
    rms_norm_backward<T>(x, w, g, dx, n, eps);                                             \
}                                                                                          \
extern "C" __global__ void swiglu_forward_##NAME(const T *gate, const T *up, T *out, u64 n, \
                                                  float unused) {                          \
    swiglu_forward<T>(gate, up, out, n);                                                   \
}                                                                                          \
extern "C" __global__ void swiglu_backward_##NAME(const T *gate, const T *up,               \
                                                   const T *grad, T *both, u64 n,          \
                                                   float unused) {                         \
    swiglu_backward<T>(gate, up, grad, both, n);                                           \
}

INSTANTIATE(f32, float)
INSTANTIATE(bf16, unsigned short)
