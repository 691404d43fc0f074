//! AdamW as PyTorch defines it (decoupled weight decay, bias-corrected moments kept in
//! f32) with global-norm clipping, and the linear-warmup cosine schedule of `transformers`.
//!
//! The LoRA parameters and both moments live in one flat f32 buffer, updated by one fused
//! op (`trainer_kernels::adamw_step`) that also applies the clipping factor: a step is a
//! norm reduction, one pass over the buffer, and a copy back into each parameter.

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};
use trainer_kernels::AdamWStep;

pub struct AdamW {
    parameters: Vec<Var>,
    /// (3, n): every parameter flattened, in order, then their first moments, then their
    /// second moments. Row 0 is the master copy the parameters are refreshed from.
    state: Tensor,
    steps: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// `tensors` flattened and concatenated in f32.
fn flat<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> Result<Tensor> {
    let pieces = tensors
        .into_iter()
        .map(|t| t.flatten_all()?.to_dtype(DType::F32))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&pieces, 0)
}

impl AdamW {
    pub fn new(parameters: Vec<Var>, weight_decay: f64) -> Result<AdamW> {
        if parameters.is_empty() {
            candle_core::bail!("no parameter to optimise");
        }
        let values = flat(parameters.iter().map(|v| v.as_tensor()))?;
        let zeros = values.zeros_like()?;
        Ok(AdamW {
            state: Tensor::stack(&[&values, &zeros, &zeros], 0)?,
            parameters,
            steps: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        })
    }

    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The parameters' gradients in `grads`, flat in the buffer's order (f32).
    pub fn flat_gradient(&self, grads: &GradStore) -> Result<Tensor> {
        let gradients = self
            .parameters
            .iter()
            .map(|parameter| {
                grads.get(parameter).ok_or_else(|| {
                    candle_core::Error::Msg("a LoRA parameter got no gradient".into())
                })
            })
            .collect::<Result<Vec<_>>>()?;
        flat(gradients)
    }

    /// One update with the flat `gradient` (see [`AdamW::flat_gradient`]), first clipped
    /// so its global L2 norm is at most `max_norm` (as `torch.nn.utils.clip_grad_norm_`: by
    /// `min(1, max_norm / (norm + 1e-6))`; `max_norm` 0 does not clip). Returns the norm
    /// before clipping as a scalar tensor: all of it happens on the device, nothing is read
    /// back.
    pub fn step(&mut self, gradient: &Tensor, max_norm: f64, learning_rate: f64) -> Result<Tensor> {
        let gradient = gradient.to_dtype(DType::F32)?.contiguous()?;
        let norm = gradient.sqr()?.sum_all()?.sqrt()?;
        let clip = if max_norm > 0.0 {
            ((&norm + 1e-6)?.recip()? * max_norm)?.minimum(1.0)?
        } else {
            norm.ones_like()?
        };
        self.steps += 1;
        let step = AdamWStep {
            learning_rate,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            step: u32::try_from(self.steps).unwrap_or(u32::MAX),
        };
        trainer_kernels::adamw_step(&self.state, &gradient, &clip.reshape(1)?, step)?;
        for (parameter, value) in self.parameters.iter().zip(self.split(0)?) {
            parameter.set(&value.to_dtype(parameter.dtype())?)?;
        }
        Ok(norm)
    }

    /// Row `row` of the buffer cut into the parameters' shapes (views, no copy).
    fn split(&self, row: usize) -> Result<Vec<Tensor>> {
        let values = self.state.get(row)?;
        let mut offset = 0;
        self.parameters
            .iter()
            .map(|parameter| {
                let count = parameter.elem_count();
                let piece = values
                    .narrow(0, offset, count)?
                    .reshape(parameter.shape())?;
                offset += count;
                Ok(piece)
            })
            .collect()
    }

    /// The first and second moments, one tensor per parameter, for checkpoints.
    pub fn moments(&self) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        Ok((self.split(1)?, self.split(2)?))
    }

    /// Takes the moments and step count of a checkpoint, and the parameters' current
    /// values (set from the same checkpoint) as the master copy.
    pub fn restore(&mut self, first: Vec<Tensor>, second: Vec<Tensor>, steps: usize) -> Result<()> {
        if first.len() != self.parameters.len() || second.len() != self.parameters.len() {
            candle_core::bail!(
                "optimizer state has {} moments for {} parameters",
                first.len(),
                self.parameters.len()
            );
        }
        for (parameter, (m, v)) in self.parameters.iter().zip(first.iter().zip(&second)) {
            if m.shape() != parameter.shape() || v.shape() != parameter.shape() {
                candle_core::bail!(
                    "optimizer state of shape {:?} for a parameter of shape {:?}",
                    m.dims(),
                    parameter.dims()
                );
            }
        }
        let values = flat(self.parameters.iter().map(|v| v.as_tensor()))?;
        let device = self.state.device().clone();
        self.state = Tensor::stack(
            &[
                values,
                flat(&first)?.to_device(&device)?,
                flat(&second)?.to_device(&device)?,
            ],
            0,
        )?;
        self.steps = steps;
        Ok(())
    }
}

/// Learning rate for optimizer step `step` (0-based): linear warmup from 0 over
/// `warmup_steps`, then cosine decay to 0 at `total_steps` (transformers'
/// `get_cosine_schedule_with_warmup`).
pub fn learning_rate(base: f64, step: usize, warmup_steps: usize, total_steps: usize) -> f64 {
    if step < warmup_steps {
        return base * step as f64 / warmup_steps.max(1) as f64;
    }
    let progress =
        (step - warmup_steps) as f64 / (total_steps.saturating_sub(warmup_steps)).max(1) as f64;
    base * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert_eq!(learning_rate(1.0, 0, 10, 100), 0.0);
        assert_eq!(learning_rate(1.0, 5, 10, 100), 0.5);
        assert_eq!(learning_rate(1.0, 10, 10, 100), 1.0);
        assert!((learning_rate(1.0, 55, 10, 100) - 0.5).abs() < 1e-12);
        assert!(learning_rate(1.0, 100, 10, 100).abs() < 1e-12);
    }

    /// The per-tensor AdamW and clipping this module used before the flat buffer, as
    /// torch.optim.AdamW and clip_grad_norm_ write them: the reference for the fused op.
    struct Reference {
        parameters: Vec<Tensor>,
        first: Vec<Tensor>,
        second: Vec<Tensor>,
        steps: i32,
    }

    impl Reference {
        fn step(&mut self, gradients: &[Tensor], max_norm: f64, lr: f64, wd: f64) -> Result<()> {
            let mut squared = Tensor::zeros((), DType::F32, &Device::Cpu)?;
            for gradient in gradients {
                squared = (squared + gradient.sqr()?.sum_all()?)?;
            }
            let norm = squared.sqrt()?;
            let factor = ((&norm + 1e-6)?.recip()? * max_norm)?.minimum(1.0)?;
            self.steps += 1;
            let (beta1, beta2, eps) = (0.9f64, 0.999f64, 1e-8);
            let correction1 = 1.0 - beta1.powi(self.steps);
            let correction2 = 1.0 - beta2.powi(self.steps);
            for (i, gradient) in gradients.iter().enumerate() {
                let gradient = gradient.broadcast_mul(&factor)?;
                let m = ((&self.first[i] * beta1)? + (&gradient * (1.0 - beta1))?)?;
                let v = ((&self.second[i] * beta2)? + (gradient.sqr()? * (1.0 - beta2))?)?;
                let denominator = ((v.sqrt()? / correction2.sqrt())? + eps)?;
                let update = ((&m / &denominator)? * (lr / correction1))?;
                let decayed = (&self.parameters[i] * (1.0 - lr * wd))?;
                self.parameters[i] = (decayed - update)?;
                self.first[i] = m;
                self.second[i] = v;
            }
            Ok(())
        }
    }

    fn random(rng: &mut crate::rng::Rng, shape: (usize, usize), scale: f64) -> Result<Tensor> {
        let values: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| (rng.normal() * scale) as f32)
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu)
    }

    fn assert_close(actual: &[Tensor], expected: &[Tensor], what: &str) -> Result<()> {
        for (a, e) in actual.iter().zip(expected) {
            let (a, e): (Vec<f32>, Vec<f32>) =
                (a.flatten_all()?.to_vec1()?, e.flatten_all()?.to_vec1()?);
            for (a, e) in a.iter().zip(&e) {
                assert!((a - e).abs() <= 1e-6, "{what}: {a} vs {e}");
            }
        }
        Ok(())
    }

    /// Eight steps over parameters of several shapes, clipping on (the gradients' norm is
    /// far above 0.5), with weight decay: the fused update over the flat buffer leaves the
    /// parameters and both moments where the per-tensor update does, to 1e-6.
    #[test]
    fn the_fused_update_equals_the_per_tensor_update() -> Result<()> {
        let mut rng = crate::rng::Rng::new(5);
        let shapes = [(8, 64), (64, 8), (4, 96), (96, 4), (1, 1)];
        let initial: Vec<Tensor> = shapes
            .iter()
            .map(|shape| random(&mut rng, *shape, 0.3))
            .collect::<Result<_>>()?;
        let parameters: Vec<Var> = initial
            .iter()
            .map(Var::from_tensor)
            .collect::<Result<_>>()?;
        let mut fused = AdamW::new(parameters.clone(), 0.05)?;
        let mut reference = Reference {
            first: initial
                .iter()
                .map(|t| t.zeros_like())
                .collect::<Result<_>>()?,
            second: initial
                .iter()
                .map(|t| t.zeros_like())
                .collect::<Result<_>>()?,
            parameters: initial,
            steps: 0,
        };
        for step in 0..8 {
            let gradients: Vec<Tensor> = shapes
                .iter()
                .map(|shape| random(&mut rng, *shape, 1.0))
                .collect::<Result<_>>()?;
            let lr = learning_rate(1e-2, step, 2, 8);
            reference.step(&gradients, 0.5, lr, 0.05)?;
            let norm = fused
                .step(&flat(&gradients)?, 0.5, lr)?
                .to_scalar::<f32>()?;
            assert!(norm > 0.5, "the gradients were clipped: norm {norm}");
        }
        let values: Vec<Tensor> = parameters.iter().map(|v| v.as_tensor().clone()).collect();
        assert_close(&values, &reference.parameters, "parameters")?;
        let (first, second) = fused.moments()?;
        assert_close(&first, &reference.first, "first moments")?;
        assert_close(&second, &reference.second, "second moments")?;
        assert_eq!(fused.steps(), 8);
        Ok(())
    }

    /// A restored optimizer continues exactly where the saved one was.
    #[test]
    fn restoring_the_moments_continues_the_run() -> Result<()> {
        let device = Device::Cpu;
        let gradient = Tensor::new(&[0.5f32, -3.0, 1.0], &device)?;
        let run = |steps: usize| -> Result<(AdamW, Var)> {
            let parameter = Var::from_tensor(&Tensor::new(&[[1.0f32, -2.0, 0.5]], &device)?)?;
            let mut optimizer = AdamW::new(vec![parameter.clone()], 0.1)?;
            for _ in 0..steps {
                optimizer.step(&gradient, 1.0, 0.01)?;
            }
            Ok((optimizer, parameter))
        };
        let (uninterrupted, expected) = run(3)?;
        let (saved, saved_parameter) = run(2)?;
        let (first, second) = saved.moments()?;
        let parameter = Var::from_tensor(&Tensor::zeros((1, 3), DType::F32, &device)?)?;
        let mut resumed = AdamW::new(vec![parameter.clone()], 0.1)?;
        parameter.set(saved_parameter.as_tensor())?;
        resumed.restore(first, second, saved.steps())?;
        resumed.step(&gradient, 1.0, 0.01)?;
        assert_eq!(
            parameter.as_tensor().to_vec2::<f32>()?,
            expected.as_tensor().to_vec2::<f32>()?
        );
        assert_eq!(resumed.steps(), uninterrupted.steps());
        Ok(())
    }

    #[test]
    fn the_returned_norm_is_the_global_norm_before_clipping() -> Result<()> {
        let device = Device::Cpu;
        let parameter = Var::from_tensor(&Tensor::zeros(2, DType::F32, &device)?)?;
        let mut optimizer = AdamW::new(vec![parameter], 0.0)?;
        let gradient = Tensor::new(&[3.0f32, 4.0], &device)?;
        let norm = optimizer.step(&gradient, 1.0, 0.01)?.to_scalar::<f32>()?;
        assert!((norm - 5.0).abs() < 1e-6);
        let unclipped = optimizer.step(&gradient, 0.0, 0.01)?.to_scalar::<f32>()?;
        assert!((unclipped - 5.0).abs() < 1e-6);
        Ok(())
    }
}
