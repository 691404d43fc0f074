//! Quality validation (stage 6): the suites, the work an agent claims to run them, and
//! the results it posts. The control plane adds the judge's scores, the gates and the
//! verdict; the trainer computes every figure from the model.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::agent::FailureKind;

/// One measurement of a fine-tuned model. Every suite reports figures, a score from 0 to
/// 100 and the samples the figures come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Suite {
    /// Base and adapter perplexity on the validation examples' assistant tokens.
    Perplexity,
    /// How much of the base model's general behaviour the adapter keeps.
    KnowledgeRetention,
    /// Generated replies against the reference replies and the training set's style.
    VoiceConsistency,
    /// Empathy, clarity and appropriateness of generated replies, scored by a judge model.
    EmotionalIntelligence,
    /// Whether generations end with the template's end-of-turn token.
    StopBehaviour,
}

impl Suite {
    pub const ALL: [Suite; 5] = [
        Suite::Perplexity,
        Suite::KnowledgeRetention,
        Suite::VoiceConsistency,
        Suite::EmotionalIntelligence,
        Suite::StopBehaviour,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Suite::Perplexity => "perplexity",
            Suite::KnowledgeRetention => "knowledge_retention",
            Suite::VoiceConsistency => "voice_consistency",
            Suite::EmotionalIntelligence => "emotional_intelligence",
            Suite::StopBehaviour => "stop_behaviour",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Suite::Perplexity => "Perplexity",
            Suite::KnowledgeRetention => "Knowledge retention",
            Suite::VoiceConsistency => "Voice consistency",
            Suite::EmotionalIntelligence => "Emotional intelligence",
            Suite::StopBehaviour => "Stop behaviour",
        }
    }

    /// Whether the suite needs replies generated for the validation prompts.
    pub fn generates_replies(self) -> bool {
        matches!(
            self,
            Suite::VoiceConsistency | Suite::EmotionalIntelligence | Suite::StopBehaviour
        )
    }
}

impl std::str::FromStr for Suite {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Suite::ALL
            .into_iter()
            .find(|suite| suite.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Suite::ALL.iter().map(|v| v.as_str()).collect();
                format!(
                    "unknown test suite {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

impl std::fmt::Display for Suite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SuiteStatus {
    Completed,
    /// Not run, with the reason (no judge configured, say).
    Skipped,
    /// Run and failed, with the error (a judge that timed out, say).
    Failed,
    /// The agent generated the replies; the control plane's judge scores them.
    AwaitingJudge,
}

impl SuiteStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SuiteStatus::Completed => "completed",
            SuiteStatus::Skipped => "skipped",
            SuiteStatus::Failed => "failed",
            SuiteStatus::AwaitingJudge => "awaiting_judge",
        }
    }
}

/// One prompt the suite ran, what the model answered, and the figures of that answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Sample {
    pub prompt: String,
    pub response: String,
    /// The reply the data holds (voice), or the base model's answer (retention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// `persona` and `emotional_arc` of the conversation, where it has them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub figures: BTreeMap<String, f64>,
    /// The judge's raw answer (emotional intelligence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge_answer: Option<String>,
}

/// The result of one suite on one adapter. `figures` is suite-specific (README: "Quality
/// validation" documents each suite's keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuiteReport {
    pub suite: Suite,
    pub status: SuiteStatus,
    /// 0 to 100; none unless completed.
    pub score: Option<f64>,
    pub figures: serde_json::Value,
    pub samples: Vec<Sample>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl SuiteReport {
    pub fn skipped(suite: Suite, reason: impl Into<String>) -> SuiteReport {
        SuiteReport {
            suite,
            status: SuiteStatus::Skipped,
            score: None,
            figures: serde_json::Value::Object(Default::default()),
            samples: Vec::new(),
            reason: Some(reason.into()),
        }
    }

    /// A number among the figures, by key.
    pub fn figure(&self, key: &str) -> Option<f64> {
        self.figures.get(key).and_then(serde_json::Value::as_f64)
    }
}

/// A file the agent downloads (relative to the API root, with the agent's secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRef {
    pub name: String,
    pub download_path: String,
    pub sha256: String,
}

/// Which examples a validation used, so that it can be reproduced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExamplesUsed {
    /// `validation_file` (every usable record of the job's validation file) or
    /// `training_split` (the trainer's seeded split of the training file).
    pub source: String,
    pub file_sha256: String,
    /// 1-based lines of the records used, in order.
    pub lines: Vec<u64>,
    /// Of those, the lines whose replies were generated (the first `max_samples`).
    pub generated_lines: Vec<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Split>,
}

/// The trainer's validation split: a seeded, shuffled fraction of the usable records.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Split {
    pub fraction: f64,
    pub seed: u64,
}

/// An adapter to validate: its job and its files (`adapter_config.json` and the weights).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterRef {
    pub job_id: Uuid,
    pub job_name: String,
    pub files: Vec<FileRef>,
}

/// Work of the kind `validation`: run `suites` on a completed job's adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationAssignment {
    pub validation_id: Uuid,
    pub base_model: String,
    pub adapter: AdapterRef,
    /// Run the same suites on this adapter over the same examples.
    pub baseline: Option<AdapterRef>,
    /// The examples: the job's validation file, or its training file with `split`.
    pub data: FileRef,
    pub split: Option<Split>,
    /// The training file: the style profile voice consistency compares with.
    pub training_data: FileRef,
    /// A chat dataset whose first user turns are knowledge retention's prompts (none: the
    /// trainer's built-in general prompts).
    #[serde(default)]
    pub retention_prompts: Option<FileRef>,
    pub suites: Vec<Suite>,
    /// Caps on prompts generated for and on new tokens per generation.
    pub max_samples: u32,
    pub max_new_tokens: u32,
    pub max_seq_len: u32,
}

/// Progress of a validation, posted by the agent as it goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationProgress {
    pub suite: Option<Suite>,
    pub message: String,
    pub done: u32,
    pub total: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationResults {
    pub adapter: Vec<SuiteReport>,
    pub baseline: Option<Vec<SuiteReport>>,
    pub examples: ExamplesUsed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ValidationOutcome {
    Completed { results: ValidationResults },
    Failed { kind: FailureKind, message: String },
}
