//! AdamW as PyTorch defines it (decoupled weight decay, bias-corrected moments kept in
//! f32), the linear-warmup cosine schedule of `transformers`, and global-norm clipping.

use candle_core::{DType, Result, Tensor, Var};

pub struct AdamW {
    parameters: Vec<Var>,
    first_moments: Vec<Tensor>,
    second_moments: Vec<Tensor>,
    steps: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    pub fn new(parameters: Vec<Var>, weight_decay: f64) -> Result<AdamW> {
        let zeros = |v: &Var| Tensor::zeros(v.shape(), DType::F32, v.device());
        Ok(AdamW {
            first_moments: parameters.iter().map(zeros).collect::<Result<_>>()?,
            second_moments: parameters.iter().map(zeros).collect::<Result<_>>()?,
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

    /// One update with `gradients[i]` for `parameters[i]`.
    pub fn step(&mut self, gradients: &[Tensor], learning_rate: f64) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        let bias_correction1 = 1.0 - self.beta1.powi(t);
        let bias_correction2 = 1.0 - self.beta2.powi(t);
        for (i, parameter) in self.parameters.iter().enumerate() {
            let gradient = gradients[i].to_dtype(DType::F32)?;
            let m = ((&self.first_moments[i] * self.beta1)? + (&gradient * (1.0 - self.beta1))?)?;
            let v = ((&self.second_moments[i] * self.beta2)?
                + (gradient.sqr()? * (1.0 - self.beta2))?)?;
            let denominator = ((v.sqrt()? / bias_correction2.sqrt())? + self.eps)?;
            let update = ((&m / &denominator)? * (learning_rate / bias_correction1))?;
            let value = parameter.as_tensor().to_dtype(DType::F32)?;
            let decayed = (value * (1.0 - learning_rate * self.weight_decay))?;
            parameter.set(&(decayed - update)?.to_dtype(parameter.dtype())?)?;
            self.first_moments[i] = m;
            self.second_moments[i] = v;
        }
        Ok(())
    }

    /// The moments and step count, for checkpoints.
    pub fn state(&self) -> (&[Tensor], &[Tensor], usize) {
        (&self.first_moments, &self.second_moments, self.steps)
    }

    pub fn restore(&mut self, first: Vec<Tensor>, second: Vec<Tensor>, steps: usize) -> Result<()> {
        if first.len() != self.parameters.len() || second.len() != self.parameters.len() {
            candle_core::bail!(
                "optimizer state has {} moments for {} parameters",
                first.len(),
                self.parameters.len()
            );
        }
        self.first_moments = first;
        self.second_moments = second;
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

/// Scales `gradients` so their global L2 norm is at most `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`: by `min(1, max_norm / (norm + 1e-6))`; `max_norm` 0
/// does not clip) and returns the norm before clipping, as a scalar tensor: all of it
/// happens on the gradients' device, with nothing read back.
pub fn clip_global_norm(gradients: &mut [Tensor], max_norm: f64) -> Result<Tensor> {
    let mut squared: Option<Tensor> = None;
    for gradient in gradients.iter() {
        let sum = gradient.to_dtype(DType::F32)?.sqr()?.sum_all()?;
        squared = Some(match squared.take() {
            Some(total) => (total + sum)?,
            None => sum,
        });
    }
    let Some(squared) = squared else {
        candle_core::bail!("no gradient to clip");
    };
    let norm = squared.sqrt()?;
    if max_norm > 0.0 {
        let factor = ((&norm + 1e-6)?.recip()? * max_norm)?.minimum(1.0)?;
        for gradient in gradients.iter_mut() {
            let factor = factor.to_dtype(gradient.dtype())?;
            *gradient = gradient.broadcast_mul(&factor)?;
        }
    }
    Ok(norm)
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

    /// The first AdamW step moves each entry by about lr against its gradient's sign,
    /// after decoupled weight decay, as torch.optim.AdamW does.
    #[test]
    fn adamw_first_step_matches_the_closed_form() -> Result<()> {
        let device = Device::Cpu;
        let parameter = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &device)?)?;
        let mut optimizer = AdamW::new(vec![parameter.clone()], 0.1)?;
        optimizer.step(&[Tensor::new(&[0.5f32, -3.0], &device)?], 0.01)?;
        let values: Vec<f32> = parameter.as_tensor().to_vec1()?;
        // p·(1 − lr·wd) − lr·sign(g) (m̂/(√v̂+ε) = g/|g| at step 1, up to ε)
        let expected = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) + 0.01];
        for (value, expected) in values.iter().zip(expected) {
            assert!(
                (f64::from(*value) - expected).abs() < 1e-6,
                "{value} vs {expected}"
            );
        }
        Ok(())
    }

    #[test]
    fn clipping_bounds_the_global_norm() -> Result<()> {
        let device = Device::Cpu;
        let mut gradients = vec![
            Tensor::new(&[3.0f32], &device)?,
            Tensor::new(&[4.0f32], &device)?,
        ];
        let norm = clip_global_norm(&mut gradients, 1.0)?.to_scalar::<f32>()?;
        assert!((norm - 5.0).abs() < 1e-6);
        let clipped = clip_global_norm(&mut gradients, 0.0)?.to_scalar::<f32>()?;
        assert!((clipped - 1.0).abs() < 1e-5);
        // Under the limit, nothing changes.
        let before = gradients[0].to_vec1::<f32>()?;
        clip_global_norm(&mut gradients, 10.0)?;
        assert_eq!(gradients[0].to_vec1::<f32>()?, before);
        Ok(())
    }
}
