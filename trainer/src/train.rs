//! The training loop: data, model, AdamW with warmup and cosine decay, gradient
//! accumulation, clipping, evaluation, metrics, and the PEFT adapter at the end.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::data::{self, Example, TextEncoder};
use crate::error::{Result, TrainerError};
use crate::lora::LoraConfig;
use crate::model::Model;
use crate::optim::{self, AdamW};
use crate::quantized::{BaseQuant, QuantizationReport};
use crate::rng::{DropoutKey, Rng};
use crate::{checkpoint, loader, peft};

/// Everything a training run depends on. Also the schema of `--config recipe.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainOptions {
    pub model: PathBuf,
    pub data: PathBuf,
    pub val_data: Option<PathBuf>,
    pub out: PathBuf,
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
    pub lr: f64,
    pub epochs: usize,
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_seq_len: usize,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    pub val_split: f64,
    /// Evaluate on the validation set every N optimizer steps (and at the end).
    pub eval_every: Option<usize>,
    /// Write a checkpoint every N optimizer steps.
    pub checkpoint_every: Option<usize>,
    /// Continue from a checkpoint directory (`OUT/checkpoints/step-N`).
    pub resume_from: Option<PathBuf>,
    pub device: DeviceChoice,
    /// Base weights and activations; `None`: bf16 on CUDA, f32 on CPU. LoRA weights and
    /// the optimizer stay f32.
    pub dtype: Option<Precision>,
    /// The final adapter is the one of the best evaluation (lowest validation loss), not
    /// the last step's. (Left out of the recipe when off, as the options below when
    /// unset, so runs without them resume from checkpoints made before they existed.)
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub keep_best: bool,
    /// Stop once this many evaluations in a row have not improved on the best validation
    /// loss by `early_stopping_min_delta`. Needs `eval_every`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub early_stopping_patience: Option<usize>,
    #[serde(skip_serializing_if = "is_zero")]
    pub early_stopping_min_delta: f64,
    /// Training examples packed into rows of `max_seq_len` tokens (each still its own
    /// sequence) rather than one per row padded to the longest; on by default. Evaluation
    /// never packs. (In the recipe only when on: runs without it, made before it existed,
    /// were unpacked and resume unpacked.)
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub packing: bool,
    /// The decoder layers' frozen projections held quantized (QLoRA-style): `q4k` or
    /// `q8_0`. (In the recipe only when set, so older runs resume unchanged.)
    #[serde(skip_serializing_if = "BaseQuant::is_none")]
    pub base_quant: BaseQuant,
    /// Gradient checkpointing: each half layer's activations are computed again in the
    /// backward instead of kept until it (about one more forward a step, for a fraction
    /// of the activation memory). The same gradients, so it is not part of the maths: a
    /// run may resume with it on or off.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
}

fn is_zero(value: &f64) -> bool {
    *value == 0.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Bf16,
    F32,
}

impl Precision {
    /// The dtype of base weights and activations on `device` when `precision` is unset.
    pub fn dtype(precision: Option<Precision>, device: DeviceChoice) -> DType {
        match (precision, device) {
            (Some(Precision::Bf16), _) | (None, DeviceChoice::Cuda) => DType::BF16,
            (Some(Precision::F32), _) | (None, DeviceChoice::Cpu) => DType::F32,
        }
    }
}

impl Default for TrainOptions {
    fn default() -> Self {
        let lora = LoraConfig::default();
        TrainOptions {
            model: PathBuf::new(),
            data: PathBuf::new(),
            val_data: None,
            out: PathBuf::from("out"),
            rank: lora.rank,
            alpha: lora.alpha,
            dropout: lora.dropout,
            target_modules: lora.target_modules,
            use_rslora: false,
            lr: 2e-4,
            epochs: 1,
            max_steps: None,
            batch_size: 2,
            grad_accum: 1,
            max_seq_len: 512,
            warmup_ratio: 0.03,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: 42,
            val_split: 0.1,
            eval_every: None,
            checkpoint_every: None,
            resume_from: None,
            device: DeviceChoice::Cpu,
            dtype: None,
            keep_best: false,
            early_stopping_patience: None,
            early_stopping_min_delta: 0.0,
            packing: true,
            base_quant: BaseQuant::None,
            gradient_checkpointing: false,
        }
    }
}

impl TrainOptions {
    pub fn lora(&self) -> LoraConfig {
        LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            dropout: self.dropout,
            target_modules: self.target_modules.clone(),
            use_rslora: self.use_rslora,
        }
    }

    /// SHA-256 over everything that changes the maths: these options (without where
    /// output goes, how often to checkpoint or evaluate, and the device), the model's
    /// `config.json` and `tokenizer.json`, and the chat template source.
    fn config_hash(&self, model_dir: &Path) -> Result<String> {
        let mut maths = self.clone();
        maths.out = PathBuf::new();
        maths.resume_from = None;
        maths.checkpoint_every = None;
        maths.eval_every = None;
        maths.device = DeviceChoice::Cpu;
        maths.gradient_checkpointing = false;
        maths.data = PathBuf::new();
        maths.val_data = None;
        // The model is identified by its files' hashes below, not where it lives, so a
        // run resumes on another host; and only the window size changes the maths, so a
        // run retried with half the micro-batch and twice the accumulation resumes too.
        maths.model = PathBuf::new();
        maths.batch_size *= maths.grad_accum;
        maths.grad_accum = 1;
        let mut text = serde_json::to_string(&maths).unwrap_or_default();
        for file in [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
        ] {
            let path = model_dir.join(file);
            if path.exists() {
                text.push_str(&checkpoint::sha256_file(&path)?);
            }
        }
        Ok(checkpoint::sha256_bytes(text.as_bytes()))
    }

    fn data_hash(&self) -> Result<String> {
        let mut text = checkpoint::sha256_file(&self.data)?;
        if let Some(path) = &self.val_data {
            text.push_str(&checkpoint::sha256_file(path)?);
        }
        Ok(checkpoint::sha256_bytes(text.as_bytes()))
    }

    fn validate(&self) -> Result<()> {
        let invalid = |m: String| Err(TrainerError::Invalid(m));
        self.lora().validate().map_err(TrainerError::Invalid)?;
        if self.lr.is_nan() || self.lr <= 0.0 {
            return invalid(format!("lr must be positive, not {}", self.lr));
        }
        if self.batch_size == 0 || self.grad_accum == 0 || self.epochs == 0 {
            return invalid("batch_size, grad_accum and epochs must be at least 1".into());
        }
        if self.max_steps == Some(0) {
            return invalid("max_steps must be at least 1".into());
        }
        if self.max_seq_len < 2 {
            return invalid("max_seq_len must be at least 2".into());
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) || !(0.0..1.0).contains(&self.val_split) {
            return invalid("warmup_ratio and val_split must be in [0, 1)".into());
        }
        if self.early_stopping_patience == Some(0) {
            return invalid("early_stopping_patience must be at least 1".into());
        }
        if self.early_stopping_patience.is_some() && self.eval_every.is_none_or(|n| n == 0) {
            return invalid(
                "early_stopping_patience needs eval_every: stopping early compares evaluations"
                    .into(),
            );
        }
        if self.early_stopping_min_delta.is_nan() || self.early_stopping_min_delta < 0.0 {
            return invalid("early_stopping_min_delta must be at least 0".into());
        }
        Ok(())
    }
}

/// The stages a run goes through: one vocabulary with the agent protocol's.
pub use protocol::agent::Stage;

/// One optimizer step, as written to `metrics.jsonl` and reported to observers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: f64,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub tokens_per_second: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation_loss: Option<f64>,
    pub elapsed_seconds: f64,
    /// Real tokens ÷ token slots computed in this step (padding is the rest).
    #[serde(default)]
    pub packing_efficiency: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub steps: usize,
    pub train_loss: f64,
    pub validation_loss: Option<f64>,
    pub train_examples: usize,
    pub validation_examples: usize,
    pub truncated_examples: usize,
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_second: f64,
    pub peak_memory_bytes: Option<u64>,
    pub cancelled: bool,
    /// The evaluation with the lowest validation loss: its step and loss.
    #[serde(default)]
    pub best_step: Option<usize>,
    #[serde(default)]
    pub best_validation_loss: Option<f64>,
    /// The step whose LoRA weights the adapter holds: the best evaluation's with
    /// keep-best, else the last step's.
    #[serde(default)]
    pub adapter_step: usize,
    /// Why training stopped before its last step, when early stopping stopped it.
    #[serde(default)]
    pub stopped_early: Option<String>,
    /// Whether training examples were packed, and real tokens ÷ token slots over the run.
    #[serde(default)]
    pub packing: bool,
    #[serde(default)]
    pub packing_efficiency: f64,
    /// How the frozen base was held, when it was quantized: trained against a quantized
    /// base, as with QLoRA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<QuantizationReport>,
    /// Whether the layers' activations were computed again in the backward (asked for,
    /// and the block ops running).
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

/// Receives progress; every method has a default so callers implement what they need.
/// `Send`: a CPU run reports from a worker of the compute pool ([`on_compute_threads`]).
pub trait Observer: Send {
    fn stage(&mut self, _stage: Stage) {}
    fn step(&mut self, _metrics: &StepMetrics) {}
    fn warning(&mut self, _message: &str) {}
    /// Something the run decided that a user should hear of (an early stop).
    fn notice(&mut self, _message: &str) {}
    /// How the training examples were packed (before the first step of a packed run).
    fn packed(&mut self, _plan: &PackingPlan) {}
    /// How the frozen base is held, when it is quantized (before the first step).
    fn quantized(&mut self, report: &QuantizationReport) {
        self.notice(&report.message());
    }
    fn checkpoint(&mut self, _step: usize, _dir: &Path) {}
}

/// No-op observer.
impl Observer for () {}

/// Requests from the caller (another thread: the agent on a spot notice, a user's
/// cancel), honoured at the next step boundary.
#[derive(Debug, Default)]
pub struct Control {
    cancel: AtomicBool,
    checkpoint: AtomicBool,
}

impl Control {
    /// Stop after the current step.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Write a checkpoint after the current step.
    pub fn request_checkpoint(&self) {
        self.checkpoint.store(true, Ordering::SeqCst);
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    fn take_checkpoint_request(&self) -> bool {
        self.checkpoint.swap(false, Ordering::SeqCst)
    }
}

/// Saves the LoRA parameters and optimizer moments under `out/checkpoints` and tells the
/// observer.
fn write_checkpoint(
    out: &Path,
    state: &checkpoint::CheckpointState,
    parameters: &[(String, Var)],
    optimizer: &AdamW,
    best_weights: Option<&HashMap<String, Tensor>>,
    observer: &mut dyn Observer,
) -> Result<()> {
    let (first, second) = optimizer.moments()?;
    let dir = checkpoint::save(
        &out.join("checkpoints"),
        state,
        parameters,
        (&first, &second),
        best_weights,
    )?;
    observer.checkpoint(state.step, &dir);
    Ok(())
}

/// Folds an evaluation into the best so far. The lowest validation loss is the best (the
/// adapter keep-best keeps); patience restarts only when an evaluation beats the previous
/// best by more than `min_delta`, as in transformers' early stopping. Returns whether this
/// evaluation is the new best.
fn record_evaluation(
    best: &mut Option<checkpoint::BestSoFar>,
    step: usize,
    loss: f64,
    min_delta: f64,
) -> bool {
    let previous = *best;
    let lowest = previous.is_none_or(|b| loss < b.validation_loss);
    let improved = previous.is_none_or(|b| loss < b.validation_loss - min_delta);
    let mut now = match (lowest, previous) {
        (false, Some(previous)) => previous,
        _ => checkpoint::BestSoFar {
            step,
            validation_loss: loss,
            evaluations_since: 0,
        },
    };
    now.evaluations_since = match (improved, previous) {
        (false, Some(previous)) => previous.evaluations_since + 1,
        _ => 0,
    };
    *best = Some(now);
    lowest
}

/// A copy of the LoRA weights as they are now.
fn snapshot(parameters: &[(String, Var)]) -> Result<HashMap<String, Tensor>> {
    parameters
        .iter()
        .map(|(name, var)| Ok((name.clone(), var.as_tensor().to_dtype(DType::F32)?.copy()?)))
        .collect()
}

pub(crate) fn device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda if !cfg!(feature = "cuda") => Err(TrainerError::Invalid(
            "--device cuda: this build has no CUDA support (build with --features cuda, as \
             scripts/build-cuda does)"
                .into(),
        )),
        DeviceChoice::Cuda => Device::new_cuda(0).map_err(|e| {
            TrainerError::Invalid(format!(
                "--device cuda: this build has CUDA support, but no CUDA GPU is usable here: {e}"
            ))
        }),
    }
}

/// Runs `work` on the threads that suit the device. On the CPU that is a worker of
/// candle's rayon pool: gemm's products and the kernels' parallel loops, called from inside
/// the pool, split across it directly, where called from outside it each of a step's
/// hundreds of products wakes the pool's workers and puts the caller to sleep until they
/// finish (on 2 cores a step takes about 10% longer that way). A CUDA run stays on the
/// calling thread: its ops launch kernels, and the context is bound to that thread.
pub fn on_compute_threads<R: Send>(choice: DeviceChoice, work: impl FnOnce() -> R + Send) -> R {
    match choice {
        DeviceChoice::Cpu => Device::Cpu.with_context(work),
        DeviceChoice::Cuda => work(),
    }
}

/// candle runs its elementwise ops on a small pool of its own, whose workers spin 25,000
/// times after each op before they sleep. A CPU step interleaves those ops with gemm's
/// products on the rayon pool ([`on_compute_threads`]), and a spinning worker takes a core
/// from the products: a quarter of one core on 2 cores. This sets the limit to 200 spins
/// unless the operator set `CANDLE_BARRIER_POOL_SPIN_LIMIT`. Call it first thing in `main`,
/// before any thread starts (candle reads it once, and the environment is not
/// synchronised).
pub fn shorten_candle_spin() {
    const VARIABLE: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VARIABLE).is_none() {
        std::env::set_var(VARIABLE, "200");
    }
}

/// Peak resident memory of this process (Linux), for the summary.
pub(crate) fn peak_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kib| kib * 1024)
}

struct Output {
    dir: PathBuf,
    metrics: std::fs::File,
}

impl Output {
    /// Opens `metrics.jsonl`, keeping the lines of steps up to `resumed_step` (those a
    /// resumed run does not repeat) and dropping any written after that checkpoint.
    fn create(dir: &Path, resumed_step: usize) -> Result<Output> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| TrainerError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let metrics_path = dir.join("metrics.jsonl");
        let kept: String = if resumed_step > 0 {
            std::fs::read_to_string(&metrics_path)
                .unwrap_or_default()
                .lines()
                .filter(|line| {
                    serde_json::from_str::<StepMetrics>(line).is_ok_and(|m| m.step <= resumed_step)
                })
                .map(|line| format!("{line}\n"))
                .collect()
        } else {
            String::new()
        };
        std::fs::write(&metrics_path, kept).map_err(io(&metrics_path))?;
        let metrics = std::fs::OpenOptions::new()
            .append(true)
            .open(&metrics_path)
            .map_err(io(&metrics_path))?;
        Ok(Output {
            dir: dir.to_path_buf(),
            metrics,
        })
    }

    fn record(&mut self, metrics: &StepMetrics) -> Result<()> {
        let line = serde_json::to_string(metrics).unwrap_or_default();
        writeln!(self.metrics, "{line}").map_err(|source| TrainerError::Io {
            path: self.dir.join("metrics.jsonl").display().to_string(),
            source,
        })
    }
}

/// Mean loss over `examples` (assistant tokens), without dropout.
pub fn evaluate(
    model: &Model,
    examples: &[Example],
    batch_size: usize,
    pad_id: u32,
    device: &Device,
) -> Result<f64> {
    let (mut total, mut count) = (0.0, 0.0);
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = data::make_batch(&refs, pad_id, device)?;
        let tokens = batch.loss_tokens as f64;
        let loss = model.loss(
            &batch.input_ids,
            Some(&batch.segments),
            &batch.targets,
            &batch.loss_mask,
            None,
        )?;
        total += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * tokens;
        count += tokens;
    }
    Ok(if count > 0.0 { total / count } else { f64::NAN })
}

/// What packing does to an epoch: its rows, and the share of token slots that are real
/// tokens, packed and as padded micro-batches would have it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackingPlan {
    pub conversations: usize,
    pub rows: usize,
    pub max_seq_len: usize,
    pub packing_efficiency: f64,
    pub unpacked_efficiency: f64,
}

impl PackingPlan {
    fn of(rows: &[Vec<usize>], lengths: &[usize], options: &TrainOptions) -> PackingPlan {
        let efficiency = |rows: &[Vec<usize>]| {
            let (mut tokens, mut slots) = (0, 0);
            for micro in rows.chunks(options.batch_size) {
                let row_tokens = |row: &Vec<usize>| row.iter().map(|i| lengths[*i]).sum::<usize>();
                tokens += micro.iter().map(row_tokens).sum::<usize>();
                slots += micro.len() * micro.iter().map(row_tokens).max().unwrap_or(0);
            }
            tokens as f64 / slots.max(1) as f64
        };
        PackingPlan {
            conversations: lengths.len(),
            rows: rows.len(),
            max_seq_len: options.max_seq_len,
            packing_efficiency: efficiency(rows),
            unpacked_efficiency: efficiency(&data::epoch_rows(lengths, None, options.seed, 0)),
        }
    }

    pub fn message(&self) -> String {
        format!(
            "Packed {} conversations into {} rows of up to {} tokens: {:.1}% of the token slots are real tokens ({:.1}% unpacked)",
            self.conversations,
            self.rows,
            self.max_seq_len,
            100.0 * self.packing_efficiency,
            100.0 * self.unpacked_efficiency
        )
    }
}

pub fn train(
    options: &TrainOptions,
    observer: &mut dyn Observer,
    control: &Control,
) -> Result<Summary> {
    on_compute_threads(options.device, || train_here(options, observer, control))
}

fn train_here(
    options: &TrainOptions,
    observer: &mut dyn Observer,
    control: &Control,
) -> Result<Summary> {
    options.validate()?;
    let started = Instant::now();
    let device = device(options.device)?;
    let (dtype, lora_dtype) = (Precision::dtype(options.dtype, options.device), DType::F32);
    let model_dir = crate::hub::resolve_model(&options.model)?;
    let config_hash = options.config_hash(&model_dir)?;
    let data_hash = options.data_hash()?;

    observer.stage(Stage::Preprocessing);
    let encoder = TextEncoder::from_model_dir(&model_dir)?;
    let max_seq_len = Some(options.max_seq_len);
    let prepared = data::load_examples(&options.data, &encoder, max_seq_len)?;
    let mut truncated = prepared.truncated;
    let (train_examples, validation_examples) = match &options.val_data {
        Some(path) => {
            let validation = data::load_examples(path, &encoder, max_seq_len)?;
            truncated += validation.truncated;
            (prepared.examples, validation.examples)
        }
        None => data::split_validation(prepared.examples, options.val_split, options.seed),
    };
    if truncated > 0 {
        observer.warning(&format!(
            "{truncated} conversations were cut to max_seq_len = {} tokens",
            options.max_seq_len
        ));
    }
    for (field, conversations) in &prepared.ignored {
        observer.warning(&format!(
            "the model's chat template does not render {}: left out of {conversations} conversations",
            field.as_str()
        ));
    }
    if prepared.dropped > 0 {
        observer.warning(&format!(
            "{} conversations had no assistant token left after truncation and were skipped",
            prepared.dropped
        ));
    }
    if train_examples.is_empty() {
        return Err(TrainerError::Invalid(
            "no training examples left after the validation split".into(),
        ));
    }
    if (options.keep_best || options.early_stopping_patience.is_some())
        && validation_examples.is_empty()
    {
        return Err(TrainerError::Invalid(
            "keep_best and early stopping need validation examples (val_data, or val_split above 0 with enough conversations)".into(),
        ));
    }
    let pad_id = encoder
        .tokenizer
        .token_to_id("<|endoftext|>")
        .or_else(|| encoder.tokenizer.get_padding().map(|p| p.pad_id))
        .unwrap_or(0);

    observer.stage(Stage::ModelLoading);
    let lora = options.lora();
    let mut init_rng = Rng::new(options.seed);
    let (model_config, mut model) = loader::load_model(
        &model_dir,
        &lora,
        (dtype, options.base_quant),
        lora_dtype,
        &device,
        &mut init_rng,
    )?;
    model.set_gradient_checkpointing(options.gradient_checkpointing);
    if let Some(report) = model.quantization() {
        observer.quantized(report);
    }
    model_config
        .check_sequence_length(options.max_seq_len)
        .map_err(TrainerError::Invalid)?;
    let parameters: Vec<(String, Var)> = model.lora_parameters().into_iter().collect();
    let mut optimizer = AdamW::new(
        parameters.iter().map(|(_, v)| v.clone()).collect(),
        options.weight_decay,
    )?;

    // A step takes `window` rows: examples, or rows of packed examples.
    let window = options.batch_size * options.grad_accum;
    let example_lengths: Vec<usize> = train_examples.iter().map(|e| e.input_ids.len()).collect();
    let packing = options.packing.then_some(options.max_seq_len);
    let rows_of = |epoch: usize| data::epoch_rows(&example_lengths, packing, options.seed, epoch);
    let mut rows: (usize, Vec<Vec<usize>>) = (0, rows_of(0));
    if options.packing {
        observer.packed(&PackingPlan::of(&rows.1, &example_lengths, options));
    }
    let steps_per_epoch = rows.1.len().div_ceil(window);
    let total_steps = options
        .max_steps
        .unwrap_or(options.epochs * steps_per_epoch);
    let warmup_steps = (options.warmup_ratio * total_steps as f64).ceil() as usize;
    let mut start_step = 0;
    let mut best: Option<checkpoint::BestSoFar> = None;
    let mut best_weights: Option<HashMap<String, Tensor>> = None;
    if let Some(dir) = &options.resume_from {
        let names: Vec<String> = parameters.iter().map(|(name, _)| name.clone()).collect();
        let restored = checkpoint::load(dir, &names, &config_hash, &data_hash, &device)?;
        for (name, var) in &parameters {
            var.set(&restored.lora[name].to_dtype(var.dtype())?)?;
        }
        optimizer.restore(
            restored.first_moments,
            restored.second_moments,
            restored.state.optimizer_steps,
        )?;
        start_step = restored.state.step;
        best = restored.state.best;
        best_weights = restored.best_weights;
        if start_step >= total_steps {
            return Err(TrainerError::Invalid(format!(
                "the checkpoint is at step {start_step}, and the run has {total_steps} steps: nothing is left to train"
            )));
        }
    }
    let mut output = Output::create(&options.out, start_step)?;

    observer.stage(Stage::Training);
    let (mut tokens_seen, mut last_loss, mut last_validation) = (0usize, f64::NAN, None);
    let mut slots_computed = 0usize;
    let mut steps_done = start_step;
    // The step of the newest checkpoint (the resumed one counts).
    let mut checkpointed_at = start_step;
    let mut stopped_early = None;
    let save_checkpoint = |step: usize,
                           epoch: usize,
                           optimizer: &AdamW,
                           best: Option<checkpoint::BestSoFar>,
                           best_weights: Option<&HashMap<String, Tensor>>,
                           observer: &mut dyn Observer| {
        let state = checkpoint::CheckpointState {
            step,
            epoch,
            optimizer_steps: optimizer.steps(),
            config_hash: config_hash.clone(),
            data_hash: data_hash.clone(),
            best,
        };
        write_checkpoint(
            &options.out,
            &state,
            &parameters,
            optimizer,
            best_weights,
            observer,
        )
    };
    for step in start_step..total_steps {
        if control.cancelled() {
            break;
        }
        let step_started = Instant::now();
        let epoch = step / steps_per_epoch;
        if rows.0 != epoch {
            rows = (epoch, rows_of(epoch));
        }
        let offset = (step % steps_per_epoch) * window;
        let selected: Vec<Vec<&Example>> = rows.1[offset..(offset + window).min(rows.1.len())]
            .iter()
            .map(|row| row.iter().map(|i| &train_examples[*i]).collect())
            .collect();
        let window_loss_tokens: usize = selected.iter().flatten().map(|e| e.loss_tokens()).sum();

        // Each micro-batch's loss is weighted by its share of the window's loss tokens, so
        // the accumulated gradient is that of one batch of the whole window.
        // Nothing is read back from the device until the step's one read of its loss and
        // gradient norm; token counts come from the host-side batches.
        let mut gradient: Option<Tensor> = None;
        let mut window_loss: Option<Tensor> = None;
        let (mut window_tokens, mut window_slots) = (0, 0);
        for (index, micro) in selected.chunks(options.batch_size).enumerate() {
            let batch = data::make_packed_batch(micro, pad_id, &device)?;
            let dropout = DropoutKey {
                seed: options.seed,
                step: step as u64,
                micro_batch: index as u64,
            };
            let loss = model.loss(
                &batch.input_ids,
                Some(&batch.segments),
                &batch.targets,
                &batch.loss_mask,
                Some(dropout),
            )?;
            let share = batch.loss_tokens as f64 / window_loss_tokens.max(1) as f64;
            let weighted = loss.affine(share, 0.0)?;
            let detached = weighted.detach().to_dtype(DType::F32)?;
            window_loss = Some(match window_loss.take() {
                Some(sum) => (sum + detached)?,
                None => detached,
            });
            window_tokens += batch.tokens;
            window_slots += batch.slots;
            let micro_gradient = optimizer.flat_gradient(&weighted.backward()?)?;
            gradient = Some(match gradient.take() {
                Some(sum) => (sum + micro_gradient)?,
                None => micro_gradient,
            });
        }
        let (Some(window_loss), Some(gradient)) = (window_loss, gradient) else {
            return Err(TrainerError::Invalid(
                "an optimizer step without a micro-batch".into(),
            ));
        };
        let learning_rate = optim::learning_rate(options.lr, step, warmup_steps, total_steps);
        let grad_norm = optimizer.step(&gradient, options.max_grad_norm, learning_rate)?;
        let read = Tensor::stack(&[window_loss, grad_norm.to_dtype(DType::F32)?], 0)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let (window_loss, grad_norm) = (read[0], read[1]);

        steps_done = step + 1;
        tokens_seen += window_tokens;
        slots_computed += window_slots;
        last_loss = window_loss;
        let evaluate_now = !validation_examples.is_empty()
            && (steps_done == total_steps
                || options
                    .eval_every
                    .is_some_and(|n| n > 0 && steps_done % n == 0));
        let validation_loss = if evaluate_now {
            Some(evaluate(
                &model,
                &validation_examples,
                options.batch_size,
                pad_id,
                &device,
            )?)
        } else {
            None
        };
        last_validation = validation_loss.or(last_validation);
        if let Some(loss) = validation_loss {
            if record_evaluation(
                &mut best,
                steps_done,
                loss,
                options.early_stopping_min_delta,
            ) && options.keep_best
            {
                best_weights = Some(snapshot(&parameters)?);
            }
            if let (Some(best), Some(patience)) = (best, options.early_stopping_patience) {
                if best.evaluations_since >= patience {
                    stopped_early = Some(format!(
                        "Stopped early after step {steps_done}: {} evaluations in a row did not improve the validation loss by more than {} (best {:.4} at step {})",
                        best.evaluations_since, options.early_stopping_min_delta, best.validation_loss, best.step
                    ));
                }
            }
        }
        let metrics = StepMetrics {
            step: steps_done,
            total_steps,
            epoch: epoch as f64 + (step % steps_per_epoch + 1) as f64 / steps_per_epoch as f64,
            loss: window_loss,
            learning_rate,
            grad_norm,
            tokens_per_second: window_tokens as f64
                / step_started.elapsed().as_secs_f64().max(1e-9),
            validation_loss,
            elapsed_seconds: started.elapsed().as_secs_f64(),
            packing_efficiency: window_tokens as f64 / window_slots.max(1) as f64,
        };
        output.record(&metrics)?;
        observer.step(&metrics);

        let scheduled = options
            .checkpoint_every
            .is_some_and(|n| n > 0 && steps_done % n == 0);
        if control.take_checkpoint_request() || scheduled {
            save_checkpoint(
                steps_done,
                epoch,
                &optimizer,
                best,
                best_weights.as_ref(),
                observer,
            )?;
            checkpointed_at = steps_done;
        }
        if let Some(message) = &stopped_early {
            observer.notice(message);
            break;
        }
    }
    // A checkpoint asked for after the last step's own check (a stop's request racing the
    // step) is written now, so a stop always ends on a checkpoint of the final parameters.
    if control.take_checkpoint_request() && checkpointed_at != steps_done {
        save_checkpoint(
            steps_done,
            (steps_done - 1) / steps_per_epoch,
            &optimizer,
            best,
            best_weights.as_ref(),
            observer,
        )?;
    }

    observer.stage(Stage::Finalization);
    // With keep-best the adapter is the best evaluation's weights.
    let adapter_step = match (&best_weights, best) {
        (Some(weights), Some(best)) if options.keep_best => {
            for (name, var) in &parameters {
                var.set(&weights[name].to_dtype(var.dtype())?)?;
            }
            best.step
        }
        _ => steps_done,
    };
    let base_model = crate::hub::base_model_reference(&options.model);
    peft::save_adapter(&options.out.join("adapter"), &model, &lora, &base_model)?;
    let seconds = started.elapsed().as_secs_f64();
    let summary = Summary {
        steps: steps_done,
        train_loss: last_loss,
        validation_loss: last_validation,
        train_examples: train_examples.len(),
        validation_examples: validation_examples.len(),
        truncated_examples: truncated,
        tokens: tokens_seen,
        seconds,
        tokens_per_second: tokens_seen as f64 / seconds.max(1e-9),
        peak_memory_bytes: peak_memory_bytes(),
        cancelled: control.cancelled(),
        best_step: best.map(|b| b.step),
        best_validation_loss: best.map(|b| b.validation_loss),
        adapter_step,
        stopped_early,
        packing: options.packing,
        packing_efficiency: tokens_seen as f64 / slots_computed.max(1) as f64,
        quantization: model.quantization().cloned(),
        gradient_checkpointing: model.gradient_checkpointing(),
    };
    let path = options.out.join("summary.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&summary).unwrap_or_default(),
    )
    .map_err(|source| TrainerError::Io {
        path: path.display().to_string(),
        source,
    })?;
    Ok(summary)
}
