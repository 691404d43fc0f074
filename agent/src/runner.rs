//! Runs one assignment: fetch the data (and the checkpoint to resume from), train
//! in-process on a blocking thread, stream progress through the outbox, upload
//! checkpoints and the adapter, and end the attempt: succeeded, failed, cancelled,
//! interrupted by a spot notice after a checkpoint at the next step boundary, or stopped
//! at a budget's cap after such a checkpoint, with the adapter of that step published.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::Utc;
use protocol::agent::{
    ArtifactKind, ArtifactUpload, Assignment, AttemptOutcome, ExportFormat, FailureKind,
    GpuTelemetry, Hyperparameters, MetricReport, Report, Severity, Stage,
};
use tokio::sync::mpsc;
use trainer::quantized::QuantizationReport;
use trainer::train::{Control, DeviceChoice, Observer, PackingPlan, StepMetrics, TrainOptions};
use trainer::TrainerError;

use crate::client::{sha256_file, ControlPlane};
use crate::config::{AgentConfig, Device};
use crate::error::{AgentError, Result};
use crate::outbox::Outbox;
use crate::spot::{self, Notice, Notices};
use crate::telemetry::process_memory_gib;

/// The latest GPU reading, shared with the heartbeat loop, for per-step metrics.
pub type LatestGpu = Arc<Mutex<Option<GpuTelemetry>>>;

/// How the running attempt is asked to stop from outside the runner: a plain stop (a
/// cancel from a heartbeat, Ctrl-C), or a stop that keeps the work (a budget's cap).
#[derive(Default)]
pub struct StopSignal {
    notify: tokio::sync::Notify,
    publish_adapter: AtomicBool,
}

impl StopSignal {
    pub fn stop(&self, publish_adapter: bool) {
        if publish_adapter {
            self.publish_adapter.store(true, Ordering::SeqCst);
        }
        self.notify.notify_waiters();
    }

    /// Waits for a stop; whether it asks for the adapter to be published.
    async fn stopped(&self) -> bool {
        self.notify.notified().await;
        self.publish_adapter.swap(false, Ordering::SeqCst)
    }
}

/// Stops training after the step in flight. A stop that publishes the adapter first asks
/// for a checkpoint of that step, as a spot notice does.
fn stop_training(control: &Control, publish: &AtomicBool, publish_adapter: bool) {
    if publish_adapter {
        publish.store(true, Ordering::SeqCst);
        control.request_checkpoint();
    }
    control.cancel();
}

/// How an attempt ended on this host.
pub enum Ended {
    Normally,
    /// The host is going away: stop taking work.
    Interrupted,
}

/// Forwards the trainer's progress into the outbox and checkpoints to the uploader.
struct Reporter {
    outbox: Outbox,
    checkpoints: mpsc::UnboundedSender<(usize, PathBuf)>,
    latest_gpu: LatestGpu,
    warnings: usize,
    notices: usize,
}

impl Reporter {
    fn push_notice(&mut self, message: String, details: Option<serde_json::Value>) {
        self.notices += 1;
        self.outbox.push(Report::Event {
            key: format!("notice-{}", self.notices),
            event_type: "info".into(),
            severity: Severity::Info,
            message,
            details,
            at: Utc::now(),
        });
    }
}

impl Observer for Reporter {
    fn stage(&mut self, stage: Stage) {
        self.outbox.push(Report::Stage {
            key: format!("stage-{}", stage.as_str()),
            stage,
            at: Utc::now(),
        });
    }

    fn step(&mut self, m: &StepMetrics) {
        let gpu = self
            .latest_gpu
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default();
        self.outbox.push(Report::Metric {
            key: format!("step-{}", m.step),
            metric: MetricReport {
                step: m.step as u64,
                total_steps: m.total_steps as u64,
                epoch: m.epoch,
                training_loss: m.loss,
                validation_loss: m.validation_loss,
                learning_rate: m.learning_rate,
                grad_norm: m.grad_norm,
                tokens_per_second: m.tokens_per_second,
                gpu_utilization: gpu.as_ref().and_then(|g| g.utilization_percent),
                memory_used_gb: match &gpu {
                    Some(g) => Some(g.memory_used_mb as f64 / 1024.0),
                    None => process_memory_gib(),
                },
                elapsed_seconds: m.elapsed_seconds,
                recorded_at: Utc::now(),
            },
        });
    }

    fn warning(&mut self, message: &str) {
        self.warnings += 1;
        self.outbox.push(Report::Event {
            key: format!("warning-{}", self.warnings),
            event_type: "warning".into(),
            severity: Severity::Warning,
            message: message.to_owned(),
            details: None,
            at: Utc::now(),
        });
    }

    fn notice(&mut self, message: &str) {
        self.push_notice(message.to_owned(), None);
    }

    /// With its figures as details, which the job page shows.
    fn packed(&mut self, plan: &PackingPlan) {
        self.push_notice(plan.message(), serde_json::to_value(plan).ok());
    }

    /// With the held and full-precision sizes as details, which the job page shows.
    fn quantized(&mut self, report: &QuantizationReport) {
        self.push_notice(report.message(), serde_json::to_value(report).ok());
    }

    fn checkpoint(&mut self, step: usize, dir: &Path) {
        let _ = self.checkpoints.send((step, dir.to_path_buf()));
    }
}

pub(crate) fn device(config: &AgentConfig, has_gpu: bool) -> DeviceChoice {
    match config.device {
        Device::Cpu => DeviceChoice::Cpu,
        Device::Cuda => DeviceChoice::Cuda,
        Device::Auto if cfg!(feature = "cuda") && has_gpu => DeviceChoice::Cuda,
        Device::Auto => DeviceChoice::Cpu,
    }
}

pub(crate) fn classify(error: &TrainerError) -> FailureKind {
    let text = error.to_string().to_ascii_lowercase();
    if matches!(error, TrainerError::OutOfMemory(_)) {
        FailureKind::OutOfMemory
    } else if matches!(error, TrainerError::Dataset { .. })
        || text.contains("no training examples")
        || text.contains("no conversation")
    {
        FailureKind::Dataset
    } else {
        FailureKind::Other
    }
}

/// Packs a checkpoint directory into `<dir>.tar`; returns the archive and its SHA-256.
fn archive(dir: &Path) -> Result<(PathBuf, String)> {
    let target = dir.with_extension("tar");
    let file = std::fs::File::create(&target).map_err(|e| AgentError::io(&target, e))?;
    let mut builder = tar::Builder::new(file);
    let name = dir.file_name().map(PathBuf::from).unwrap_or_default();
    builder
        .append_dir_all(&name, dir)
        .and_then(|_| builder.finish())
        .map_err(|e| AgentError::io(dir, e))?;
    let sha = sha256_file(&target)?;
    Ok((target, sha))
}

fn unpack(archive: &Path, into: &Path) -> Result<PathBuf> {
    let file = std::fs::File::open(archive).map_err(|e| AgentError::io(archive, e))?;
    tar::Archive::new(file)
        .unpack(into)
        .map_err(|e| AgentError::io(archive, e))?;
    let entry = std::fs::read_dir(into)
        .map_err(|e| AgentError::io(into, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .ok_or_else(|| AgentError::Config(format!("{} holds no checkpoint", archive.display())))?;
    Ok(entry)
}

async fn upload_checkpoint(
    client: &ControlPlane,
    attempt: uuid::Uuid,
    step: usize,
    dir: PathBuf,
) -> Result<()> {
    let (tar, sha256) = tokio::task::spawn_blocking(move || archive(&dir))
        .await
        .map_err(|e| AgentError::Config(format!("archiving a checkpoint: {e}")))??;
    client
        .upload(
            attempt,
            &tar,
            &ArtifactUpload {
                kind: ArtifactKind::Checkpoint,
                name: format!("checkpoint-step-{step}.tar"),
                sha256,
                step: Some(step as u64),
                epoch: None,
            },
        )
        .await?;
    let _ = tokio::fs::remove_file(&tar).await;
    Ok(())
}

/// Writes the adapter in the formats the job asked for besides PEFT's, next to it. A
/// failed export is a warning on the job, never a failed run: the PEFT adapter stands.
fn export_adapter(options: &TrainOptions, exports: &[ExportFormat], outbox: &Outbox) {
    for format in exports {
        match format {
            ExportFormat::Gguf => {
                // The base model as training resolved it (a hub id is in the cache now).
                let written = trainer::hub::resolve_model(&options.model).and_then(|model| {
                    trainer::gguf::export_lora(
                        &options.out.join("adapter"),
                        &model,
                        &options.out.join(GGUF_ADAPTER),
                        trainer::gguf::GgufDtype::F16,
                    )
                });
                if let Err(error) = written {
                    tracing::warn!(%error, "GGUF export failed");
                    outbox.push(Report::Event {
                        key: "gguf-export".into(),
                        event_type: "warning".into(),
                        severity: Severity::Warning,
                        message: format!("The GGUF export failed: {error}"),
                        details: None,
                        at: Utc::now(),
                    });
                }
            }
        }
    }
}

/// The GGUF adapter's file name in the attempt's output directory.
const GGUF_ADAPTER: &str = "adapter.gguf";

async fn upload_outputs(client: &ControlPlane, attempt: uuid::Uuid, out: &Path) -> Result<()> {
    let files = [
        (
            "adapter/adapter_model.safetensors",
            ArtifactKind::AdapterWeights,
        ),
        ("adapter/adapter_config.json", ArtifactKind::AdapterWeights),
        ("summary.json", ArtifactKind::TrainingReport),
        ("metrics.jsonl", ArtifactKind::MetricsExport),
        (GGUF_ADAPTER, ArtifactKind::GgufAdapter),
    ];
    for (relative, kind) in files {
        let path = out.join(relative);
        if !path.exists() {
            continue;
        }
        let sha256 = sha256_file(&path)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        client
            .upload(
                attempt,
                &path,
                &ArtifactUpload {
                    kind,
                    name,
                    sha256,
                    step: None,
                    epoch: None,
                },
            )
            .await?;
    }
    Ok(())
}

/// Runs `assignment` to its end and reports that end to the control plane.
pub async fn run(
    config: &AgentConfig,
    client: &ControlPlane,
    assignment: Assignment,
    mut notices: Notices,
    latest_gpu: LatestGpu,
    stop: Arc<StopSignal>,
) -> Result<Ended> {
    let attempt = assignment.attempt_id;
    let dir = config.attempt_dir(attempt);
    std::fs::create_dir_all(&dir).map_err(|e| AgentError::io(&dir, e))?;
    let outbox = Outbox::open(&config.outbox_dir(), attempt)?;
    let control = Arc::new(Control::default());
    // Set when a stop asks for the adapter as of its checkpoint (a budget's cap).
    let publish = Arc::new(AtomicBool::new(false));
    tracing::info!(job = %assignment.job_name, attempt = assignment.attempt_number, "attempt started");

    // Delivery runs for the whole attempt; a stop from the control plane cancels training.
    let delivery = {
        let (outbox, client) = (outbox.clone(), client.clone());
        let (control, publish) = (control.clone(), publish.clone());
        tokio::spawn(async move {
            outbox
                .deliver(&client, |delivery| {
                    if delivery.stop_attempt {
                        stop_training(&control, &publish, delivery.publish_adapter);
                    }
                })
                .await
        })
    };
    let stop_watch = {
        let (control, publish, stop) = (control.clone(), publish.clone(), stop.clone());
        tokio::spawn(async move {
            let publish_adapter = stop.stopped().await;
            stop_training(&control, &publish, publish_adapter);
        })
    };

    let has_gpu = latest_gpu.lock().map(|g| g.is_some()).unwrap_or(false);
    let prepared = prepare(config, client, &assignment, &dir, has_gpu).await;
    let options = match prepared {
        Ok(options) => options,
        Err(error) => {
            outbox.close();
            let _ = delivery.await;
            stop_watch.abort();
            let kind = match &error {
                AgentError::Trainer(e) => classify(e),
                _ => FailureKind::Other,
            };
            client
                .finish(
                    attempt,
                    &AttemptOutcome::Failed {
                        kind,
                        message: error.to_string(),
                    },
                )
                .await?;
            Outbox::remove(&config.outbox_dir(), attempt);
            return Ok(Ended::Normally);
        }
    };

    let (checkpoint_sender, mut checkpoint_receiver) = mpsc::unbounded_channel();
    let training = {
        let mut reporter = Reporter {
            outbox: outbox.clone(),
            checkpoints: checkpoint_sender,
            latest_gpu,
            warnings: 0,
            notices: 0,
        };
        let control = control.clone();
        let options = options.clone();
        tokio::task::spawn_blocking(move || {
            trainer::train::train(&options, &mut reporter, &control)
        })
    };
    tokio::pin!(training);

    let mut notice: Option<Notice> = None;
    let mut last_checkpoint: Option<usize> = None;
    let result = loop {
        tokio::select! {
            result = &mut training => break result,
            Some((step, path)) = checkpoint_receiver.recv() => {
                upload_checkpoint(client, attempt, step, path).await?;
                last_checkpoint = Some(step);
            }
            changed = notices.changed(), if notice.is_none() => {
                if changed.is_err() { continue; }
                if let Some(received) = notices.borrow().clone() {
                    tracing::warn!(provider = received.provider, "notice received: checkpointing at the next step boundary");
                    outbox.push(Report::Event {
                        key: "spot-notice".into(),
                        event_type: "warning".into(),
                        severity: Severity::Warning,
                        message: format!("Interruption notice from {}: checkpointing at the next step boundary", received.provider),
                        details: Some(serde_json::json!({"provider": received.provider, "deadline": received.deadline})),
                        at: Utc::now(),
                    });
                    // Checkpoint after the step in flight, then stop before the next.
                    control.request_checkpoint();
                    control.cancel();
                    notice = Some(received);
                }
            }
        }
    };
    // Checkpoints written in the last step are uploaded before anything is reported.
    while let Ok((step, path)) = checkpoint_receiver.try_recv() {
        upload_checkpoint(client, attempt, step, path).await?;
        last_checkpoint = Some(step);
    }
    stop_watch.abort();
    let result =
        result.map_err(|e| AgentError::Config(format!("the trainer thread failed: {e}")))?;

    let (outcome, ended) = match (result, &notice) {
        (Ok(_), Some(notice)) => (
            AttemptOutcome::Interrupted {
                provider: notice.provider.to_owned(),
                notice_deadline: notice.deadline,
                seconds_used: notice.received_at.elapsed().as_secs_f64(),
                checkpoint_step: last_checkpoint.map(|s| s as u64),
            },
            Ended::Interrupted,
        ),
        (Ok(summary), None) if summary.cancelled && publish.load(Ordering::SeqCst) => {
            // The trainer saved the adapter of its last step, the step it checkpointed;
            // with no new checkpoint (stopped before a step) there is nothing to publish.
            if last_checkpoint.is_some() {
                export_adapter(&options, &assignment.exports, &outbox);
                upload_outputs(client, attempt, &options.out).await?;
            }
            (
                AttemptOutcome::Stopped {
                    checkpoint_step: last_checkpoint.map(|s| s as u64),
                    summary: serde_json::to_value(&summary)?,
                },
                Ended::Normally,
            )
        }
        (Ok(summary), None) if summary.cancelled => (AttemptOutcome::Cancelled, Ended::Normally),
        (Ok(summary), None) => {
            export_adapter(&options, &assignment.exports, &outbox);
            upload_outputs(client, attempt, &options.out).await?;
            (
                AttemptOutcome::Succeeded {
                    summary: serde_json::to_value(&summary)?,
                },
                Ended::Normally,
            )
        }
        (Err(error), _) => {
            tracing::error!(%error, "training failed");
            (
                AttemptOutcome::Failed {
                    kind: classify(&error),
                    message: error.to_string(),
                },
                Ended::Normally,
            )
        }
    };
    // Every report reaches the control plane before the attempt's end does.
    outbox.close();
    let _ = delivery.await;
    let started = Instant::now();
    client.finish(attempt, &outcome).await?;
    if let Some(notice) = &notice {
        spot::acknowledge(config, notice).await;
    }
    tracing::info!(
        attempt = assignment.attempt_number,
        ms = started.elapsed().as_millis() as u64,
        "attempt reported"
    );
    Outbox::remove(&config.outbox_dir(), attempt);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ended)
}

/// Downloads what the attempt needs and builds the trainer's options.
async fn prepare(
    config: &AgentConfig,
    client: &ControlPlane,
    assignment: &Assignment,
    dir: &Path,
    has_gpu: bool,
) -> Result<TrainOptions> {
    let data = dir.join("training-data");
    client
        .download(
            &assignment.training_file_path,
            &data,
            &assignment.training_file_sha256,
        )
        .await?;
    let val_data = match &assignment.validation_file {
        Some((path, sha256)) => {
            let target = dir.join("validation-data");
            client.download(path, &target, sha256).await?;
            Some(target)
        }
        None => None,
    };
    let resume_from = match &assignment.resume_from {
        Some(point) => {
            let archive = dir.join("resume.tar");
            client
                .download(&point.download_path, &archive, &point.sha256)
                .await?;
            let into = dir.join("resume");
            let unpacked = tokio::task::spawn_blocking(move || unpack(&archive, &into))
                .await
                .map_err(|e| AgentError::Config(format!("unpacking a checkpoint: {e}")))??;
            Some(unpacked)
        }
        None => None,
    };
    let checkpoint_every =
        (assignment.checkpoint_every > 0).then_some(assignment.checkpoint_every as usize);
    let mut options = train_options(
        &assignment.hyperparameters,
        Path::new(&assignment.base_model),
        &data,
        &dir.join("out"),
        checkpoint_every,
        resume_from,
        device(config, has_gpu),
    );
    options.val_data = val_data;
    Ok(options)
}

/// The trainer's options for a job's hyperparameters: what every agent runs for them.
pub fn train_options(
    recipe: &Hyperparameters,
    model: &Path,
    data: &Path,
    out: &Path,
    checkpoint_every: Option<usize>,
    resume_from: Option<PathBuf>,
    device: DeviceChoice,
) -> TrainOptions {
    TrainOptions {
        model: model.to_path_buf(),
        data: data.to_path_buf(),
        out: out.to_path_buf(),
        rank: recipe.rank as usize,
        alpha: recipe.lora_alpha,
        dropout: recipe.lora_dropout,
        target_modules: recipe.target_modules.clone(),
        lr: recipe.learning_rate,
        epochs: recipe.epochs as usize,
        batch_size: recipe.batch_size as usize,
        grad_accum: recipe.gradient_accumulation_steps as usize,
        max_seq_len: recipe.max_seq_len as usize,
        warmup_ratio: recipe.warmup_ratio,
        seed: recipe.seed,
        eval_every: recipe.eval_every.map(|n| n as usize).or(checkpoint_every),
        checkpoint_every,
        resume_from,
        device,
        keep_best: recipe.keep_best,
        early_stopping_patience: recipe.early_stopping_patience.map(|n| n as usize),
        early_stopping_min_delta: recipe.early_stopping_min_delta.unwrap_or(0.0),
        packing: recipe.packing,
        base_quant: recipe.base_quant,
        gradient_checkpointing: recipe.gradient_checkpointing,
        ..TrainOptions::default()
    }
}
