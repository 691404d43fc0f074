//! Quality validation of a trained adapter: the suites of `protocol::validation`, each
//! computed from the models (base, adapter and, for a comparison, a baseline adapter)
//! on the validation examples. The judge of emotional intelligence is an HTTP service
//! the control plane calls, so that suite leaves here with its replies generated and its
//! scores to come (`awaiting_judge`).
//!
//! Scores (0–100), as the README's "Quality validation" section documents them:
//! - perplexity: the share of the base model's loss the adapter removes,
//!   `100 · clamp((L_base − L_adapter) / L_base, 0, 1)`;
//! - knowledge retention: `100 · (½ · exp(−max(0, L_adapter − L_base)) + ½ · agreement)`
//!   on the base model's greedy answers to general prompts; the base against itself is 100;
//! - voice consistency: `0.4 · chrF + 0.3 · 100 · ROUGE-L + 0.3 · 100 · style similarity`;
//! - stop behaviour: `100 ·` the share of generations that end their turn.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use protocol::dataset::{self, Conversation, Limits, Message, Role};
use protocol::validation::{
    ExamplesUsed, Sample, Split, Suite, SuiteReport, SuiteStatus, ValidationResults,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::data::{self, Example, TextEncoder};
use crate::error::{Result, TrainerError};
use crate::evaluation::{
    evaluate_each, evaluate_examples, generate_all, load_for_inference, with_adapter, Generation,
};
use crate::model::Model;
use crate::train::DeviceChoice;

pub mod text_metrics;

use text_metrics::{chrf, cosine, quantile, rouge_l, trigram_profile};

/// The built-in general prompts of knowledge retention (55, written for this project).
pub const GENERAL_PROMPTS: &str = include_str!("general_prompts.txt");

/// Examples are evaluated this many at a time, as `trainer eval` does by default.
const EVAL_BATCH: usize = 4;

#[derive(Debug, Clone)]
pub struct ValidationOptions {
    pub model: PathBuf,
    pub adapter: PathBuf,
    /// Run the same suites on this adapter over the same examples.
    pub baseline: Option<PathBuf>,
    /// The validation examples, or the training file to split them from (`split`).
    pub data: PathBuf,
    pub split: Option<Split>,
    /// The training file: voice consistency's style profile.
    pub training_data: PathBuf,
    pub suites: Vec<Suite>,
    /// Prompts generated for, per suite.
    pub max_samples: usize,
    pub max_new_tokens: usize,
    pub max_seq_len: Option<usize>,
    /// A chat dataset whose conversations' first user turns are knowledge retention's
    /// prompts (default: the built-in set).
    pub retention_prompts: Option<PathBuf>,
    /// Where the base model's greedy answers are kept between validations.
    pub cache_dir: Option<PathBuf>,
    pub device: DeviceChoice,
}

/// Told how a validation goes.
/// `Send`: a CPU run reports from a worker of the compute pool
/// ([`crate::train::on_compute_threads`]).
pub trait Progress: Send {
    fn progress(&mut self, suite: Option<Suite>, message: &str, done: usize, total: usize);
}

impl Progress for () {
    fn progress(&mut self, _: Option<Suite>, _: &str, _: usize, _: usize) {}
}

/// A usable record of the data: its line, conversation and tokens.
struct Item {
    line: u64,
    conversation: Conversation,
    example: Example,
}

impl Item {
    /// The conversation up to its last trained assistant turn, and that turn's text.
    fn prompt_and_reply(&self) -> Option<(&[Message], &str)> {
        let last = self
            .conversation
            .messages
            .iter()
            .rposition(Message::is_trained)?;
        (last > 0).then(|| {
            (
                &self.conversation.messages[..last],
                self.conversation.messages[last].content.as_str(),
            )
        })
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        let meta = &self.conversation.metadata;
        [
            ("persona", &meta.persona),
            ("emotional_arc", &meta.emotional_arc),
        ]
        .into_iter()
        .filter_map(|(key, value)| value.clone().map(|v| (key.to_owned(), v)))
        .collect()
    }
}

fn dataset_error(path: &Path, message: impl std::fmt::Display) -> TrainerError {
    TrainerError::Dataset {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// The records of `path` the loss can count, as `data::load_examples` keeps them.
fn load_items(path: &Path, encoder: &TextEncoder, max_seq_len: Option<usize>) -> Result<Vec<Item>> {
    let file = std::fs::File::open(path).map_err(|source| TrainerError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let (_, records) =
        dataset::open(file, Limits::default()).map_err(|e| dataset_error(path, e))?;
    let mut items = Vec::new();
    for record in records {
        let record = record.map_err(|e| dataset_error(path, e))?;
        let encoded = encoder
            .encode_conversation(&record.conversation)
            .map_err(|e| dataset_error(path, format!("line {}: {e}", record.line)))?;
        let (example, _) = data::to_example(&encoded.ids, &encoded.trained, max_seq_len);
        if example.loss_tokens() > 0 {
            items.push(Item {
                line: record.line,
                conversation: record.conversation,
                example,
            });
        }
    }
    if items.is_empty() {
        return Err(dataset_error(
            path,
            "no conversation has an assistant token to validate on",
        ));
    }
    Ok(items)
}

fn sha256_of(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|source| TrainerError::Io {
        path: path.display().to_string(),
        source,
    })?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// Runs the suites of `options` and returns their reports.
pub fn run(options: &ValidationOptions, progress: &mut dyn Progress) -> Result<ValidationResults> {
    crate::train::on_compute_threads(options.device, || run_here(options, progress))
}

fn run_here(options: &ValidationOptions, progress: &mut dyn Progress) -> Result<ValidationResults> {
    let device = crate::train::device(options.device)?;
    let model_dir = crate::hub::resolve_model(&options.model)?;
    let encoder = TextEncoder::from_model_dir(&model_dir)?;
    let items = load_items(&options.data, &encoder, options.max_seq_len)?;
    let items = match options.split {
        Some(split) => data::split_validation(items, split.fraction, split.seed).1,
        None => items,
    };
    if items.is_empty() {
        return Err(dataset_error(
            &options.data,
            "the validation split is empty",
        ));
    }
    let generated: Vec<&Item> = items
        .iter()
        .filter(|item| item.prompt_and_reply().is_some())
        .take(options.max_samples.max(1))
        .collect();
    let examples = ExamplesUsed {
        source: if options.split.is_some() {
            "training_split"
        } else {
            "validation_file"
        }
        .into(),
        file_sha256: sha256_of(&options.data)?,
        lines: items.iter().map(|i| i.line).collect(),
        generated_lines: generated.iter().map(|i| i.line).collect(),
        split: options.split,
    };

    progress.progress(None, "loading the base model and the adapter", 0, 1);
    let base = load_for_inference(&options.model, None, &device)?;
    let context = Context {
        options,
        encoder: &encoder,
        base: &base,
        items: &items,
        generated: &generated,
    };
    let base_perplexity = if options.suites.contains(&Suite::Perplexity) {
        Some(context.evaluate(&base, &items)?)
    } else {
        None
    };
    let base_answers = if options.suites.contains(&Suite::KnowledgeRetention) {
        Some(context.base_answers(progress)?)
    } else {
        None
    };
    let shared = Shared {
        base_perplexity,
        base_answers,
        style: trigram_profile_of(&options.training_data, &encoder)?,
    };
    // The adapters share the base's weights: one copy of the model in memory.
    let adapter = with_adapter(&base, &options.adapter)?;
    let adapter_reports = context.suites(&adapter, &shared, "adapter", progress)?;
    drop(adapter);
    let baseline_reports = match &options.baseline {
        Some(dir) => {
            let baseline = with_adapter(&base, dir)?;
            Some(context.suites(&baseline, &shared, "baseline", progress)?)
        }
        None => None,
    };
    Ok(ValidationResults {
        adapter: adapter_reports,
        baseline: baseline_reports,
        examples,
    })
}

/// The assistant replies of the training file as one style profile.
fn trigram_profile_of(
    path: &Path,
    encoder: &TextEncoder,
) -> Result<std::collections::HashMap<String, f64>> {
    let items = load_items(path, encoder, None)?;
    let replies = items.iter().flat_map(|item| {
        item.conversation
            .messages
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .map(|m| m.content.as_str())
    });
    Ok(trigram_profile(replies))
}

/// What every subject (adapter, baseline) is measured against.
struct Shared {
    base_perplexity: Option<crate::evaluation::EvalReport>,
    base_answers: Option<Vec<BaseAnswer>>,
    style: std::collections::HashMap<String, f64>,
}

/// The base model's greedy answer to a general prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseAnswer {
    pub prompt: String,
    pub text: String,
    pub tokens: Vec<u32>,
    pub stopped: bool,
}

struct Context<'a> {
    options: &'a ValidationOptions,
    encoder: &'a TextEncoder,
    base: &'a Model,
    items: &'a [Item],
    generated: &'a [&'a Item],
}

impl Context<'_> {
    fn evaluate(&self, model: &Model, items: &[Item]) -> Result<crate::evaluation::EvalReport> {
        let examples: Vec<Example> = items.iter().map(|i| i.example.clone()).collect();
        evaluate_examples(model, self.encoder, &examples, EVAL_BATCH)
    }

    fn retention_prompts(&self) -> Result<Vec<String>> {
        let limit = self.options.max_samples.max(1);
        let prompts: Vec<String> = match &self.options.retention_prompts {
            Some(path) => first_user_turns(path, limit)?,
            None => GENERAL_PROMPTS
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .take(limit)
                .map(str::to_owned)
                .collect(),
        };
        if prompts.is_empty() {
            return Err(TrainerError::Invalid(
                "the knowledge retention prompt file holds no user turn".into(),
            ));
        }
        Ok(prompts)
    }

    /// The base model's greedy answers to the retention prompts, from the cache when this
    /// base model answered these prompts with this budget before.
    fn base_answers(&self, progress: &mut dyn Progress) -> Result<Vec<BaseAnswer>> {
        let prompts = self.retention_prompts()?;
        let key = {
            let mut hasher = Sha256::new();
            let model_dir = crate::hub::resolve_model(&self.options.model)?;
            hasher.update(model_dir.display().to_string());
            for name in [
                "config.json",
                "model.safetensors.index.json",
                "model.safetensors",
            ] {
                if let Ok(meta) = std::fs::metadata(model_dir.join(name)) {
                    hasher.update(format!("{name}:{}", meta.len()));
                }
            }
            hasher.update(self.options.max_new_tokens.to_le_bytes());
            for prompt in &prompts {
                hasher.update(prompt);
                hasher.update([0]);
            }
            hex::encode(hasher.finalize())
        };
        let cached = self
            .options
            .cache_dir
            .as_ref()
            .map(|dir| dir.join(format!("base-answers-{}.json", &key[..16])));
        if let Some(answers) = cached
            .as_ref()
            .and_then(|path| std::fs::read(path).ok())
            .and_then(|bytes| serde_json::from_slice::<Vec<BaseAnswer>>(&bytes).ok())
            .filter(|answers| answers.len() == prompts.len())
        {
            return Ok(answers);
        }
        let answers = answer_prompts(
            self.base,
            self.encoder,
            &prompts,
            self.options.max_new_tokens,
            progress,
        )?;
        if let Some(path) = &cached {
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            // A cache that cannot be written only costs the next validation time.
            if let Ok(bytes) = serde_json::to_vec(&answers) {
                let _ = std::fs::write(path, bytes);
            }
        }
        Ok(answers)
    }

    fn suites(
        &self,
        subject: &Model,
        shared: &Shared,
        who: &str,
        progress: &mut dyn Progress,
    ) -> Result<Vec<SuiteReport>> {
        let replies = if self.options.suites.iter().any(|s| s.generates_replies()) {
            let prompts: Vec<&[Message]> = self
                .generated
                .iter()
                .map(|item| item.prompt_and_reply().unwrap_or_default().0)
                .collect();
            let message = format!("the {who} replies to the validation prompts");
            progress.progress(None, &message, 0, prompts.len());
            let max_new_tokens = self.options.max_new_tokens;
            greedy(
                subject,
                self.encoder,
                &prompts,
                max_new_tokens,
                &mut |done, total| {
                    progress.progress(None, &message, done, total);
                },
            )?
        } else {
            Vec::new()
        };
        let mut reports = Vec::new();
        for suite in &self.options.suites {
            progress.progress(
                Some(*suite),
                &format!("{} on the {who}", suite.title()),
                0,
                1,
            );
            reports.push(match suite {
                Suite::Perplexity => self.perplexity(subject, shared)?,
                Suite::KnowledgeRetention => retention(
                    self.base,
                    subject,
                    self.encoder,
                    shared.base_answers.as_deref().unwrap_or_default(),
                    self.options.max_new_tokens,
                )?,
                Suite::VoiceConsistency => self.voice(&replies, &shared.style),
                Suite::StopBehaviour => self.stop_behaviour(&replies),
                Suite::EmotionalIntelligence => self.awaiting_judge(&replies),
            });
        }
        Ok(reports)
    }

    fn perplexity(&self, subject: &Model, shared: &Shared) -> Result<SuiteReport> {
        let base = match &shared.base_perplexity {
            Some(report) => report.clone(),
            None => self.evaluate(self.base, self.items)?,
        };
        let adapter = self.evaluate(subject, self.items)?;
        let improvement = 100.0 * (base.perplexity - adapter.perplexity) / base.perplexity;
        let score = 100.0 * ((base.loss - adapter.loss) / base.loss).clamp(0.0, 1.0);
        let examples: Vec<Example> = self.generated.iter().map(|i| i.example.clone()).collect();
        let base_each = evaluate_each(self.base, self.encoder, &examples, EVAL_BATCH)?;
        let adapter_each = evaluate_each(subject, self.encoder, &examples, EVAL_BATCH)?;
        let mut samples = Vec::new();
        for ((item, b), a) in self.generated.iter().zip(base_each).zip(adapter_each) {
            let (prompt, reply) = item.prompt_and_reply().unwrap_or_default();
            samples.push(Sample {
                prompt: last_user_text(prompt),
                response: reply.to_owned(),
                metadata: item.metadata(),
                figures: BTreeMap::from([
                    ("line".into(), item.line as f64),
                    ("base_loss".into(), b.loss),
                    ("adapter_loss".into(), a.loss),
                ]),
                ..Sample::default()
            });
        }
        Ok(SuiteReport {
            suite: Suite::Perplexity,
            status: SuiteStatus::Completed,
            score: Some(score),
            figures: json!({
                "base": base, "adapter": adapter,
                "base_perplexity": base.perplexity, "adapter_perplexity": adapter.perplexity,
                "improvement_pct": improvement,
                "examples": self.items.len(), "tokens": adapter.tokens,
            }),
            samples,
            reason: None,
        })
    }

    fn reply_samples(&self, replies: &[Generation]) -> Vec<Sample> {
        self.generated
            .iter()
            .zip(replies)
            .map(|(item, reply)| {
                let (prompt, reference) = item.prompt_and_reply().unwrap_or_default();
                Sample {
                    prompt: last_user_text(prompt),
                    response: reply.text.clone(),
                    reference: Some(reference.to_owned()),
                    metadata: item.metadata(),
                    figures: BTreeMap::from([("line".into(), item.line as f64)]),
                    judge_answer: None,
                }
            })
            .collect()
    }

    fn voice(
        &self,
        replies: &[Generation],
        style: &std::collections::HashMap<String, f64>,
    ) -> SuiteReport {
        let mut samples = self.reply_samples(replies);
        let mut ratios = Vec::new();
        for sample in &mut samples {
            let reference = sample.reference.as_deref().unwrap_or_default();
            let ratio =
                sample.response.chars().count() as f64 / reference.chars().count().max(1) as f64;
            ratios.push(ratio);
            sample
                .figures
                .insert("chrf".into(), chrf(&sample.response, reference));
            sample
                .figures
                .insert("rouge_l".into(), rouge_l(&sample.response, reference));
            sample.figures.insert("length_ratio".into(), ratio);
        }
        let mean = |key: &str, of: &[&Sample]| {
            of.iter().filter_map(|s| s.figures.get(key)).sum::<f64>() / of.len().max(1) as f64
        };
        let all: Vec<&Sample> = samples.iter().collect();
        let breakdown = |field: &str| {
            let mut groups: BTreeMap<String, Vec<&Sample>> = BTreeMap::new();
            for sample in &samples {
                if let Some(value) = sample.metadata.get(field) {
                    groups.entry(value.clone()).or_default().push(sample);
                }
            }
            groups
                .into_iter()
                .map(|(value, group)| {
                    let figures = json!({"samples": group.len(), "chrf": mean("chrf", &group),
                                         "rouge_l": mean("rouge_l", &group)});
                    (value, figures)
                })
                .collect::<serde_json::Map<_, _>>()
        };
        let style_similarity = cosine(
            &trigram_profile(replies.iter().map(|r| r.text.as_str())),
            style,
        );
        ratios.sort_by(f64::total_cmp);
        let (chrf_mean, rouge_mean) = (mean("chrf", &all), mean("rouge_l", &all));
        let score = 0.4 * chrf_mean + 0.3 * 100.0 * rouge_mean + 0.3 * 100.0 * style_similarity;
        SuiteReport {
            suite: Suite::VoiceConsistency,
            status: SuiteStatus::Completed,
            score: Some(score.clamp(0.0, 100.0)),
            figures: json!({
                "chrf": chrf_mean, "rouge_l": rouge_mean, "style_similarity": style_similarity,
                "length_ratio": {
                    "mean": ratios.iter().sum::<f64>() / ratios.len().max(1) as f64,
                    "p10": quantile(&ratios, 0.1), "p50": quantile(&ratios, 0.5), "p90": quantile(&ratios, 0.9),
                },
                "by_persona": breakdown("persona"),
                "by_emotional_arc": breakdown("emotional_arc"),
                "samples": samples.len(),
            }),
            samples,
            reason: None,
        }
    }

    fn stop_behaviour(&self, replies: &[Generation]) -> SuiteReport {
        let mut samples = self.reply_samples(replies);
        for (sample, reply) in samples.iter_mut().zip(replies) {
            sample
                .figures
                .insert("stopped".into(), f64::from(u8::from(reply.stopped)));
            sample
                .figures
                .insert("new_tokens".into(), reply.tokens.len() as f64);
        }
        let count = replies.len().max(1) as f64;
        let stopped = replies.iter().filter(|r| r.stopped).count();
        let stop_rate = stopped as f64 / count;
        SuiteReport {
            suite: Suite::StopBehaviour,
            status: SuiteStatus::Completed,
            score: Some(100.0 * stop_rate),
            figures: json!({
                "stop_rate": stop_rate, "stopped": stopped, "prompts": replies.len(),
                "mean_new_tokens": replies.iter().map(|r| r.tokens.len()).sum::<usize>() as f64 / count,
                "max_new_tokens": self.options.max_new_tokens,
            }),
            samples,
            reason: None,
        }
    }

    fn awaiting_judge(&self, replies: &[Generation]) -> SuiteReport {
        SuiteReport {
            suite: Suite::EmotionalIntelligence,
            status: SuiteStatus::AwaitingJudge,
            score: None,
            figures: json!({"samples": replies.len()}),
            samples: self.reply_samples(replies),
            reason: None,
        }
    }
}

/// The first user turn of each of the first `limit` conversations of a dataset file.
fn first_user_turns(path: &Path, limit: usize) -> Result<Vec<String>> {
    let file = std::fs::File::open(path).map_err(|source| TrainerError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let (_, records) =
        dataset::open(file, Limits::default()).map_err(|e| dataset_error(path, e))?;
    let mut prompts = Vec::new();
    for record in records {
        let record = record.map_err(|e| dataset_error(path, e))?;
        let first = record
            .conversation
            .messages
            .iter()
            .find(|m| m.role == Role::User);
        if let Some(message) = first {
            prompts.push(message.content.clone());
        }
        if prompts.len() == limit {
            break;
        }
    }
    Ok(prompts)
}

/// The text of the last user turn: what a sample shows as its prompt.
fn last_user_text(messages: &[Message]) -> String {
    messages
        .iter()
        .rev()
        .find(|m| m.role == Role::User)
        .map(|m| m.content.clone())
        .unwrap_or_default()
}

/// Greedy answers of `model` to single-turn `prompts`.
pub fn answer_prompts(
    model: &Model,
    encoder: &TextEncoder,
    prompts: &[String],
    max_new_tokens: usize,
    progress: &mut dyn Progress,
) -> Result<Vec<BaseAnswer>> {
    let message = "the base model answers the general prompts";
    let suite = Some(Suite::KnowledgeRetention);
    progress.progress(suite, message, 0, prompts.len());
    let generations = answer_each(
        model,
        encoder,
        prompts,
        max_new_tokens,
        &mut |done, total| {
            progress.progress(suite, message, done, total);
        },
    )?;
    Ok(prompts
        .iter()
        .zip(generations)
        .map(|(prompt, generation)| BaseAnswer {
            prompt: prompt.clone(),
            text: generation.text,
            tokens: generation.tokens,
            stopped: generation.stopped,
        })
        .collect())
}

/// [`greedy`] replies to each prompt as a conversation of one user turn.
fn answer_each<'a>(
    model: &Model,
    encoder: &TextEncoder,
    prompts: impl IntoIterator<Item = &'a String>,
    max_new_tokens: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Generation>> {
    let turns: Vec<[Message; 1]> = prompts
        .into_iter()
        .map(|prompt| [Message::new(Role::User, prompt.clone())])
        .collect();
    let conversations: Vec<&[Message]> = turns.iter().map(|turn| &turn[..]).collect();
    greedy(model, encoder, &conversations, max_new_tokens, progress)
}

/// Greedy replies (no sampling) to each of `conversations`, answered together (see
/// [`generate_all`]), `progress` told how many are done.
fn greedy(
    model: &Model,
    encoder: &TextEncoder,
    conversations: &[&[Message]],
    max_new_tokens: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Generation>> {
    generate_all(
        model,
        encoder,
        conversations,
        (max_new_tokens, 0.0, 0),
        progress,
    )
}

/// Knowledge retention of `subject` against `base` on the base's answers.
pub fn retention(
    base: &Model,
    subject: &Model,
    encoder: &TextEncoder,
    answers: &[BaseAnswer],
    max_new_tokens: usize,
) -> Result<SuiteReport> {
    let (mut base_sum, mut subject_sum, mut tokens) = (0.0, 0.0, 0usize);
    let mut agreement_sum = 0.0;
    let mut samples = Vec::with_capacity(answers.len());
    let prompts = answers.iter().map(|answer| &answer.prompt);
    let own_answers = answer_each(subject, encoder, prompts, max_new_tokens, &mut |_, _| {})?;
    // Each base answer as a conversation to score, where it holds an assistant token.
    let mut examples = Vec::with_capacity(answers.len());
    for answer in answers {
        let conversation = Conversation::chat(vec![
            Message::new(Role::User, answer.prompt.clone()),
            Message::new(Role::Assistant, answer.text.clone()),
        ]);
        let encoded = encoder.encode_conversation(&conversation)?;
        let (example, _) = data::to_example(&encoded.ids, &encoded.trained, None);
        examples.push((example.loss_tokens() > 0).then_some(example));
    }
    let scored: Vec<Example> = examples.iter().flatten().cloned().collect();
    let base_each = evaluate_each(base, encoder, &scored, EVAL_BATCH)?;
    let subject_each = evaluate_each(subject, encoder, &scored, EVAL_BATCH)?;
    let mut losses = base_each.into_iter().zip(subject_each);
    for ((answer, own), example) in answers.iter().zip(own_answers).zip(&examples) {
        let mut figures = BTreeMap::new();
        if let Some((b, s)) = example.as_ref().and_then(|_| losses.next()) {
            base_sum += b.loss * b.tokens as f64;
            subject_sum += s.loss * s.tokens as f64;
            tokens += b.tokens;
            figures.insert("base_loss".into(), b.loss);
            figures.insert("adapter_loss".into(), s.loss);
        }
        let agreement = token_agreement(&answer.tokens, &own.tokens);
        agreement_sum += agreement;
        figures.insert("token_agreement".into(), agreement);
        samples.push(Sample {
            prompt: answer.prompt.clone(),
            response: own.text,
            reference: Some(answer.text.clone()),
            figures,
            ..Sample::default()
        });
    }
    let count = answers.len().max(1) as f64;
    let (base_loss, subject_loss) = (
        base_sum / tokens.max(1) as f64,
        subject_sum / tokens.max(1) as f64,
    );
    let loss_increase = subject_loss - base_loss;
    let agreement = agreement_sum / count;
    let score = 100.0 * (0.5 * (-loss_increase.max(0.0)).exp() + 0.5 * agreement);
    Ok(SuiteReport {
        suite: Suite::KnowledgeRetention,
        status: SuiteStatus::Completed,
        score: Some(score),
        figures: json!({
            "base_loss": base_loss, "adapter_loss": subject_loss, "loss_increase": loss_increase,
            "relative_loss_change_pct": if base_loss > 0.0 { 100.0 * loss_increase / base_loss } else { 0.0 },
            "token_agreement": agreement, "prompts": answers.len(), "tokens": tokens,
        }),
        samples,
        reason: None,
    })
}

/// The share of positions where two greedy outputs hold the same token, over the longer
/// of the two (1 when both are empty).
pub fn token_agreement(a: &[u32], b: &[u32]) -> f64 {
    let longest = a.len().max(b.len());
    if longest == 0 {
        return 1.0;
    }
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / longest as f64
}
