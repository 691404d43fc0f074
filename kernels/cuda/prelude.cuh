typedef unsigned long long u64;

/* bf16 travels as its bits: widened to f32 exactly, and rounded back to nearest even (as
   the `half` crate does on the CPU), so no header is needed. */
__device__ __forceinline__ float load(const float *p, u64 i) { return p[i]; }
__device__ __forceinline__ float load(const unsigned short *p, u64 i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ void store(float *p, u64 i, float x) { p[i] = x; }
__device__ __forceinline__ unsigned short to_bf16(float x) {
    const unsigned int bits = __float_as_uint(x);
    return x != x ? (unsigned short)((bits >> 16) | 0x40)
                  : (unsigned short)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}
__device__ __forceinline__ void store(unsigned short *p, u64 i, float x) { p[i] = to_bf16(x); }
