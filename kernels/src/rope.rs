//! Rotary position embedding as one op that also moves the heads in front of the
//! positions: `x` (B, L, H, D), the projection's output as it lies, becomes
//! `x·cos + rotate_half(x)·sin` in (B, H, L, D), the layout attention reads.
//!
//! Composed, the same is two narrows, a negation, a concatenation, a copy out of the
//! transposed view, two products and a sum, each a graph node whose backward candle
//! zero-fills and adds. The backward here is the same op run the other way with `sin`
//! negated (`rotate_half`'s transpose is its negation, and the tables repeat each frequency
//! in both halves). CPU in f32 and f64; CUDA in f32 and bf16.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use rayon::prelude::*;

use crate::real::{contiguous, Real};
use crate::vectorized::{vectorized, TASK_ENTRIES};

/// `x·cos + rotate_half(x)·sin` for `x` (B, L, H, D) and tables (L, D), shared by the
/// rows, or (B, L, D), each row its own (packed rows restart positions per sequence);
/// returned as (B, H, L, D).
pub fn rope_heads_major(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (op, x) = rope_heads_major_op(x, cos, sin)?;
    x.apply_op1(op)
}

/// [`rope_heads_major`]'s op and its operand (contiguous), for a caller that applies it
/// without a graph node and runs its `bwd` itself.
pub fn rope_heads_major_op(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Rope, Tensor)> {
    let x = x.contiguous()?;
    let op = Rope {
        cos: cos.to_dtype(x.dtype())?.contiguous()?,
        sin: sin.to_dtype(x.dtype())?.contiguous()?,
        sign: 1.0,
        to_heads_major: true,
    };
    Ok((op, x))
}

#[derive(Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// 1 for the rotation, −1 for its transpose (the backward).
    sign: f64,
    /// (B, L, H, D) → (B, H, L, D), else the reverse.
    to_heads_major: bool,
}

/// Sizes of one call, and the output's shape.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    heads: usize,
    len: usize,
    dim: usize,
    /// Whether each row has its own tables.
    per_row: bool,
}

impl Dims {
    /// Where the tables hold the entries for row `b`, position `l`.
    fn table_row(&self, b: usize, l: usize) -> usize {
        if self.per_row {
            (b * self.len + l) * self.dim
        } else {
            l * self.dim
        }
    }
}

impl Rope {
    fn dims(&self, input: &Layout) -> Result<(Dims, Shape)> {
        let (batch, a, b, dim) = input.shape().dims4()?;
        let (len, heads) = if self.to_heads_major { (a, b) } else { (b, a) };
        let per_row = self.cos.dims() == [batch, len, dim];
        let fits = |t: &Tensor| t.dims() == [len, dim] || t.dims() == [batch, len, dim];
        let same = self.cos.dims() == self.sin.dims();
        if !fits(&self.cos) || !same || dim % 2 != 0 {
            candle_core::bail!(
                "rope: tables {:?} for an input of {:?}",
                self.cos.dims(),
                input.dims()
            );
        }
        let dims = Dims {
            batch,
            heads,
            len,
            dim,
            per_row,
        };
        let shape = if self.to_heads_major {
            Shape::from((batch, heads, len, dim))
        } else {
            Shape::from((batch, len, heads, dim))
        };
        Ok((dims, shape))
    }

    /// One output row (D entries) per (b, h, l), written in parallel tasks of rows; each half
    /// of a row is one branch-free loop.
    fn forward<T: Real>(&self, dims: Dims, x: &[T], cos: &[T], sin: &[T]) -> Vec<T> {
        let Dims {
            batch,
            heads,
            len,
            dim,
            ..
        } = dims;
        assert_eq!(
            x.len(),
            batch * heads * len * dim,
            "rope: input of another shape"
        );
        let half = dim / 2;
        let sign = T::of(self.sign);
        let mut out = vec![T::default(); x.len()];
        // Tasks of whole rows, about TASK_ENTRIES entries each.
        let rows_per_task = (TASK_ENTRIES / dim.max(1)).max(1);
        out.par_chunks_mut(rows_per_task * dim.max(1))
            .enumerate()
            .for_each(|(task, rows)| {
                vectorized(
                    #[inline(always)]
                    || {
                        for (i, out) in rows.chunks_exact_mut(dim.max(1)).enumerate() {
                            let row = task * rows_per_task + i;
                            // The output row's (b, h, l) or (b, l, h), and where its input
                            // row lies.
                            let (b, h, l) = if self.to_heads_major {
                                (row / (heads * len), row / len % heads, row % len)
                            } else {
                                (row / (len * heads), row % heads, row / heads % len)
                            };
                            let from = if self.to_heads_major {
                                ((b * len + l) * heads + h) * dim
                            } else {
                                ((b * heads + h) * len + l) * dim
                            };
                            let table = dims.table_row(b, l);
                            let (x, cos, sin) = (
                                &x[from..from + dim],
                                &cos[table..table + dim],
                                &sin[table..table + dim],
                            );
                            let (low, high) = x.split_at(half);
                            let (out_low, out_high) = out.split_at_mut(half);
                            for d in 0..half {
                                out_low[d] = low[d] * cos[d] - sign * sin[d] * high[d];
                                out_high[d] =
                                    high[d] * cos[half + d] + sign * sin[half + d] * low[d];
                            }
                        }
                    },
                )
            });
        out
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (dims, shape) = self.dims(layout)?;
        let (cos, cos_layout) = self.cos.storage_and_layout();
        let (sin, sin_layout) = self.sin.storage_and_layout();
        let (candle_core::Storage::Cpu(cos), candle_core::Storage::Cpu(sin)) = (&*cos, &*sin)
        else {
            candle_core::bail!("rope: the tables are not on the CPU");
        };
        let out = match (x, cos, sin) {
            (CpuStorage::F32(x), CpuStorage::F32(c), CpuStorage::F32(s)) => {
                CpuStorage::F32(self.forward(
                    dims,
                    contiguous(x, layout, "rope")?,
                    contiguous(c, cos_layout, "rope")?,
                    contiguous(s, sin_layout, "rope")?,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(c), CpuStorage::F64(s)) => {
                CpuStorage::F64(self.forward(
                    dims,
                    contiguous(x, layout, "rope")?,
                    contiguous(c, cos_layout, "rope")?,
                    contiguous(s, sin_layout, "rope")?,
                ))
            }
            _ => candle_core::bail!("rope on the CPU takes f32 or f64"),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (dims, shape) = self.dims(layout)?;
        let out = cuda::launch(self, dims, x, layout)?;
        Ok((out, shape))
    }

    fn bwd(&self, _x: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.input_gradient(grad)?))
    }
}

impl Rope {
    /// The gradient of the input for the output's `grad`, which is all the backward reads:
    /// what `bwd` returns, for a caller that chains the backward itself.
    pub fn input_gradient(&self, grad: &Tensor) -> Result<Tensor> {
        let transpose = Rope {
            sign: -self.sign,
            to_heads_major: !self.to_heads_major,
            ..self.clone()
        };
        grad.contiguous()?.apply_op1(transpose)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{Dims, Rope};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Result, Storage};

    #[allow(unsafe_code)]
    fn run<T: CudaDType + DeviceRepr>(
        op: &Rope,
        dims: Dims,
        x: &CudaStorage,
        layout: &Layout,
        name: &str,
    ) -> Result<CudaStorage> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("rope: the input is not contiguous".into()))?;
        let (cos, cos_layout) = op.cos.storage_and_layout();
        let (sin, sin_layout) = op.sin.storage_and_layout();
        let (Storage::Cuda(cos), Storage::Cuda(sin)) = (&*cos, &*sin) else {
            candle_core::bail!("rope: the tables are not on the GPU");
        };
        let device = x.device.clone();
        let function =
            device.get_or_load_custom_func(name, "trainer_kernels_rope", &PROGRAM.ptx()?)?;
        let input = x.as_cuda_slice::<T>()?.slice(start..end);
        let cos = cos.as_cuda_slice::<T>()?.slice(cos_layout.start_offset()..);
        let sin = sin.as_cuda_slice::<T>()?.slice(sin_layout.start_offset()..);
        let count = end - start;
        // SAFETY: the kernel writes every output entry (one thread each).
        let out = unsafe { device.alloc::<T>(count)? };
        let sizes = [dims.batch, dims.heads, dims.len, dims.dim].map(|n| n as u64);
        let (sign, to_heads_major) = (op.sign as f32, op.to_heads_major as i32);
        let per_row = dims.per_row as i32;
        let mut builder = function.builder();
        builder.arg(&input);
        builder.arg(&cos);
        builder.arg(&sin);
        builder.arg(&out);
        for size in &sizes {
            builder.arg(size);
        }
        builder.arg(&sign);
        builder.arg(&to_heads_major);
        builder.arg(&per_row);
        // SAFETY: input and output hold B·H·L·D entries and the tables L·D, or B·L·D when
        // per row (checked by `Rope::dims`).
        unsafe { builder.launch(LaunchConfig::for_num_elems(count as u32)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, device))
    }

    pub(super) fn launch(
        op: &Rope,
        dims: Dims,
        x: &CudaStorage,
        layout: &Layout,
    ) -> Result<CudaStorage> {
        match x.dtype() {
            DType::F32 => run::<f32>(op, dims, x, layout, "rope_f32"),
            DType::BF16 => run::<half::bf16>(op, dims, x, layout, "rope_bf16"),
            other => candle_core::bail!("rope on CUDA takes f32 or bf16, not {other:?}"),
        }
    }

    const SOURCE: &str = crate::cuda::cuda_source!("../cuda/rope.cu");

    static PROGRAM: crate::cuda::Program = crate::cuda::Program::new(SOURCE);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// The composed rotation the op replaces, on (B, L, H, D) input moved to (B, H, L, D).
    fn composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let x = x.transpose(1, 2)?.contiguous()?;
        let half = x.dim(D::Minus1)? / 2;
        let rotated = Tensor::cat(
            &[
                &x.narrow(D::Minus1, half, half)?.neg()?,
                &x.narrow(D::Minus1, 0, half)?,
            ],
            D::Minus1,
        )?;
        let (cos, sin) = match cos.rank() {
            3 => (cos.unsqueeze(1)?, sin.unsqueeze(1)?),
            _ => (cos.clone(), sin.clone()),
        };
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }

    #[test]
    fn equals_the_composed_rotation_and_its_gradient_in_f64() -> Result<()> {
        equals_composed(false)
    }

    #[test]
    fn rows_with_their_own_tables_equal_the_composed_rotation() -> Result<()> {
        equals_composed(true)
    }

    fn equals_composed(per_row: bool) -> Result<()> {
        let device = Device::Cpu;
        let (batch, len, heads, dim) = (2, 5, 3, 8);
        let x = Var::from_tensor(&Tensor::randn(
            0f64,
            1.0,
            (batch, len, heads, dim),
            &device,
        )?)?;
        // Tables as the model builds them: each frequency in both halves.
        let angles: Vec<f64> = (0..len)
            .flat_map(|l| (0..dim).map(move |d| l as f64 * (1.0 + (d % (dim / 2)) as f64)))
            .collect();
        let angles = Tensor::from_vec(angles, (len, dim), &device)?;
        let angles = if per_row {
            // The second row's positions restart at 2, as a packed row's second sequence.
            let restarted = Tensor::cat(&[angles.narrow(0, 0, 2)?, angles.narrow(0, 0, 3)?], 0)?;
            Tensor::stack(&[angles, restarted], 0)?
        } else {
            angles
        };
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let upstream = Tensor::randn(0f64, 1.0, (batch, heads, len, dim), &device)?;
        let ours = rope_heads_major(x.as_tensor(), &cos, &sin)?;
        let theirs = composed(x.as_tensor(), &cos, &sin)?;
        let max = |t: Tensor| -> Result<f64> { t.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>() };
        assert_eq!(ours.dims(), theirs.dims());
        assert!(max((&ours - &theirs)?)? < 1e-12);
        let gradient = |y: &Tensor| -> Result<Tensor> {
            Ok((y * &upstream)?
                .sum_all()?
                .backward()?
                .get(&x)
                .expect("x's gradient")
                .clone())
        };
        assert!(max((gradient(&ours)? - gradient(&theirs)?)?)? < 1e-12);
        Ok(())
    }
}
