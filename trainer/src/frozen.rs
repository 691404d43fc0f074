//! Operations with a frozen (constant) operand: a linear layer's weight, a norm's scale,
//! a bias, an attention mask, the rotary tables, a loss mask.
//!
//! Written with candle's binary ops, `x * w` gives `w` a gradient as large as `x` and keeps
//! it in the gradient store until the step ends, and `x.matmul(w)` computes a weight-sized
//! gradient for every frozen weight (design notes; candle `backprop.rs`). These custom ops
//! compute the same forward on the backend's own kernels, and their backward returns only
//! the gradient of `x`: frozen operands cost no gradient computation and no gradient memory.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::op::{Add, Mul};
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Storage, Tensor};

use crate::quantized::QuantizedWeight;

/// A frozen linear weight (out, in): dense in the base dtype, or in quantized row tiles
/// ([`crate::quantized`]) that the products dequantize one at a time.
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    Dense(Tensor),
    Quantized(QuantizedWeight),
}

impl FrozenWeight {
    /// (out, in).
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            FrozenWeight::Dense(weight) => weight.dims2(),
            FrozenWeight::Quantized(weight) => Ok(weight.dims()),
        }
    }

    /// The weight for products in `dtype`: a dense weight cast once; quantized tiles are
    /// dequantized to the products' dtype as they are used.
    pub fn in_dtype(&self, dtype: candle_core::DType) -> Result<FrozenWeight> {
        Ok(match self {
            FrozenWeight::Dense(weight) => FrozenWeight::Dense(weight.to_dtype(dtype)?),
            FrozenWeight::Quantized(_) => self.clone(),
        })
    }

    pub fn device(&self) -> Device {
        match self {
            FrozenWeight::Dense(weight) => weight.device().clone(),
            FrozenWeight::Quantized(weight) => weight.device(),
        }
    }

    /// `x · Wᵀ` on one backend for a contiguous `x` of shape (..., in): (..., out).
    pub(crate) fn product<S: OnBackend>(&self, x: &S, x_layout: &Layout) -> Result<(S, Shape)> {
        let dims = x_layout.dims();
        let k = *dims.last().unwrap_or(&0);
        let (n, k_w) = self.dims()?;
        if k != k_w {
            candle_core::bail!("frozen linear: input has {k} features, weight expects {k_w}");
        }
        let m = x_layout.shape().elem_count() / k.max(1);
        let x3 = Layout::contiguous_with_offset((1, m, k), x_layout.start_offset());
        let out = match self {
            FrozenWeight::Dense(weight) => {
                let (storage, w_layout) = weight.storage_and_layout();
                let transposed = w_layout.transpose(0, 1)?;
                let w3 = Layout::new(
                    Shape::from((1, k, n)),
                    vec![k * n, transposed.stride()[0], transposed.stride()[1]],
                    transposed.start_offset(),
                );
                x.matmul(S::of(&storage)?, (1, m, n, k), &x3, &w3)?
            }
            FrozenWeight::Quantized(weight) => {
                // Each tile gives a block of output columns, copied into place.
                let mut out = x.device().zeros_impl(&Shape::from((m, n)), x.dtype())?;
                for tile in weight.dequantized_tiles(x.dtype()) {
                    let (first, tile) = tile?;
                    let rows = tile.dim(0)?;
                    let (storage, w_layout) = tile.storage_and_layout();
                    let part = x.matmul(
                        S::of(&storage)?,
                        (1, m, rows, k),
                        &x3,
                        &transposed(rows, k, w_layout.start_offset()),
                    )?;
                    part.copy2d(&mut out, m, rows, rows, n, 0, first)?;
                }
                out
            }
        };
        Ok((out, with_features(x_layout, n)))
    }

    /// `g · W` for `g` of shape (..., out): the input's gradient, (..., in).
    pub(crate) fn input_gradient(&self, grad: &Tensor) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(weight) => grad.broadcast_matmul(weight),
            FrozenWeight::Quantized(weight) => {
                let (n, k) = weight.dims();
                let mut dims = grad.dims().to_vec();
                let m = grad.elem_count() / n.max(1);
                let grad = grad.contiguous()?.reshape((m, n))?;
                let mut sum: Option<Tensor> = None;
                for tile in weight.dequantized_tiles(grad.dtype()) {
                    let (first, tile) = tile?;
                    let rows = tile.dim(0)?;
                    let block = if rows == n {
                        grad.clone()
                    } else {
                        grad.narrow(1, first, rows)?.contiguous()?
                    };
                    let part = block.matmul(&tile)?;
                    sum = Some(match sum {
                        Some(sum) => (sum + part)?,
                        None => part,
                    });
                }
                let Some(sum) = sum else {
                    candle_core::bail!("frozen linear: a quantized weight without tiles");
                };
                if let Some(last) = dims.last_mut() {
                    *last = k;
                }
                sum.reshape(dims)
            }
        }
    }
}

/// A backend's storage inside a `Storage`: lets one generic forward serve each backend.
pub(crate) trait OnBackend: BackendStorage<Device: BackendDevice<Storage = Self>> {
    fn of(storage: &Storage) -> Result<&Self>;
}

impl OnBackend for CpuStorage {
    fn of(storage: &Storage) -> Result<&Self> {
        match storage {
            Storage::Cpu(storage) => Ok(storage),
            _ => candle_core::bail!("a frozen operand is not on the CPU"),
        }
    }
}

#[cfg(feature = "cuda")]
impl OnBackend for candle_core::CudaStorage {
    fn of(storage: &Storage) -> Result<&Self> {
        match storage {
            Storage::Cuda(storage) => Ok(storage),
            _ => candle_core::bail!("a frozen operand is not on the GPU"),
        }
    }
}

/// A row-major (rows, cols) matrix at `offset`, transposed (as a batch of one).
pub(crate) fn transposed(rows: usize, cols: usize, offset: usize) -> Layout {
    Layout::new(
        Shape::from((1, cols, rows)),
        vec![rows * cols, 1, cols],
        offset,
    )
}

/// The shape of a linear layer's output for an input laid out as `x_layout`: the input's,
/// with `n` features.
pub(crate) fn with_features(x_layout: &Layout, n: usize) -> Shape {
    let mut dims = x_layout.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Shape::from(dims)
}

/// `x · wᵀ` (a linear layer without bias); `x` of shape (..., in), `w` of shape (out, in).
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    frozen_linear(x, &FrozenWeight::Dense(weight.clone()))
}

/// `x · Wᵀ` for a dense or quantized frozen weight.
pub fn frozen_linear(x: &Tensor, weight: &FrozenWeight) -> Result<Tensor> {
    let x = x.contiguous()?;
    x.apply_op1(frozen_linear_op(weight, x.dtype())?)
}

/// [`frozen_linear`]'s op for inputs of `dtype` (contiguous), for a caller that applies it
/// without a graph node and runs its `bwd` itself, or only its backward.
pub fn frozen_linear_op(weight: &FrozenWeight, dtype: candle_core::DType) -> Result<FrozenLinear> {
    Ok(FrozenLinear {
        weight: weight.in_dtype(dtype)?,
    })
}

/// `x ⊙ w` with `w` broadcast to `x`'s shape.
pub fn scale(x: &Tensor, factor: &Tensor) -> Result<Tensor> {
    apply(x, factor, Kind::Scale)
}

/// `x + w` with `w` broadcast to `x`'s shape.
pub fn shift(x: &Tensor, offset: &Tensor) -> Result<Tensor> {
    apply(x, offset, Kind::Shift)
}

/// Owns its weight so the graph keeps it alive for the backward pass.
pub struct FrozenLinear {
    weight: FrozenWeight,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.weight.product(x, x_layout)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.weight.product(x, x_layout)
    }

    fn bwd(&self, _x: &Tensor, _result: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.input_gradient(grad)?))
    }
}

impl FrozenLinear {
    /// The gradient of x for the output's `grad`, which is all the backward reads: what
    /// `bwd` returns, for a caller that chains the backward itself.
    pub fn input_gradient(&self, grad: &Tensor) -> Result<Tensor> {
        self.weight.input_gradient(grad)
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    /// `x ⊙ w`, `w` broadcast to `x`'s shape.
    Scale,
    /// `x + w`, `w` broadcast to `x`'s shape.
    Shift,
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
    fn forward<S: OnBackend>(&self, x: &S, x_layout: &Layout) -> Result<(S, Shape)> {
        let (storage, w_layout) = self.operand.storage_and_layout();
        let w = S::of(&storage)?;
        let w_broadcast = w_layout.broadcast_as(x_layout.shape())?;
        let out = match self.kind {
            Kind::Scale => x.binary_impl::<Mul>(w, x_layout, &w_broadcast)?,
            Kind::Shift => x.binary_impl::<Add>(w, x_layout, &w_broadcast)?,
        };
        Ok((out, x_layout.shape().clone()))
    }
}

impl CustomOp1 for FrozenOp {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Scale => "frozen-scale",
            Kind::Shift => "frozen-shift",
        }
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.forward(x, x_layout)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.forward(x, x_layout)
    }

    fn bwd(&self, _x: &Tensor, _result: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad_x = match self.kind {
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
    fn a_quantized_weight_gives_the_products_of_its_dequantized_values() -> Result<()> {
        use crate::quantized::QuantizedWeight;
        use candle_core::quantized::GgmlDType;
        let device = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (10, 256), &device)?;
        for (format, rows_per_tile) in [(GgmlDType::Q4K, 4), (GgmlDType::Q8_0, 10)] {
            let quantized = QuantizedWeight::tiled(&w, format, &device, rows_per_tile)?;
            let dense = quantized.dequantize(DType::F64)?;
            let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 3, 256), &device)?)?;
            let ours = frozen_linear(x.as_tensor(), &FrozenWeight::Quantized(quantized))?;
            let plain = x.as_tensor().broadcast_matmul(&dense.t()?)?;
            assert!(close(&ours, &plain) < 1e-10, "{format:?}: outputs differ");
            let ours_dx = ours.sin()?.sum_all()?.backward()?;
            let plain_dx = plain.sin()?.sum_all()?.backward()?;
            let (Some(ours_dx), Some(plain_dx)) = (ours_dx.get(&x), plain_dx.get(&x)) else {
                panic!("x has no gradient");
            };
            assert!(close(ours_dx, plain_dx) < 1e-10, "{format:?}: dx differs");
        }
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
