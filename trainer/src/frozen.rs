//! Operations with a frozen (constant) operand: a linear layer's weight, a norm's scale,
//! a bias, an attention mask, the rotary tables, a loss mask.
//!
//! Written with candle's binary ops, `x * w` gives `w` a gradient as large as `x` and keeps
//! it in the gradient store until the step ends, and `x.matmul(w)` computes a weight-sized
//! gradient for every frozen weight (design notes; candle `backprop.rs`). These custom ops
//! compute the same forward on the backend's own kernels, and their backward returns only
//! the gradient of `x`: frozen operands cost no gradient computation and no gradient memory.

use candle_core::backend::BackendStorage;
use candle_core::op::{Add, Mul};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

#[derive(Debug, Clone, Copy)]
enum Kind {
    /// `x · wᵀ` with `w` of shape (out, in).
    Linear,
    /// `x ⊙ w`, `w` broadcast to `x`'s shape.
    Scale,
    /// `x + w`, `w` broadcast to `x`'s shape.
    Shift,
}

/// `x · wᵀ` (a linear layer without bias); `x` of shape (..., in), `w` of shape (out, in).
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    apply(x, weight, Kind::Linear)
}

/// `x ⊙ w` with `w` broadcast to `x`'s shape.
pub fn scale(x: &Tensor, factor: &Tensor) -> Result<Tensor> {
    apply(x, factor, Kind::Scale)
}

/// `x + w` with `w` broadcast to `x`'s shape.
pub fn shift(x: &Tensor, offset: &Tensor) -> Result<Tensor> {
    apply(x, offset, Kind::Shift)
}

fn apply(x: &Tensor, operand: &Tensor, kind: Kind) -> Result<Tensor> {
    let x = x.contiguous()?;
    let operand = operand.to_dtype(x.dtype())?;
    x.apply_op1(FrozenOp { operand, kind })
}

/// Owns its operand so the graph keeps it alive for the backward pass.
struct FrozenOp {
    operand: Tensor,
    kind: Kind,
}

impl FrozenOp {
    fn forward<S: BackendStorage>(
        &self,
        x: &S,
        x_layout: &Layout,
        w: &S,
        w_layout: &Layout,
    ) -> Result<(S, Shape)> {
        match self.kind {
            Kind::Linear => {
                let dims = x_layout.dims();
                let k = *dims.last().unwrap_or(&0);
                let (n, k_w) = w_layout.shape().dims2()?;
                if k != k_w {
                    candle_core::bail!(
                        "frozen linear: input has {k} features, weight expects {k_w}"
                    );
                }
                let m = x_layout.shape().elem_count() / k.max(1);
                let x3 = Layout::contiguous_with_offset((1, m, k), x_layout.start_offset());
                let transposed = w_layout.transpose(0, 1)?;
                let w3 = Layout::new(
                    Shape::from((1, k, n)),
                    vec![k * n, transposed.stride()[0], transposed.stride()[1]],
                    transposed.start_offset(),
                );
                let out = x.matmul(w, (1, m, n, k), &x3, &w3)?;
                let mut out_dims = dims.to_vec();
                if let Some(last) = out_dims.last_mut() {
                    *last = n;
                }
                Ok((out, Shape::from(out_dims)))
            }
            Kind::Scale => {
                let w_broadcast = w_layout.broadcast_as(x_layout.shape())?;
                Ok((
                    x.binary_impl::<Mul>(w, x_layout, &w_broadcast)?,
                    x_layout.shape().clone(),
                ))
            }
            Kind::Shift => {
                let w_broadcast = w_layout.broadcast_as(x_layout.shape())?;
                Ok((
                    x.binary_impl::<Add>(w, x_layout, &w_broadcast)?,
                    x_layout.shape().clone(),
                ))
            }
        }
    }
}

impl CustomOp1 for FrozenOp {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Linear => "frozen-linear",
            Kind::Scale => "frozen-scale",
            Kind::Shift => "frozen-shift",
        }
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (storage, w_layout) = self.operand.storage_and_layout();
        let Storage::Cpu(w) = &*storage else {
            candle_core::bail!("{}: operand is not on the CPU", self.name());
        };
        self.forward(x, x_layout, w, w_layout)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (storage, w_layout) = self.operand.storage_and_layout();
        let Storage::Cuda(w) = &*storage else {
            candle_core::bail!("{}: operand is not on the GPU", self.name());
        };
        self.forward(x, x_layout, w, w_layout)
    }

    fn bwd(&self, _x: &Tensor, _result: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad_x = match self.kind {
            Kind::Linear => grad.broadcast_matmul(&self.operand)?,
            Kind::Scale => grad.broadcast_mul(&self.operand)?,
            Kind::Shift => grad.clone(),
        };
        Ok(Some(grad_x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn close(a: &Tensor, b: &Tensor) -> f64 {
        a.sub(b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f64>())
            .expect("difference")
    }

    #[test]
    fn forward_and_input_gradient_match_plain_ops() -> Result<()> {
        let device = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 3, 4), &device)?)?;
        let w = Tensor::randn(0f64, 1.0, (5, 4), &device)?;
        let s = Tensor::randn(0f64, 1.0, 5, &device)?;
        let b = Tensor::randn(0f64, 1.0, (3, 5), &device)?;

        let ours = shift(&scale(&linear(x.as_tensor(), &w)?, &s)?, &b)?;
        let plain = x
            .as_tensor()
            .broadcast_matmul(&w.t()?)?
            .broadcast_mul(&s)?
            .broadcast_add(&b)?;
        assert!(close(&ours, &plain) < 1e-12);

        let ours_grads = ours.sqr()?.sum_all()?.backward()?;
        let plain_grads = plain.sqr()?.sum_all()?.backward()?;
        let ours_dx = ours_grads.get(&x).expect("x has a gradient");
        let plain_dx = plain_grads.get(&x).expect("x has a gradient");
        assert!(close(ours_dx, plain_dx) < 1e-10);
        for frozen in [&w, &s, &b] {
            assert!(
                ours_grads.get(frozen).is_none(),
                "no gradient for a frozen operand"
            );
        }
        assert_eq!(ours_grads.get_ids().count(), 1, "only x's gradient is kept");
        assert!(
            plain_grads.get_ids().count() > 1,
            "plain ops keep gradients for the frozen operands"
        );
        Ok(())
    }

    #[test]
    fn a_transposed_input_is_handled() -> Result<()> {
        let device = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (4, 3), &device)?.t()?;
        let w = Tensor::randn(0f32, 1.0, (2, 4), &device)?;
        let ours = linear(&x, &w)?.to_dtype(DType::F64)?;
        let plain = x.matmul(&w.t()?)?.to_dtype(DType::F64)?;
        assert!(close(&ours, &plain) < 1e-5);
        Ok(())
    }
}
