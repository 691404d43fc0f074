//! RMSNorm with a frozen scale as one op: `y = x · w / √(mean(x²) + ε)` per row, and a
//! backward that returns `x`'s gradient in one pass per row instead of candle's dozen
//! element-wise ops (and no gradient for the frozen `w`). CPU in f32 and f64; CUDA in f32
//! and bf16 (`norm_gate_cuda.rs`).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::lanes::{dot, dot3};
use crate::real::{contiguous, with_values, Real};
use crate::vectorized::vectorized;

/// `x` (..., n) normalised over its last dimension and scaled by `weight` (n).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let (op, [x, weight]) = rms_norm_op(x, weight, eps)?;
    x.apply_op2(&weight, op)
}

/// [`rms_norm`]'s op and its operands (`x` contiguous, the scale in `x`'s dtype), for a
/// caller that applies it without a graph node and runs its `bwd` itself.
pub fn rms_norm_op(x: &Tensor, weight: &Tensor, eps: f64) -> Result<(RmsNorm, [Tensor; 2])> {
    let x = x.contiguous()?;
    let weight = weight.to_dtype(x.dtype())?.contiguous()?;
    Ok((RmsNorm { eps }, [x, weight]))
}

#[derive(Debug, Clone, Copy)]
pub struct RmsNorm {
    eps: f64,
}

impl RmsNorm {
    /// `1 / √(mean(row²) + ε)`.
    #[inline(always)]
    fn inverse_rms<T: Real>(&self, row: &[T]) -> T {
        let squares = dot(row, row);
        T::of(1.0) / (squares / T::of(row.len() as f64) + T::of(self.eps)).sqrt()
    }

    fn forward<T: Real>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let mut out = vec![T::default(); x.len()];
        out.par_chunks_mut(w.len())
            .zip(x.par_chunks(w.len()))
            .for_each(|(out, row)| {
                vectorized(
                    #[inline(always)]
                    || {
                        let r = self.inverse_rms(row);
                        for ((o, x), w) in out.iter_mut().zip(row).zip(w) {
                            *o = *x * r * *w;
                        }
                    },
                )
            });
        out
    }

    /// `dx_j = g_j w_j r − x_j r³/n · Σ_i g_i w_i x_i` per row.
    fn backward<T: Real>(&self, x: &[T], w: &[T], grad: &[T]) -> Vec<T> {
        let n = w.len();
        let mut dx = vec![T::default(); x.len()];
        dx.par_chunks_mut(n)
            .zip(x.par_chunks(n).zip(grad.par_chunks(n)))
            .for_each(|(dx, (row, grad))| {
                vectorized(
                    #[inline(always)]
                    || {
                        let r = self.inverse_rms(row);
                        let projection = dot3(grad, w, row);
                        let correction = projection * r * r * r / T::of(n as f64);
                        for (((d, x), g), w) in dx.iter_mut().zip(row).zip(grad).zip(w) {
                            *d = *g * *w * r - *x * correction;
                        }
                    },
                )
            });
        dx
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = w_layout.shape().elem_count();
        if x_layout.dims().last() != Some(&n) {
            candle_core::bail!("rms norm: input {:?} for a scale of {n}", x_layout.dims());
        }
        let out = match (x, w) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => CpuStorage::F32(self.forward(
                contiguous(x, x_layout, "rms norm")?,
                contiguous(w, w_layout, "rms norm")?,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(w)) => CpuStorage::F64(self.forward(
                contiguous(x, x_layout, "rms norm")?,
                contiguous(w, w_layout, "rms norm")?,
            )),
            _ => candle_core::bail!("rms norm on the CPU takes f32 or f64"),
        };
        Ok((out, x_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
        w: &candle_core::CudaStorage,
        w_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = w_layout.shape().elem_count();
        if x_layout.dims().last() != Some(&n) {
            candle_core::bail!("rms norm: input {:?} for a scale of {n}", x_layout.dims());
        }
        let y = crate::norm_gate_cuda::rms_norm_forward((x, x_layout), (w, w_layout), self.eps)?;
        Ok((y, x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.input_gradient(x, w, grad)?), None))
    }
}

impl RmsNorm {
    /// The gradient of `x` for the output's `grad` (the scale is frozen): what `bwd`
    /// returns, for a caller that chains the backward itself.
    pub fn input_gradient(&self, x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let op = crate::cuda::OnCuda(crate::norm_gate_cuda::RmsNormGradient { eps: self.eps });
            return x.apply_op3_no_bwd(&w.contiguous()?, &grad.contiguous()?, &op);
        }
        Ok(match x.dtype() {
            DType::F32 => {
                let dx = with_values([x, w, grad], |[x, w, grad]| {
                    self.backward::<f32>(x, w, grad)
                })?;
                Tensor::from_vec(dx, x.shape(), x.device())?
            }
            DType::F64 => {
                let dx = with_values([x, w, grad], |[x, w, grad]| {
                    self.backward::<f64>(x, w, grad)
                })?;
                Tensor::from_vec(dx, x.shape(), x.device())?
            }
            other => candle_core::bail!("rms norm on the CPU takes f32 or f64, not {other:?}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// The composed RMSNorm the op replaces.
    fn composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        let rms = x.sqr()?.mean_keepdim(D::Minus1)?.affine(1.0, eps)?.sqrt()?;
        x.broadcast_div(&rms)?.broadcast_mul(w)
    }

    #[test]
    fn the_op_equals_the_composed_norm_and_its_gradient_in_f64() -> Result<()> {
        let device = Device::Cpu;
        let values: Vec<f64> = (0..2 * 5 * 24)
            .map(|i| ((i * 37 % 101) as f64 - 50.0) / 17.0)
            .collect();
        let x = Var::from_vec(values, (2, 5, 24), &device)?;
        let w = Tensor::from_vec(
            (0..24).map(|i| 0.5 + i as f64 / 24.0).collect(),
            24,
            &device,
        )?;
        let upstream = Tensor::from_vec(
            (0..240).map(|i| ((i % 7) as f64 - 3.0) / 3.0).collect(),
            (2, 5, 24),
            &device,
        )?;
        let fused = rms_norm(x.as_tensor(), &w, 1e-6)?;
        let reference = composed(x.as_tensor(), &w, 1e-6)?;
        let difference = (&fused - &reference)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f64>()?;
        assert!(difference < 1e-12, "forward differs by {difference}");
        let grad = |y: &Tensor| -> Result<Tensor> {
            Ok((y * &upstream)?
                .sum_all()?
                .backward()?
                .get(&x)
                .expect("grad")
                .clone())
        };
        let difference = (grad(&fused)? - grad(&reference)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f64>()?;
        assert!(difference < 1e-12, "gradient differs by {difference}");
        Ok(())
    }
}
