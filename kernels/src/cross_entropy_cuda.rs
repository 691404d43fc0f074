//! The training loss's per-chunk arithmetic on CUDA, in two kernels over a chunk's logits
//! (rows × vocabulary, f32 or bf16): one block per row finds the row's logsumexp (an
//! online max and sum, in f32) and its masked negative log-likelihood; a second pass writes
//! the logits' gradient `(softmax − onehot(target)) · mask` in the logits' dtype. Composed
//! from candle ops the same takes a dozen f32 passes over the logits (a cast, max,
//! subtract, exp, sum, log, gather, divide, two products, a scatter and a cast back).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};

const BLOCK: u32 = 256;

/// Per row of `logits` (rows × vocab), its logsumexp then its negative log-likelihood
/// of `targets` (u32, rows) times `mask` (f32, rows): f32, 2·rows entries.
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    logits.contiguous()?.apply_op3_no_bwd(
        &targets.contiguous()?,
        &mask.contiguous()?,
        &crate::cuda::OnCuda(Statistics),
    )
}

/// The logits' gradient `(softmax − onehot(target)) · mask` from the rows' statistics
/// ([`cross_entropy_rows`]), in the logits' dtype and shape.
pub fn cross_entropy_gradient(
    logits: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
    rows: &Tensor,
) -> Result<Tensor> {
    let op = crate::cuda::OnCuda(Gradient {
        statistics: rows.contiguous()?,
    });
    logits
        .contiguous()?
        .apply_op3_no_bwd(&targets.contiguous()?, &mask.contiguous()?, &op)
}

struct Statistics;

struct Gradient {
    statistics: Tensor,
}

/// The logits' rows and vocabulary, checked against targets and mask.
fn sizes(logits: &Layout, targets: &Layout, mask: &Layout) -> Result<(usize, usize)> {
    let (rows, vocab) = logits.shape().dims2()?;
    if targets.shape().elem_count() != rows || mask.shape().elem_count() != rows {
        candle_core::bail!("cross entropy: {rows} rows of logits, but targets or mask differ");
    }
    Ok((rows, vocab))
}

/// Launches `kernel` (one block per row) over logits, targets, mask and, for the gradient,
/// the statistics, into a fresh output of `out_len` entries of `O`.
#[allow(unsafe_code)]
fn launch<T: CudaDType + DeviceRepr, O: CudaDType + DeviceRepr>(
    kernel: &str,
    (logits, logits_layout): (&CudaStorage, &Layout),
    (targets, targets_layout): (&CudaStorage, &Layout),
    (mask, mask_layout): (&CudaStorage, &Layout),
    statistics: Option<&CudaStorage>,
    out_len: usize,
) -> Result<CudaStorage> {
    let (rows, vocab) = sizes(logits_layout, targets_layout, mask_layout)?;
    let device = logits.device.clone();
    let function =
        device.get_or_load_custom_func(kernel, "trainer_kernels_cross_entropy", &PROGRAM.ptx()?)?;
    let offsets = |layout: &Layout| -> Result<std::ops::Range<usize>> {
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("cross entropy: an input is not contiguous".into())
        })?;
        Ok(start..end)
    };
    let logits = logits.as_cuda_slice::<T>()?.slice(offsets(logits_layout)?);
    let targets = targets
        .as_cuda_slice::<u32>()?
        .slice(offsets(targets_layout)?);
    let mask = mask.as_cuda_slice::<f32>()?.slice(offsets(mask_layout)?);
    // SAFETY: each row's block writes all of its outputs before anything reads them.
    let out = unsafe { device.alloc::<O>(out_len)? };
    let (rows64, vocab64) = (rows as u64, vocab as u64);
    let mut builder = function.builder();
    builder.arg(&logits);
    builder.arg(&targets);
    builder.arg(&mask);
    let statistics = statistics.map(|s| s.as_cuda_slice::<f32>()).transpose()?;
    if let Some(statistics) = &statistics {
        builder.arg(*statistics);
    }
    builder.arg(&out);
    builder.arg(&rows64);
    builder.arg(&vocab64);
    let config = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: logits hold rows·vocab entries, targets and mask `rows` (checked by
    // `sizes`), the statistics 2·rows, and `out_len` is what the kernel writes.
    unsafe { builder.launch(config) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, device))
}

fn dtype_suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => {
            candle_core::bail!("cross entropy on CUDA takes f32 or bf16 logits, not {other:?}")
        }
    }
}

impl crate::cuda::CudaOp3 for Statistics {
    fn name(&self) -> &'static str {
        "cross-entropy-rows"
    }

    fn cuda_fwd(
        &self,
        (logits, logits_layout): (&CudaStorage, &Layout),
        (targets, targets_layout): (&CudaStorage, &Layout),
        (mask, mask_layout): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, _) = sizes(logits_layout, targets_layout, mask_layout)?;
        let inputs = (
            (logits, logits_layout),
            (targets, targets_layout),
            (mask, mask_layout),
        );
        let name = format!("cross_entropy_rows_{}", dtype_suffix(logits.dtype())?);
        let out = match logits.dtype() {
            DType::F32 => launch::<f32, f32>(&name, inputs.0, inputs.1, inputs.2, None, 2 * rows)?,
            _ => launch::<half::bf16, f32>(&name, inputs.0, inputs.1, inputs.2, None, 2 * rows)?,
        };
        Ok((out, Shape::from(2 * rows)))
    }
}

impl crate::cuda::CudaOp3 for Gradient {
    fn name(&self) -> &'static str {
        "cross-entropy-gradient"
    }

    fn cuda_fwd(
        &self,
        (logits, logits_layout): (&CudaStorage, &Layout),
        (targets, targets_layout): (&CudaStorage, &Layout),
        (mask, mask_layout): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, vocab) = sizes(logits_layout, targets_layout, mask_layout)?;
        let (storage, layout) = self.statistics.storage_and_layout();
        let Storage::Cuda(statistics) = &*storage else {
            candle_core::bail!("cross entropy: the row statistics are not on the GPU");
        };
        if layout.shape().elem_count() != 2 * rows || layout.start_offset() != 0 {
            candle_core::bail!("cross entropy: the row statistics do not fit the logits");
        }
        let inputs = (
            (logits, logits_layout),
            (targets, targets_layout),
            (mask, mask_layout),
        );
        let name = format!("cross_entropy_gradient_{}", dtype_suffix(logits.dtype())?);
        let count = rows * vocab;
        let out = match logits.dtype() {
            DType::F32 => {
                launch::<f32, f32>(&name, inputs.0, inputs.1, inputs.2, Some(statistics), count)?
            }
            _ => launch::<half::bf16, half::bf16>(
                &name,
                inputs.0,
                inputs.1,
                inputs.2,
                Some(statistics),
                count,
            )?,
        };
        Ok((out, logits_layout.shape().clone()))
    }
}

const SOURCE: &str = crate::cuda::cuda_source!("../cuda/cross_entropy.cu");

static PROGRAM: crate::cuda::Program = crate::cuda::Program::new(SOURCE);
