//! `trainer kernel-check`: each fused op run on the chosen device and on the CPU with the
//! same inputs, and how far apart they land. On a GPU host this checks the CUDA kernels
//! against the CPU implementations the tests check (scripts/gpu-check runs it first).

use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;

use crate::error::{Result, TrainerError};
use crate::model::chunked_token_loss;
use crate::rng::Rng;
use crate::train::{self, DeviceChoice};

#[derive(Debug, Clone, Serialize)]
pub struct KernelCheck {
    pub kernel: &'static str,
    pub device: String,
    /// The largest absolute difference between the device's result and the CPU's.
    pub max_abs_difference: f64,
    pub tolerance: f64,
    pub passed: bool,
}

/// Runs every check on `choice` and returns their outcomes (the caller fails on any).
pub fn run(choice: DeviceChoice) -> Result<Vec<KernelCheck>> {
    let device = train::device(choice)?;
    let mut rng = Rng::new(17);
    let checks: [(&'static str, f64, Check); 3] = [
        ("dropout", 0.0, dropout),
        ("fused_adamw", 1e-6, adamw),
        ("chunked_cross_entropy", 1e-4, chunked_loss),
    ];
    checks
        .into_iter()
        .map(|(kernel, tolerance, check)| {
            let difference = check(&device, &mut rng)?;
            Ok(KernelCheck {
                kernel,
                device: format!("{:?}", device.location()),
                max_abs_difference: difference,
                tolerance,
                passed: difference <= tolerance,
            })
        })
        .collect()
}

type Check = fn(&Device, &mut Rng) -> Result<f64>;

fn random(rng: &mut Rng, count: usize, scale: f64) -> Vec<f32> {
    (0..count).map(|_| (rng.normal() * scale) as f32).collect()
}

/// The largest |a − b| over two tensors of one shape, compared on the CPU in f64.
fn max_difference(a: &Tensor, b: &Tensor) -> Result<f64> {
    let difference = (a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?
        - b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?)?
    .abs()?
    .flatten_all()?
    .max(0)?
    .to_scalar::<f64>()?;
    Ok(difference)
}

/// The same stream gives the same bits: an exact match is required.
fn dropout(device: &Device, rng: &mut Rng) -> Result<f64> {
    let values = random(rng, 1 << 20, 1.0);
    let on = |device: &Device| -> Result<Tensor> {
        let x = Tensor::from_vec(values.clone(), (1024, 1024), device)?;
        Ok(trainer_kernels::dropout(&x, 0x5EED, 0.9)?)
    };
    max_difference(&on(device)?, &on(&Device::Cpu)?)
}

/// Three clipped steps over a million entries: the parameters and both moments.
fn adamw(device: &Device, rng: &mut Rng) -> Result<f64> {
    let n = 1 << 20;
    let initial = random(rng, n, 0.1);
    let gradients: Vec<Vec<f32>> = (0..3).map(|_| random(rng, n, 1.0)).collect();
    let on = |device: &Device| -> Result<Tensor> {
        let values = Tensor::from_vec(initial.clone(), n, device)?;
        let state = Tensor::stack(&[&values, &values.zeros_like()?, &values.zeros_like()?], 0)?;
        for (step, gradient) in gradients.iter().enumerate() {
            let gradient = Tensor::from_vec(gradient.clone(), n, device)?;
            let clip = Tensor::new(&[0.25f32], device)?;
            let step = trainer_kernels::AdamWStep {
                learning_rate: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
                step: step as u32 + 1,
            };
            trainer_kernels::adamw_step(&state, &gradient, &clip, step)?;
        }
        Ok(state)
    };
    max_difference(&on(device)?, &on(&Device::Cpu)?)
}

/// The loss and its gradient for the hidden states, over several chunks, in f32.
fn chunked_loss(device: &Device, rng: &mut Rng) -> Result<f64> {
    let (tokens, width, vocab) = (96, 64, 4000);
    let hidden = random(rng, tokens * width, 1.0);
    let head = random(rng, vocab * width, 0.2);
    let targets: Vec<u32> = (0..tokens)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect();
    let mask: Vec<f32> = (0..tokens).map(|i| (i % 3 != 0) as u8 as f32).collect();
    let on = |device: &Device| -> Result<(Tensor, Tensor)> {
        let hidden = Var::from_vec(hidden.clone(), (2, tokens / 2, width), device)?;
        let head = Tensor::from_vec(head.clone(), (vocab, width), device)?;
        let targets = Tensor::from_vec(targets.clone(), (2, tokens / 2), device)?;
        let mask = Tensor::from_vec(mask.clone(), (2, tokens / 2), device)?;
        let loss = chunked_token_loss(hidden.as_tensor(), &head, &targets, &mask, 40)?;
        let gradient = loss
            .backward()?
            .get(&hidden)
            .cloned()
            .ok_or_else(|| TrainerError::Invalid("the hidden states got no gradient".into()))?;
        Ok((loss, gradient))
    };
    let ((loss, gradient), (cpu_loss, cpu_gradient)) = (on(device)?, on(&Device::Cpu)?);
    Ok(max_difference(&loss, &cpu_loss)?.max(max_difference(&gradient, &cpu_gradient)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_check_passes_on_the_cpu() -> Result<()> {
        let checks = run(DeviceChoice::Cpu)?;
        assert_eq!(checks.len(), 3);
        for check in checks {
            assert!(check.passed, "{check:?}");
            assert_eq!(check.max_abs_difference, 0.0, "CPU against CPU: {check:?}");
        }
        Ok(())
    }
}
