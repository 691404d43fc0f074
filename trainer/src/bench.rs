//! `trainer bench`: LoRA training throughput at a model's shape, without its weights.
//! Base weights are random, drawn on the device in the run's dtype (a billion f32 weights
//! are never made on the host); tokens are random. The steps are the training loop's own
//! (forward with loss, backward, clipping and AdamW), each phase timed after the device has
//! finished it.
//!
//! With `--lengths mixed` the examples' lengths are uniform in [32, seq] (as chat data
//! varies), and a step takes `batch` rows: padded examples, one per row, or with
//! `--packing on` examples packed into rows of `seq` as training packs them. Tokens/s then
//! counts real tokens, not padding, so the two compare as a user sees them.
//!
//! FLOPs per token, for MFU: `4·N + 6·N_lora + 6·layers·seq·q_dim`, where `N` is the number
//! of frozen linear weights (every projection and the LM head; embeddings are lookups):
//! 2·N forward and 2·N for the input gradients of the backward, no weight gradients;
//! LoRA's weights get all three matmuls (6 per weight); causal attention does `QKᵀ` and `AV`
//! over half the sequence on average (2·seq·q_dim forward per layer, three times that with
//! the backward).

use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::Serialize;

use crate::config::ModelConfig;
use crate::data::{self, Batch, Example};
use crate::error::{Result, TrainerError};
use crate::lora::LoraConfig;
use crate::model::Model;
use crate::optim;
use crate::quantized::BaseQuant;
use crate::rng::{DropoutKey, Rng};
use crate::train::{DeviceChoice, Precision};
use protocol::LORA_TARGET_MODULES;

/// A model shape by name: a tiny one for tests, and two real ones of the benchmarks.
pub fn shape(name: &str) -> Result<ShapeSpec> {
    let spec = match name {
        "tiny" => ShapeSpec {
            architecture: "llama",
            hidden_size: 64,
            intermediate_size: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            vocab_size: 512,
        },
        "llama-3.2-1b" => ShapeSpec {
            architecture: "llama",
            hidden_size: 2048,
            intermediate_size: 8192,
            layers: 16,
            heads: 32,
            kv_heads: 8,
            vocab_size: 128_256,
        },
        "qwen2.5-0.5b" => ShapeSpec {
            architecture: "qwen2",
            hidden_size: 896,
            intermediate_size: 4864,
            layers: 24,
            heads: 14,
            kv_heads: 2,
            vocab_size: 151_936,
        },
        other => {
            return Err(TrainerError::Invalid(format!(
                "unknown shape {other:?}; expected tiny, llama-3.2-1b or qwen2.5-0.5b"
            )))
        }
    };
    Ok(spec)
}

#[derive(Debug, Clone, Serialize)]
pub struct ShapeSpec {
    pub architecture: &'static str,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab_size: usize,
}

impl ShapeSpec {
    fn config(&self) -> Result<ModelConfig> {
        let (class, model_type) = match self.architecture {
            "qwen2" => ("Qwen2ForCausalLM", "qwen2"),
            _ => ("LlamaForCausalLM", "llama"),
        };
        let json = serde_json::json!({
            "architectures": [class], "model_type": model_type,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab_size,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 131_072, "rope_theta": 500_000.0,
            "tie_word_embeddings": true,
        });
        ModelConfig::parse(&json.to_string()).map_err(TrainerError::Invalid)
    }
}

pub struct BenchOptions {
    pub shape: ShapeSpec,
    pub seq: usize,
    pub batch: usize,
    pub rank: usize,
    pub steps: usize,
    /// LoRA dropout probability; each step draws its own masks, as training does.
    pub lora_dropout: f64,
    pub device: DeviceChoice,
    /// Base weights and activations; `None`: bf16 on CUDA, f32 on CPU.
    pub dtype: Option<Precision>,
    /// The device's dense peak in TFLOPS at `dtype`, for MFU.
    pub peak_tflops: Option<f64>,
    /// Example lengths uniform in [32, seq] rather than all `seq`.
    pub mixed_lengths: bool,
    /// Examples packed into rows of `seq`.
    pub packing: bool,
    /// How the frozen projections are held.
    pub base_quant: BaseQuant,
    /// The layers' activations computed again in the backward.
    pub gradient_checkpointing: bool,
}

/// The shortest example with `mixed_lengths`.
const SHORTEST_MIXED: usize = 32;

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub shape: ShapeSpec,
    pub seq: usize,
    pub batch: usize,
    pub rank: usize,
    pub steps: usize,
    pub lora_dropout: f64,
    pub device: &'static str,
    pub dtype: String,
    /// The attention that ran: `tensor-core` or `per-thread` kernels on CUDA, `cpu`, or
    /// `composed`.
    pub attention: &'static str,
    /// Whether each half of a decoder layer was one graph node (`TRAINER_BLOCK_OPS`, on
    /// unless 0) or a node per op.
    pub block_ops: bool,
    /// Whether the layers' activations were computed again in the backward.
    pub gradient_checkpointing: bool,
    pub tokens_per_second: f64,
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
    /// Device memory in use at its highest (total less free, sampled after each phase;
    /// the CUDA context included) on CUDA; the process' peak resident set on CPU.
    pub peak_memory_bytes: Option<u64>,
    pub flops_per_token: f64,
    pub mfu: Option<f64>,
    pub frozen_parameters: usize,
    pub lora_parameters: usize,
    pub mixed_lengths: bool,
    pub packing: bool,
    /// Real tokens ÷ token slots computed (1 when every row is full).
    pub packing_efficiency: f64,
    pub base_quant: BaseQuant,
    /// Bytes the frozen projections take as held (quantized or not).
    pub projection_bytes: u64,
}

/// Random base weights made on the device: N(0, 0.02²), norms at 1.
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        if name.ends_with("norm.weight") {
            return Tensor::ones(shape, dtype, device);
        }
        Tensor::randn(0f32, 0.02, shape, device)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!(
            "{name}: random weights need a shape"
        )))
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn frozen_linear_parameters(config: &ModelConfig) -> usize {
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let q = config.num_attention_heads * config.head_dim;
    let kv = config.num_key_value_heads * config.head_dim;
    let per_layer = h * q + 2 * h * kv + q * h + 3 * h * i;
    config.num_hidden_layers * per_layer + h * config.vocab_size
}

fn synchronize(device: &Device) -> Result<()> {
    Ok(device.synchronize()?)
}

/// Device memory in use now: total less free on CUDA, the process' peak on CPU.
fn memory_in_use(device: &Device) -> Option<u64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => cuda
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, total)| (total - free) as u64),
        _ => crate::train::peak_memory_bytes(),
    }
}

pub fn run(options: &BenchOptions) -> Result<BenchReport> {
    crate::train::on_compute_threads(options.device, || run_here(options))
}

fn run_here(options: &BenchOptions) -> Result<BenchReport> {
    if options.steps == 0 || options.seq < 2 || options.batch == 0 || options.rank == 0 {
        return Err(TrainerError::Invalid(
            "--steps, --batch and --rank must be at least 1, --seq at least 2".into(),
        ));
    }
    let device = crate::train::device(options.device)?;
    let dtype = Precision::dtype(options.dtype, options.device);
    let config = options.shape.config()?;
    let lora = LoraConfig {
        rank: options.rank,
        alpha: 2.0 * options.rank as f64,
        dropout: options.lora_dropout,
        target_modules: LORA_TARGET_MODULES.iter().map(|m| m.to_string()).collect(),
        use_rslora: false,
    };
    lora.validate().map_err(TrainerError::Invalid)?;
    let mut rng = Rng::new(0);
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone());
    let mut model = Model::new(&config, vb, &lora, DType::F32, options.base_quant, &mut rng)?;
    model.set_gradient_checkpointing(options.gradient_checkpointing);
    let projection_bytes = model.projection_report().held_bytes;
    let parameters: Vec<_> = model.lora_parameters().into_values().collect();
    let lora_parameters: usize = parameters.iter().map(|v| v.elem_count()).sum();
    let mut optimizer = optim::AdamW::new(parameters.clone(), 0.0)?;

    let (batch, seq) = (options.batch, options.seq);
    let batches = step_batches(options, config.vocab_size, &mut rng, &device)?;

    let mut peak = memory_in_use(&device);
    let mut sample = |device: &Device| {
        peak = peak.max(memory_in_use(device));
    };
    let (mut forward, mut backward, mut update) = (0.0, 0.0, 0.0);
    // The first step warms up (allocations, kernel loading) and is not timed.
    for (step, inputs) in batches.iter().enumerate() {
        let started = Instant::now();
        let loss = model.loss(
            &inputs.input_ids,
            Some(&inputs.segments),
            &inputs.targets,
            &inputs.loss_mask,
            Some(DropoutKey {
                seed: 0,
                step: step as u64,
                micro_batch: 0,
            }),
        )?;
        synchronize(&device)?;
        sample(&device);
        let forward_done = Instant::now();
        let gradients = loss.backward()?;
        synchronize(&device)?;
        sample(&device);
        let backward_done = Instant::now();
        let gradient = optimizer.flat_gradient(&gradients)?;
        drop(gradients);
        optimizer.step(&gradient, 1.0, 1e-4)?;
        synchronize(&device)?;
        sample(&device);
        if step > 0 {
            forward += (forward_done - started).as_secs_f64();
            backward += (backward_done - forward_done).as_secs_f64();
            update += backward_done.elapsed().as_secs_f64();
        }
    }
    let steps = options.steps as f64;
    let timed = &batches[1..];
    let tokens: usize = timed.iter().map(|b| b.tokens).sum();
    let slots: usize = timed.iter().map(|b| b.slots).sum();
    let tokens_per_second = tokens as f64 / (forward + backward + update).max(1e-12);
    let frozen_parameters = frozen_linear_parameters(&config);
    let q_dim = config.num_attention_heads * config.head_dim;
    let flops_per_token = 4.0 * frozen_parameters as f64
        + 6.0 * lora_parameters as f64
        + 6.0 * (config.num_hidden_layers * seq * q_dim) as f64;
    Ok(BenchReport {
        shape: options.shape.clone(),
        seq,
        batch,
        rank: options.rank,
        steps: options.steps,
        lora_dropout: options.lora_dropout,
        device: match options.device {
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
        },
        dtype: format!("{dtype:?}").to_lowercase(),
        attention: trainer_kernels::attention::implementation(&device, dtype, config.head_dim)?,
        block_ops: model.block_ops(),
        gradient_checkpointing: model.gradient_checkpointing(),
        tokens_per_second,
        forward_ms: forward / steps * 1e3,
        backward_ms: backward / steps * 1e3,
        optimizer_ms: update / steps * 1e3,
        peak_memory_bytes: peak,
        flops_per_token,
        mfu: options
            .peak_tflops
            .map(|peak| flops_per_token * tokens_per_second / (peak * 1e12)),
        frozen_parameters,
        lora_parameters,
        mixed_lengths: options.mixed_lengths,
        packing: options.packing,
        packing_efficiency: tokens as f64 / slots.max(1) as f64,
        base_quant: options.base_quant,
        projection_bytes,
    })
}

/// One batch per step and one for the warm-up: `batch` rows of random tokens, every
/// token counted by the loss. Mixed lengths draw a pool of examples four times the rows
/// needed; unpacked rows take them in order, packed rows are the training loop's plan.
fn step_batches(
    options: &BenchOptions,
    vocab: usize,
    rng: &mut Rng,
    device: &Device,
) -> Result<Vec<Batch>> {
    let (rows_needed, seq) = (options.batch * (options.steps + 1), options.seq);
    let pool = if options.mixed_lengths {
        4 * rows_needed
    } else {
        rows_needed
    };
    let examples: Vec<Example> = (0..pool)
        .map(|_| {
            let length = if options.mixed_lengths {
                rng.uniform(SHORTEST_MIXED.min(seq) as f64, seq as f64 + 1.0) as usize
            } else {
                seq
            };
            let ids: Vec<u32> = (0..=length)
                .map(|_| (rng.next_u64() % vocab as u64) as u32)
                .collect();
            Example {
                input_ids: ids[..length].to_vec(),
                targets: ids[1..].to_vec(),
                loss_mask: vec![1.0; length],
            }
        })
        .collect();
    let lengths: Vec<usize> = examples.iter().map(|e| e.input_ids.len()).collect();
    let rows = if options.packing {
        data::epoch_rows(&lengths, Some(seq), 0, 0)
    } else {
        (0..pool).map(|index| vec![index]).collect()
    };
    if rows.len() < rows_needed {
        return Err(TrainerError::Invalid(format!(
            "{} packed rows from {pool} examples, {rows_needed} needed",
            rows.len()
        )));
    }
    rows[..rows_needed]
        .chunks(options.batch)
        .map(|micro| {
            let micro: Vec<Vec<&Example>> = micro
                .iter()
                .map(|row| row.iter().map(|i| &examples[*i]).collect())
                .collect();
            Ok(data::make_packed_batch(&micro, 0, device)?)
        })
        .collect()
}
