//! Causal self-attention as one op whose memory is O(B·H·L·D), not O(B·H·L²): each query
//! row runs an online softmax over the keys it may see, and the backward recomputes the
//! probabilities instead of keeping them. Causality, padding and packing come from
//! positions and each row's [`Segments`] (a query sees the earlier keys of its own
//! sequence), so no L² bias tensor is built; grouped-query heads read their shared
//! key/value head directly, so K and V are never repeated.
//!
//! This file is the op and its CPU implementation (f32 and f64); `attention_cuda.rs` holds
//! the CUDA kernels (f32 and bf16, head dimensions 16, 32 and 64).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::real::{contiguous, values, Real};
use crate::segments::{Bounds, Segments};

/// `softmax(q·kᵀ·scale + causal, padding and segment mask)·v` for q (B, H, L, D) and
/// k, v (B, KV, L, D), H a multiple of KV; row b holds the sequences `segments` gives it.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &Segments,
    scale: f64,
) -> Result<Tensor> {
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
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
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

struct CausalAttention {
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

/// `Σ aᵢbᵢ` in eight independent partial sums, so the compiler can keep them in one SIMD
/// register (a single running sum is a chain it may not reorder).
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let (a_lanes, b_lanes) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = a_lanes
        .remainder()
        .iter()
        .zip(b_lanes.remainder())
        .fold(T::default(), |sum, (x, y)| sum + *x * *y);
    let mut partial = [T::default(); 8];
    for (x, y) in a_lanes.zip(b_lanes) {
        for ((p, x), y) in partial.iter_mut().zip(x).zip(y) {
            *p += *x * *y;
        }
    }
    partial.iter().fold(tail, |sum, p| sum + *p)
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

    fn row(&self, tensor_heads: usize, b: usize, h: usize, i: usize) -> std::ops::Range<usize> {
        let start = ((b * tensor_heads + h) * self.len + i) * self.dim;
        start..start + self.dim
    }
}

impl CausalAttention {
    /// The keys query `i` of row `b` sees: real ones of its sequence, at or before it.
    fn visible(&self, dims: Dims, b: usize, i: usize) -> std::ops::Range<usize> {
        let start = self.bounds.starts[b * dims.len + i] as usize;
        start..(i + 1).min(self.lengths.get(b).copied().unwrap_or(0))
    }

    /// Running max and normaliser of query row `q_row`'s scores (its logsumexp is
    /// `max + ln(sum)`), and with `v` given, its output.
    fn softmax_row<T: Real>(
        &self,
        dims: Dims,
        (q, k, v): (&[T], &[T], &[T]),
        (b, h, i): (usize, usize, usize),
        mut out: Option<&mut [T]>,
    ) -> (T, T) {
        let kvh = h / (dims.heads / dims.kv_heads);
        let scale = T::of(self.scale);
        let q_row = &q[dims.row(dims.heads, b, h, i)];
        let (mut max, mut sum) = (T::default(), T::default());
        let visible = self.visible(dims, b, i);
        let first = visible.start;
        for j in visible {
            let score = dot(q_row, &k[dims.row(dims.kv_heads, b, kvh, j)]) * scale;
            let p = if j == first || score > max {
                let correction = if j == first {
                    T::of(0.0)
                } else {
                    (max - score).exp()
                };
                sum *= correction;
                if let Some(out) = out.as_deref_mut() {
                    out.iter_mut().for_each(|o| *o *= correction);
                }
                max = score;
                T::of(1.0)
            } else {
                (score - max).exp()
            };
            sum += p;
            if let Some(out) = out.as_deref_mut() {
                let v_row = &v[dims.row(dims.kv_heads, b, kvh, j)];
                out.iter_mut().zip(v_row).for_each(|(o, x)| *o += p * *x);
            }
        }
        if let Some(out) = out {
            if sum > T::default() {
                out.iter_mut().for_each(|o| *o /= sum);
            }
        }
        (max, sum)
    }

    /// One task per (row, head): their outputs are disjoint. Keeps the rows' logsumexp.
    fn forward<T: Real>(&self, dims: Dims, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
        let mut out = vec![T::default(); q.len()];
        let mut logsumexp = vec![f64::NEG_INFINITY; q.len() / dims.dim.max(1)];
        out.par_chunks_mut(dims.len * dims.dim)
            .zip(logsumexp.par_chunks_mut(dims.len))
            .enumerate()
            .for_each(|(row_head, (chunk, logsumexp))| {
                let (b, h) = (row_head / dims.heads, row_head % dims.heads);
                for (i, (out_row, lse)) in chunk.chunks_mut(dims.dim).zip(logsumexp).enumerate() {
                    let (max, sum) = self.softmax_row(dims, (q, k, v), (b, h, i), Some(out_row));
                    if sum > T::default() {
                        *lse = (max + sum.ln()).to_f64();
                    }
                }
            });
        if let Ok(mut kept) = self.logsumexp.lock() {
            *kept = Some(logsumexp);
        }
        out
    }

    /// Row `(b, h, i)`'s logsumexp: kept by the forward pass, else recomputed.
    fn row_logsumexp<T: Real>(
        &self,
        dims: Dims,
        kept: Option<&[f64]>,
        (q, k, v): (&[T], &[T], &[T]),
        (b, h, i): (usize, usize, usize),
    ) -> Option<T> {
        if let Some(kept) = kept {
            let lse = kept[(b * dims.heads + h) * dims.len + i];
            return lse.is_finite().then(|| T::of(lse));
        }
        let (max, sum) = self.softmax_row(dims, (q, k, v), (b, h, i), None);
        (sum > T::default()).then(|| max + sum.ln())
    }

    /// Gradients of q, k and v, recomputing each probability from the row's logsumexp.
    /// One task per (row, key/value head): it owns that head's dK and dV and the dQ of the
    /// query heads sharing it.
    fn backward<T: Real>(&self, dims: Dims, saved: Saved<'_, T>) -> (Vec<T>, Vec<T>, Vec<T>) {
        let Saved { q, k, v, out, grad } = saved;
        let (mut dq, mut dk, mut dv) = (
            vec![T::default(); q.len()],
            vec![T::default(); k.len()],
            vec![T::default(); v.len()],
        );
        let scale = T::of(self.scale);
        let kept = self.logsumexp.lock().ok().and_then(|mut kept| kept.take());
        let kept = kept
            .as_deref()
            .filter(|kept| kept.len() == q.len() / dims.dim.max(1));
        let (group, block) = (dims.heads / dims.kv_heads, dims.len * dims.dim);
        dq.par_chunks_mut(group * block)
            .zip(dk.par_chunks_mut(block))
            .zip(dv.par_chunks_mut(block))
            .enumerate()
            .for_each(|(row_head, ((dq, dk), dv))| {
                let (b, kvh) = (row_head / dims.kv_heads, row_head % dims.kv_heads);
                for member in 0..group {
                    let h = kvh * group + member;
                    for i in 0..dims.len {
                        let Some(logsumexp) = self.row_logsumexp(dims, kept, (q, k, v), (b, h, i))
                        else {
                            continue;
                        };
                        let row = dims.row(dims.heads, b, h, i);
                        let (q_row, g_row) = (&q[row.clone()], &grad[row.clone()]);
                        let delta = dot(g_row, &out[row]);
                        let dq_start = (member * dims.len + i) * dims.dim;
                        let dq_row = &mut dq[dq_start..dq_start + dims.dim];
                        let visible = self.visible(dims, b, i);
                        let first = visible.start;
                        let keys = visible.start * dims.dim..visible.end.max(first) * dims.dim;
                        let rows = dk[keys.clone()]
                            .chunks_exact_mut(dims.dim)
                            .zip(dv[keys].chunks_exact_mut(dims.dim));
                        for (j, (dk_row, dv_row)) in (first..).zip(rows) {
                            let kv_row = dims.row(dims.kv_heads, b, kvh, j);
                            let (k_row, v_row) = (&k[kv_row.clone()], &v[kv_row]);
                            let p = (dot(q_row, k_row) * scale - logsumexp).exp();
                            let ds = p * (dot(g_row, v_row) - delta) * scale;
                            // Slices zipped, not indexed: no bounds checks, so the three
                            // updates vectorise.
                            for (dv, g) in dv_row.iter_mut().zip(g_row) {
                                *dv += p * *g;
                            }
                            for (dq, k) in dq_row.iter_mut().zip(k_row) {
                                *dq += ds * *k;
                            }
                            for (dk, q) in dk_row.iter_mut().zip(q_row) {
                                *dk += ds * *q;
                            }
                        }
                    }
                }
            });
        (dq, dk, dv)
    }
}

impl CausalAttention {
    /// The backward on tensors of element type `T`: q, k, v, the output and its gradient
    /// read flat, the gradients of q, k and v built in the same shapes.
    fn gradients<T: Real>(
        &self,
        dims: Dims,
        [q, k, v, out, grad]: [&Tensor; 5],
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (q_data, k_data, v_data) = (values(q)?, values(k)?, values(v)?);
        let (out, grad) = (values(out)?, values(grad)?);
        let saved = Saved {
            q: &q_data,
            k: &k_data,
            v: &v_data,
            out: &out,
            grad: &grad,
        };
        let (dq, dk, dv) = self.backward(dims, saved);
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
        let out = match (q, k, v) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                CpuStorage::F32(self.forward(
                    dims,
                    contiguous(q, q_layout, "causal attention")?,
                    contiguous(k, k_layout, "causal attention")?,
                    contiguous(v, v_layout, "causal attention")?,
                ))
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => {
                CpuStorage::F64(self.forward(
                    dims,
                    contiguous(q, q_layout, "causal attention")?,
                    contiguous(k, k_layout, "causal attention")?,
                    contiguous(v, v_layout, "causal attention")?,
                ))
            }
            _ => candle_core::bail!("causal attention on the CPU takes f32 or f64"),
        };
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
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            return self.cuda_gradients(q, k, v, out, grad);
        }
        let dims = Dims::of(q.dims(), k.dims())?;
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => self.gradients::<f32>(dims, [q, k, v, out, grad])?,
            DType::F64 => self.gradients::<f64>(dims, [q, k, v, out, grad])?,
            other => {
                candle_core::bail!("causal attention on the CPU takes f32 or f64, not {other:?}")
            }
        };
        Ok((Some(dq), Some(dk), Some(dv)))
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
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
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
        Ok((Some(dq), Some(dk), Some(dv)))
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
        equals_composed(&[vec![5], vec![3]])
    }

    #[test]
    fn packed_rows_attend_within_their_sequences_only() -> Result<()> {
        // Three sequences in the first row; two and padding in the second.
        equals_composed(&[vec![2, 1, 2], vec![1, 2]])
    }

    fn equals_composed(rows: &[Vec<usize>]) -> Result<()> {
        let (batch, heads, kv_heads, len, dim) = (rows.len(), 4, 2, 5, 3);
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
