//! A LoRA projection as one op: `y = x·Wᵀ + s·dropout(x)·Aᵀ·Bᵀ` over (x, A, B), with the
//! frozen W held by the op.
//!
//! Composed from candle ops, one projection is about ten graph nodes (two casts, two
//! transposes, three matmuls, a scale, an add, the dropout), and candle's backward
//! zero-fills and adds a gradient for every node's every input: on a GPU that is a dozen
//! passes over activation-sized tensors per projection, seven projections a layer. This
//! op is one node with a hand-written backward of five matmuls (`dx = dy·W + s·mask(dy·B·A)`,
//! `dA = s·(dy·B)ᵀ·dropout(x)`, `dB = s·dyᵀ·dropout(x)·Aᵀ`). The matmuls run in `x`'s
//! dtype against A and B cast from their f32 masters; their gradients come back in f32.

use candle_core::op::Add;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use crate::frozen::{transposed, FrozenWeight, OnBackend};

/// `x·Wᵀ + scale·dropout(x)·Aᵀ·Bᵀ` for x (..., in), W (out, in), A (r, in), B (out, r).
/// `dropout` is the mask's (stream, keep probability), `None` for no dropout.
pub fn lora_linear(
    x: &Tensor,
    weight: &FrozenWeight,
    (a, b): (&Tensor, &Tensor),
    scale: f64,
    dropout: Option<(u64, f64)>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let op = LoraLinear {
        weight: weight.in_dtype(x.dtype())?,
        scale,
        dropout: dropout
            .map(|(stream, keep)| {
                trainer_kernels::Dropout::new(stream, keep).map(|op| (op, stream, keep))
            })
            .transpose()?,
    };
    x.apply_op3(a, b, op)
}

struct LoraLinear {
    weight: FrozenWeight,
    scale: f64,
    dropout: Option<(trainer_kernels::Dropout, u64, f64)>,
}

impl LoraLinear {
    /// The forward on one backend; `dropped` is `x` after dropout, when there is dropout.
    fn forward<S: OnBackend>(
        &self,
        (x, x_layout): (&S, &Layout),
        dropped: Option<(S, Shape)>,
        (a, a_layout): (&S, &Layout),
        (b, b_layout): (&S, &Layout),
    ) -> Result<(S, Shape)> {
        let dims = x_layout.dims();
        let k = *dims.last().unwrap_or(&0);
        let (n, k_w) = self.weight.dims()?;
        let (rank, k_a) = a_layout.shape().dims2()?;
        let (n_b, rank_b) = b_layout.shape().dims2()?;
        if (k_w, k_a, n_b, rank_b) != (k, k, n, rank) {
            candle_core::bail!(
                "lora linear: input of {k} features, weight {n}×{k_w}, A {rank}×{k_a}, B {n_b}×{rank_b}"
            );
        }
        if !a_layout.is_contiguous() || !b_layout.is_contiguous() {
            candle_core::bail!("lora linear: A and B must be contiguous");
        }
        let m = x_layout.shape().elem_count() / k.max(1);
        let rows =
            |cols: usize, offset: usize| Layout::contiguous_with_offset((1, m, cols), offset);
        let (base, _) = self.weight.product(x, x_layout)?;
        let dtype = x.dtype();
        // The scale goes on B (out × r), not on the product (rows × out).
        let b = b.affine(b_layout, self.scale, 0.0)?;
        let (a, b) = (
            a.to_dtype(a_layout, dtype)?,
            b.to_dtype(&Layout::contiguous(b_layout.shape()), dtype)?,
        );
        let (input, input_offset) = match &dropped {
            Some((storage, _)) => (storage, 0),
            None => (x, x_layout.start_offset()),
        };
        let down = input.matmul(
            &a,
            (1, m, rank, k),
            &rows(k, input_offset),
            &transposed(rank, k, 0),
        )?;
        let up = down.matmul(&b, (1, m, n, rank), &rows(rank, 0), &transposed(n, rank, 0))?;
        let out_layout = rows(n, 0);
        let out = base.binary_impl::<Add>(&up, &out_layout, &out_layout)?;
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = n;
        }
        Ok((out, Shape::from(out_dims)))
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use candle_core::CustomOp1;
        let dropped = match &self.dropout {
            Some((op, _, _)) => Some(op.cpu_fwd(x, x_layout)?),
            None => None,
        };
        self.forward((x, x_layout), dropped, (a, a_layout), (b, b_layout))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
        a: &candle_core::CudaStorage,
        a_layout: &Layout,
        b: &candle_core::CudaStorage,
        b_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::CustomOp1;
        let dropped = match &self.dropout {
            Some((op, _, _)) => Some(op.cuda_fwd(x, x_layout)?),
            None => None,
        };
        self.forward((x, x_layout), dropped, (a, a_layout), (b, b_layout))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dtype = x.dtype();
        let k = x.dim(candle_core::D::Minus1)?;
        let (n, _) = self.weight.dims()?;
        let m = x.elem_count() / k.max(1);
        let x2 = x.detach().reshape((m, k))?;
        let g2 = grad.contiguous()?.reshape((m, n))?;
        let drop = |t: Tensor| -> Result<Tensor> {
            match self.dropout {
                Some((_, stream, keep)) => trainer_kernels::dropout(&t, stream, keep),
                None => Ok(t),
            }
        };
        let input = drop(x2)?;
        // The scale rides on B as in the forward, so only small tensors are scaled.
        let a_cast = a.detach().to_dtype(dtype)?;
        let b_scaled = b.detach().affine(self.scale, 0.0)?.to_dtype(dtype)?;
        let grad_down = g2.matmul(&b_scaled)?;
        let lora_dx = drop(grad_down.matmul(&a_cast)?)?;
        let dx = (self.weight.input_gradient(&g2)? + lora_dx)?.reshape(x.shape())?;
        let down = input.matmul(&a_cast.t()?)?;
        let da = grad_down.t()?.matmul(&input)?;
        let db = g2.t()?.matmul(&down)?.affine(self.scale, 0.0)?;
        Ok((
            Some(dx),
            Some(da.to_dtype(a.dtype())?),
            Some(db.to_dtype(b.dtype())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantized::QuantizedWeight;
    use candle_core::quantized::GgmlDType;
    use candle_core::{DType, Device, Var};

    /// What the op replaces, composed from candle ops: the reference its test checks it
    /// against.
    fn composed(
        x: &Tensor,
        weight: &Tensor,
        (a, b): (&Tensor, &Tensor),
        scale: f64,
        dropout: Option<(u64, f64)>,
    ) -> Result<Tensor> {
        let input = match dropout {
            Some((stream, keep)) => trainer_kernels::dropout(x, stream, keep)?,
            None => x.clone(),
        };
        let lora = input
            .broadcast_matmul(&a.to_dtype(x.dtype())?.t()?)?
            .broadcast_matmul(&b.to_dtype(x.dtype())?.t()?)?
            .affine(scale, 0.0)?;
        crate::frozen::linear(x, weight)? + lora
    }

    fn difference(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f64>())
            .expect("difference")
    }

    #[test]
    fn equals_the_composed_projection_and_its_gradients_in_f64() -> Result<()> {
        let device = Device::Cpu;
        let w = Tensor::randn(0f64, 1.0, (7, 64), &device)?;
        // A quantized weight in tiles of 3 rows, against its own dequantized values.
        let quantized = QuantizedWeight::tiled(&w, GgmlDType::Q8_0, &device, 3)?;
        let dequantized = quantized.dequantize(DType::F64)?;
        let weights = [
            (FrozenWeight::Dense(w.clone()), w),
            (FrozenWeight::Quantized(quantized), dequantized),
        ];
        for (weight, dense) in &weights {
            for dropout in [None, Some((0xABCD, 0.8))] {
                let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 5, 64), &device)?)?;
                let a = Var::from_tensor(&Tensor::randn(0f64, 1.0, (3, 64), &device)?)?;
                let b = Var::from_tensor(&Tensor::randn(0f64, 1.0, (7, 3), &device)?)?;
                let upstream = Tensor::randn(0f64, 1.0, (2, 5, 7), &device)?;
                let pair = (a.as_tensor(), b.as_tensor());
                let ours = lora_linear(x.as_tensor(), weight, pair, 0.5, dropout)?;
                let theirs = composed(x.as_tensor(), dense, pair, 0.5, dropout)?;
                let case = format!("{weight:?} {dropout:?}");
                assert!(difference(&ours, &theirs) < 1e-12, "{case}: outputs differ");
                let ours_grads = (ours * &upstream)?.sum_all()?.backward()?;
                let theirs_grads = (theirs * &upstream)?.sum_all()?.backward()?;
                for (name, var) in [("x", &x), ("A", &a), ("B", &b)] {
                    let (Some(g1), Some(g2)) = (ours_grads.get(var), theirs_grads.get(var)) else {
                        panic!("{name} has no gradient");
                    };
                    assert!(difference(g1, g2) < 1e-12, "{case}: d{name} differs");
                }
            }
        }
        Ok(())
    }
}
