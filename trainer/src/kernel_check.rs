//! `trainer kernel-check`: each fused op run on the chosen device and on the CPU with the
//! same inputs, and how far apart they land. On a GPU host this checks the CUDA kernels
//! against the CPU implementations the tests check (scripts/gpu-check runs it first).

use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;

use crate::error::{Result, TrainerError};
use crate::frozen::FrozenWeight;
use crate::model::chunked_token_loss;
use crate::quantized::QuantizedWeight;
use crate::rng::Rng;
use crate::train::{self, DeviceChoice};
use candle_core::quantized::GgmlDType;

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
    let checks: [(&'static str, f64, Check); 11] = [
        ("dropout", 0.0, dropout),
        ("fused_adamw", 1e-6, adamw),
        ("chunked_cross_entropy", 1e-4, chunked_loss),
        ("causal_attention_f32", 1e-4, attention_f32),
        ("causal_attention_bf16", 5e-2, attention_bf16),
        (
            "causal_attention_bf16_per_thread",
            5e-2,
            attention_bf16_per_thread,
        ),
        ("fused_lora_linear", 1e-3, lora_linear),
        ("fused_lora_linear_q4k", 1e-3, lora_linear_q4k),
        ("fused_lora_linear_q8_0", 1e-3, lora_linear_q8_0),
        ("rms_norm_and_swiglu", 1e-4, norm_and_gate),
        ("rope", 1e-5, rope),
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

/// The output followed by the gradients of `inputs` under `Σ output ⊙ upstream`.
fn output_and_gradients(
    what: &str,
    out: Tensor,
    upstream: &Tensor,
    inputs: &[&Var],
) -> Result<Vec<Tensor>> {
    let gradients = (out.to_dtype(DType::F32)? * upstream)?
        .sum_all()?
        .backward()?;
    let mut results = vec![out];
    for var in inputs {
        let gradient = gradients
            .get(var)
            .cloned()
            .ok_or_else(|| TrainerError::Invalid(format!("{what}: an input got no gradient")))?;
        results.push(gradient);
    }
    Ok(results)
}

/// The largest difference between matching tensors of the device's and the CPU's results.
fn worst_difference(ours: &[Tensor], reference: &[Tensor]) -> Result<f64> {
    ours.iter()
        .zip(reference)
        .try_fold(0.0f64, |worst, (a, b)| Ok(worst.max(max_difference(a, b)?)))
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

/// The attention op in f32: output and the gradients of q, k and v.
fn attention_f32(device: &Device, rng: &mut Rng) -> Result<f64> {
    attention(device, rng, DType::F32)
}

/// The same in bf16 where the device computes in it (CUDA: on tensor cores where the GPU
/// has them), against the CPU in f32.
fn attention_bf16(device: &Device, rng: &mut Rng) -> Result<f64> {
    let dtype = if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    };
    attention(device, rng, dtype)
}

/// The same with tensor cores refused: the per-thread kernels GPUs without them run.
fn attention_bf16_per_thread(device: &Device, rng: &mut Rng) -> Result<f64> {
    let allowed = trainer_kernels::allow_tensor_cores(false);
    let difference = attention_bf16(device, rng);
    trainer_kernels::allow_tensor_cores(allowed);
    difference
}

/// Three rows (one full, one padded to 61 of 100 positions, one packed with three
/// sequences crossing tile boundaries), four query heads over two key/value heads, head
/// dimension 64: more than one tile each way, a partial last tile.
fn attention(device: &Device, rng: &mut Rng, dtype: DType) -> Result<f64> {
    let (batch, heads, kv_heads, len, dim) = (3, 4, 2, 100, 64);
    let segments = trainer_kernels::Segments::packed(vec![vec![100], vec![61], vec![30, 45, 20]]);
    let scale = 1.0 / (dim as f64).sqrt();
    let (query_shape, key_shape) = ((batch, heads, len, dim), (batch, kv_heads, len, dim));
    let queries = random(rng, batch * heads * len * dim, 1.0);
    let keys = random(rng, batch * kv_heads * len * dim, 1.0);
    let values = random(rng, batch * kv_heads * len * dim, 1.0);
    let weights = random(rng, batch * heads * len * dim, 1.0);
    let on = |device: &Device, dtype: DType| -> Result<Vec<Tensor>> {
        let var = |data: &[f32], shape: (usize, usize, usize, usize)| -> Result<Var> {
            let tensor = Tensor::from_vec(data.to_vec(), shape, device)?.to_dtype(dtype)?;
            Ok(Var::from_tensor(&tensor)?)
        };
        let (q, k, v) = (
            var(&queries, query_shape)?,
            var(&keys, key_shape)?,
            var(&values, key_shape)?,
        );
        let out = trainer_kernels::causal_attention(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            &segments,
            scale,
        )?;
        let weights = Tensor::from_vec(weights.clone(), query_shape, device)?;
        output_and_gradients("attention", out, &weights, &[&q, &k, &v])
    };
    worst_difference(&on(device, dtype)?, &on(&Device::Cpu, DType::F32)?)
}

/// The fused LoRA projection with dropout, in f32: output and the gradients of x, A, B.
fn lora_linear(device: &Device, rng: &mut Rng) -> Result<f64> {
    lora_linear_on(device, rng, None)
}

/// As [`lora_linear`] over a q4k base weight in several tiles: the device's dequantization
/// and tiled products against the CPU's.
fn lora_linear_q4k(device: &Device, rng: &mut Rng) -> Result<f64> {
    lora_linear_on(device, rng, Some(GgmlDType::Q4K))
}

fn lora_linear_q8_0(device: &Device, rng: &mut Rng) -> Result<f64> {
    lora_linear_on(device, rng, Some(GgmlDType::Q8_0))
}

fn lora_linear_on(device: &Device, rng: &mut Rng, format: Option<GgmlDType>) -> Result<f64> {
    let (rows, inputs, outputs, rank) = (300, 256, 192, 16);
    let x = random(rng, rows * inputs, 1.0);
    let w = random(rng, outputs * inputs, 1.0 / 16.0);
    let a = random(rng, rank * inputs, 1.0 / 16.0);
    let b = random(rng, outputs * rank, 0.25);
    let upstream = random(rng, rows * outputs, 1.0);
    let on = |device: &Device| -> Result<Vec<Tensor>> {
        let var = |data: &[f32], shape: (usize, usize)| -> Result<Var> {
            Ok(Var::from_tensor(&Tensor::from_vec(
                data.to_vec(),
                shape,
                device,
            )?)?)
        };
        let (x, a, b) = (
            var(&x, (rows, inputs))?,
            var(&a, (rank, inputs))?,
            var(&b, (outputs, rank))?,
        );
        let w = Tensor::from_vec(w.clone(), (outputs, inputs), device)?;
        let w = match format {
            Some(format) => {
                FrozenWeight::Quantized(QuantizedWeight::tiled(&w, format, device, 64)?)
            }
            None => FrozenWeight::Dense(w),
        };
        let out = crate::fused_lora::lora_linear(
            x.as_tensor(),
            &w,
            (a.as_tensor(), b.as_tensor()),
            2.0,
            Some((0xD40, 0.9)),
        )?;
        let upstream = Tensor::from_vec(upstream.clone(), (rows, outputs), device)?;
        output_and_gradients("lora linear", out, &upstream, &[&x, &a, &b])
    };
    worst_difference(&on(device)?, &on(&Device::Cpu)?)
}

/// RMSNorm then SwiGLU (the normed rows as the gate), in f32: the output and the gradients
/// of the input and of `up`.
fn norm_and_gate(device: &Device, rng: &mut Rng) -> Result<f64> {
    let (rows, width) = (37, 896);
    let x = random(rng, rows * width, 1.0);
    let w = random(rng, width, 0.5);
    let up = random(rng, rows * width, 1.0);
    let upstream = random(rng, rows * width, 1.0);
    let on = |device: &Device| -> Result<Vec<Tensor>> {
        let x = Var::from_tensor(&Tensor::from_vec(x.clone(), (rows, width), device)?)?;
        let up = Var::from_tensor(&Tensor::from_vec(up.clone(), (rows, width), device)?)?;
        let w = Tensor::from_vec(w.clone(), width, device)?;
        let normed = trainer_kernels::rms_norm(x.as_tensor(), &w, 1e-6)?;
        let out = trainer_kernels::swiglu(&normed, up.as_tensor())?;
        let upstream = Tensor::from_vec(upstream.clone(), (rows, width), device)?;
        output_and_gradients("norm and gate", out, &upstream, &[&x, &up])
    };
    worst_difference(&on(device)?, &on(&Device::Cpu)?)
}

/// The rotary embedding with its move to heads-major, in f32: output and input gradient,
/// with tables shared by the rows and with each row's own (as packed rows have).
fn rope(device: &Device, rng: &mut Rng) -> Result<f64> {
    let (batch, len, heads, dim) = (2, 70, 6, 64);
    let x = random(rng, batch * len * heads * dim, 1.0);
    let angles = random(rng, len * dim / 2, 3.0);
    let upstream = random(rng, batch * len * heads * dim, 1.0);
    let on = |device: &Device| -> Result<Vec<Tensor>> {
        let x = Var::from_tensor(&Tensor::from_vec(
            x.clone(),
            (batch, len, heads, dim),
            device,
        )?)?;
        let half = Tensor::from_vec(angles.clone(), (len, dim / 2), device)?;
        let shared = Tensor::cat(&[&half, &half], 1)?;
        // The second row's positions restart at 30, as a packed row's second sequence.
        let restarted = Tensor::cat(
            &[shared.narrow(0, 0, 30)?, shared.narrow(0, 0, len - 30)?],
            0,
        )?;
        let per_row = Tensor::stack(&[&shared, &restarted], 0)?;
        let upstream = Tensor::from_vec(upstream.clone(), (batch, heads, len, dim), device)?;
        let mut results = Vec::new();
        for angles in [shared, per_row] {
            let out =
                trainer_kernels::rope_heads_major(x.as_tensor(), &angles.cos()?, &angles.sin()?)?;
            results.extend(output_and_gradients("rope", out, &upstream, &[&x])?);
        }
        Ok(results)
    };
    worst_difference(&on(device)?, &on(&Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_check_passes_on_the_cpu() -> Result<()> {
        let checks = run(DeviceChoice::Cpu)?;
        assert_eq!(checks.len(), 11);
        for check in checks {
            assert!(check.passed, "{check:?}");
            assert_eq!(check.max_abs_difference, 0.0, "CPU against CPU: {check:?}");
        }
        Ok(())
    }
}
