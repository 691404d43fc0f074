//! One AdamW step (PyTorch's: decoupled weight decay, bias-corrected moments) with the
//! global-norm clipping factor folded in, over every LoRA parameter at once: they and
//! their two moments live in one flat f32 buffer, so a step is one pass over memory
//! instead of a dozen element-wise ops per tensor.

use candle_core::{CpuStorage, DType, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

/// The hyperparameters of one step; `step` counts from 1 (the bias corrections use it).
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub learning_rate: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: u32,
}

/// Updates `state` (3, n) in place: row 0 holds the parameters, row 1 the first moments,
/// row 2 the second moments. `gradient` (n) is multiplied by `clip` (one element, the
/// clipping factor, computed on the device so nothing is read back) before the update.
pub fn adamw_step(state: &Tensor, gradient: &Tensor, clip: &Tensor, step: AdamWStep) -> Result<()> {
    let (rows, n) = state.dims2()?;
    if rows != 3 || gradient.elem_count() != n || clip.elem_count() != 1 {
        candle_core::bail!(
            "adamw: state {:?}, gradient {:?}, clip {:?}: expected (3, n), (n) and (1)",
            state.dims(),
            gradient.dims(),
            clip.dims()
        );
    }
    for (name, tensor) in [("state", state), ("gradient", gradient), ("clip", clip)] {
        if tensor.dtype() != DType::F32 || !tensor.is_contiguous() {
            candle_core::bail!("adamw: {name} must be contiguous f32");
        }
    }
    state.inplace_op3(gradient, clip, &Update::new(step))
}

/// The step's constants, in the order the update uses them.
#[derive(Debug, Clone, Copy)]
struct Update {
    beta1: f32,
    beta2: f32,
    /// `lr / (1 − β1ᵗ)`.
    step_size: f32,
    /// `1 / √(1 − β2ᵗ)`.
    inverse_root_correction: f32,
    eps: f32,
    /// `1 − lr · weight_decay`.
    decay: f32,
}

impl Update {
    fn new(step: AdamWStep) -> Update {
        let t = step.step.max(1) as i32;
        Update {
            beta1: step.beta1 as f32,
            beta2: step.beta2 as f32,
            step_size: (step.learning_rate / (1.0 - step.beta1.powi(t))) as f32,
            inverse_root_correction: (1.0 / (1.0 - step.beta2.powi(t)).sqrt()) as f32,
            eps: step.eps as f32,
            decay: (1.0 - step.learning_rate * step.weight_decay) as f32,
        }
    }

    /// The new (parameter, first moment, second moment) of one entry.
    fn apply(&self, parameter: f32, m: f32, v: f32, gradient: f32) -> (f32, f32, f32) {
        let m = m * self.beta1 + gradient * (1.0 - self.beta1);
        let v = v * self.beta2 + gradient * gradient * (1.0 - self.beta2);
        let denominator = v.sqrt() * self.inverse_root_correction + self.eps;
        (
            parameter * self.decay - m / denominator * self.step_size,
            m,
            v,
        )
    }
}

fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, len: usize) -> Result<&'a [f32]> {
    match storage {
        CpuStorage::F32(data) => Ok(&data[layout.start_offset()..layout.start_offset() + len]),
        _ => candle_core::bail!("adamw: expected f32"),
    }
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(
        &self,
        state: &mut CpuStorage,
        state_layout: &Layout,
        gradient: &CpuStorage,
        gradient_layout: &Layout,
        clip: &CpuStorage,
        clip_layout: &Layout,
    ) -> Result<()> {
        let n = gradient_layout.shape().elem_count();
        let gradient = f32_slice(gradient, gradient_layout, n)?;
        let clip = f32_slice(clip, clip_layout, 1)?[0];
        let CpuStorage::F32(state) = state else {
            candle_core::bail!("adamw: expected f32");
        };
        let start = state_layout.start_offset();
        let (parameters, moments) = state[start..start + 3 * n].split_at_mut(n);
        let (first, second) = moments.split_at_mut(n);
        parameters
            .par_iter_mut()
            .zip(first.par_iter_mut())
            .zip(second.par_iter_mut())
            .zip(gradient.par_iter())
            .with_min_len(1 << 14)
            .for_each(|(((p, m), v), g)| (*p, *m, *v) = self.apply(*p, *m, *v, g * clip));
        Ok(())
    }

    #[cfg(feature = "cuda")]
    #[allow(unsafe_code)]
    fn cuda_fwd(
        &self,
        state: &mut candle_core::CudaStorage,
        state_layout: &Layout,
        gradient: &candle_core::CudaStorage,
        gradient_layout: &Layout,
        clip: &candle_core::CudaStorage,
        clip_layout: &Layout,
    ) -> Result<()> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;

        let n = gradient_layout.shape().elem_count();
        let device = state.device.clone();
        let function = device.get_or_load_custom_func(
            "adamw_f32",
            "trainer_kernels_adamw",
            &PROGRAM.ptx()?,
        )?;
        let gradient = gradient
            .as_cuda_slice::<f32>()?
            .slice(gradient_layout.start_offset()..);
        let clip = clip
            .as_cuda_slice::<f32>()?
            .slice(clip_layout.start_offset()..);
        let mut state = state
            .as_cuda_slice_mut::<f32>()?
            .slice_mut(state_layout.start_offset()..);
        let count = n as u64;
        let mut builder = function.builder();
        builder.arg(&count);
        builder.arg(&mut state);
        builder.arg(&gradient);
        builder.arg(&clip);
        builder.arg(&self.beta1);
        builder.arg(&self.beta2);
        builder.arg(&self.step_size);
        builder.arg(&self.inverse_root_correction);
        builder.arg(&self.eps);
        builder.arg(&self.decay);
        // SAFETY: the kernel reads `count` gradients and one clip factor and updates
        // 3·`count` state entries, the sizes checked in `adamw_step`.
        unsafe { builder.launch(LaunchConfig::for_num_elems(n as u32)) }.w()?;
        Ok(())
    }
}

/// The CUDA kernel: the same arithmetic as [`Update::apply`], one thread per entry.
#[cfg(feature = "cuda")]
const SOURCE: &str = crate::cuda::cuda_source!("../cuda/adamw.cu");

#[cfg(feature = "cuda")]
static PROGRAM: crate::cuda::Program = crate::cuda::Program::new(SOURCE);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// At step 1, m̂/(√v̂+ε) is g/|g| up to ε: each entry moves by lr against its
    /// (clipped) gradient's sign after decoupled weight decay.
    #[test]
    fn the_first_step_matches_the_closed_form() -> Result<()> {
        let device = Device::Cpu;
        let state = Tensor::new(&[[1.0f32, -2.0], [0.0, 0.0], [0.0, 0.0]], &device)?;
        let gradient = Tensor::new(&[0.5f32, -3.0], &device)?;
        let clip = Tensor::new(&[0.5f32], &device)?;
        let step = AdamWStep {
            learning_rate: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            step: 1,
        };
        adamw_step(&state, &gradient, &clip, step)?;
        let rows: Vec<Vec<f32>> = state.to_vec2()?;
        let expected = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) + 0.01];
        for (value, expected) in rows[0].iter().zip(expected) {
            assert!(
                (f64::from(*value) - expected).abs() < 1e-6,
                "{value} vs {expected}"
            );
        }
        // The moments saw the clipped gradient.
        assert!((rows[1][0] - 0.1 * 0.25).abs() < 1e-7);
        assert!((rows[2][1] - 0.001 * 2.25).abs() < 1e-7);
        Ok(())
    }

    #[test]
    fn shapes_and_dtypes_are_checked() -> Result<()> {
        let device = Device::Cpu;
        let step = AdamWStep {
            learning_rate: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            step: 1,
        };
        let clip = Tensor::new(&[1.0f32], &device)?;
        let state = Tensor::zeros((3, 4), DType::F32, &device)?;
        assert!(adamw_step(&state, &Tensor::zeros(5, DType::F32, &device)?, &clip, step).is_err());
        let wide = Tensor::zeros((3, 4), DType::F64, &device)?;
        assert!(adamw_step(&wide, &Tensor::zeros(4, DType::F64, &device)?, &clip, step).is_err());
        Ok(())
    }
}
