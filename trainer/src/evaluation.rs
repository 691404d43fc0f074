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
use crate::model::{token_losses, Model};
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
    // No LoRA module at all, so the base model is evaluated as it is.
    let none = LoraConfig {
        target_modules: Vec::new(),
        ..LoraConfig::default()
    };
    let (_, base) = loader::load_model(
        model_dir,
        &none,
        (DType::F32, crate::quantized::BaseQuant::None),
        DType::F32,
        device,
        &mut Rng::new(0),
    )?;
    match adapter_dir {
        Some(dir) => with_adapter(&base, dir),
        None => Ok(base),
    }
}

/// `base` with the adapter in `adapter_dir`, sharing the base's weights (not a copy).
pub fn with_adapter(base: &Model, adapter_dir: &Path) -> Result<Model> {
    let lora = peft::read_adapter_config(adapter_dir)?;
    let model = base.with_adapters(&lora, DType::F32, &mut Rng::new(0))?;
    peft::load_adapter_weights(adapter_dir, &model, base.lm_head().device())?;
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
    evaluate_examples(&model, &encoder, &prepared.examples, batch_size)
}

/// The figures of [`EvalReport`] for `model` on `examples`, in batches of `batch_size`,
/// on the model's device.
pub fn evaluate_examples(
    model: &Model,
    encoder: &TextEncoder,
    examples: &[Example],
    batch_size: usize,
) -> Result<EvalReport> {
    let rows = row_figures(model, encoder, examples, batch_size)?;
    let whole = rows
        .iter()
        .fold(RowFigures::default(), |sum, row| sum.plus(row));
    whole.report(examples.len())
}

/// [`evaluate_examples`] for each of `examples` on its own, computed in batches of
/// `batch_size` (the figures per example that validation reports); every example must
/// have an assistant token.
pub fn evaluate_each(
    model: &Model,
    encoder: &TextEncoder,
    examples: &[Example],
    batch_size: usize,
) -> Result<Vec<EvalReport>> {
    row_figures(model, encoder, examples, batch_size)?
        .into_iter()
        .enumerate()
        .map(|(i, row)| {
            row.report(1)
                .map_err(|e| TrainerError::Invalid(format!("example {}: {e}", i + 1)))
        })
        .collect()
}

/// One example's sums: negative log-likelihood over its assistant tokens and over all its
/// predicted tokens, assistant tokens predicted right, and both counts.
#[derive(Debug, Clone, Copy, Default)]
struct RowFigures {
    loss_sum: f64,
    all_sum: f64,
    correct: f64,
    tokens: f64,
    tokens_all: f64,
}

impl RowFigures {
    fn plus(self, other: &RowFigures) -> RowFigures {
        RowFigures {
            loss_sum: self.loss_sum + other.loss_sum,
            all_sum: self.all_sum + other.all_sum,
            correct: self.correct + other.correct,
            tokens: self.tokens + other.tokens,
            tokens_all: self.tokens_all + other.tokens_all,
        }
    }

    fn report(&self, conversations: usize) -> Result<EvalReport> {
        if self.tokens == 0.0 {
            return Err(TrainerError::Invalid(
                "no assistant token to evaluate".into(),
            ));
        }
        let loss = self.loss_sum / self.tokens;
        Ok(EvalReport {
            loss,
            loss_all_tokens: self.all_sum / self.tokens_all,
            perplexity: loss.exp(),
            token_accuracy: self.correct / self.tokens,
            tokens: self.tokens as usize,
            tokens_all: self.tokens_all as usize,
            conversations,
        })
    }
}

/// Each example's [`RowFigures`], `batch_size` examples a forward pass.
fn row_figures(
    model: &Model,
    encoder: &TextEncoder,
    examples: &[Example],
    batch_size: usize,
) -> Result<Vec<RowFigures>> {
    let device = model.lm_head().device().clone();
    let longest = examples
        .iter()
        .map(|e| e.input_ids.len() + 1)
        .max()
        .unwrap_or(0);
    model
        .config()
        .check_sequence_length(longest)
        .map_err(TrainerError::Invalid)?;
    let pad_id = encoder.tokenizer.token_to_id("<|endoftext|>").unwrap_or(0);
    let mut figures = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = data::make_batch(&refs, pad_id, &device)?;
        let logits = model.forward_inference(&batch.input_ids, Some(&batch.segments))?;
        let losses = token_losses(&logits, &batch.targets)?;
        let wide = losses.dtype();
        let (assistant, all) = (
            batch.loss_mask.to_dtype(wide)?,
            batch.attention_mask.to_dtype(wide)?,
        );
        let hits = logits
            .argmax(D::Minus1)?
            .eq(&batch.targets)?
            .to_dtype(wide)?;
        // Each row's five sums, read back at once: (rows, 5).
        let sums: Vec<Vec<f64>> = Tensor::stack(
            &[
                (&losses * &assistant)?.sum(1)?,
                (&losses * &all)?.sum(1)?,
                (&hits * &assistant)?.sum(1)?,
                assistant.sum(1)?,
                all.sum(1)?,
            ],
            1,
        )?
        .to_dtype(DType::F64)?
        .to_vec2()?;
        figures.extend(sums.iter().map(|row| RowFigures {
            loss_sum: row[0],
            all_sum: row[1],
            correct: row[2],
            tokens: row[3],
            tokens_all: row[4],
        }));
    }
    Ok(figures)
}

/// What [`generate`] produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub text: String,
    /// The new tokens, the end-of-turn token excluded.
    pub tokens: Vec<u32>,
    /// Whether the model ended its turn (emitted an end-of-turn token) within the budget.
    pub stopped: bool,
}

/// The tokens that end an assistant turn in the chat templates we support.
pub fn end_of_turn_tokens(encoder: &TextEncoder) -> Vec<u32> {
    ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>"]
        .iter()
        .filter_map(|t| encoder.tokenizer.token_to_id(t))
        .collect()
}

/// Chat-templated sampling with a KV cache, on the model's device: the assistant's next
/// turn after `messages`. `temperature` 0 is greedy.
pub fn generate(
    model: &Model,
    encoder: &TextEncoder,
    messages: &[protocol::dataset::Message],
    max_new_tokens: usize,
    temperature: f64,
    seed: u64,
) -> Result<Generation> {
    let mut generations = generate_all(
        model,
        encoder,
        &[messages],
        (max_new_tokens, temperature, seed),
        &mut |_, _| {},
    )?;
    generations
        .pop()
        .ok_or_else(|| TrainerError::Invalid("no generation".into()))
}

/// At most this many conversations are answered together.
const GENERATION_ROWS: usize = 16;
/// ... and together hold at most this many prompt tokens (padding included): the prompts'
/// forward keeps its attention scores, rows × heads × prompt², before the cache takes over.
const GENERATION_PROMPT_TOKENS: usize = 4096;

/// [`generate`] for each of `conversations` (`(max_new_tokens, temperature, seed)`, each
/// row sampling from its own generator seeded with `seed`): their prompts right-aligned in
/// one batch, left padding that no query sees, so a step is one forward for all the rows
/// instead of one each, and the products read the weights once for all of them. A row
/// that ended its turn is carried along until all have or the budget is spent. `progress`
/// hears (conversations answered, all of them) after each batch.
pub fn generate_all(
    model: &Model,
    encoder: &TextEncoder,
    conversations: &[&[protocol::dataset::Message]],
    (max_new_tokens, temperature, seed): (usize, f64, u64),
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Generation>> {
    let mut prompts = Vec::with_capacity(conversations.len());
    for messages in conversations {
        let text = encoder.template.render(messages, None, true)?;
        let prompt = encoder.encode_text(&text)?;
        if prompt.is_empty() {
            return Err(TrainerError::Invalid(
                "the prompt encodes to no token".into(),
            ));
        }
        model
            .config()
            .check_sequence_length(prompt.len() + max_new_tokens)
            .map_err(TrainerError::Invalid)?;
        prompts.push(prompt);
    }
    let mut generations = Vec::with_capacity(prompts.len());
    while generations.len() < prompts.len() {
        let rest = &prompts[generations.len()..];
        let mut rows = 1;
        let mut longest = rest[0].len();
        while rows < rest.len().min(GENERATION_ROWS) {
            let wider = longest.max(rest[rows].len());
            if wider * (rows + 1) > GENERATION_PROMPT_TOKENS {
                break;
            }
            (rows, longest) = (rows + 1, wider);
        }
        let sampling = (max_new_tokens, temperature, seed);
        generations.extend(generate_rows(model, encoder, &rest[..rows], sampling)?);
        progress(generations.len(), prompts.len());
    }
    Ok(generations)
}

/// One batch of [`generate_all`].
fn generate_rows(
    model: &Model,
    encoder: &TextEncoder,
    prompts: &[Vec<u32>],
    (max_new_tokens, temperature, seed): (usize, f64, u64),
) -> Result<Vec<Generation>> {
    let device = model.lm_head().device().clone();
    let rows = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let padding: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    let padded: Vec<u32> = prompts
        .iter()
        .flat_map(|prompt| std::iter::repeat_n(0, longest - prompt.len()).chain(prompt.clone()))
        .collect();
    let mut input = Tensor::from_vec(padded, (rows, longest), &device)?;
    let mut cache = crate::model::KvCache::left_padded(padding);
    let stop = end_of_turn_tokens(encoder);
    let mut generators: Vec<Rng> = (0..rows).map(|_| Rng::new(seed)).collect();
    let mut tokens = vec![Vec::new(); rows];
    let mut stopped = vec![false; rows];
    for _ in 0..max_new_tokens {
        if stopped.iter().all(|s| *s) {
            break;
        }
        let logits = model.forward_cached(&input, &mut cache)?;
        // Greedy picks on the device: a token a row comes back, not a row of logits.
        let picked: Vec<u32> = if temperature <= 0.0 {
            logits.argmax(D::Minus1)?.to_vec1()?
        } else {
            let logits: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
            let each = logits.iter().zip(&mut generators).zip(&stopped);
            each.map(|((logits, generator), stopped)| match stopped {
                true => 0,
                false => sample(logits, temperature, generator),
            })
            .collect()
        };
        for (row, &next) in picked.iter().enumerate() {
            if !stopped[row] {
                if stop.contains(&next) {
                    stopped[row] = true;
                } else {
                    tokens[row].push(next);
                }
            }
        }
        input = Tensor::from_vec(picked, (rows, 1), &device)?;
    }
    tokens
        .into_iter()
        .zip(stopped)
        .map(|(tokens, stopped)| {
            Ok(Generation {
                text: encoder.decode(&tokens)?,
                tokens,
                stopped,
            })
        })
        .collect()
}

/// A token drawn from `softmax(logits / temperature)`, `temperature` above 0.
fn sample(logits: &[f32], temperature: f64, rng: &mut Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32)
    };
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
