//! Helpers the trainer's integration tests share.
// Each test binary uses a part of them.
#![allow(dead_code)]

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use trainer::init::random_weights;
use trainer::rng::Rng;
use trainer::train::{Control, Observer, StepMetrics};
use trainer::{LoraConfig, Model, ModelConfig};

/// Cancels the run once it has finished step `at`, as a lost host would stop it.
pub struct StopAfter<'a> {
    pub control: &'a Control,
    pub at: usize,
}

impl Observer for StopAfter<'_> {
    fn step(&mut self, metrics: &StepMetrics) {
        if metrics.step == self.at {
            self.control.cancel();
        }
    }
}

/// The run's `metrics.jsonl`, a line per step.
pub fn metrics(out: &Path) -> Vec<StepMetrics> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .map(|line| serde_json::from_str(line).expect("metrics line"))
        .collect()
}

/// A tiny f64 model (two layers, four query heads over two key/value heads, a 32-token
/// vocabulary) with rank-2 LoRA and no dropout, its B matrices given values so that every
/// LoRA parameter has a gradient to check.
pub fn tiny_f64_model(architecture: &str, tie: bool) -> candle_core::Result<Model> {
    let lora = LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        ..LoraConfig::default()
    };
    tiny_f64_model_with(architecture, tie, &lora)
}

/// [`tiny_f64_model`] with the adapters `lora` describes.
pub fn tiny_f64_model_with(
    architecture: &str,
    tie: bool,
    lora: &LoraConfig,
) -> candle_core::Result<Model> {
    let config = ModelConfig::parse(&format!(
        r#"{{"architectures": ["{architecture}"], "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6, "vocab_size": 32, "max_position_embeddings": 64,
            "rope_theta": 10000.0, "tie_word_embeddings": {tie}, "hidden_act": "silu"}}"#
    ))
    .expect("tiny config");
    let device = Device::Cpu;
    let weights = random_weights(&config, 3, DType::F64, &device)?;
    let vb = VarBuilder::from_tensors(weights, DType::F64, &device);
    let mut rng = Rng::new(11);
    let model = Model::new(
        &config,
        vb,
        lora,
        DType::F64,
        trainer::quantized::BaseQuant::None,
        &mut rng,
    )?;
    // B starts at zero (so A's gradient would be zero): give it values for the check.
    for (name, parameter) in model.lora_parameters() {
        if name.ends_with("lora_B.weight") {
            let values: Vec<f64> = (0..parameter.elem_count())
                .map(|_| rng.normal() * 0.5)
                .collect();
            parameter.set(&Tensor::from_vec(values, parameter.shape(), &device)?)?;
        }
    }
    Ok(model)
}
