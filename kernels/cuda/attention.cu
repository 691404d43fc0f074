#define NEG_INF __int_as_float(0xff800000)
#define QUERY_ROWS 64
#define KEY_TILE 64
#define SCORE_GROUP 16
#define KEY_ROWS 32
#define QUERY_TILE 32
/* Shared values are read again after this point rather than kept from before it: keeping
   a row's D values live across it costs more registers than the kernel has. */
#define RELOAD_SHARED() asm volatile("" ::: "memory")

/* Rows `first..first + count` of a (len, D) matrix into a tile of floats, zeros past
   the end, by the whole block. */
template <typename T, int D, int ROWS>
__device__ void load_tile(float (*tile)[D], const T *matrix, int first, int len) {
    for (int e = threadIdx.x; e < ROWS * D; e += blockDim.x) {
        const int r = e / D, c = e % D, row = first + r;
        tile[r][c] = row < len ? load(matrix, (u64)row * D + c) : 0.0f;
    }
}

/* The query row a forward or dQ thread owns, and the key/value rows its head reads. */
template <typename T>
struct QueryRow {
    bool active;      /* a row of the sequence, not past its end */
    int first;        /* the first key it sees: its sequence's start */
    int visible;      /* one past the last key it sees: min(i + 1, length) */
    int block_first;  /* the first key any row of its block sees */
    int block_keys;   /* one past the last key any row of its block sees */
    u64 row;          /* its index among the B·H·L query rows */
    const T *keys, *values;
};

template <typename T, int D>
__device__ QueryRow<T> query_row(const T *k, const T *v, const unsigned int *lengths,
                                 const unsigned int *starts, int heads, int kv_heads, int len) {
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int kvh = h / (heads / kv_heads);
    const int i = blockIdx.x * QUERY_ROWS + threadIdx.x;
    const int length = (int)lengths[b];
    QueryRow<T> at;
    at.active = i < len;
    at.first = at.active ? (int)starts[(u64)b * len + i] : 0;
    at.visible = at.active ? min(i + 1, length) : 0;
    /* Starts never decrease along a row, so the block's first row starts first. */
    at.block_first = (int)starts[(u64)b * len + min((int)(blockIdx.x * QUERY_ROWS), len - 1)];
    at.block_keys = min(min((int)(blockIdx.x * QUERY_ROWS + QUERY_ROWS), len), length);
    at.row = (u64)bh * len + i;
    at.keys = k + (u64)(b * kv_heads + kvh) * len * D;
    at.values = v + (u64)(b * kv_heads + kvh) * len * D;
    return at;
}

template <typename T, int D>
__device__ void forward(const T *q, const T *k, const T *v, T *out, float *lse,
                        const unsigned int *lengths, const unsigned int *starts, int heads,
                        int kv_heads, int len, float scale) {
    __shared__ float ks[KEY_TILE][D];
    __shared__ float vs[KEY_TILE][D];
    const QueryRow<T> at = query_row<T, D>(k, v, lengths, starts, heads, kv_heads, len);
    const bool active = at.active;
    const int first = at.first, visible = at.visible, block_keys = at.block_keys;
    const u64 row = at.row;
    const T *keys = at.keys, *values = at.values;
    float qr[D], acc[D];
#pragma unroll
    for (int d = 0; d < D; ++d) {
        qr[d] = active ? load(q, row * D + d) * scale : 0.0f;
        acc[d] = 0.0f;
    }
    float m = NEG_INF, s = 0.0f;
    for (int j0 = at.block_first; j0 < block_keys; j0 += KEY_TILE) {
        __syncthreads();
        load_tile<T, D, KEY_TILE>(ks, keys, j0, len);
        load_tile<T, D, KEY_TILE>(vs, values, j0, len);
        __syncthreads();
        const int count = min(KEY_TILE, visible - j0), skip = first - j0;
        for (int r0 = 0; r0 < count; r0 += SCORE_GROUP) {
            /* A group wholly before the row's sequence: skipped, so every group taken
               holds a seen key and the running max stays finite. */
            if (r0 + SCORE_GROUP <= skip) continue;
            float score[SCORE_GROUP];
            float group_max = NEG_INF;
#pragma unroll
            for (int t = 0; t < SCORE_GROUP; ++t) {
                float x = 0.0f;
#pragma unroll
                for (int d = 0; d < D; ++d) x += qr[d] * ks[r0 + t][d];
                score[t] = r0 + t < count && r0 + t >= skip ? x : NEG_INF;
                group_max = fmaxf(group_max, score[t]);
            }
            const float m_new = fmaxf(m, group_max);
            const float correction = __expf(m - m_new);
            s *= correction;
#pragma unroll
            for (int d = 0; d < D; ++d) acc[d] *= correction;
#pragma unroll
            for (int t = 0; t < SCORE_GROUP; ++t) {
                const float p = __expf(score[t] - m_new);
                s += p;
#pragma unroll
                for (int d = 0; d < D; ++d) acc[d] += p * vs[r0 + t][d];
            }
            m = m_new;
        }
    }
    if (active) {
        const float inverse = s > 0.0f ? 1.0f / s : 0.0f;
#pragma unroll
        for (int d = 0; d < D; ++d) store(out, row * D + d, acc[d] * inverse);
        lse[row] = s > 0.0f ? m + logf(s) : NEG_INF;
    }
}

template <typename T, int D>
__device__ void delta(const T *out, const T *grad, float *result, u64 rows) {
    const u64 row = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    if (row >= rows) return;
    float x = 0.0f;
    for (int d = 0; d < D; ++d) x += load(out, row * D + d) * load(grad, row * D + d);
    result[row] = x;
}

/* dQ_i = scale · Σ_j p_ij (dO_i·v_j − Δ_i) k_j, one thread per query row. */
template <typename T, int D>
__device__ void grad_q(const T *q, const T *k, const T *v, const T *grad, const float *lse,
                       const float *deltas, const unsigned int *lengths,
                       const unsigned int *starts, int heads, int kv_heads, int len,
                       float scale, T *dq) {
    __shared__ float ks[KEY_TILE][D];
    __shared__ float vs[KEY_TILE][D];
    const QueryRow<T> at = query_row<T, D>(k, v, lengths, starts, heads, kv_heads, len);
    const bool active = at.active;
    const int first = at.first, visible = at.visible, block_keys = at.block_keys;
    const u64 row = at.row;
    const T *keys = at.keys, *values = at.values;
    float qr[D], gr[D], dqr[D];
#pragma unroll
    for (int d = 0; d < D; ++d) {
        qr[d] = active ? load(q, row * D + d) * scale : 0.0f;
        gr[d] = active ? load(grad, row * D + d) : 0.0f;
        dqr[d] = 0.0f;
    }
    const float row_lse = active ? lse[row] : 0.0f;
    const float row_delta = active ? deltas[row] : 0.0f;
    for (int j0 = at.block_first; j0 < block_keys; j0 += KEY_TILE) {
        __syncthreads();
        load_tile<T, D, KEY_TILE>(ks, keys, j0, len);
        load_tile<T, D, KEY_TILE>(vs, values, j0, len);
        __syncthreads();
        const int count = min(KEY_TILE, visible - j0);
        for (int r = max(0, first - j0); r < count; ++r) {
            float score = 0.0f, dp = 0.0f;
#pragma unroll
            for (int d = 0; d < D; ++d) {
                score += qr[d] * ks[r][d];
                dp += gr[d] * vs[r][d];
            }
            const float p = __expf(score - row_lse);
            const float ds = p * (dp - row_delta) * scale;
            RELOAD_SHARED();
#pragma unroll
            for (int d = 0; d < D; ++d) dqr[d] += ds * ks[r][d];
        }
    }
    if (active) {
#pragma unroll
        for (int d = 0; d < D; ++d) store(dq, row * D + d, dqr[d]);
    }
}

/* dV_j = Σ_i p_ij dO_i and dK_j = scale · Σ_i p_ij (dO_i·v_j − Δ_i) q_i over the query
   rows of one head (blockIdx.z of those sharing key/value head kvh); one thread per key
   row. Each head writes its share (dK, then dV, in f32) for `sum_shares` to add up. */
template <typename T, int D>
__device__ void grad_kv(const T *q, const T *k, const T *v, const T *grad, const float *lse,
                        const float *deltas, const unsigned int *lengths,
                        const unsigned int *ends, int heads, int kv_heads, int len,
                        float scale, float *shares) {
    __shared__ float qs[QUERY_TILE][D];
    __shared__ float gs[QUERY_TILE][D];
    __shared__ float own_k[KEY_ROWS][D + 1];
    __shared__ float own_v[KEY_ROWS][D + 1];
    __shared__ float tile_lse[QUERY_TILE];
    __shared__ float tile_delta[QUERY_TILE];
    const int bkv = blockIdx.y, b = bkv / kv_heads, kvh = bkv % kv_heads;
    const int group = heads / kv_heads;
    const int first_key = blockIdx.x * KEY_ROWS;
    const int j = first_key + threadIdx.x;
    const int length = (int)lengths[b];
    const bool active = j < len;
    const bool seen = active && j < length;
    /* The queries that see this key end with its sequence; ends never decrease along a
       row, so the block's last key's end bounds them all. */
    const int last_query = active ? (int)ends[(u64)b * len + j] : 0;
    const int block_end = (int)ends[(u64)b * len + min(first_key + KEY_ROWS, len) - 1];
    const u64 key_row = (u64)bkv * len + j;
    /* The thread's own key and value rows, read for every query. A bf16 key row is packed
       two to a register (exact: it is bf16), so reading it costs none of the
       shared-memory bandwidth that bounds the loop below; the value row (and an f32 key
       row) stays in shared memory, as registers for both would spill. */
    const bool packed = sizeof(T) == 2;
    unsigned int packed_k[D / 2];
    if (packed) {
        const unsigned short *kb = (const unsigned short *)k;
#pragma unroll
        for (int d = 0; d < D; d += 2) {
            const u64 at = key_row * D + d;
            packed_k[d / 2] = active ? (unsigned int)kb[at] | ((unsigned int)kb[at + 1] << 16) : 0u;
        }
    }
#pragma unroll
    for (int d = 0; d < D; ++d) {
        if (!packed) own_k[threadIdx.x][d] = active ? load(k, key_row * D + d) : 0.0f;
        own_v[threadIdx.x][d] = active ? load(v, key_row * D + d) : 0.0f;
    }
    float dkr[D], dvr[D];
#pragma unroll
    for (int d = 0; d < D; ++d) {
        dkr[d] = 0.0f;
        dvr[d] = 0.0f;
    }
    /* No query sees a key at or past its row's length. */
    if (first_key < length) {
        {
            const int member = blockIdx.z;
            const u64 bh = (u64)b * heads + kvh * group + member;
            const T *queries = q + bh * len * D;
            const T *grads = grad + bh * len * D;
            for (int i0 = first_key; i0 < block_end; i0 += QUERY_TILE) {
                __syncthreads();
                load_tile<T, D, QUERY_TILE>(qs, queries, i0, len);
                load_tile<T, D, QUERY_TILE>(gs, grads, i0, len);
                for (int r = threadIdx.x; r < QUERY_TILE; r += blockDim.x) {
                    const int i = i0 + r;
                    tile_lse[r] = i < len ? lse[bh * len + i] : 0.0f;
                    tile_delta[r] = i < len ? deltas[bh * len + i] : 0.0f;
                }
                __syncthreads();
                if (!seen) continue;
                const int rows = min(QUERY_TILE, last_query - i0);
                for (int r = max(0, j - i0); r < rows; ++r) {
                    float score = 0.0f, dp = 0.0f;
#pragma unroll
                    for (int d = 0; d < D; d += 2) {
                        float k0, k1;
                        if (packed) {
                            /* Unpacked here, each time: hoisted out of the loop, the
                               unpacked row would take the registers packing saves. */
                            asm volatile("" : "+r"(packed_k[d / 2]));
                            k0 = __uint_as_float(packed_k[d / 2] << 16);
                            k1 = __uint_as_float(packed_k[d / 2] & 0xffff0000u);
                        } else {
                            k0 = own_k[threadIdx.x][d];
                            k1 = own_k[threadIdx.x][d + 1];
                        }
                        const float v0 = own_v[threadIdx.x][d], v1 = own_v[threadIdx.x][d + 1];
                        score += qs[r][d] * k0 + qs[r][d + 1] * k1;
                        dp += gs[r][d] * v0 + gs[r][d + 1] * v1;
                    }
                    const float p = __expf(score * scale - tile_lse[r]);
                    const float ds = p * (dp - tile_delta[r]) * scale;
                    RELOAD_SHARED();
#pragma unroll
                    for (int d = 0; d < D; ++d) {
                        dvr[d] += p * gs[r][d];
                        dkr[d] += ds * qs[r][d];
                    }
                }
            }
        }
    }
    if (active) {
        const u64 keys = (u64)gridDim.y * len * D;
        float *share = shares + (u64)blockIdx.z * 2 * keys;
#pragma unroll
        for (int d = 0; d < D; ++d) {
            share[key_row * D + d] = dkr[d];
            share[keys + key_row * D + d] = dvr[d];
        }
    }
}

/* dK then dV: each entry the sum of the group's query heads' shares. */
template <typename T>
__device__ void sum_shares(const float *shares, T *dkv, u64 entries, int members) {
    for (u64 e = blockIdx.x * (u64)blockDim.x + threadIdx.x; e < entries;
         e += (u64)blockDim.x * gridDim.x) {
        float total = 0.0f;
        for (int m = 0; m < members; ++m) total += shares[(u64)m * entries + e];
        store(dkv, e, total);
    }
}

#define INSTANTIATE(NAME, T, D)                                                              \
extern "C" __global__ void attention_forward_##NAME##_##D(                                 \
    const T *q, const T *k, const T *v, T *out, float *lse, const unsigned int *lengths,    \
    const unsigned int *starts, int heads, int kv_heads, int len, float scale) {           \
    forward<T, D>(q, k, v, out, lse, lengths, starts, heads, kv_heads, len, scale);        \
}                                                                                          \
extern "C" __global__ void attention_delta_##NAME##_##D(                                   \
    const T *out, const T *grad, float *result, u64 rows) {                                \
    delta<T, D>(out, grad, result, rows);                                                  \
}                                                                                          \
extern "C" __global__ void attention_grad_q_##NAME##_##D(                                  \
    const T *q, const T *k, const T *v, const T *grad, const float *lse,                   \
    const float *deltas, const unsigned int *lengths, const unsigned int *starts,           \
    int heads, int kv_heads, int len, float scale, T *dq) {                                \
    grad_q<T, D>(q, k, v, grad, lse, deltas, lengths, starts, heads, kv_heads, len, scale,  \
                 dq);                                                                      \
}                                                                                          \
extern "C" __global__ void attention_grad_kv_##NAME##_##D(                                 \
    const T *q, const T *k, const T *v, const T *grad, const float *lse,                   \
    const float *deltas, const unsigned int *lengths, const unsigned int *ends,             \
    int heads, int kv_heads, int len, float scale, float *shares) {                        \
    grad_kv<T, D>(q, k, v, grad, lse, deltas, lengths, ends, heads, kv_heads, len, scale,   \
                  shares);                                                                 \
}                                                                                          \
extern "C" __global__ void attention_sum_shares_##NAME##_##D(                              \
    const float *shares, T *dkv, u64 entries, int members) {                               \
    sum_shares<T>(shares, dkv, entries, members);                                          \
}

INSTANTIATE(f32, float, 16)
INSTANTIATE(f32, float, 32)
INSTANTIATE(f32, float, 64)
INSTANTIATE(bf16, unsigned short, 16)
INSTANTIATE(bf16, unsigned short, 32)
INSTANTIATE(bf16, unsigned short, 64)
