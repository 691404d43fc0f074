//! Causal self-attention as one op whose memory is O(B·H·L·D), not O(B·H·L²): each block
//! of query rows runs an online softmax over blocks of the keys it may see, each block's
//! scores one matrix product, and the backward recomputes the probabilities instead of
//! keeping them. Causality, padding and packing come from
//! positions and each row's [`Segments`] (a query sees the earlier keys of its own
//! sequence), so no L² bias tensor is built; grouped-query heads read their shared
//! key/value head directly, so K and V are never repeated.
//!
//! This file is the op and its CPU implementation (f32 and f64); `attention_cuda.rs` holds
//! the CUDA kernels (f32 and bf16, head dimensions 16, 32 and 64).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::lanes;
use crate::matrix::{matmul, Matrix, Threads};
use crate::real::{contiguous, with_values, Real};
use crate::segments::{Bounds, Segments};
use crate::vectorized::vectorized;

/// `softmax(q·kᵀ·scale + causal, padding and segment mask)·v` for q (B, H, L, D) and
/// k, v (B, KV, L, D), H a multiple of KV; row b holds the sequences `segments` gives it.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &Segments,
    scale: f64,
) -> Result<Tensor> {
    let (op, [q, k, v]) = causal_attention_op(q, k, v, segments, scale)?;
    q.apply_op3(&k, &v, op)
}

/// [`causal_attention`]'s op and its operands (contiguous), for a caller that applies it
/// without a graph node and runs its `bwd` itself.
pub fn causal_attention_op(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &Segments,
    scale: f64,
) -> Result<(CausalAttention, [Tensor; 3])> {
    let (batch, _, len, _) = q.dims4()?;
    if segments.rows() != batch {
        candle_core::bail!(
            "causal attention: {batch} rows but segments for {}",
            segments.rows()
        );
    }
    let op = CausalAttention {
        lengths: segments.lengths(),
        bounds: segments.bounds(len)?,
        scale,
        logsumexp: std::sync::Mutex::new(None),
        #[cfg(feature = "cuda")]
        cuda_logsumexp: std::sync::Mutex::new(None),
    };
    Ok((op, [q.contiguous()?, k.contiguous()?, v.contiguous()?]))
}

/// Whether the op runs on `device` for tensors of `dtype` with heads of `head_dim`: on the
/// CPU in f32 or f64; on CUDA in f32 or bf16 for the head dimensions it has kernels for.
pub fn supported(device: &candle_core::Device, dtype: DType, head_dim: usize) -> bool {
    match device {
        candle_core::Device::Cpu => matches!(dtype, DType::F32 | DType::F64),
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) => {
            matches!(dtype, DType::F32 | DType::BF16)
                && crate::attention_cuda::HEAD_DIMS.contains(&head_dim)
        }
        _ => {
            let _ = head_dim;
            false
        }
    }
}

/// Which attention runs on `device` for tensors of `dtype` with heads of `head_dim`:
/// `"tensor-core"` or `"per-thread"` kernels on CUDA, `"cpu"`, or `"composed"` from candle
/// ops where the op does not run ([`supported`]).
pub fn implementation(
    device: &candle_core::Device,
    dtype: DType,
    head_dim: usize,
) -> Result<&'static str> {
    if !supported(device, dtype, head_dim) {
        return Ok("composed");
    }
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(cuda) => {
            Ok(if crate::attention_cuda::tensor_cores(cuda, dtype)? {
                "tensor-core"
            } else {
                "per-thread"
            })
        }
        _ => Ok("cpu"),
    }
}

pub struct CausalAttention {
    /// Each row's real tokens: keys at or past them are padding, seen by no query.
    lengths: Vec<usize>,
    /// Each position's first visible key and the end of the queries that see it.
    bounds: Bounds,
    scale: f64,
    /// Each query row's logsumexp (B·H·L numbers), kept by the forward pass so the
    /// backward recomputes the probabilities without a pass to find them; `-inf` for a
    /// row that sees no key.
    logsumexp: std::sync::Mutex<Option<Vec<f64>>>,
    /// The same, kept on the GPU by the CUDA forward.
    #[cfg(feature = "cuda")]
    cuda_logsumexp:
        std::sync::Mutex<Option<candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>>>,
}

/// Queries and keys are taken this many at a time: each block's scores are one matrix
/// product (gemm's SIMD kernels), small enough to stay in cache while it is used.
const BLOCK: usize = 64;

/// The keys of `seen` that lie in the block `keys`, counted from the block's first; empty
/// (and inside the block) when none do.
#[inline(always)]
fn within(seen: &std::ops::Range<usize>, keys: &std::ops::Range<usize>) -> std::ops::Range<usize> {
    let start = seen.start.clamp(keys.start, keys.end) - keys.start;
    start..(seen.end.clamp(keys.start, keys.end) - keys.start).max(start)
}

/// A row of a block's scores becomes `e^(s − shift)` on the keys `seen` and 0 on the
/// others (the forward's and the backward's one mask); returns the row's sum.
#[inline(always)]
fn exponentiate<T: Real>(row: &mut [T], seen: std::ops::Range<usize>, shift: T) -> T {
    let (before, rest) = row.split_at_mut(seen.start);
    let (inside, after) = rest.split_at_mut(seen.len());
    before.fill(T::default());
    after.fill(T::default());
    // Exponentiate, then sum: a loop with nothing carried from one entry to the next
    // vectorises.
    inside.iter_mut().for_each(|s| *s = (*s - shift).exp_fast());
    lanes::sum(inside)
}

/// A head's keys or values (L × D, row-major) stored as D × L, for products with their
/// transpose: a block of them is then contiguous along the keys, and gemm takes it as the
/// right operand of `q·kᵀ` (or `dO·vᵀ`) as it is, where it packs a row-major block first
/// for every block of queries. Rows are `stride` apart, a cache line more than a multiple
/// of 16: at a power-of-two length a block's D rows would all fall in the same few sets of
/// the L1 cache and evict each other.
struct Columns<T> {
    data: Vec<T>,
    stride: usize,
}

impl<T: Real> Columns<T> {
    fn of(head: &[T], dim: usize) -> Columns<T> {
        let len = head.len() / dim.max(1);
        let stride = len.next_multiple_of(16) + 16;
        let mut data = vec![T::default(); dim * stride];
        for (i, row) in head.chunks_exact(dim).enumerate() {
            for (j, value) in row.iter().enumerate() {
                data[j * stride + i] = *value;
            }
        }
        Columns { data, stride }
    }

    /// The columns of `keys`: D × keys.len().
    fn keys(&self, keys: &std::ops::Range<usize>) -> Matrix<&[T]> {
        Matrix {
            data: &self.data[keys.start..],
            rows: self.data.len() / self.stride,
            cols: keys.len(),
            row_stride: self.stride,
            col_stride: 1,
        }
    }
}

/// The sizes of one call: query heads, key/value heads, length, head dim (the batch is
/// what the tensors' lengths imply).
#[derive(Clone, Copy)]
struct Dims {
    heads: usize,
    kv_heads: usize,
    len: usize,
    dim: usize,
}

impl Dims {
    fn of(q: &[usize], k: &[usize]) -> Result<Dims> {
        let (&[batch, heads, len, dim], &[kb, kv_heads, kl, kd]) = (q, k) else {
            candle_core::bail!("causal attention takes (B, H, L, D) tensors");
        };
        if (kb, kl, kd) != (batch, len, dim) || kv_heads == 0 || heads % kv_heads != 0 {
            candle_core::bail!("causal attention: q {q:?} and k/v {k:?} do not fit");
        }
        Ok(Dims {
            heads,
            kv_heads,
            len,
            dim,
        })
    }

    /// Head `h` of row `b` in a tensor of `tensor_heads` heads: L·D values.
    fn head(&self, tensor_heads: usize, b: usize, h: usize) -> std::ops::Range<usize> {
        let start = (b * tensor_heads + h) * self.len * self.dim;
        start..start + self.len * self.dim
    }
}

/// One block of queries: the keys each sees, and the span of keys any of them sees.
struct QueryBlock {
    queries: std::ops::Range<usize>,
    visible: Vec<std::ops::Range<usize>>,
    keys: std::ops::Range<usize>,
}

impl QueryBlock {
    /// The key blocks to visit, each clipped to the keys this block sees, skipping those
    /// no query of it sees (other sequences of a packed row).
    fn key_blocks(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        self.keys
            .clone()
            .step_by(BLOCK)
            .map(|start| start..(start + BLOCK).min(self.keys.end))
            .filter(|block| {
                self.visible
                    .iter()
                    .any(|seen| seen.start < block.end && block.start < seen.end)
            })
    }
}

impl CausalAttention {
    /// The keys query `i` of row `b` sees: real ones of its sequence, at or before it.
    fn visible(&self, dims: Dims, b: usize, i: usize) -> std::ops::Range<usize> {
        let start = self.bounds.starts[b * dims.len + i] as usize;
        start..(i + 1).min(self.lengths.get(b).copied().unwrap_or(0))
    }

    /// Row `b`'s query blocks that see at least one key.
    fn query_blocks(&self, dims: Dims, b: usize) -> impl Iterator<Item = QueryBlock> + '_ {
        (0..dims.len).step_by(BLOCK).filter_map(move |first| {
            let queries = first..(first + BLOCK).min(dims.len);
            let visible: Vec<_> = queries.clone().map(|i| self.visible(dims, b, i)).collect();
            let seen = visible.iter().filter(|seen| !seen.is_empty());
            let start = seen.clone().map(|seen| seen.start).min()?;
            let end = seen.map(|seen| seen.end).max()?;
            Some(QueryBlock {
                queries,
                visible,
                keys: start..end,
            })
        })
    }

    /// Head `h` of row `b`: its output (L·D, zero-filled on entry) and each query's
    /// logsumexp (`-inf` on entry, left so for a query that sees no key), by an online
    /// softmax over blocks of keys.
    #[inline(always)]
    fn forward_head<T: Real>(
        &self,
        dims: Dims,
        (q, k_columns, v): (&[T], &[Columns<T>], &[T]),
        (b, h): (usize, usize),
        (out, logsumexp): (&mut [T], &mut [f64]),
    ) {
        let kvh = h / (dims.heads / dims.kv_heads);
        let (q, k_t, v) = (
            &q[dims.head(dims.heads, b, h)],
            &k_columns[b * dims.kv_heads + kvh],
            &v[dims.head(dims.kv_heads, b, kvh)],
        );
        let (d, scale, minus_infinity) = (dims.dim, T::of(self.scale), T::of(f64::NEG_INFINITY));
        let mut probabilities = [T::default(); BLOCK * BLOCK];
        for block in self.query_blocks(dims, b) {
            let rows = block.queries.len();
            let (mut max, mut sum) = (vec![minus_infinity; rows], vec![T::default(); rows]);
            let q_block = &q[block.queries.start * d..block.queries.end * d];
            let out_block = &mut out[block.queries.start * d..block.queries.end * d];
            for keys in block.key_blocks() {
                let cols = keys.len();
                let p = &mut probabilities[..rows * cols];
                matmul(
                    Matrix::rows(&mut *p, rows, cols),
                    Matrix::rows(q_block, rows, d),
                    k_t.keys(&keys),
                    false,
                    scale,
                    Threads::One,
                );
                for (r, p_row) in p.chunks_exact_mut(cols).enumerate() {
                    let seen = within(&block.visible[r], &keys);
                    let block_max = lanes::max(&p_row[seen.clone()], minus_infinity);
                    if block_max > max[r] {
                        let correction = (max[r] - block_max).exp();
                        sum[r] *= correction;
                        out_block[r * d..(r + 1) * d]
                            .iter_mut()
                            .for_each(|o| *o *= correction);
                        max[r] = block_max;
                    }
                    sum[r] += exponentiate(p_row, seen, max[r]);
                }
                matmul(
                    Matrix::rows(&mut *out_block, rows, d),
                    Matrix::rows(&*p, rows, cols),
                    Matrix::rows(&v[keys.start * d..keys.end * d], cols, d),
                    true,
                    T::of(1.0),
                    Threads::One,
                );
            }
            let lse_block = &mut logsumexp[block.queries.clone()];
            for (r, (out_row, lse)) in out_block.chunks_exact_mut(d).zip(lse_block).enumerate() {
                if sum[r] > T::default() {
                    out_row.iter_mut().for_each(|o| *o /= sum[r]);
                    *lse = (max[r] + sum[r].ln()).to_f64();
                }
            }
        }
    }

    /// The output and each query row's logsumexp (B·H·L, `-inf` for a row that sees no
    /// key). One task per (row, head): their outputs are disjoint.
    fn forward<T: Real>(&self, dims: Dims, q: &[T], k: &[T], v: &[T]) -> (Vec<T>, Vec<f64>) {
        let mut out = vec![T::default(); q.len()];
        let mut logsumexp = vec![f64::NEG_INFINITY; q.len() / dims.dim.max(1)];
        // Each key/value head's keys as columns, once for the query heads that share it.
        let k_columns: Vec<Columns<T>> = k
            .par_chunks((dims.len * dims.dim).max(1))
            .map(|head| Columns::of(head, dims.dim))
            .collect();
        out.par_chunks_mut(dims.len * dims.dim)
            .zip(logsumexp.par_chunks_mut(dims.len))
            .enumerate()
            .for_each(|(row_head, outputs)| {
                let (b, h) = (row_head / dims.heads, row_head % dims.heads);
                vectorized(
                    #[inline(always)]
                    || self.forward_head(dims, (q, &k_columns, v), (b, h), outputs),
                );
            });
        (out, logsumexp)
    }

    /// Gradients of q, k and v, recomputing each block's probabilities from the rows'
    /// logsumexp (the forward's, else computed again). One task per (row, key/value head):
    /// it owns that head's dK and dV and the dQ of the query heads sharing it.
    fn backward<T: Real>(&self, dims: Dims, saved: Saved<'_, T>) -> (Vec<T>, Vec<T>, Vec<T>) {
        let Saved { q, k, v, out, grad } = saved;
        let kept = self.logsumexp.lock().ok().and_then(|mut kept| kept.take());
        let logsumexp = match kept {
            Some(kept) if kept.len() == q.len() / dims.dim.max(1) => kept,
            _ => self.forward(dims, q, k, v).1,
        };
        let (mut dq, mut dk, mut dv) = (
            vec![T::default(); q.len()],
            vec![T::default(); k.len()],
            vec![T::default(); v.len()],
        );
        let (group, head) = (dims.heads / dims.kv_heads, dims.len * dims.dim);
        dq.par_chunks_mut(group * head)
            .zip(dk.par_chunks_mut(head))
            .zip(dv.par_chunks_mut(head))
            .enumerate()
            .for_each(|(row_head, ((dq, dk), dv))| {
                let (b, kvh) = (row_head / dims.kv_heads, row_head % dims.kv_heads);
                let (k, v) = (
                    &k[dims.head(dims.kv_heads, b, kvh)],
                    &v[dims.head(dims.kv_heads, b, kvh)],
                );
                let transposed = (Columns::of(k, dims.dim), Columns::of(v, dims.dim));
                for (member, dq) in dq.chunks_exact_mut(head).enumerate() {
                    let h = kvh * group + member;
                    let rows = (b * dims.heads + h) * dims.len..(b * dims.heads + h + 1) * dims.len;
                    let head = Head {
                        saved: Saved {
                            q: &q[dims.head(dims.heads, b, h)],
                            k,
                            v,
                            out: &out[dims.head(dims.heads, b, h)],
                            grad: &grad[dims.head(dims.heads, b, h)],
                        },
                        transposed: (&transposed.0, &transposed.1),
                        logsumexp: &logsumexp[rows],
                    };
                    vectorized(
                        #[inline(always)]
                        || self.backward_head(dims, b, head, (dq, dk, dv)),
                    );
                }
            });
        (dq, dk, dv)
    }

    /// One query head's share of the gradients: its dQ, and what it adds to its key/value
    /// head's dK and dV.
    #[inline(always)]
    fn backward_head<T: Real>(
        &self,
        dims: Dims,
        b: usize,
        head: Head<'_, T>,
        (dq, dk, dv): (&mut [T], &mut [T], &mut [T]),
    ) {
        let Head {
            saved,
            transposed: (k_t, v_t),
            logsumexp,
        } = head;
        // v is read through its columns (`v_t`) only.
        let Saved {
            q,
            k,
            v: _,
            out,
            grad,
        } = saved;
        let (d, scale) = (dims.dim, T::of(self.scale));
        let mut probabilities = [T::default(); BLOCK * BLOCK];
        let mut score_grads = [T::default(); BLOCK * BLOCK];
        for block in self.query_blocks(dims, b) {
            let rows = block.queries.len();
            let span = block.queries.start * d..block.queries.end * d;
            let (q_block, g_block) = (&q[span.clone()], &grad[span.clone()]);
            let delta: Vec<T> = g_block
                .chunks_exact(d)
                .zip(out[span.clone()].chunks_exact(d))
                .map(|(g, o)| lanes::dot(g, o))
                .collect();
            for keys in block.key_blocks() {
                let cols = keys.len();
                let key_span = keys.start * d..keys.end * d;
                let (p, ds) = (
                    &mut probabilities[..rows * cols],
                    &mut score_grads[..rows * cols],
                );
                matmul(
                    Matrix::rows(&mut *p, rows, cols),
                    Matrix::rows(q_block, rows, d),
                    k_t.keys(&keys),
                    false,
                    scale,
                    Threads::One,
                );
                for (r, p_row) in p.chunks_exact_mut(cols).enumerate() {
                    let lse = logsumexp[block.queries.start + r];
                    let seen = match lse.is_finite() {
                        true => within(&block.visible[r], &keys),
                        false => 0..0,
                    };
                    exponentiate(p_row, seen, T::of(lse));
                }
                matmul(
                    Matrix::rows(&mut dv[key_span.clone()], cols, d),
                    Matrix::rows(&*p, rows, cols).t(),
                    Matrix::rows(g_block, rows, d),
                    true,
                    T::of(1.0),
                    Threads::One,
                );
                matmul(
                    Matrix::rows(&mut *ds, rows, cols),
                    Matrix::rows(g_block, rows, d),
                    v_t.keys(&keys),
                    false,
                    T::of(1.0),
                    Threads::One,
                );
                for ((ds_row, p_row), delta) in ds
                    .chunks_exact_mut(cols)
                    .zip(p.chunks_exact(cols))
                    .zip(&delta)
                {
                    for (ds, p) in ds_row.iter_mut().zip(p_row) {
                        *ds = *p * (*ds - *delta) * scale;
                    }
                }
                matmul(
                    Matrix::rows(&mut dq[span.clone()], rows, d),
                    Matrix::rows(&*ds, rows, cols),
                    Matrix::rows(&k[key_span.clone()], cols, d),
                    true,
                    T::of(1.0),
                    Threads::One,
                );
                matmul(
                    Matrix::rows(&mut dk[key_span], cols, d),
                    Matrix::rows(&*ds, rows, cols).t(),
                    Matrix::rows(q_block, rows, d),
                    true,
                    T::of(1.0),
                    Threads::One,
                );
            }
        }
    }
}

/// One query head's inputs to the backward (its own rows of q, the output and its
/// gradient, its key/value head's k and v, and those two as [`Columns`]) and its rows'
/// logsumexp.
struct Head<'a, T> {
    saved: Saved<'a, T>,
    transposed: (&'a Columns<T>, &'a Columns<T>),
    logsumexp: &'a [f64],
}

impl CausalAttention {
    /// The backward on tensors of element type `T`: q, k, v, the output and its gradient
    /// read flat, the gradients of q, k and v built in the same shapes.
    fn gradients<T: Real>(
        &self,
        dims: Dims,
        [q, k, v, out, grad]: [&Tensor; 5],
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (dq, dk, dv) = with_values([q, k, v, out, grad], |[q, k, v, out, grad]| {
            self.backward(dims, Saved { q, k, v, out, grad })
        })?;
        let build =
            |data: Vec<T>, like: &Tensor| Tensor::from_vec(data, like.shape(), like.device());
        Ok((build(dq, q)?, build(dk, k)?, build(dv, v)?))
    }
}

/// What the backward reads: the inputs, the output and its gradient, flattened.
struct Saved<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    out: &'a [T],
    grad: &'a [T],
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::of(q_layout.dims(), k_layout.dims())?;
        let shape = q_layout.shape().clone();
        let (out, logsumexp) = match (q, k, v) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                let (out, logsumexp) = self.forward(
                    dims,
                    contiguous(q, q_layout, "causal attention")?,
                    contiguous(k, k_layout, "causal attention")?,
                    contiguous(v, v_layout, "causal attention")?,
                );
                (CpuStorage::F32(out), logsumexp)
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => {
                let (out, logsumexp) = self.forward(
                    dims,
                    contiguous(q, q_layout, "causal attention")?,
                    contiguous(k, k_layout, "causal attention")?,
                    contiguous(v, v_layout, "causal attention")?,
                );
                (CpuStorage::F64(out), logsumexp)
            }
            _ => candle_core::bail!("causal attention on the CPU takes f32 or f64"),
        };
        if let Ok(mut kept) = self.logsumexp.lock() {
            *kept = Some(logsumexp);
        }
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        q_layout: &Layout,
        k: &candle_core::CudaStorage,
        k_layout: &Layout,
        v: &candle_core::CudaStorage,
        v_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let shape = cuda_shape(q_layout.dims(), k_layout.dims())?;
        let (out, logsumexp) = crate::attention_cuda::forward(
            (q, q_layout),
            (k, k_layout),
            (v, v_layout),
            (&self.lengths, &self.bounds),
            self.scale,
            shape,
        )?;
        if let Ok(mut kept) = self.cuda_logsumexp.lock() {
            *kept = Some(logsumexp);
        }
        Ok((out, q_layout.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = self.input_gradients(q, k, v, out, grad)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

impl CausalAttention {
    /// The gradients of q, k and v for the output's `grad`: what `bwd` returns, for a
    /// caller that chains the backward itself.
    pub fn input_gradients(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            return self.cuda_gradients(q, k, v, out, grad);
        }
        let dims = Dims::of(q.dims(), k.dims())?;
        match q.dtype() {
            DType::F32 => self.gradients::<f32>(dims, [q, k, v, out, grad]),
            DType::F64 => self.gradients::<f64>(dims, [q, k, v, out, grad]),
            other => {
                candle_core::bail!("causal attention on the CPU takes f32 or f64, not {other:?}")
            }
        }
    }
}

/// The kernels' sizes for q (B, H, L, D) and k (B, KV, L, D).
#[cfg(feature = "cuda")]
fn cuda_shape(q: &[usize], k: &[usize]) -> Result<crate::attention_cuda::Shape> {
    let dims = Dims::of(q, k)?;
    Ok(crate::attention_cuda::Shape {
        batch: q[0],
        heads: dims.heads,
        kv_heads: dims.kv_heads,
        len: dims.len,
        dim: dims.dim,
    })
}

#[cfg(feature = "cuda")]
impl CausalAttention {
    /// The backward on the GPU: one op over q, k and v returns their gradients in one
    /// buffer, split here. The logsumexp the forward kept is used once; a second backward
    /// runs the forward again for it.
    fn cuda_gradients(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let kept = self
            .cuda_logsumexp
            .lock()
            .ok()
            .and_then(|mut kept| kept.take());
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let logsumexp = match kept {
            Some(logsumexp) => logsumexp,
            None => {
                let again = CausalAttention {
                    lengths: self.lengths.clone(),
                    bounds: self.bounds.clone(),
                    scale: self.scale,
                    logsumexp: std::sync::Mutex::new(None),
                    cuda_logsumexp: std::sync::Mutex::new(None),
                };
                q.apply_op3_no_bwd(&k, &v, &again)?;
                let kept = again
                    .cuda_logsumexp
                    .lock()
                    .ok()
                    .and_then(|mut kept| kept.take());
                kept.ok_or_else(|| {
                    candle_core::Error::Msg("causal attention: no logsumexp to reuse".into())
                })?
            }
        };
        let op = crate::cuda::OnCuda(CudaGradients {
            lengths: self.lengths.clone(),
            bounds: self.bounds.clone(),
            scale: self.scale,
            out: out.contiguous()?,
            grad: grad.contiguous()?,
            logsumexp,
        });
        let all = q.apply_op3_no_bwd(&k, &v, &op)?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let dq = all.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = all.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = all.narrow(0, nq + nk, nk)?.reshape(k.shape())?;
        Ok((dq, dk, dv))
    }
}

/// The CUDA backward as an op over (q, k, v) with the rest it reads held here; its
/// result is the gradients of q, k and v, flat and in that order.
#[cfg(feature = "cuda")]
struct CudaGradients {
    lengths: Vec<usize>,
    bounds: Bounds,
    scale: f64,
    out: Tensor,
    grad: Tensor,
    logsumexp: candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
}

#[cfg(feature = "cuda")]
impl crate::cuda::CudaOp3 for CudaGradients {
    fn name(&self) -> &'static str {
        "causal-attention-gradients"
    }

    fn cuda_fwd(
        &self,
        (q, q_layout): (&candle_core::CudaStorage, &Layout),
        (k, k_layout): (&candle_core::CudaStorage, &Layout),
        (v, v_layout): (&candle_core::CudaStorage, &Layout),
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let shape = cuda_shape(q_layout.dims(), k_layout.dims())?;
        let (out, out_layout) = self.out.storage_and_layout();
        let (grad, grad_layout) = self.grad.storage_and_layout();
        let (candle_core::Storage::Cuda(out), candle_core::Storage::Cuda(grad)) = (&*out, &*grad)
        else {
            candle_core::bail!("causal attention: the output or its gradient is not on the GPU");
        };
        let saved = crate::attention_cuda::Saved {
            out: (out, out_layout),
            grad: (grad, grad_layout),
            logsumexp: &self.logsumexp,
        };
        let gradients = crate::attention_cuda::backward(
            (q, q_layout),
            (k, k_layout),
            (v, v_layout),
            saved,
            (&self.lengths, &self.bounds),
            self.scale,
            shape,
        )?;
        let count = q_layout.shape().elem_count() + 2 * k_layout.shape().elem_count();
        Ok((gradients, Shape::from(count)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// The composed attention the op replaces: repeated K/V, an L² bias, softmax, matmul.
    /// `rows[b]` are row b's sequence lengths; query i sees key j when j ≤ i, j is real
    /// and both are of one sequence (padding belonging to the last).
    fn composed(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rows: &[Vec<usize>],
        scale: f64,
    ) -> Result<Tensor> {
        let (batch, heads, len, _) = q.dims4()?;
        let groups = heads / k.dim(1)?;
        let repeat = |t: &Tensor| -> Result<Tensor> {
            let (b, kv, l, d) = t.dims4()?;
            t.unsqueeze(2)?
                .broadcast_as((b, kv, groups, l, d))?
                .reshape((b, kv * groups, l, d))
        };
        let sequence_of = |b: usize, i: usize| {
            let mut end = 0;
            for (index, length) in rows[b].iter().enumerate() {
                end += length;
                if i < end {
                    return index;
                }
            }
            rows[b].len().saturating_sub(1)
        };
        let bias: Vec<f64> = (0..batch)
            .flat_map(|b| {
                let length: usize = rows[b].iter().sum();
                (0..len).flat_map(move |i| {
                    (0..len).map(move |j| {
                        let seen = j <= i && j < length && sequence_of(b, i) == sequence_of(b, j);
                        if seen {
                            0.0
                        } else {
                            -1e30
                        }
                    })
                })
            })
            .collect();
        let bias = Tensor::from_vec(bias, (batch, 1, len, len), q.device())?;
        let scores = (q.matmul(&repeat(k)?.t()?)? * scale)?.broadcast_add(&bias)?;
        let max = scores.max_keepdim(D::Minus1)?;
        let e = scores.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
            .matmul(&repeat(v)?)
    }

    fn random(shape: (usize, usize, usize, usize), seed: u64) -> Result<Var> {
        let count = shape.0 * shape.1 * shape.2 * shape.3;
        let mut state = seed;
        let values: Vec<f64> = (0..count)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect();
        Var::from_tensor(&Tensor::from_vec(values, shape, &Device::Cpu)?)
    }

    #[test]
    fn equals_composed_attention_and_its_gradients_in_f64() -> Result<()> {
        // Two rows (one padded), four query heads sharing two key/value heads.
        equals_composed(&[vec![5], vec![3]], 5, 3)
    }

    #[test]
    fn packed_rows_attend_within_their_sequences_only() -> Result<()> {
        // Three sequences in the first row; two and padding in the second.
        equals_composed(&[vec![2, 1, 2], vec![1, 2]], 5, 3)
    }

    #[test]
    fn rows_longer_than_a_block_equal_the_composed_attention() -> Result<()> {
        // Three blocks of queries and keys, the last one short: sequences that end inside
        // a block and others that span blocks, a block of another sequence's keys that
        // a query block skips, a padded row, and a row of one long sequence.
        let len = 2 * BLOCK + 22;
        let rows = [vec![30, BLOCK + 30, 5, 20], vec![BLOCK + 9], vec![len]];
        equals_composed(&rows, len, 8)
    }

    fn equals_composed(rows: &[Vec<usize>], len: usize, dim: usize) -> Result<()> {
        let (batch, heads, kv_heads) = (rows.len(), 4, 2);
        let segments = Segments::packed(rows.to_vec());
        let scale = 1.0 / (dim as f64).sqrt();
        let q = random((batch, heads, len, dim), 1)?;
        let k = random((batch, kv_heads, len, dim), 2)?;
        let v = random((batch, kv_heads, len, dim), 3)?;
        let weights = random((batch, heads, len, dim), 4)?;

        let ours = causal_attention(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            &segments,
            scale,
        )?;
        let theirs = composed(q.as_tensor(), k.as_tensor(), v.as_tensor(), rows, scale)?;
        let difference = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(difference < 1e-12, "outputs differ by {difference}");

        let ours_grads = (ours * weights.as_tensor())?.sum_all()?.backward()?;
        let theirs_grads = (theirs * weights.as_tensor())?.sum_all()?.backward()?;
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let a = ours_grads.get(var).expect("our gradient");
            let b = theirs_grads.get(var).expect("composed gradient");
            let difference = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(difference < 1e-12, "d{name} differs by {difference}");
        }
        Ok(())
    }

    #[test]
    fn refuses_shapes_that_do_not_fit() -> Result<()> {
        let q = Tensor::zeros((1, 3, 4, 2), DType::F32, &Device::Cpu)?;
        let k = Tensor::zeros((1, 2, 4, 2), DType::F32, &Device::Cpu)?;
        let error = causal_attention(&q, &k, &k, &Segments::unpacked(&[4]), 1.0)
            .expect_err("3 heads over 2");
        assert!(error.to_string().contains("do not fit"), "{error}");
        Ok(())
    }
}
