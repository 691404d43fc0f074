use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use trainer::config::Architecture;
use trainer::evaluation::{evaluate_file, generate, load_for_inference};
use trainer::init::{write_tiny_model, TinyModel};
use trainer::quantized::BaseQuant;
use trainer::train::{
    on_compute_threads, train, Control, DeviceChoice, Observer, Precision, Stage, StepMetrics,
    TrainOptions,
};

/// Every op allocates its output, and freed tensors go back to the system under glibc's
/// malloc, so each step page-faults its activations in again (and flushes TLBs across
/// threads); mimalloc keeps and reuses them (for as long as `main` asks, below).
#[global_allocator]
static ALLOCATOR: allocator::MiMalloc = allocator::MiMalloc;

/// LoRA fine-tuning of Llama-family models on chat data.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the Train variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Train a LoRA adapter; writes adapter/, metrics.jsonl and summary.json to --out.
    Train(TrainArgs),
    /// Score a model (and adapter) on a dataset; prints JSON.
    Eval {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        data: PathBuf,
        /// Cut conversations to this many tokens (default: no truncation).
        #[arg(long)]
        max_seq_len: Option<usize>,
        #[arg(long, default_value_t = 4)]
        batch_size: usize,
    },
    /// Run quality validation suites on an adapter; prints the reports as JSON.
    /// emotional_intelligence leaves with its replies generated and `awaiting_judge`
    /// (the control plane's judge scores it).
    Validate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: PathBuf,
        /// Run the same suites on this adapter too.
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// The validation examples (every usable record).
        #[arg(long)]
        data: PathBuf,
        /// Validate on the seeded split of --data that training held out (fraction 0.1).
        #[arg(long)]
        split_seed: Option<u64>,
        /// The training file, for voice consistency's style profile (default: --data).
        #[arg(long)]
        training_data: Option<PathBuf>,
        /// Comma-separated: perplexity, knowledge_retention, voice_consistency,
        /// emotional_intelligence, stop_behaviour.
        #[arg(
            long,
            default_value = "perplexity,knowledge_retention,voice_consistency,stop_behaviour"
        )]
        suites: String,
        #[arg(long, default_value_t = 16)]
        max_samples: usize,
        #[arg(long, default_value_t = 96)]
        max_new_tokens: usize,
        #[arg(long)]
        max_seq_len: Option<usize>,
        /// A chat dataset whose first user turns are knowledge retention's prompts.
        #[arg(long)]
        retention_prompts: Option<PathBuf>,
        /// cpu or cuda.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Answer a prompt with the chat template and a KV cache.
    Generate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// 0 is greedy.
        #[arg(long, default_value_t = 0.7)]
        temperature: f64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Training throughput at a model's shape with random weights and tokens; prints one
    /// JSON line (tokens_per_second, forward_ms, backward_ms, optimizer_ms,
    /// peak_memory_bytes, mfu).
    Bench {
        /// tiny, llama-3.2-1b or qwen2.5-0.5b; the flags below override its sizes.
        #[arg(long, default_value = "tiny")]
        shape: String,
        #[arg(long)]
        hidden_size: Option<usize>,
        #[arg(long)]
        layers: Option<usize>,
        #[arg(long)]
        heads: Option<usize>,
        #[arg(long)]
        kv_heads: Option<usize>,
        #[arg(long)]
        intermediate_size: Option<usize>,
        #[arg(long)]
        vocab_size: Option<usize>,
        #[arg(long, default_value_t = 256)]
        seq: usize,
        #[arg(long, default_value_t = 2)]
        batch: usize,
        #[arg(long, default_value_t = 16)]
        rank: usize,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// LoRA dropout on every adapter's input, as training applies it (training's
        /// default is 0.05).
        #[arg(long, default_value_t = 0.0)]
        lora_dropout: f64,
        #[arg(long, value_parser = ["cpu", "cuda"], default_value = "cpu")]
        device: String,
        /// Base weights and activations (default: bf16 on CUDA, f32 on CPU).
        #[arg(long, value_parser = ["bf16", "f32"])]
        dtype: Option<String>,
        /// The device's dense peak TFLOPS at that dtype, for MFU (H100/H200 bf16: 989).
        #[arg(long)]
        peak_tflops: Option<f64>,
        /// Example lengths: all --seq tokens, or uniform in [32, --seq] (chat-like).
        #[arg(long, value_parser = ["full", "mixed"], default_value = "full")]
        lengths: String,
        /// Pack examples into rows of --seq tokens, as training does.
        #[arg(long, value_parser = ["on", "off"], default_value = "off")]
        packing: String,
        /// Hold the frozen projections quantized, as training with --base-quant does.
        #[arg(long, value_parser = BaseQuant::NAMES, default_value = "none")]
        base_quant: String,
        /// Compute each layer's activations again in the backward, as training with
        /// --gradient-checkpointing does.
        #[arg(long)]
        gradient_checkpointing: bool,
        /// Print the shape's sizes as JSON and stop (for peers benched at the same shape).
        #[arg(long)]
        describe: bool,
    },
    /// Run each fused op (dropout, AdamW, chunked cross-entropy) on the device and on the
    /// CPU with the same inputs; prints one JSON line per op and fails if any differs by
    /// more than its tolerance.
    KernelCheck {
        #[arg(long, value_parser = ["cpu", "cuda"], default_value = "cpu")]
        device: String,
    },
    /// Fold an adapter into its base model; writes a Hugging Face model directory.
    Merge {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Export an adapter for another runtime: `gguf`, a llama.cpp LoRA adapter (load it
    /// with `llama-cli -m BASE.gguf --lora FILE`). Prints JSON.
    Export {
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long, value_parser = ["gguf"])]
        format: String,
        #[arg(long)]
        out: PathBuf,
        /// The base model's directory, for its config (default: the adapter's
        /// base_model_name_or_path, when it is a local directory).
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, value_parser = ["f32", "f16", "bf16"], default_value = "f32")]
        dtype: String,
    },
    /// Write a tiny random model directory (config, weights, tokenizer, chat template).
    InitModel {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "llama", value_parser = ["llama", "mistral", "qwen2"])]
        architecture: String,
        #[arg(long, default_value_t = 64)]
        hidden_size: usize,
        #[arg(long, default_value_t = 128)]
        intermediate_size: usize,
        #[arg(long, default_value_t = 2)]
        layers: usize,
        #[arg(long, default_value_t = 4)]
        heads: usize,
        #[arg(long, default_value_t = 2)]
        kv_heads: usize,
        #[arg(long)]
        tie_word_embeddings: bool,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

/// Flags override `--config recipe.toml`, which overrides the defaults.
#[derive(clap::Args)]
struct TrainArgs {
    /// TOML recipe with the same keys as the flags (model, data, out, rank, lr, ...).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long)]
    val_data: Option<PathBuf>,
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    rank: Option<usize>,
    #[arg(long)]
    alpha: Option<f64>,
    #[arg(long)]
    dropout: Option<f64>,
    /// Comma-separated, e.g. q_proj,v_proj.
    #[arg(long, value_delimiter = ',')]
    target_modules: Option<Vec<String>>,
    #[arg(long)]
    use_rslora: bool,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    max_seq_len: Option<usize>,
    #[arg(long)]
    warmup_ratio: Option<f64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    max_grad_norm: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    val_split: Option<f64>,
    #[arg(long)]
    eval_every: Option<usize>,
    /// Write a checkpoint every N optimizer steps (OUT/checkpoints/step-N).
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Continue from a checkpoint directory with the same settings and data.
    #[arg(long)]
    resume_from: Option<PathBuf>,
    #[arg(long, value_parser = ["cpu", "cuda"])]
    device: Option<String>,
    /// Base weights and activations (default: bf16 on CUDA, f32 on CPU).
    #[arg(long, value_parser = ["bf16", "f32"])]
    dtype: Option<String>,
    /// The adapter is the best evaluation's (lowest validation loss), not the last step's.
    #[arg(long)]
    keep_best: bool,
    /// Stop after this many evaluations in a row without improvement (needs --eval-every).
    #[arg(long)]
    early_stopping_patience: Option<usize>,
    /// The improvement in validation loss that counts (default 0).
    #[arg(long)]
    early_stopping_min_delta: Option<f64>,
    /// Pack training examples into rows of max_seq_len tokens, each still its own
    /// sequence (default on; evaluation never packs).
    #[arg(long, value_parser = ["on", "off"])]
    packing: Option<String>,
    /// Hold the decoder layers' frozen projections quantized (QLoRA-style): q4k (4.5 bits
    /// a weight; q5_0 where rows are not a multiple of 256), q8_0, or none. LoRA and the
    /// optimizer stay f32.
    #[arg(long, value_parser = BaseQuant::NAMES)]
    base_quant: Option<String>,
    /// Compute each layer's activations again in the backward instead of keeping them
    /// (all but the attention's output): about two thirds of a forward more a step, a
    /// fraction of the activation memory, the same gradients.
    #[arg(long)]
    gradient_checkpointing: bool,
}

fn precision(name: &str) -> Precision {
    if name == "bf16" {
        Precision::Bf16
    } else {
        Precision::F32
    }
}

impl TrainArgs {
    fn options(self) -> anyhow::Result<TrainOptions> {
        let mut options = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("{}", path.display()))?
            }
            None => TrainOptions::default(),
        };
        macro_rules! take {
            ($($field:ident),*) => { $( if let Some(value) = self.$field { options.$field = value; } )* };
        }
        take!(
            model,
            data,
            out,
            rank,
            alpha,
            dropout,
            target_modules,
            lr,
            epochs,
            batch_size,
            grad_accum,
            max_seq_len,
            warmup_ratio,
            weight_decay,
            max_grad_norm,
            seed,
            val_split
        );
        options.val_data = self.val_data.or(options.val_data);
        options.max_steps = self.max_steps.or(options.max_steps);
        options.eval_every = self.eval_every.or(options.eval_every);
        options.checkpoint_every = self.checkpoint_every.or(options.checkpoint_every);
        options.resume_from = self.resume_from.or(options.resume_from);
        options.use_rslora |= self.use_rslora;
        options.keep_best |= self.keep_best;
        options.gradient_checkpointing |= self.gradient_checkpointing;
        options.early_stopping_patience = self
            .early_stopping_patience
            .or(options.early_stopping_patience);
        if let Some(delta) = self.early_stopping_min_delta {
            options.early_stopping_min_delta = delta;
        }
        if let Some(packing) = self.packing {
            options.packing = packing == "on";
        }
        if let Some(base_quant) = self.base_quant {
            options.base_quant = base_quant.parse().map_err(anyhow::Error::msg)?;
        }
        if let Some(device) = self.device {
            options.device = if device == "cuda" {
                DeviceChoice::Cuda
            } else {
                DeviceChoice::Cpu
            };
        }
        if let Some(dtype) = self.dtype {
            options.dtype = Some(precision(&dtype));
        }
        anyhow::ensure!(
            !options.model.as_os_str().is_empty(),
            "--model is required (or `model` in --config)"
        );
        anyhow::ensure!(
            !options.data.as_os_str().is_empty(),
            "--data is required (or `data` in --config)"
        );
        Ok(options)
    }
}

/// A one-line progress bar on stderr: step, loss, tokens/s, ETA.
struct ProgressBar {
    started: Instant,
}

impl Observer for ProgressBar {
    fn stage(&mut self, stage: Stage) {
        eprintln!(
            "{}",
            match stage {
                Stage::Preprocessing => "preprocessing data…",
                Stage::ModelLoading => "loading the model…",
                Stage::Training => "training…",
                Stage::Finalization => "\nwriting the adapter…",
            }
        );
    }

    fn step(&mut self, m: &StepMetrics) {
        let done = m.step as f64 / m.total_steps.max(1) as f64;
        let width = 30;
        let filled = (done * width as f64) as usize;
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta = elapsed / done.max(1e-9) - elapsed;
        let validation = m
            .validation_loss
            .map(|v| format!(" val {v:.4}"))
            .unwrap_or_default();
        eprint!(
            "\r[{}{}] {}/{} loss {:.4}{validation} lr {:.2e} {:.0} tok/s ETA {}:{:02}   ",
            "#".repeat(filled),
            ".".repeat(width - filled),
            m.step,
            m.total_steps,
            m.loss,
            m.learning_rate,
            m.tokens_per_second,
            (eta / 60.0) as u64,
            (eta % 60.0) as u64
        );
        let _ = std::io::stderr().flush();
    }

    fn warning(&mut self, message: &str) {
        eprintln!("warning: {message}");
    }

    fn notice(&mut self, message: &str) {
        eprintln!("\n{message}");
    }

    fn packed(&mut self, plan: &trainer::train::PackingPlan) {
        eprintln!("{}", plan.message());
    }

    fn checkpoint(&mut self, step: usize, dir: &std::path::Path) {
        eprintln!("\ncheckpoint at step {step}: {}", dir.display());
    }
}

fn main() -> anyhow::Result<()> {
    allocator::keep_freed_memory();
    trainer::train::shorten_candle_spin();
    match Cli::parse().command {
        Command::Train(args) => {
            let options = args.options()?;
            let summary = train(
                &options,
                &mut ProgressBar {
                    started: Instant::now(),
                },
                &Control::default(),
            )?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
            eprintln!("adapter: {}", options.out.join("adapter").display());
        }
        Command::Eval {
            model,
            adapter,
            data,
            max_seq_len,
            batch_size,
        } => {
            let report = on_compute_threads(DeviceChoice::Cpu, || {
                evaluate_file(&model, adapter.as_deref(), &data, max_seq_len, batch_size)
            })?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Validate {
            model,
            adapter,
            baseline,
            data,
            split_seed,
            training_data,
            suites,
            max_samples,
            max_new_tokens,
            max_seq_len,
            retention_prompts,
            device,
        } => {
            let suites = suites
                .split(',')
                .map(|s| s.trim().parse::<protocol::validation::Suite>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(anyhow::Error::msg)?;
            let options = trainer::validation::ValidationOptions {
                training_data: training_data.unwrap_or_else(|| data.clone()),
                split: split_seed.map(|seed| protocol::validation::Split {
                    fraction: 0.1,
                    seed,
                }),
                model,
                adapter,
                baseline,
                data,
                suites,
                max_samples,
                max_new_tokens,
                max_seq_len,
                retention_prompts,
                cache_dir: None,
                device: if device == "cuda" {
                    DeviceChoice::Cuda
                } else {
                    DeviceChoice::Cpu
                },
            };
            let results = trainer::validation::run(&options, &mut ())?;
            println!("{}", serde_json::to_string_pretty(&results)?);
        }
        Command::Generate {
            model,
            adapter,
            prompt,
            max_new_tokens,
            temperature,
            seed,
        } => {
            let encoder =
                trainer::data::TextEncoder::from_model_dir(&trainer::hub::resolve_model(&model)?)?;
            let generation = on_compute_threads(DeviceChoice::Cpu, || {
                let loaded =
                    load_for_inference(&model, adapter.as_deref(), &candle_core::Device::Cpu)?;
                generate(
                    &loaded,
                    &encoder,
                    &[protocol::dataset::Message::new(
                        protocol::dataset::Role::User,
                        prompt,
                    )],
                    max_new_tokens,
                    temperature,
                    seed,
                )
            })?;
            println!("{}", generation.text);
        }
        Command::Bench {
            shape,
            hidden_size,
            layers,
            heads,
            kv_heads,
            intermediate_size,
            vocab_size,
            seq,
            batch,
            rank,
            steps,
            lora_dropout,
            device,
            dtype,
            peak_tflops,
            lengths,
            packing,
            base_quant,
            gradient_checkpointing,
            describe,
        } => {
            let mut spec = trainer::bench::shape(&shape)?;
            macro_rules! set {
                ($($field:ident => $value:expr),*) => { $( if let Some(v) = $value { spec.$field = v; } )* };
            }
            set!(hidden_size => hidden_size, layers => layers, heads => heads,
                 kv_heads => kv_heads, intermediate_size => intermediate_size,
                 vocab_size => vocab_size);
            if describe {
                println!("{}", serde_json::to_string(&spec)?);
                return Ok(());
            }
            let report = trainer::bench::run(&trainer::bench::BenchOptions {
                shape: spec,
                seq,
                batch,
                rank,
                steps,
                lora_dropout,
                device: if device == "cuda" {
                    DeviceChoice::Cuda
                } else {
                    DeviceChoice::Cpu
                },
                dtype: dtype.map(|d| precision(&d)),
                peak_tflops,
                mixed_lengths: lengths == "mixed",
                packing: packing == "on",
                base_quant: base_quant.parse().map_err(anyhow::Error::msg)?,
                gradient_checkpointing,
            })?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Command::KernelCheck { device } => {
            let choice = if device == "cuda" {
                DeviceChoice::Cuda
            } else {
                DeviceChoice::Cpu
            };
            let checks = trainer::kernel_check::run(choice)?;
            for check in &checks {
                println!("{}", serde_json::to_string(check)?);
            }
            if let Some(failed) = checks.iter().find(|c| !c.passed) {
                anyhow::bail!(
                    "{} on {} differs from the CPU by {:e} (tolerance {:e})",
                    failed.kernel,
                    failed.device,
                    failed.max_abs_difference,
                    failed.tolerance
                );
            }
        }
        Command::Merge {
            model,
            adapter,
            out,
        } => {
            let merged = trainer::merge::merge_adapter(&model, &adapter, &out)?;
            eprintln!("{merged} weights updated");
            println!("{}", out.display());
        }
        Command::Export {
            adapter,
            format: _,
            out,
            model,
            dtype,
        } => {
            let model = match model {
                Some(model) => model,
                None => trainer::peft::base_model_dir(&adapter)?,
            };
            let dtype = trainer::gguf::GgufDtype::parse(&dtype)
                .ok_or_else(|| anyhow::anyhow!("unknown --dtype {dtype}"))?;
            let written = trainer::gguf::export_lora(&adapter, &model, &out, dtype)?;
            println!("{}", serde_json::to_string(&written)?);
        }
        Command::InitModel {
            out,
            architecture,
            hidden_size,
            intermediate_size,
            layers,
            heads,
            kv_heads,
            tie_word_embeddings,
            seed,
        } => {
            let architecture = match architecture.as_str() {
                "mistral" => Architecture::Mistral,
                "qwen2" => Architecture::Qwen2,
                _ => Architecture::Llama,
            };
            let spec = TinyModel {
                architecture,
                hidden_size,
                intermediate_size,
                layers,
                heads,
                kv_heads,
                tie_word_embeddings,
                seed,
            };
            write_tiny_model(&out, &spec)?;
            println!("{}", out.display());
        }
    }
    Ok(())
}
