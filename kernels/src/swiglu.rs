//! SwiGLU's gate as one op: `silu(gate) · up`, with a backward that returns both
//! gradients in one pass (`silu'(g) = s·(1 + g·(1 − s))`, `s = σ(g)`) instead of candle's
//! composed silu, product and their backward ops. CPU in f32 and f64; CUDA in f32 and
//! bf16 (`norm_gate_cuda.rs`).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::real::{contiguous, with_values, Real};
use crate::vectorized::{vectorized, TASK_ENTRIES};

/// `silu(gate) ⊙ up` for two tensors of one shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let (op, [gate, up]) = swiglu_op(gate, up)?;
    gate.apply_op2(&up, op)
}

/// [`swiglu`]'s op and its operands (contiguous), for a caller that applies it without a
/// graph node and runs its `bwd` itself.
pub fn swiglu_op(gate: &Tensor, up: &Tensor) -> Result<(SwiGlu, [Tensor; 2])> {
    if gate.shape() != up.shape() {
        candle_core::bail!(
            "swiglu: gate {:?} and up {:?} differ",
            gate.dims(),
            up.dims()
        );
    }
    Ok((SwiGlu, [gate.contiguous()?, up.contiguous()?]))
}

#[derive(Debug, Clone, Copy)]
pub struct SwiGlu;

#[inline(always)]
fn sigmoid<T: Real>(x: T) -> T {
    T::of(1.0) / (T::of(1.0) + (-x).exp_fast())
}

fn forward<T: Real>(gate: &[T], up: &[T]) -> Vec<T> {
    let mut out = vec![T::default(); gate.len()];
    out.par_chunks_mut(TASK_ENTRIES)
        .zip(
            gate.par_chunks(TASK_ENTRIES)
                .zip(up.par_chunks(TASK_ENTRIES)),
        )
        .for_each(|(out, (gate, up))| {
            vectorized(
                #[inline(always)]
                || {
                    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
                        *o = *g * sigmoid(*g) * *u;
                    }
                },
            )
        });
    out
}

/// (d gate, d up).
fn backward<T: Real>(gate: &[T], up: &[T], grad: &[T]) -> (Vec<T>, Vec<T>) {
    let mut d_gate = vec![T::default(); gate.len()];
    let mut d_up = vec![T::default(); gate.len()];
    d_gate
        .par_chunks_mut(TASK_ENTRIES)
        .zip(d_up.par_chunks_mut(TASK_ENTRIES))
        .zip(
            gate.par_chunks(TASK_ENTRIES)
                .zip(up.par_chunks(TASK_ENTRIES))
                .zip(grad.par_chunks(TASK_ENTRIES)),
        )
        .for_each(|((d_gate, d_up), ((gate, up), grad))| {
            vectorized(
                #[inline(always)]
                || {
                    let inputs = gate.iter().zip(up).zip(grad);
                    for ((d_gate, d_up), ((&g, &u), &dy)) in d_gate.iter_mut().zip(d_up).zip(inputs)
                    {
                        let s = sigmoid(g);
                        *d_gate = dy * u * s * (T::of(1.0) + g * (T::of(1.0) - s));
                        *d_up = dy * g * s;
                    }
                },
            )
        });
    (d_gate, d_up)
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (gate, up) {
            (CpuStorage::F32(g), CpuStorage::F32(u)) => CpuStorage::F32(forward(
                contiguous(g, gate_layout, "swiglu")?,
                contiguous(u, up_layout, "swiglu")?,
            )),
            (CpuStorage::F64(g), CpuStorage::F64(u)) => CpuStorage::F64(forward(
                contiguous(g, gate_layout, "swiglu")?,
                contiguous(u, up_layout, "swiglu")?,
            )),
            _ => candle_core::bail!("swiglu on the CPU takes f32 or f64"),
        };
        Ok((out, gate_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gate: &candle_core::CudaStorage,
        gate_layout: &Layout,
        up: &candle_core::CudaStorage,
        up_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::norm_gate_cuda::swiglu_forward((gate, gate_layout), (up, up_layout))?;
        Ok((out, gate_layout.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (d_gate, d_up) = self.gradients(gate, up, grad)?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

impl SwiGlu {
    /// The gradients of the gate and of the up projection for the output's `grad`: what
    /// `bwd` returns, for a caller that chains the backward itself.
    pub fn gradients(&self, gate: &Tensor, up: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if gate.device().is_cuda() {
            let both = gate.apply_op3_no_bwd(
                up,
                &grad.contiguous()?,
                &crate::cuda::OnCuda(crate::norm_gate_cuda::SwiGluGradients),
            )?;
            let count = gate.elem_count();
            let d_gate = both.narrow(0, 0, count)?.reshape(gate.shape())?;
            let d_up = both.narrow(0, count, count)?.reshape(gate.shape())?;
            return Ok((d_gate, d_up));
        }
        fn build<T: Real>(
            (d_gate, d_up): (Vec<T>, Vec<T>),
            like: &Tensor,
        ) -> Result<(Tensor, Tensor)> {
            Ok((
                Tensor::from_vec(d_gate, like.shape(), like.device())?,
                Tensor::from_vec(d_up, like.shape(), like.device())?,
            ))
        }
        Ok(match gate.dtype() {
            DType::F32 => build(
                with_values([gate, up, grad], |[gate, up, grad]| {
                    backward::<f32>(gate, up, grad)
                })?,
                gate,
            )?,
            DType::F64 => build(
                with_values([gate, up, grad], |[gate, up, grad]| {
                    backward::<f64>(gate, up, grad)
                })?,
                gate,
            )?,
            other => candle_core::bail!("swiglu on the CPU takes f32 or f64, not {other:?}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn the_op_equals_silu_times_up_and_its_gradients_in_f64() -> Result<()> {
        let device = Device::Cpu;
        let data = |k: usize| -> Vec<f64> {
            (0..3 * 40)
                .map(|i| ((i * k % 97) as f64 - 48.0) / 9.0)
                .collect()
        };
        let gate = Var::from_vec(data(31), (3, 40), &device)?;
        let up = Var::from_vec(data(17), (3, 40), &device)?;
        let upstream = Tensor::from_vec(data(7), (3, 40), &device)?;
        let fused = swiglu(gate.as_tensor(), up.as_tensor())?;
        let reference = (gate.as_tensor().silu()? * up.as_tensor())?;
        let max = |t: Tensor| -> Result<f64> { t.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>() };
        assert!(max((&fused - &reference)?)? < 1e-12);
        let grads = |y: &Tensor| (y * &upstream)?.sum_all()?.backward();
        let (a, b) = (grads(&fused)?, grads(&reference)?);
        for var in [&gate, &up] {
            let difference = max((a.get(var).expect("fused") - b.get(var).expect("composed"))?)?;
            assert!(difference < 1e-12, "gradient differs by {difference}");
        }
        Ok(())
    }
}
