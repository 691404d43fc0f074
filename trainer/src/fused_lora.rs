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
//! On the CPU the forward keeps, for the backward, its dropout mask as bits (used twice
//! there; on a GPU the hash is cheaper than the memory, and the backward draws it again)
//! and `dropout(x)·Aᵀ` (rows × rank: small, and computing it again reads all of x).

use candle_core::backend::BackendStorage;
use candle_core::op::{Add, BackpropOp};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use std::sync::OnceLock;
use trainer_kernels::KeptMask;

use crate::frozen::{transposed, with_features, FrozenWeight, OnBackend};

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
    let op = lora_linear_op(weight, x.dtype(), scale, dropout)?;
    x.apply_op3(a, b, op)
}

/// [`lora_linear`]'s op for inputs of `dtype` (which it takes contiguous), for a caller
/// that applies it without a graph node and runs its `bwd` itself, or only its backward.
pub fn lora_linear_op(
    weight: &FrozenWeight,
    dtype: DType,
    scale: f64,
    dropout: Option<(u64, f64)>,
) -> Result<LoraLinear> {
    Ok(LoraLinear {
        weight: weight.in_dtype(dtype)?,
        scale,
        dropout: dropout
            .map(|(stream, keep)| trainer_kernels::Dropout::new(stream, keep))
            .transpose()?,
        kept_mask: OnceLock::new(),
        kept_down: OnceLock::new(),
    })
}

pub struct LoraLinear {
    weight: FrozenWeight,
    scale: f64,
    dropout: Option<trainer_kernels::Dropout>,
    /// The mask the CPU forward drew, for the backward.
    kept_mask: OnceLock<KeptMask>,
    /// The CPU forward's `dropout(x)·Aᵀ` (rows × rank), for the backward: recomputing it
    /// reads the whole input again, and these thin products are bound by that read.
    kept_down: OnceLock<Tensor>,
}

impl LoraLinear {
    /// The input's rows and features, the output's features and the rank: (m, k, n, r).
    fn dims(
        &self,
        x_layout: &Layout,
        a_layout: &Layout,
        b_layout: &Layout,
    ) -> Result<(usize, usize, usize, usize)> {
        let k = *x_layout.dims().last().unwrap_or(&0);
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
        Ok((x_layout.shape().elem_count() / k.max(1), k, n, rank))
    }

    /// The CPU forward for a dense weight in f32 or f64: the LoRA term accumulates into
    /// the base product's output inside gemm ([`trainer_kernels::product`]).
    fn cpu_forward(
        &self,
        (x, x_layout): (&CpuStorage, &Layout),
        dropped: Option<&CpuStorage>,
        weight: &Tensor,
        (a, a_layout): (&CpuStorage, &Layout),
        (b, b_layout): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        use trainer_kernels::product::product_sum;
        let (m, k, n, rank) = self.dims(x_layout, a_layout, b_layout)?;
        let dtype = x.dtype();
        let (a, b) = (a.to_dtype(a_layout, dtype)?, b.to_dtype(b_layout, dtype)?);
        let rows = Layout::contiguous_with_offset((m, k), x_layout.start_offset());
        let dropped_rows = Layout::contiguous((m, k));
        let (input, input_rows) = match dropped {
            Some(dropped) => (dropped, &dropped_rows),
            None => (x, &rows),
        };
        let a_t = Layout::contiguous((rank, k)).transpose(0, 1)?;
        let down = product_sum((input, input_rows), (&a, &a_t), None)?;
        let _ = self.kept_down.set(Tensor::from_storage(
            candle_core::Storage::Cpu(down.clone()),
            (m, rank),
            BackpropOp::none(),
            false,
        ));
        let (w, w_layout) = weight.storage_and_layout();
        let candle_core::Storage::Cpu(w) = &*w else {
            candle_core::bail!("lora linear: the frozen weight is not on the CPU");
        };
        let out = product_sum(
            (x, &rows),
            (w, &w_layout.transpose(0, 1)?),
            Some((
                (&down, &Layout::contiguous((m, rank))),
                (&b, &Layout::contiguous((n, rank)).transpose(0, 1)?),
                self.scale,
            )),
        )?;
        Ok((out, with_features(x_layout, n)))
    }

    /// The forward on one backend; `dropped` is `x` after dropout, when there is dropout.
    fn forward<S: OnBackend>(
        &self,
        (x, x_layout): (&S, &Layout),
        dropped: Option<(S, Shape)>,
        (a, a_layout): (&S, &Layout),
        (b, b_layout): (&S, &Layout),
    ) -> Result<(S, Shape)> {
        let (m, k, n, rank) = self.dims(x_layout, a_layout, b_layout)?;
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
        Ok((out, with_features(x_layout, n)))
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
        let dropped = match &self.dropout {
            Some(op) => {
                let mask = self
                    .kept_mask
                    .get_or_init(|| op.draw(x_layout.shape().elem_count()));
                Some((mask.apply(x, x_layout)?, x_layout.shape().clone()))
            }
            None => None,
        };
        match &self.weight {
            FrozenWeight::Dense(weight) if matches!(x.dtype(), DType::F32 | DType::F64) => self
                .cpu_forward(
                    (x, x_layout),
                    dropped.as_ref().map(|(storage, _)| storage),
                    weight,
                    (a, a_layout),
                    (b, b_layout),
                ),
            _ => self.forward((x, x_layout), dropped, (a, a_layout), (b, b_layout)),
        }
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
            Some(op) => Some(op.cuda_fwd(x, x_layout)?),
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
        let (dx, da, db) = self.gradients(x, a, b, grad)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

impl LoraLinear {
    /// The gradients of x, A and B for the output's `grad`: what `bwd` returns, for a
    /// caller that chains the backward itself.
    pub fn gradients(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let dtype = x.dtype();
        let k = x.dim(candle_core::D::Minus1)?;
        let (n, _) = self.weight.dims()?;
        let m = x.elem_count() / k.max(1);
        let x2 = x.detach().reshape((m, k))?;
        let g2 = grad.contiguous()?.reshape((m, n))?;
        let drop = |t: Tensor| -> Result<Tensor> {
            match (&self.dropout, self.kept_mask.get()) {
                (_, Some(mask)) => t.contiguous()?.apply_op1_no_bwd(mask),
                (Some(op), None) => t.contiguous()?.apply_op1_no_bwd(op),
                (None, None) => Ok(t),
            }
        };
        let input = drop(x2)?;
        // The scale rides on B as in the forward, so only small tensors are scaled.
        let a_cast = a.detach().to_dtype(dtype)?;
        let b_scaled = b.detach().affine(self.scale, 0.0)?.to_dtype(dtype)?;
        let grad_down = product(&g2, &b_scaled)?;
        // Without dropout between them, gemm sums both terms of dx into one output (CPU).
        let summed = match (&self.weight, &self.dropout) {
            (FrozenWeight::Dense(weight), None) => trainer_kernels::product::tensor_product_sum(
                &g2,
                weight,
                Some((&grad_down, &a_cast, 1.0)),
            )?,
            _ => None,
        };
        let dx = match summed {
            Some(dx) => dx,
            None => (self.weight.input_gradient(&g2)? + drop(grad_down.matmul(&a_cast)?)?)?,
        }
        .reshape(x.shape())?;
        let down = match self.kept_down.get() {
            Some(down) => down.clone(),
            None => product(&input, &a_cast.t()?)?,
        };
        let da = product(&columns_contiguous(&grad_down)?.t()?, &input)?;
        // dB = s·gᵀ·down, computed as its transpose so the thin operand is the left one.
        let db = product(&columns_contiguous(&down)?.t()?, &g2)?
            .t()?
            .affine(self.scale, 0.0)?;
        Ok((dx, da.to_dtype(a.dtype())?, db.to_dtype(b.dtype())?))
    }
}

/// The 2-D `t` with its columns contiguous on the CPU (elsewhere as it is), for a thin
/// matrix (rows × rank) that a product reads transposed: gemm's thin products run faster
/// when their thin operand is contiguous along the inner dimension, which for `tᵀ·y` is
/// t's columns. Measured at rank 8 on two AVX-512 cores, rows × features 1,024 × 256,
/// 512 × 512 and 512 × 1,376: dA = gdᵀ·x took 50, 34 and 127 µs with gd row-major, 33, 30
/// and 75 µs after its transposed copy (about 2 µs); dBᵀ = downᵀ·g 32, 27 and 78 µs where
/// dB = gᵀ·down took 120, 86 and 222. cuBLAS takes either layout as it is.
fn columns_contiguous(t: &Tensor) -> Result<Tensor> {
    match t.device() {
        candle_core::Device::Cpu => t.t()?.contiguous()?.t(),
        _ => Ok(t.clone()),
    }
}

/// `lhs·rhs` for 2-D tensors: on the CPU through gemm directly, which writes the output
/// without zero-filling it first and splits across the current pool (candle's matmul also
/// parses /proc/cpuinfo on each call to count the cores); elsewhere candle's matmul.
fn product(lhs: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    match trainer_kernels::product::tensor_product_sum(lhs, rhs, None)? {
        Some(product) => Ok(product),
        None => lhs.matmul(rhs),
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
