//! The causal attention op on CUDA: the same online softmax, the same masks from positions,
//! row lengths and sequence bounds (packed rows), and the same recomputing backward as the CPU implementation in
//! `attention.rs`, with f32 arithmetic over f32 or bf16 tensors.
//!
//! One thread owns one query row (forward, dQ) or one key row (dK, dV, summed over the
//! query heads sharing it), and the rows it reads from the other side stream through
//! shared memory in tiles, so memory stays O(B·H·L·D) and no B·H·L² tensor exists. The
//! head dimension is a template constant (16, 32 or 64) so each row's vectors stay in
//! registers; other sizes keep the composed attention.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result};

use crate::segments::Bounds;

/// Head dimensions with a compiled kernel.
pub(crate) const HEAD_DIMS: [usize; 3] = [16, 32, 64];

/// Query rows per forward and dQ block; key rows per dK/dV block.
const QUERY_ROWS: u32 = 64;
const KEY_ROWS: u32 = 32;

/// The sizes of one call, as the kernels take them.
#[derive(Clone, Copy)]
pub(crate) struct Shape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub len: usize,
    pub dim: usize,
}

impl Shape {
    fn query_entries(&self) -> usize {
        self.batch * self.heads * self.len * self.dim
    }

    fn key_entries(&self) -> usize {
        self.batch * self.kv_heads * self.len * self.dim
    }

    fn rows(&self) -> usize {
        self.batch * self.heads * self.len
    }
}

fn suffix(dtype: DType, dim: usize) -> Result<String> {
    let name = match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        other => candle_core::bail!("causal attention on CUDA takes f32 or bf16, not {other:?}"),
    };
    if !HEAD_DIMS.contains(&dim) {
        candle_core::bail!("causal attention on CUDA: no kernel for head dimension {dim}");
    }
    Ok(format!("{name}_{dim}"))
}

fn contiguous_range(layout: &Layout) -> Result<std::ops::Range<usize>> {
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("causal attention: an input is not contiguous".into())
    })?;
    Ok(start..end)
}

/// What the kernels read of which keys each query sees, on the device.
struct Visibility {
    /// Each row's real length, clamped to the sequence (B entries).
    lengths: CudaSlice<u32>,
    /// Each position's first visible key (B·L entries).
    starts: CudaSlice<u32>,
    /// One past the last query that sees each key (B·L entries).
    ends: CudaSlice<u32>,
}

fn upload_visibility(
    device: &candle_core::CudaDevice,
    (lengths, bounds): (&[usize], &Bounds),
    shape: Shape,
) -> Result<Visibility> {
    let lengths: Vec<u32> = (0..shape.batch)
        .map(|b| lengths.get(b).copied().unwrap_or(0).min(shape.len) as u32)
        .collect();
    let positions = shape.batch * shape.len;
    if bounds.starts.len() != positions || bounds.ends.len() != positions {
        candle_core::bail!(
            "causal attention: bounds for {} positions, not {positions}",
            bounds.starts.len()
        );
    }
    Ok(Visibility {
        lengths: device.clone_htod(&lengths)?,
        starts: device.clone_htod(&bounds.starts)?,
        ends: device.clone_htod(&bounds.ends)?,
    })
}

fn grid(rows: usize, per_block: u32, blocks_y: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((rows as u32).div_ceil(per_block), blocks_y as u32, 1),
        block_dim: (per_block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The forward pass: the output (in the inputs' type) and each query row's logsumexp.
#[allow(unsafe_code)]
pub(crate) fn forward(
    (q, q_layout): (&CudaStorage, &Layout),
    (k, k_layout): (&CudaStorage, &Layout),
    (v, v_layout): (&CudaStorage, &Layout),
    visibility: (&[usize], &Bounds),
    scale: f64,
    shape: Shape,
) -> Result<(CudaStorage, CudaSlice<f32>)> {
    fn launch<T: CudaDType + DeviceRepr>(
        inputs: [(&CudaStorage, std::ops::Range<usize>); 3],
        visibility: (&[usize], &Bounds),
        scale: f32,
        shape: Shape,
        name: &str,
    ) -> Result<(CudaStorage, CudaSlice<f32>)> {
        let device = inputs[0].0.device.clone();
        let function = device.get_or_load_custom_func(
            &format!("attention_forward_{name}"),
            "trainer_kernels_attention",
            &PROGRAM.ptx()?,
        )?;
        let [q, k, v] = inputs.map(|(storage, range)| (storage, range));
        let q = q.0.as_cuda_slice::<T>()?.slice(q.1);
        let k = k.0.as_cuda_slice::<T>()?.slice(k.1);
        let v = v.0.as_cuda_slice::<T>()?.slice(v.1);
        let visibility = upload_visibility(&device, visibility, shape)?;
        // SAFETY: every output entry and every logsumexp is written by the kernel (one
        // thread per query row) before anything reads it.
        let out = unsafe { device.alloc::<T>(shape.query_entries())? };
        // SAFETY: as above.
        let logsumexp = unsafe { device.alloc::<f32>(shape.rows())? };
        let (heads, kv_heads, len) = (shape.heads as i32, shape.kv_heads as i32, shape.len as i32);
        let mut builder = function.builder();
        builder.arg(&q);
        builder.arg(&k);
        builder.arg(&v);
        builder.arg(&out);
        builder.arg(&logsumexp);
        builder.arg(&visibility.lengths);
        builder.arg(&visibility.starts);
        builder.arg(&heads);
        builder.arg(&kv_heads);
        builder.arg(&len);
        builder.arg(&scale);
        let config = grid(shape.len, QUERY_ROWS, shape.batch * shape.heads);
        // SAFETY: q holds B·H·L·D entries and k, v B·KV·L·D (checked by the caller), the
        // outputs were sized from the same shape, lengths holds B entries and starts B·L.
        unsafe { builder.launch(config) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, device), logsumexp))
    }

    let name = suffix(q.dtype(), shape.dim)?;
    let inputs = [
        (q, contiguous_range(q_layout)?),
        (k, contiguous_range(k_layout)?),
        (v, contiguous_range(v_layout)?),
    ];
    match q.dtype() {
        DType::F32 => launch::<f32>(inputs, visibility, scale as f32, shape, &name),
        _ => launch::<half::bf16>(inputs, visibility, scale as f32, shape, &name),
    }
}

/// What the backward reads besides q, k and v: the forward's output and logsumexp, and
/// the output's gradient (all contiguous).
pub(crate) struct Saved<'a> {
    pub out: (&'a CudaStorage, &'a Layout),
    pub grad: (&'a CudaStorage, &'a Layout),
    pub logsumexp: &'a CudaSlice<f32>,
}

/// The gradients of q, k and v in one buffer, in that order (the inputs' type).
#[allow(unsafe_code)]
pub(crate) fn backward(
    (q, q_layout): (&CudaStorage, &Layout),
    (k, k_layout): (&CudaStorage, &Layout),
    (v, v_layout): (&CudaStorage, &Layout),
    saved: Saved<'_>,
    visibility: (&[usize], &Bounds),
    scale: f64,
    shape: Shape,
) -> Result<CudaStorage> {
    fn launch<T: CudaDType + DeviceRepr>(
        inputs: [(&CudaStorage, std::ops::Range<usize>); 5],
        logsumexp: &CudaSlice<f32>,
        visibility: (&[usize], &Bounds),
        scale: f32,
        shape: Shape,
        name: &str,
    ) -> Result<CudaStorage> {
        let device = inputs[0].0.device.clone();
        let ptx = PROGRAM.ptx()?;
        let load = |kernel: &str| {
            device.get_or_load_custom_func(
                &format!("attention_{kernel}_{name}"),
                "trainer_kernels_attention",
                &ptx,
            )
        };
        let view = |i: usize| -> Result<_> {
            let (storage, range) = &inputs[i];
            Ok(storage.as_cuda_slice::<T>()?.slice(range.clone()))
        };
        let (q, k, v, out, grad) = (view(0)?, view(1)?, view(2)?, view(3)?, view(4)?);
        let visibility = upload_visibility(&device, visibility, shape)?;
        let (heads, kv_heads, len) = (shape.heads as i32, shape.kv_heads as i32, shape.len as i32);
        let rows = shape.rows() as u64;

        // Each row's Σ dO·O, which every probability's gradient subtracts.
        // SAFETY: the kernel writes every row's entry before the others read it.
        let delta = unsafe { device.alloc::<f32>(shape.rows())? };
        let function = load("delta")?;
        let mut builder = function.builder();
        builder.arg(&out);
        builder.arg(&grad);
        builder.arg(&delta);
        builder.arg(&rows);
        // SAFETY: out and grad hold `rows` rows of D entries, delta `rows` entries.
        unsafe { builder.launch(LaunchConfig::for_num_elems(rows as u32)) }.w()?;

        let (nq, nk) = (shape.query_entries(), shape.key_entries());
        let group = shape.heads / shape.kv_heads;
        // SAFETY: dQ's kernel writes every query row; the group sum every dK and dV entry.
        let mut gradients = unsafe { device.alloc::<T>(nq + 2 * nk)? };
        // Each query head's share of dK and dV, in f32, summed over the group afterwards.
        // SAFETY: every (head, key row) pair of the grid writes its share.
        let shares = unsafe { device.alloc::<f32>(group * 2 * nk)? };
        let (mut dq, mut dkv) = gradients.split_at_mut(nq);

        // dQ: a thread per query row. dK and dV: a thread per key row and query head.
        let kernels = [
            (
                "grad_q",
                grid(shape.len, QUERY_ROWS, shape.batch * shape.heads),
            ),
            ("grad_kv", {
                let mut config = grid(shape.len, KEY_ROWS, shape.batch * shape.kv_heads);
                config.grid_dim.2 = group as u32;
                config
            }),
        ];
        for (kernel, config) in kernels {
            let function = load(kernel)?;
            let mut builder = function.builder();
            builder.arg(&q);
            builder.arg(&k);
            builder.arg(&v);
            builder.arg(&grad);
            builder.arg(logsumexp);
            builder.arg(&delta);
            builder.arg(&visibility.lengths);
            // dQ reads each query's first key; dK and dV each key's last query.
            if kernel == "grad_q" {
                builder.arg(&visibility.starts);
            } else {
                builder.arg(&visibility.ends);
            }
            builder.arg(&heads);
            builder.arg(&kv_heads);
            builder.arg(&len);
            builder.arg(&scale);
            if kernel == "grad_q" {
                builder.arg(&mut dq);
            } else {
                builder.arg(&shares);
            }
            // SAFETY: the sizes are those of the forward; dQ holds B·H·L·D entries, the
            // shares group·2·B·KV·L·D.
            unsafe { builder.launch(config) }.w()?;
        }
        let function = load("sum_shares")?;
        let mut builder = function.builder();
        let (entries, members) = ((2 * nk) as u64, group as i32);
        builder.arg(&shares);
        builder.arg(&mut dkv);
        builder.arg(&entries);
        builder.arg(&members);
        // SAFETY: shares holds `members` runs of `entries` floats, dkv `entries` entries.
        unsafe { builder.launch(LaunchConfig::for_num_elems(entries as u32)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(gradients, device))
    }

    let name = suffix(q.dtype(), shape.dim)?;
    let inputs = [
        (q, contiguous_range(q_layout)?),
        (k, contiguous_range(k_layout)?),
        (v, contiguous_range(v_layout)?),
        (saved.out.0, contiguous_range(saved.out.1)?),
        (saved.grad.0, contiguous_range(saved.grad.1)?),
    ];
    let scale = scale as f32;
    match q.dtype() {
        DType::F32 => launch::<f32>(inputs, saved.logsumexp, visibility, scale, shape, &name),
        _ => launch::<half::bf16>(inputs, saved.logsumexp, visibility, scale, shape, &name),
    }
}

/// The kernels. Row `i` of batch row `b` sees keys `starts[b·L + i] ≤ j < min(i + 1,
/// length[b])`, and key `j` is seen by queries `j ≤ i < ends[b·L + j]` (its sequence's
/// end); a row that sees none outputs 0 and has logsumexp −∞.
const SOURCE: &str = crate::cuda::cuda_source!(
    r#"
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
"#
);

static PROGRAM: crate::cuda::Program = crate::cuda::Program::new(SOURCE);
