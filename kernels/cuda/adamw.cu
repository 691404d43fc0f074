extern "C" __global__ void adamw_f32(
    const unsigned long long n, float *state, const float *gradient, const float *clip,
    const float beta1, const float beta2, const float step_size,
    const float inverse_root_correction, const float eps, const float decay) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         i < n; i += (unsigned long long)blockDim.x * gridDim.x) {
        const float g = gradient[i] * clip[0];
        const float m = state[n + i] * beta1 + g * (1.0f - beta1);
        const float v = state[2 * n + i] * beta2 + g * g * (1.0f - beta2);
        const float denominator = sqrtf(v) * inverse_root_correction + eps;
        state[i] = state[i] * decay - m / denominator * step_size;
        state[n + i] = m;
        state[2 * n + i] = v;
    }
}
