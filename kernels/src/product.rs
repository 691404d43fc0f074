//! A sum of two matrix products, `lhs·rhs + scale·left·right`, on the CPU: the LoRA
//! projection's output (`x·Wᵀ + s·(x·Aᵀ)·Bᵀ`) and its input gradient (`g·W + (g·sB)·A`).
//!
//! Composed from candle's matmul and add, that is two outputs, each zero-filled before gemm
//! writes it, and a third pass that adds them. Here gemm writes the first product into a
//! buffer it alone initialises and accumulates the second into it; both run across the
//! current rayon pool.

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, Device, Layout, Result, Storage, Tensor};

use crate::matrix::{matmul, product, Matrix, Threads};
use crate::real::Real;

/// A 2-D operand on the CPU, any strides.
pub type Operand<'a> = (&'a CpuStorage, &'a Layout);

/// A second product to add, and its factor.
pub type Extra<'a> = (Operand<'a>, Operand<'a>, f64);

/// `lhs·rhs + scale·left·right` for 2-D operands in f32 or f64 (all one dtype); row-major.
pub fn product_sum(lhs: Operand, rhs: Operand, extra: Option<Extra>) -> Result<CpuStorage> {
    Ok(match lhs.0 {
        CpuStorage::F32(_) => CpuStorage::F32(typed::<f32>(lhs, rhs, extra)?),
        CpuStorage::F64(_) => CpuStorage::F64(typed::<f64>(lhs, rhs, extra)?),
        other => candle_core::bail!(
            "product sum on the CPU takes f32 or f64, not {:?}",
            other.dtype()
        ),
    })
}

/// [`product_sum`] over tensors; `None` where it does not run (not on the CPU, or not in
/// f32 or f64), for the caller to compose the same from candle's ops.
pub fn tensor_product_sum(
    lhs: &Tensor,
    rhs: &Tensor,
    extra: Option<(&Tensor, &Tensor, f64)>,
) -> Result<Option<Tensor>> {
    let runs = |t: &Tensor| {
        matches!(t.device(), Device::Cpu)
            && matches!(t.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
    };
    if !runs(lhs) || !runs(rhs) || extra.is_some_and(|(l, r, _)| !runs(l) || !runs(r)) {
        return Ok(None);
    }
    let shape = (lhs.dim(0)?, rhs.dim(1)?);
    let (lhs_storage, lhs_layout) = lhs.storage_and_layout();
    let (rhs_storage, rhs_layout) = rhs.storage_and_layout();
    let extra_parts = extra
        .map(|(left, right, scale)| (left.storage_and_layout(), right.storage_and_layout(), scale));
    let extra_operands = match &extra_parts {
        Some(((left, left_layout), (right, right_layout), scale)) => Some((
            (on_cpu(left)?, *left_layout),
            (on_cpu(right)?, *right_layout),
            *scale,
        )),
        None => None,
    };
    let sum = product_sum(
        (on_cpu(&lhs_storage)?, lhs_layout),
        (on_cpu(&rhs_storage)?, rhs_layout),
        extra_operands,
    )?;
    Ok(Some(Tensor::from_storage(
        Storage::Cpu(sum),
        shape,
        BackpropOp::none(),
        false,
    )))
}

fn on_cpu(storage: &Storage) -> Result<&CpuStorage> {
    match storage {
        Storage::Cpu(storage) => Ok(storage),
        _ => candle_core::bail!("product sum: an operand is not on the CPU"),
    }
}

fn typed<T: Real>(lhs: Operand, rhs: Operand, extra: Option<Extra>) -> Result<Vec<T>> {
    let (lhs, rhs) = (matrix::<T>(lhs)?, matrix::<T>(rhs)?);
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if rhs.rows != k {
        candle_core::bail!("product sum: {m}×{k} times {}×{n}", rhs.rows);
    }
    let mut out = product(lhs, rhs, Threads::Pool);
    if let Some((left, right, scale)) = extra {
        let (left, right) = (matrix::<T>(left)?, matrix::<T>(right)?);
        if left.rows != m || right.cols != n || left.cols != right.rows {
            candle_core::bail!(
                "product sum: a {m}×{n} product plus {}×{} times {}×{}",
                left.rows,
                left.cols,
                right.rows,
                right.cols
            );
        }
        matmul(
            Matrix::rows(&mut out[..], m, n),
            left,
            right,
            true,
            T::of(scale),
            Threads::Pool,
        );
    }
    Ok(out)
}

/// The operand as a matrix over its storage, strides as its layout gives them.
fn matrix<'a, T: Real>((storage, layout): Operand<'a>) -> Result<Matrix<&'a [T]>> {
    let (rows, cols) = layout.shape().dims2()?;
    let data = storage.as_slice::<T>()?;
    let stride = layout.stride();
    let Some(data) = data.get(layout.start_offset()..) else {
        candle_core::bail!("product sum: an operand starts past its storage");
    };
    Ok(Matrix {
        data,
        rows,
        cols,
        row_stride: stride[0],
        col_stride: stride[1],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against candle's matmul and add, with transposed and offset operands, in f64.
    #[test]
    fn equals_the_composed_products() -> Result<()> {
        let device = Device::Cpu;
        let x = Tensor::randn(0f64, 1.0, (7, 5), &device)?;
        let w = Tensor::randn(0f64, 1.0, (6, 5), &device)?;
        let a = Tensor::randn(0f64, 1.0, (3, 5), &device)?;
        let b = Tensor::randn(0f64, 1.0, (2, 6, 3), &device)?.get(1)?;
        let down = x.matmul(&a.t()?)?;
        let expected = (x.matmul(&w.t()?)? + down.matmul(&b.t()?)?.affine(0.5, 0.0)?)?;
        let Some(sum) = tensor_product_sum(&x, &w.t()?, Some((&down, &b.t()?, 0.5)))? else {
            candle_core::bail!("the CPU path did not run");
        };
        let gap = (sum - &expected)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(gap < 1e-12, "largest difference {gap}");
        let plain = tensor_product_sum(&x, &w.t()?, None)?;
        let Some(plain) = plain else {
            candle_core::bail!("the CPU path did not run");
        };
        let gap = (plain - x.matmul(&w.t()?)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(gap < 1e-12, "largest difference {gap}");
        Ok(())
    }

    #[test]
    fn mismatched_shapes_are_an_error() -> Result<()> {
        let device = Device::Cpu;
        let x = Tensor::zeros((4, 3), candle_core::DType::F32, &device)?;
        let w = Tensor::zeros((2, 5), candle_core::DType::F32, &device)?;
        assert!(tensor_product_sum(&x, &w, None).is_err());
        Ok(())
    }
}
