//! What the agent and the control plane say to each other under `/api/v1/agent/…`.
//! Every call but enrollment carries `Authorization: Bearer <agent secret>`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One GPU as NVML reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct GpuTelemetry {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub utilization_percent: Option<u32>,
    pub memory_used_mb: u64,
    pub memory_total_mb: u64,
    pub temperature_c: Option<u32>,
    pub power_w: Option<f64>,
    pub sm_clock_mhz: Option<u32>,
    /// XID error events seen since the previous heartbeat.
    #[serde(default)]
    pub xid_errors: Vec<u64>,
}

impl GpuTelemetry {
    pub fn memory_free_mb(&self) -> u64 {
        self.memory_total_mb.saturating_sub(self.memory_used_mb)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct HostTelemetry {
    pub cpu_percent: f64,
    pub cpu_count: usize,
    pub memory_used_mb: u64,
    pub memory_total_mb: u64,
    /// Free space on the filesystem holding the agent's work dir.
    pub disk_free_mb: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Capacity {
    /// Can be taken away with a notice: on-demand jobs are never placed here.
    Spot,
    #[default]
    Ondemand,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Heartbeat {
    pub gpus: Vec<GpuTelemetry>,
    pub host: HostTelemetry,
    pub capacity: Capacity,
    /// The attempt the agent is running, if any.
    pub attempt_id: Option<Uuid>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// Seconds until the control plane expects the next heartbeat.
    pub interval_seconds: u64,
    /// True when the agent's current attempt should stop (cancelled or reassigned).
    pub stop_attempt: bool,
    /// With `stop_attempt`: the stop is a budget's cap, not a cancel. Checkpoint after the
    /// step in flight, publish the adapter as of that checkpoint, and end
    /// [`AttemptOutcome::Stopped`].
    #[serde(default)]
    pub publish_adapter: bool,
}

/// Asks for work; the control plane holds the request up to `wait_seconds`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClaimRequest {
    pub wait_seconds: u64,
    pub heartbeat: Heartbeat,
}

/// A job's training hyperparameters: resolved and checked by the control plane (preset
/// plus overrides), carried to the agent, turned into the trainer's options there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hyperparameters {
    pub rank: u32,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub learning_rate: f64,
    pub epochs: u32,
    /// Micro-batch size (halved on an out-of-memory retry).
    pub batch_size: u32,
    pub gradient_accumulation_steps: u32,
    pub max_seq_len: u32,
    pub warmup_ratio: f64,
    pub target_modules: Vec<String>,
    pub seed: u64,
    /// Evaluate on the validation set every this many optimizer steps (default: at each
    /// checkpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_every: Option<u32>,
    /// Stop after this many evaluations in a row without improvement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stopping_patience: Option<u32>,
    /// The validation-loss improvement that counts (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stopping_min_delta: Option<f64>,
    /// The adapter is the best evaluation's, not the last step's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_best: bool,
    /// Training examples packed into rows of `max_seq_len` tokens, each its own sequence.
    /// New jobs pack unless told not to; a job stored before packing existed reads as
    /// unpacked, as it ran, so its checkpoints still resume.
    #[serde(default)]
    pub packing: bool,
    /// How the frozen base's decoder projections are held (QLoRA-style when quantized).
    #[serde(default)]
    pub base_quant: BaseQuant,
    /// Each layer's activations computed again in the backward instead of kept: about a
    /// third more compute for a fraction of the activation memory, the same gradients.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
}

/// How a job's frozen base weights are held (`--base-quant` to the trainer): as they are,
/// or the decoder projections quantized to a GGUF block format. LoRA weights and optimizer
/// state stay f32 either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BaseQuant {
    /// In the base dtype (bf16 or f32).
    #[default]
    #[serde(rename = "none")]
    None,
    /// 8-bit blocks of 32 weights with an f16 scale: 8.5 bits a weight.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// 4-bit k-quant super-blocks of 256 weights: 4.5 bits a weight. Projections whose
    /// input width is not a multiple of 256 fall back to q5_0 (blocks of 32), as
    /// llama.cpp's quantizer does.
    #[serde(rename = "q4k")]
    Q4k,
}

impl BaseQuant {
    pub const NAMES: [&'static str; 3] = ["none", "q8_0", "q4k"];

    pub fn name(self) -> &'static str {
        match self {
            BaseQuant::None => "none",
            BaseQuant::Q8_0 => "q8_0",
            BaseQuant::Q4k => "q4k",
        }
    }

    pub fn is_none(&self) -> bool {
        *self == BaseQuant::None
    }

    /// Bytes a quantized projection weight takes (a block's scales included); `None` when
    /// the weight stays in the base dtype.
    pub fn bytes_per_weight(self) -> Option<f64> {
        match self {
            BaseQuant::None => None,
            BaseQuant::Q8_0 => Some(34.0 / 32.0),
            BaseQuant::Q4k => Some(144.0 / 256.0),
        }
    }
}

impl std::fmt::Display for BaseQuant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for BaseQuant {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        [BaseQuant::None, BaseQuant::Q8_0, BaseQuant::Q4k]
            .into_iter()
            .find(|quant| quant.name() == text)
            .ok_or_else(|| format!("unknown {text:?}; known: {}", BaseQuant::NAMES.join(", ")))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResumePoint {
    pub checkpoint_id: Uuid,
    pub step: u64,
    /// Relative to the API root; download with the agent's secret.
    pub download_path: String,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub attempt_id: Uuid,
    pub attempt_number: u32,
    pub job_id: Uuid,
    pub job_name: String,
    /// A local directory on the agent or a hub id.
    pub base_model: String,
    /// Relative to the API root; download with the agent's secret.
    pub training_file_path: String,
    pub training_file_sha256: String,
    /// The job's validation file (path, SHA-256): validation loss is measured on it
    /// instead of a split of the training file.
    #[serde(default)]
    pub validation_file: Option<(String, String)>,
    pub hyperparameters: Hyperparameters,
    /// Checkpoint every this many optimizer steps (0: only when asked).
    pub checkpoint_every: u32,
    /// Other formats to write the adapter in after training, each uploaded as its own
    /// artifact.
    #[serde(default)]
    pub exports: Vec<ExportFormat>,
    pub resume_from: Option<ResumePoint>,
}

/// A format an adapter can be exported to besides PEFT's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormat {
    /// A llama.cpp LoRA adapter (`llama-cli --lora`), uploaded as `gguf_adapter`.
    Gguf,
}

/// What a claim hands an agent: a training attempt or a validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "work", rename_all = "snake_case")]
pub enum Work {
    Training(Assignment),
    Validation(crate::validation::ValidationAssignment),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Preprocessing,
    ModelLoading,
    Training,
    Finalization,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Preprocessing => "preprocessing",
            Stage::ModelLoading => "model_loading",
            Stage::Training => "training",
            Stage::Finalization => "finalization",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricReport {
    pub step: u64,
    pub total_steps: u64,
    pub epoch: f64,
    pub training_loss: f64,
    pub validation_loss: Option<f64>,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub tokens_per_second: f64,
    pub gpu_utilization: Option<u32>,
    pub memory_used_gb: Option<f64>,
    pub elapsed_seconds: f64,
    pub recorded_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Error,
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 4] = [
        Severity::Info,
        Severity::Warning,
        Severity::Error,
        Severity::Critical,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
            Severity::Critical => "critical",
        }
    }
}

impl std::str::FromStr for Severity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Severity::ALL
            .into_iter()
            .find(|severity| severity.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Severity::ALL.iter().map(|v| v.as_str()).collect();
                format!(
                    "unknown severity {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

impl TryFrom<String> for Severity {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        value.parse()
    }
}

impl std::fmt::Display for Severity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One item of the agent's outbox. `key` is unique per job: an item delivered twice is
/// stored once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Report {
    Stage {
        key: String,
        stage: Stage,
        at: DateTime<Utc>,
    },
    Metric {
        key: String,
        metric: MetricReport,
    },
    Event {
        key: String,
        /// `info`, `warning`, `error` or `checkpoint`.
        event_type: String,
        severity: Severity,
        message: String,
        details: Option<serde_json::Value>,
        at: DateTime<Utc>,
    },
}

impl Report {
    pub fn key(&self) -> &str {
        match self {
            Report::Stage { key, .. } | Report::Metric { key, .. } | Report::Event { key, .. } => {
                key
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportBatch {
    pub reports: Vec<Report>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportReply {
    /// How many of the batch were new (the rest had arrived before).
    pub accepted: usize,
    /// The attempt should stop at the next step boundary.
    pub stop_attempt: bool,
    /// As in [`HeartbeatReply::publish_adapter`].
    #[serde(default)]
    pub publish_adapter: bool,
}

/// Why a trainer run failed, as far as the agent can tell; decides the retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Retried with half the micro-batch and twice the accumulation.
    OutOfMemory,
    /// Bad data: retrying will not help.
    Dataset,
    Other,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum AttemptOutcome {
    Succeeded {
        summary: serde_json::Value,
    },
    Failed {
        kind: FailureKind,
        message: String,
    },
    /// Stopped by a spot notice after checkpointing at `checkpoint_step`.
    Interrupted {
        provider: String,
        notice_deadline: Option<DateTime<Utc>>,
        seconds_used: f64,
        checkpoint_step: Option<u64>,
    },
    Cancelled,
    /// Stopped at the control plane's request (`publish_adapter`) after checkpointing at
    /// `checkpoint_step`; the adapter as of that step was uploaded with the summary.
    Stopped {
        checkpoint_step: Option<u64>,
        summary: serde_json::Value,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    AdapterWeights,
    Checkpoint,
    TrainingReport,
    MetricsExport,
    /// A base model with the adapter merged in.
    FinalModel,
    ValidationReport,
    /// The adapter as a llama.cpp GGUF LoRA adapter.
    GgufAdapter,
}

impl ArtifactKind {
    pub const ALL: [ArtifactKind; 7] = [
        ArtifactKind::AdapterWeights,
        ArtifactKind::Checkpoint,
        ArtifactKind::TrainingReport,
        ArtifactKind::MetricsExport,
        ArtifactKind::FinalModel,
        ArtifactKind::ValidationReport,
        ArtifactKind::GgufAdapter,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactKind::AdapterWeights => "adapter_weights",
            ArtifactKind::Checkpoint => "checkpoint",
            ArtifactKind::TrainingReport => "training_report",
            ArtifactKind::MetricsExport => "metrics_export",
            ArtifactKind::FinalModel => "final_model",
            ArtifactKind::ValidationReport => "validation_report",
            ArtifactKind::GgufAdapter => "gguf_adapter",
        }
    }
}

impl TryFrom<String> for ArtifactKind {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        ArtifactKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == value)
            .ok_or_else(|| format!("unknown artifact kind {value:?}"))
    }
}

/// Query of `PUT /agent/attempts/{id}/artifacts`; the body is the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactUpload {
    pub kind: ArtifactKind,
    pub name: String,
    pub sha256: String,
    pub step: Option<u64>,
    pub epoch: Option<u64>,
}
