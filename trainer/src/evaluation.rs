//! `trainer eval`: the training objective and standard figures on a dataset file.
//!
//! Each conversation is rendered by the chat template without a generation prompt and
//! tokenized as `apply_chat_template` would; position t predicts token t + 1.
//! `loss_all_tokens` is the token-weighted mean cross-entropy over every predicted token,
//! `loss` the same over tokens inside assistant turns (content and end-of-turn marker).

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use serde::Serialize;

use crate::data::{self, Example, TextEncoder};
use crate::error::{Result, TrainerError};
use crate::lora::LoraConfig;
use crate::model::{token_loss, Model};
use crate::rng::Rng;
use crate::{loader, peft};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    /// Mean cross-entropy over assistant tokens (the training objective).
    pub loss: f64,
    /// Mean cross-entropy over every predicted token.
    pub loss_all_tokens: f64,
    /// exp(loss).
    pub perplexity: f64,
    /// Share of assistant tokens whose most likely prediction is the actual token.
    pub token_accuracy: f64,
    /// Assistant tokens scored.
    pub tokens: usize,
    /// Every predicted token.
    pub tokens_all: usize,
    pub conversations: usize,
}

/// The model in `model_dir`, with the adapter in `adapter_dir` when given (otherwise the
/// base model alone).
pub fn load_for_inference(
    model_dir: &Path,
    adapter_dir: Option<&Path>,
    device: &Device,
) -> Result<Model> {
    let lora = match adapter_dir {
        Some(dir) => peft::read_adapter_config(dir)?,
        // No adapter: no LoRA module at all, so the base model is evaluated as it is.
        None => LoraConfig {
            target_modules: Vec::new(),
            ..LoraConfig::default()
        },
    };
    let (_, model) = loader::load_model(
        model_dir,
        &lora,
        DType::F32,
        DType::F32,
        device,
        &mut Rng::new(0),
    )?;
    if let Some(dir) = adapter_dir {
        peft::load_adapter_weights(dir, &model, device)?;
    }
    Ok(model)
}

pub fn evaluate_file(
    model_dir: &Path,
    adapter_dir: Option<&Path>,
    data_path: &Path,
    max_seq_len: Option<usize>,
    batch_size: usize,
) -> Result<EvalReport> {
    let device = Device::Cpu;
    let encoder = TextEncoder::from_model_dir(&crate::hub::resolve_model(model_dir)?)?;
    let prepared = data::load_examples(data_path, &encoder, max_seq_len)?;
    let model = load_for_inference(model_dir, adapter_dir, &device)?;
    let longest = prepared
        .examples
        .iter()
        .map(|e| e.input_ids.len() + 1)
        .max()
        .unwrap_or(0);
    model
        .config()
        .check_sequence_length(longest)
        .map_err(TrainerError::Invalid)?;
    let pad_id = encoder.tokenizer.token_to_id("<|endoftext|>").unwrap_or(0);

    let (mut loss_sum, mut all_sum, mut correct) = (0.0, 0.0, 0.0);
    let (mut tokens, mut tokens_all) = (0.0, 0.0);
    for chunk in prepared.examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = data::make_batch(&refs, pad_id, &device)?;
        let logits = model
            .forward(&batch.input_ids, Some(&batch.lengths), None)?
            .detach();
        let all_mask = batch.attention_mask.to_dtype(DType::F32)?;
        let (count, count_all) = (batch.loss_tokens as f64, batch.tokens as f64);
        let loss = token_loss(&logits, &batch.targets, &batch.loss_mask)?;
        let loss_all = token_loss(&logits, &batch.targets, &all_mask)?;
        loss_sum += loss.to_scalar::<f32>()? as f64 * count;
        all_sum += loss_all.to_scalar::<f32>()? as f64 * count_all;
        tokens += count;
        tokens_all += count_all;
        let predicted = logits.argmax(D::Minus1)?;
        let hits = predicted.eq(&batch.targets)?.to_dtype(DType::F32)?;
        correct += (hits * &batch.loss_mask)?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    if tokens == 0.0 {
        return Err(TrainerError::Dataset {
            path: data_path.display().to_string(),
            message: "no assistant token to evaluate".into(),
        });
    }
    let loss = loss_sum / tokens;
    Ok(EvalReport {
        loss,
        loss_all_tokens: all_sum / tokens_all,
        perplexity: loss.exp(),
        token_accuracy: correct / tokens,
        tokens: tokens as usize,
        tokens_all: tokens_all as usize,
        conversations: prepared.examples.len(),
    })
}

/// Chat-templated sampling with a KV cache. `temperature` 0 is greedy.
pub fn generate(
    model: &Model,
    encoder: &TextEncoder,
    prompt: &str,
    max_new_tokens: usize,
    temperature: f64,
    seed: u64,
) -> Result<String> {
    let device = Device::Cpu;
    let messages = [protocol::dataset::Message::new(
        protocol::dataset::Role::User,
        prompt,
    )];
    let text = encoder.template.render(&messages, None, true)?;
    let prompt_ids = encoder.encode_text(&text)?;
    if prompt_ids.is_empty() {
        return Err(TrainerError::Invalid(
            "the prompt encodes to no token".into(),
        ));
    }
    let stop: Vec<u32> = ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>"]
        .iter()
        .filter_map(|t| encoder.tokenizer.token_to_id(t))
        .collect();
    let mut cache = crate::model::KvCache::default();
    let mut rng = Rng::new(seed);
    let mut generated = Vec::new();
    let mut input = Tensor::new(prompt_ids.as_slice(), &device)?.unsqueeze(0)?;
    for _ in 0..max_new_tokens {
        let logits: Vec<f32> = model
            .forward_cached(&input, &mut cache)?
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        let next = sample(&logits, temperature, &mut rng);
        if stop.contains(&next) {
            break;
        }
        generated.push(next);
        input = Tensor::new(&[next], &device)?.unsqueeze(0)?;
    }
    encoder.decode(&generated)
}

fn sample(logits: &[f32], temperature: f64, rng: &mut Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32)
    };
    if temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let weights: Vec<f64> = logits
        .iter()
        .map(|l| ((*l as f64 - max) / temperature).exp())
        .collect();
    let mut target = rng.next_f64() * weights.iter().sum::<f64>();
    for (i, weight) in weights.iter().enumerate() {
        target -= weight;
        if target <= 0.0 {
            return i as u32;
        }
    }
    argmax()
}
