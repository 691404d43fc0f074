//! RMSNorm and SwiGLU on CUDA, forward and backward, f32 or bf16 with f32 arithmetic: the
//! same formulas as the CPU implementations in `rms_norm.rs` and `swiglu.rs`. RMSNorm runs
//! one block per row (two block-wide sums in the backward); SwiGLU one thread per entry.
//! Each backward is an op over the tensors it reads (candle hands `bwd` tensors, not
//! storages), written here once for both.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Shape};

const BLOCK: u32 = 256;

fn range(layout: &Layout, op: &str) -> Result<std::ops::Range<usize>> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: an input is not contiguous")))?;
    Ok(start..end)
}

fn suffix(dtype: DType, op: &str) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => candle_core::bail!("{op} on CUDA takes f32 or bf16, not {other:?}"),
    }
}

/// Launches `kernel_<dtype>` over the inputs (read) into a fresh output of `out_len`
/// entries, with the trailing scalar arguments `n` (row length or entry count) and `eps`.
#[allow(unsafe_code)]
fn launch<T: CudaDType + DeviceRepr + candle_core::WithDType>(
    kernel: &str,
    inputs: &[(&CudaStorage, &Layout)],
    out_len: usize,
    (n, eps): (u64, f32),
    config: LaunchConfig,
) -> Result<CudaStorage> {
    let device = inputs[0].0.device.clone();
    let name = format!("{kernel}_{}", suffix(T::DTYPE, kernel)?);
    let function =
        device.get_or_load_custom_func(&name, "trainer_kernels_norm_gate", &PROGRAM.ptx()?)?;
    let views = inputs
        .iter()
        .map(|(storage, layout)| Ok(storage.as_cuda_slice::<T>()?.slice(range(layout, kernel)?)))
        .collect::<Result<Vec<_>>>()?;
    // SAFETY: every kernel here writes each of its `out_len` outputs before anything reads
    // them.
    let out = unsafe { device.alloc::<T>(out_len)? };
    let mut builder = function.builder();
    for view in &views {
        builder.arg(view);
    }
    builder.arg(&out);
    builder.arg(&n);
    builder.arg(&eps);
    // SAFETY: the callers size `out_len`, `n` and the grid from the inputs' shapes, which
    // they check against each other.
    unsafe { builder.launch(config) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, device))
}

fn dispatch(
    kernel: &str,
    inputs: &[(&CudaStorage, &Layout)],
    out_len: usize,
    scalars: (u64, f32),
    config: LaunchConfig,
) -> Result<CudaStorage> {
    match inputs[0].0.dtype() {
        DType::F32 => launch::<f32>(kernel, inputs, out_len, scalars, config),
        DType::BF16 => launch::<half::bf16>(kernel, inputs, out_len, scalars, config),
        other => candle_core::bail!("{kernel} on CUDA takes f32 or bf16, not {other:?}"),
    }
}

fn rows_config(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// RMSNorm's forward: `x` (rows × n) and the scale `w` (n).
pub(crate) fn rms_norm_forward(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    eps: f64,
) -> Result<CudaStorage> {
    let n = w.1.shape().elem_count();
    let count = x.1.shape().elem_count();
    dispatch(
        "rms_norm_forward",
        &[x, w],
        count,
        (n as u64, eps as f32),
        rows_config(count / n.max(1)),
    )
}

/// SwiGLU's forward over `count` entries.
pub(crate) fn swiglu_forward(
    gate: (&CudaStorage, &Layout),
    up: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let count = gate.1.shape().elem_count();
    dispatch(
        "swiglu_forward",
        &[gate, up],
        count,
        (count as u64, 0.0),
        LaunchConfig::for_num_elems(count as u32),
    )
}

/// RMSNorm's backward as an op over (x, w, dy): dx.
pub(crate) struct RmsNormGradient {
    pub eps: f64,
}

/// SwiGLU's backward as an op over (gate, up, dy): d gate then d up, in one buffer.
pub(crate) struct SwiGluGradients;

impl crate::cuda::CudaOp3 for RmsNormGradient {
    fn name(&self) -> &'static str {
        "rms-norm-gradient"
    }

    fn cuda_fwd(
        &self,
        (x, x_layout): (&CudaStorage, &Layout),
        (w, w_layout): (&CudaStorage, &Layout),
        (grad, grad_layout): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let n = w_layout.shape().elem_count();
        let count = x_layout.shape().elem_count();
        if grad_layout.shape() != x_layout.shape() {
            candle_core::bail!("rms norm gradient: the gradient's shape is not the input's");
        }
        let inputs = [(x, x_layout), (w, w_layout), (grad, grad_layout)];
        let dx = dispatch(
            "rms_norm_backward",
            &inputs,
            count,
            (n as u64, self.eps as f32),
            rows_config(count / n.max(1)),
        )?;
        Ok((dx, x_layout.shape().clone()))
    }
}

impl crate::cuda::CudaOp3 for SwiGluGradients {
    fn name(&self) -> &'static str {
        "swiglu-gradients"
    }

    fn cuda_fwd(
        &self,
        (gate, gate_layout): (&CudaStorage, &Layout),
        (up, up_layout): (&CudaStorage, &Layout),
        (grad, grad_layout): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let count = gate_layout.shape().elem_count();
        if up_layout.shape() != gate_layout.shape() || grad_layout.shape() != gate_layout.shape() {
            candle_core::bail!("swiglu gradients: gate, up and the gradient differ in shape");
        }
        let inputs = [(gate, gate_layout), (up, up_layout), (grad, grad_layout)];
        let both = dispatch(
            "swiglu_backward",
            &inputs,
            2 * count,
            (count as u64, 0.0),
            LaunchConfig::for_num_elems(count as u32),
        )?;
        Ok((both, Shape::from(2 * count)))
    }
}

/// The kernels.
const SOURCE: &str = crate::cuda::cuda_source!("../cuda/norm_gate.cu");

static PROGRAM: crate::cuda::Program = crate::cuda::Program::new(SOURCE);
