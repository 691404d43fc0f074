/* The attention op on tensor cores (bf16, compute capability 8.0 and up): the
   FlashAttention-2 loops with `mma.sync` m16n8k16 products accumulated in f32, for the
   same masks, output, logsumexp and gradients as the bf16 kernels of attention.cu (whose
   `delta` and `sum_shares` these share).

   A block is four warps; each warp owns 16 rows (queries in the forward and dQ, keys in
   dK/dV) and walks the tiles of 64 rows of the other side its block sees. Lane
   (g = lane / 4, t = lane % 4) holds, of every 16 × 8 result, rows g and g + 8 and
   columns 2t and 2t + 1 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), so it keeps two
   rows' running values, and a row's sums need only the four lanes of a quad. A 16 × 64
   result (scores, probabilities, their gradients) is exactly the next product's left
   operand once rounded to bf16 (the FlashAttention-2 register reuse). Tiles stream
   through shared memory as bf16 pairs, one 32-bit word per operand register: as they are
   (row = token, word = two dimensions) when the product contracts over dimensions, and
   transposed (row = dimension, word = two tokens) when it contracts over tokens. */
#define NEG_INF __int_as_float(0xff800000)
#define MMA_THREADS 128
#define MMA_ROWS 64
/* Words added to each shared row so that a quad's eight groups read eight distinct
   bank quadruples. */
#define MMA_PAD 4

#ifndef TRAINER_KERNELS_EMULATED
/* d += a·b over one 16 × 16 (a, row-major) by 16 × 8 (b, column-major) bf16 product. */
__device__ __forceinline__ void mma_bf16_16x8x16(float (&d)[4], const unsigned int (&a)[4],
                                                 const unsigned int (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

/* Entries i and i + 1 of a bf16 matrix as one word, the first in the low half. */
__device__ __forceinline__ unsigned int bf16_pair(const unsigned short *p, u64 i) {
    return (unsigned int)p[i] | ((unsigned int)p[i + 1] << 16);
}

/* Two f32 values rounded to bf16 and packed, `low` in the low half. */
__device__ __forceinline__ unsigned int round_pair(float low, float high) {
    return (unsigned int)to_bf16(low) | ((unsigned int)to_bf16(high) << 16);
}

/* The row maximum over the four lanes of a quad (the lanes holding one row). */
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffff, x, 1);
    return x + __shfl_xor_sync(0xffffffff, x, 2);
}

__device__ __forceinline__ int lane_group() { return (threadIdx.x % 32) / 4; }
__device__ __forceinline__ int lane_in_group() { return threadIdx.x % 4; }

/* A 16 × 64 result of f32 products: 8 column blocks of 8, 4 entries each per lane. */
typedef float Tile16x64[MMA_ROWS / 8][4];

/* Rows `rows[0]` and `rows[1]` (this lane's g and g + 8) of a (len, D) bf16 matrix as
   the left operand of products over its D dimensions; rows past the end are zeros. */
template <int D>
__device__ void load_left(unsigned int (&left)[D / 16][4], const unsigned short *matrix,
                          const int (&rows)[2], int len) {
    const int t = lane_in_group();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int row = rows[r % 2], d = kk * 16 + 2 * t + (r / 2) * 8;
            left[kk][r] = row < len ? bf16_pair(matrix, (u64)row * D + d) : 0u;
        }
    }
}

/* Eight bf16 entries as four pairs: one 16-byte load or store. */
struct __align__(16) EightEntries {
    unsigned int pairs[4];
};

/* Entries 8c..8c + 8 of a (len, D) bf16 matrix's row as four pairs, zeros past the end:
   one 16-byte load where the matrix is 16-byte aligned (as candle allocates it). */
template <int D>
__device__ __forceinline__ void load_eight(unsigned int (&pairs)[4], const unsigned short *matrix,
                                           int row, int c, int len, bool aligned) {
    const u64 at = (u64)row * D + 8 * c;
    if (row >= len) {
        pairs[0] = pairs[1] = pairs[2] = pairs[3] = 0u;
    } else if (aligned) {
        const EightEntries wide = *(const EightEntries *)(matrix + at);
#pragma unroll
        for (int j = 0; j < 4; ++j) pairs[j] = wide.pairs[j];
    } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) pairs[j] = bf16_pair(matrix, at + 2 * j);
    }
}

/* Rows `first..first + 64` of a (len, D) bf16 matrix into shared memory, zeros past the
   end: as they are into `rows` and transposed into `columns`, either of which may be
   null. Each step moves eight entries of two consecutive rows, its threads reading
   consecutive stretches of a row. By the whole block. */
template <int D>
__device__ void load_tile(unsigned int (*rows)[D / 2 + MMA_PAD],
                          unsigned int (*columns)[MMA_ROWS / 2 + MMA_PAD],
                          const unsigned short *matrix, int first, int len) {
    const bool aligned = ((u64)matrix & 15) == 0;
    for (int e = threadIdx.x; e < (MMA_ROWS / 2) * (D / 8); e += blockDim.x) {
        const int c = e % (D / 8), w = e / (D / 8), row = first + 2 * w;
        unsigned int low[4], high[4];
        load_eight<D>(low, matrix, row, c, len, aligned);
        load_eight<D>(high, matrix, row + 1, c, len, aligned);
        if (rows) {
            EightEntries &first_row = *(EightEntries *)&rows[2 * w][4 * c];
            EightEntries &second_row = *(EightEntries *)&rows[2 * w + 1][4 * c];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                first_row.pairs[j] = low[j];
                second_row.pairs[j] = high[j];
            }
        }
        if (columns) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                columns[8 * c + 2 * j][w] = (low[j] & 0xffffu) | (high[j] << 16);
                columns[8 * c + 2 * j + 1][w] = (low[j] >> 16) | (high[j] & 0xffff0000u);
            }
        }
    }
}

/* Which of a tile's eight column blocks of 8 (from row j0 of the other side) hold a row
   in [first, end), the rows some row of the warp pairs with, as bits: the warp skips the
   products of the others (causal diagonals, other sequences of a packed row), whose
   entries are all masked. Equal across the warp, as `mma.sync` needs. */
__device__ __forceinline__ unsigned int live_blocks(int j0, int first, int end) {
    unsigned int live = 0u;
#pragma unroll
    for (int n = 0; n < MMA_ROWS / 8; ++n) {
        if (j0 + 8 * n < end && j0 + 8 * n + 8 > first) live |= 1u << n;
    }
    return live;
}

/* out = left (16 × D) · tileᵀ, the tile's 64 rows as they are: scores, or their
   gradient from the output's; zeros in the column blocks not `live`. */
template <int D>
__device__ void product_over_dims(Tile16x64 &out, const unsigned int (&left)[D / 16][4],
                                  const unsigned int (*tile)[D / 2 + MMA_PAD],
                                  unsigned int live) {
    const int g = lane_group(), t = lane_in_group();
#pragma unroll
    for (int n = 0; n < MMA_ROWS / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) out[n][e] = 0.0f;
        if (!(live >> n & 1u)) continue;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const unsigned int right[2] = {tile[n * 8 + g][kk * 8 + t],
                                           tile[n * 8 + g][kk * 8 + 4 + t]};
            mma_bf16_16x8x16(out[n], left[kk], right);
        }
    }
}

/* acc (16 × D) += weights (16 × 64, rounded to bf16) · the tile's 64 rows, from their
   transposed copy; weights outside the `live` column blocks are zeros and skipped. */
template <int D>
__device__ void accumulate_over_rows(float (&acc)[D / 8][4], const Tile16x64 &weights,
                                     const unsigned int (*tile)[MMA_ROWS / 2 + MMA_PAD],
                                     unsigned int live) {
    const int g = lane_group(), t = lane_in_group();
#pragma unroll
    for (int kk = 0; kk < MMA_ROWS / 16; ++kk) {
        if (!(live >> (2 * kk) & 3u)) continue;
        const unsigned int left[4] = {
            round_pair(weights[2 * kk][0], weights[2 * kk][1]),
            round_pair(weights[2 * kk][2], weights[2 * kk][3]),
            round_pair(weights[2 * kk + 1][0], weights[2 * kk + 1][1]),
            round_pair(weights[2 * kk + 1][2], weights[2 * kk + 1][3]),
        };
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            const unsigned int right[2] = {tile[n * 8 + g][kk * 8 + t],
                                           tile[n * 8 + g][kk * 8 + 4 + t]};
            mma_bf16_16x8x16(acc[n], left, right);
        }
    }
}

template <int D>
__device__ void zero(float (&acc)[D / 8][4]) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[n][e] = 0.0f;
    }
}

/* Rows `rows` of a (len, D) output from this lane's accumulators, each row times its
   factor. */
template <typename T, int D>
__device__ void store_rows(T *matrix, const float (&acc)[D / 8][4], const int (&rows)[2],
                           const float (&factor)[2], int len) {
    const int t = lane_in_group();
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        if (rows[half] >= len) continue;
        const u64 at = (u64)rows[half] * D;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            store(matrix, at + n * 8 + 2 * t, acc[n][2 * half] * factor[half]);
            store(matrix, at + n * 8 + 2 * t + 1, acc[n][2 * half + 1] * factor[half]);
        }
    }
}

/* The query rows a warp owns in the forward and dQ, and which keys each sees. */
struct QueryRows {
    int index[2];   /* positions g and g + 8 of the warp's 16 */
    int first[2];   /* the first key each sees */
    int visible[2]; /* one past the last key each sees (0 past the row's end) */
    int block_first, block_keys; /* the keys any row of the block sees */
    int warp_first, warp_keys;   /* the keys any row of the warp sees */
    u64 bh;         /* the (batch row, head) the block works on */
    const unsigned short *keys, *values;
};

__device__ QueryRows query_rows(const unsigned short *k, const unsigned short *v,
                                const unsigned int *lengths, const unsigned int *starts,
                                int heads, int kv_heads, int len, int dim) {
    QueryRows at;
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int kvh = h / (heads / kv_heads);
    const int block_row = blockIdx.x * MMA_ROWS, length = (int)lengths[b];
    const int warp_row = block_row + (threadIdx.x / 32) * 16 + lane_group();
    for (int half = 0; half < 2; ++half) {
        const int i = warp_row + 8 * half;
        at.index[half] = i;
        at.first[half] = i < len ? (int)starts[(u64)b * len + i] : 0;
        at.visible[half] = i < len ? min(i + 1, length) : 0;
    }
    /* Starts never decrease along a row, so the block's (warp's) first row starts first. */
    at.block_first = (int)starts[(u64)b * len + min(block_row, len - 1)];
    at.block_keys = min(min(block_row + MMA_ROWS, len), length);
    const int warp_first_row = block_row + (threadIdx.x / 32) * 16;
    at.warp_first = (int)starts[(u64)b * len + min(warp_first_row, len - 1)];
    at.warp_keys = min(min(warp_first_row + 16, len), length);
    at.bh = (u64)bh;
    at.keys = k + (u64)(b * kv_heads + kvh) * len * dim;
    at.values = v + (u64)(b * kv_heads + kvh) * len * dim;
    return at;
}

/* In place: a score becomes its probability exp(score·scale − lse) if the pair is seen
   (0 if not), and the probability's gradient dP the score's, p·(dP − Δ)·scale. */
__device__ __forceinline__ void probability_and_gradient(float &score, float &gradient,
                                                         bool seen, float lse, float delta,
                                                         float scale) {
    const float p = seen ? __expf(score * scale - lse) : 0.0f;
    score = p;
    gradient = p * (gradient - delta) * scale;
}

/* Whether this lane's entry e of column block n in a tile from key j0 is a key its query
   row sees. */
__device__ __forceinline__ bool sees(const QueryRows &at, int j0, int n, int e) {
    const int key = j0 + n * 8 + 2 * lane_in_group() + e % 2, half = e / 2;
    return key >= at.first[half] && key < at.visible[half];
}

template <int D>
__device__ void forward_mma(const unsigned short *q, const unsigned short *k,
                            const unsigned short *v, unsigned short *out, float *lse,
                            const unsigned int *lengths, const unsigned int *starts, int heads,
                            int kv_heads, int len, float scale) {
    __shared__ __align__(16) unsigned int keys_shared[MMA_ROWS][D / 2 + MMA_PAD];
    __shared__ __align__(16) unsigned int values_shared[D][MMA_ROWS / 2 + MMA_PAD];
    const QueryRows at = query_rows(k, v, lengths, starts, heads, kv_heads, len, D);
    unsigned int query[D / 16][4];
    load_left<D>(query, q + at.bh * len * D, at.index, len);
    float acc[D / 8][4];
    zero<D>(acc);
    /* Each row's running max of its scaled scores (−∞ before any) and this lane's share
       of Σ exp(score − max). */
    float row_max[2] = {NEG_INF, NEG_INF}, row_sum[2] = {0.0f, 0.0f};

    /* Tiles start on the block's first key, so a packed row's later sequences skip the
       tiles of those before them. */
    for (int j0 = at.block_first; j0 < at.block_keys; j0 += MMA_ROWS) {
        __syncthreads();
        load_tile<D>(keys_shared, nullptr, at.keys, j0, len);
        load_tile<D>(nullptr, values_shared, at.values, j0, len);
        __syncthreads();
        const unsigned int live = live_blocks(j0, at.warp_first, at.warp_keys);
        Tile16x64 s;
        product_over_dims<D>(s, query, keys_shared, live);
        float tile_max[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int n = 0; n < MMA_ROWS / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[n][e] = sees(at, j0, n, e) ? s[n][e] * scale : NEG_INF;
                tile_max[e / 2] = fmaxf(tile_max[e / 2], s[n][e]);
            }
        }
        float base[2], correction[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const float next = fmaxf(row_max[half], quad_max(tile_max[half]));
            /* A row that has seen no key yet keeps −∞ as its max; its exponentials are
               taken against 0, so that every one of them (and the correction) is 0, not
               NaN. */
            base[half] = next == NEG_INF ? 0.0f : next;
            correction[half] = __expf(row_max[half] - base[half]);
            row_max[half] = next;
            row_sum[half] *= correction[half];
        }
#pragma unroll
        for (int n = 0; n < MMA_ROWS / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[n][e] = __expf(s[n][e] - base[e / 2]);
                row_sum[e / 2] += s[n][e];
            }
        }
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[n][e] *= correction[e / 2];
        }
        accumulate_over_rows<D>(acc, s, values_shared, live);
    }

    float inverse[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const float sum = quad_sum(row_sum[half]);
        inverse[half] = sum > 0.0f ? 1.0f / sum : 0.0f;
        const int i = at.index[half];
        if (i < len && lane_in_group() == 0)
            lse[at.bh * len + i] = sum > 0.0f ? row_max[half] + logf(sum) : NEG_INF;
    }
    store_rows<unsigned short, D>(out + at.bh * len * D, acc, at.index, inverse, len);
}

/* dQ_i = scale · Σ_j p_ij (dO_i·v_j − Δ_i) k_j, a warp per 16 query rows. */
template <int D>
__device__ void grad_q_mma(const unsigned short *q, const unsigned short *k,
                           const unsigned short *v, const unsigned short *grad,
                           const float *lse, const float *deltas, const unsigned int *lengths,
                           const unsigned int *starts, int heads, int kv_heads, int len,
                           float scale, unsigned short *dq) {
    __shared__ __align__(16) unsigned int keys_shared[MMA_ROWS][D / 2 + MMA_PAD];
    __shared__ __align__(16) unsigned int keys_transposed[D][MMA_ROWS / 2 + MMA_PAD];
    __shared__ __align__(16) unsigned int values_shared[MMA_ROWS][D / 2 + MMA_PAD];
    const QueryRows at = query_rows(k, v, lengths, starts, heads, kv_heads, len, D);
    unsigned int query[D / 16][4], upstream[D / 16][4];
    load_left<D>(query, q + at.bh * len * D, at.index, len);
    load_left<D>(upstream, grad + at.bh * len * D, at.index, len);
    float row_lse[2], row_delta[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int i = at.index[half];
        row_lse[half] = i < len ? lse[at.bh * len + i] : 0.0f;
        row_delta[half] = i < len ? deltas[at.bh * len + i] : 0.0f;
    }
    float acc[D / 8][4];
    zero<D>(acc);
    for (int j0 = at.block_first; j0 < at.block_keys; j0 += MMA_ROWS) {
        __syncthreads();
        load_tile<D>(keys_shared, keys_transposed, at.keys, j0, len);
        load_tile<D>(values_shared, nullptr, at.values, j0, len);
        __syncthreads();
        const unsigned int live = live_blocks(j0, at.warp_first, at.warp_keys);
        Tile16x64 s, dp;
        product_over_dims<D>(s, query, keys_shared, live);
        product_over_dims<D>(dp, upstream, values_shared, live);
#pragma unroll
        for (int n = 0; n < MMA_ROWS / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int half = e / 2;
                probability_and_gradient(s[n][e], dp[n][e], sees(at, j0, n, e), row_lse[half],
                                         row_delta[half], scale);
            }
        }
        accumulate_over_rows<D>(acc, dp, keys_transposed, live);
    }
    const float one[2] = {1.0f, 1.0f};
    store_rows<unsigned short, D>(dq + at.bh * len * D, acc, at.index, one, len);
}

/* dV_j = Σ_i p_ij dO_i and dK_j = scale · Σ_i p_ij (dO_i·v_j − Δ_i) q_i over the query
   rows of one head (blockIdx.z of those sharing key/value head kvh), a warp per 16 key
   rows. Each head writes its share (dK, then dV, in f32) for `sum_shares` to add up. */
template <int D>
__device__ void grad_kv_mma(const unsigned short *q, const unsigned short *k,
                            const unsigned short *v, const unsigned short *grad,
                            const float *lse, const float *deltas, const unsigned int *lengths,
                            const unsigned int *ends, int heads, int kv_heads, int len,
                            float scale, float *shares) {
    __shared__ __align__(16) unsigned int queries_shared[MMA_ROWS][D / 2 + MMA_PAD];
    __shared__ __align__(16) unsigned int queries_transposed[D][MMA_ROWS / 2 + MMA_PAD];
    __shared__ __align__(16) unsigned int grads_shared[MMA_ROWS][D / 2 + MMA_PAD];
    __shared__ __align__(16) unsigned int grads_transposed[D][MMA_ROWS / 2 + MMA_PAD];
    __shared__ float tile_lse[MMA_ROWS];
    __shared__ float tile_delta[MMA_ROWS];
    const int bkv = blockIdx.y, b = bkv / kv_heads, kvh = bkv % kv_heads;
    const int group = heads / kv_heads, length = (int)lengths[b];
    const u64 bh = (u64)b * heads + kvh * group + blockIdx.z;
    const int first_key = blockIdx.x * MMA_ROWS;
    const int t = lane_in_group();
    int keys[2], last_query[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int j = first_key + (threadIdx.x / 32) * 16 + lane_group() + 8 * half;
        keys[half] = j;
        /* The queries that see key j run from j to its sequence's end; none past the
           row's length. */
        last_query[half] = j < len && j < length ? (int)ends[(u64)b * len + j] : 0;
    }
    /* Ends never decrease along a row, so the block's (warp's) last key's end bounds them
       all; the warp's queries start at its first key. */
    const int block_end = (int)ends[(u64)b * len + min(first_key + MMA_ROWS, len) - 1];
    const int warp_first_key = first_key + (threadIdx.x / 32) * 16;
    const int warp_queries =
        warp_first_key < min(len, length)
            ? (int)ends[(u64)b * len + min(warp_first_key + 16, len) - 1]
            : 0;
    const u64 kv_offset = (u64)bkv * len * D;
    unsigned int own_keys[D / 16][4], own_values[D / 16][4];
    load_left<D>(own_keys, k + kv_offset, keys, len);
    load_left<D>(own_values, v + kv_offset, keys, len);
    float dk[D / 8][4], dv[D / 8][4];
    zero<D>(dk);
    zero<D>(dv);
    const unsigned short *queries = q + bh * len * D, *grads = grad + bh * len * D;
    /* No query sees a key at or past its row's length. */
    for (int i0 = first_key; first_key < length && i0 < block_end; i0 += MMA_ROWS) {
        __syncthreads();
        load_tile<D>(queries_shared, queries_transposed, queries, i0, len);
        load_tile<D>(grads_shared, grads_transposed, grads, i0, len);
        for (int r = threadIdx.x; r < MMA_ROWS; r += blockDim.x) {
            const int i = i0 + r;
            tile_lse[r] = i < len ? lse[bh * len + i] : 0.0f;
            tile_delta[r] = i < len ? deltas[bh * len + i] : 0.0f;
        }
        __syncthreads();
        /* Transposed scores and their gradients: rows are this warp's keys, columns the
           tile's queries. */
        const unsigned int live = live_blocks(i0, warp_first_key, warp_queries);
        Tile16x64 p, ds;
        product_over_dims<D>(p, own_keys, queries_shared, live);
        product_over_dims<D>(ds, own_values, grads_shared, live);
#pragma unroll
        for (int n = 0; n < MMA_ROWS / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = n * 8 + 2 * t + e % 2, i = i0 + r, half = e / 2;
                const bool seen = i >= keys[half] && i < last_query[half];
                probability_and_gradient(p[n][e], ds[n][e], seen, tile_lse[r], tile_delta[r],
                                         scale);
            }
        }
        accumulate_over_rows<D>(dv, p, grads_transposed, live);
        accumulate_over_rows<D>(dk, ds, queries_transposed, live);
    }
    const u64 entries = (u64)gridDim.y * len * D;
    float *share = shares + (u64)blockIdx.z * 2 * entries + kv_offset;
    const float one[2] = {1.0f, 1.0f};
    store_rows<float, D>(share, dk, keys, one, len);
    store_rows<float, D>(share + entries, dv, keys, one, len);
}

#define INSTANTIATE_MMA(D)                                                                   \
extern "C" __global__ void attention_forward_mma_bf16_##D(                                 \
    const unsigned short *q, const unsigned short *k, const unsigned short *v,              \
    unsigned short *out, float *lse, const unsigned int *lengths,                           \
    const unsigned int *starts, int heads, int kv_heads, int len, float scale) {           \
    forward_mma<D>(q, k, v, out, lse, lengths, starts, heads, kv_heads, len, scale);       \
}                                                                                          \
extern "C" __global__ void attention_grad_q_mma_bf16_##D(                                  \
    const unsigned short *q, const unsigned short *k, const unsigned short *v,              \
    const unsigned short *grad, const float *lse, const float *deltas,                      \
    const unsigned int *lengths, const unsigned int *starts, int heads, int kv_heads,       \
    int len, float scale, unsigned short *dq) {                                             \
    grad_q_mma<D>(q, k, v, grad, lse, deltas, lengths, starts, heads, kv_heads, len, scale, \
                  dq);                                                                      \
}                                                                                          \
extern "C" __global__ void attention_grad_kv_mma_bf16_##D(                                 \
    const unsigned short *q, const unsigned short *k, const unsigned short *v,              \
    const unsigned short *grad, const float *lse, const float *deltas,                      \
    const unsigned int *lengths, const unsigned int *ends, int heads, int kv_heads,         \
    int len, float scale, float *shares) {                                                  \
    grad_kv_mma<D>(q, k, v, grad, lse, deltas, lengths, ends, heads, kv_heads, len, scale,  \
                   shares);                                                                 \
}

INSTANTIATE_MMA(16)
INSTANTIATE_MMA(32)
INSTANTIATE_MMA(64)
