//! Quality validation (stage 6): runs queued on completed jobs, claimed by agents like
//! training attempts, scored by the judge where configured, judged by the gates, and
//! exported as JSON, CSV or PDF through the signed-link artifact path. A lost agent's run
//! goes back to the queue; a bad input fails it with the trainer's message.

use chrono::{DateTime, Duration, Utc};
use protocol::agent::ArtifactKind;
use protocol::validation::{
    AdapterRef, FileRef, Split, Suite, ValidationAssignment, ValidationOutcome, ValidationProgress,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use uuid::Uuid;

use super::artifact::{signed_download, DownloadLink};
use super::job::visible_job;
use super::{AppState, CurrentUser, ServiceError, ServiceResult};
use crate::db::agents::Agent;
use crate::db::artifacts::{self, Artifact};
use crate::db::events::{self, Event};
use crate::db::files::{self, TrainingFile};
use crate::db::jobs::{self, Job};
use crate::db::now;
use crate::db::validations::{self, Completion, NewRun, RunStatus, ValidationRun};
use crate::domain::validation::{
    apply_gate_overrides, comparison, judge_gates, overall_score, parse_suites, recommendations,
    verdict, Gates,
};
use crate::domain::{EventType, FieldError, JobStatus, Severity};
use crate::live::JobUpdate;
use crate::storage::Download;

/// A lost agent's run is queued again at most this many times, then fails.
const MAX_CLAIMS: i64 = 3;

/// `POST /validation/{job_id}/run`, and a job's `validate_on_completion`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// perplexity, knowledge_retention, voice_consistency, emotional_intelligence,
    /// stop_behaviour.
    pub test_suites: Vec<String>,
    /// Another completed job of yours, on the same base model: the same suites run on
    /// its adapter over the same examples.
    #[serde(default)]
    pub comparison_baseline: Option<Uuid>,
    /// One of your training files whose conversations' first user turns are knowledge
    /// retention's prompts (default: 55 built-in general prompts).
    #[serde(default)]
    pub retention_file_id: Option<Uuid>,
    /// Gate overrides, such as {"stop_rate": 0.9} or {"stop_rate": {"pass": 0.95, "warn": 0.8}}.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub gates: Option<Map<String, Value>>,
    /// Prompts generated for per suite (default `validation.default_samples`).
    #[serde(default)]
    pub max_samples: Option<u32>,
    /// New tokens per generated reply (default `validation.default_new_tokens`).
    #[serde(default)]
    pub max_new_tokens: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    pub validation_id: Uuid,
    pub status: RunStatus,
    /// A rough guess: one minute plus a few seconds per generated reply.
    pub estimated_completion: DateTime<Utc>,
}

/// A request checked against the configuration: suites, gates and caps.
pub struct Checked {
    pub suites: Vec<Suite>,
    pub gates: Gates,
    pub max_samples: u32,
    pub max_new_tokens: u32,
}

/// Checks a request (or a job's `validate_on_completion`), every bad field named.
pub fn check_request(
    state: &AppState,
    request: &RunRequest,
    job_gates: Option<&Map<String, Value>>,
) -> ServiceResult<Checked> {
    let settings = &state.settings.validation;
    let mut errors = Vec::new();
    let suites = parse_suites(&request.test_suites, "test_suites").unwrap_or_else(|e| {
        errors.extend(e);
        Vec::new()
    });
    let mut gates = settings.gates.clone();
    for (overrides, field) in [
        (job_gates, "validate_on_completion.gates"),
        (request.gates.as_ref(), "gates"),
    ] {
        if let Some(overrides) = overrides {
            if let Err(e) = apply_gate_overrides(&mut gates, overrides, field) {
                errors.extend(e);
            }
        }
    }
    let max_samples = request.max_samples.unwrap_or(settings.default_samples);
    if !(1..=settings.max_samples).contains(&max_samples) {
        errors.push(FieldError::new(
            "max_samples",
            format!(
                "must be between 1 and {} (validation.max_samples)",
                settings.max_samples
            ),
        ));
    }
    let max_new_tokens = request
        .max_new_tokens
        .unwrap_or(settings.default_new_tokens);
    if !(1..=settings.max_new_tokens).contains(&max_new_tokens) {
        errors.push(FieldError::new(
            "max_new_tokens",
            format!(
                "must be between 1 and {} (validation.max_new_tokens)",
                settings.max_new_tokens
            ),
        ));
    }
    if errors.is_empty() {
        Ok(Checked {
            suites,
            gates,
            max_samples,
            max_new_tokens,
        })
    } else {
        Err(ServiceError::Validation(errors))
    }
}

fn validation_event(job_id: Uuid, severity: Severity, message: String, details: Value) -> Event {
    let mut event = Event::new(job_id, EventType::Info, severity, message).with_details(details);
    event.source = Some("validation".into());
    event
}

/// The job's validate-on-completion settings, if it has them.
fn job_validation_settings(job: &Job) -> Option<RunRequest> {
    job.validate_on_completion
        .as_ref()
        .and_then(|json| serde_json::from_value(json.0.clone()).ok())
}

/// Queues a validation of one of the user's completed jobs.
pub async fn request_run(
    state: &AppState,
    user: &CurrentUser,
    job_id: Uuid,
    request: &RunRequest,
) -> ServiceResult<Accepted> {
    let job = visible_job(state, user, job_id).await?;
    let baseline = match request.comparison_baseline {
        Some(id) => Some(
            visible_job(state, user, id)
                .await
                .map_err(|_| ServiceError::NotFound("comparison baseline"))?,
        ),
        None => None,
    };
    let job_gates = job_validation_settings(&job).and_then(|r| r.gates);
    let checked = check_request(state, request, job_gates.as_ref())?;
    if let Some(file) = request.retention_file_id {
        check_validation_file(state, job.user_id, file).await?;
    }
    let run = enqueue(
        state,
        &job,
        baseline.as_ref(),
        request.retention_file_id,
        &checked,
        false,
    )
    .await?;
    Ok(accepted(&run))
}

fn accepted(run: &ValidationRun) -> Accepted {
    let generating = run
        .test_suites
        .0
        .iter()
        .filter(|s| s.generates_replies())
        .count() as i64;
    let baseline = if run.comparison_baseline_id.is_some() {
        2
    } else {
        1
    };
    let seconds = 60 + 2 * run.max_samples * (generating.min(1) + 1) * baseline;
    Accepted {
        validation_id: run.id,
        status: run.status,
        estimated_completion: run.created_at + Duration::seconds(seconds),
    }
}

async fn enqueue(
    state: &AppState,
    job: &Job,
    baseline: Option<&Job>,
    retention_file: Option<Uuid>,
    checked: &Checked,
    automatic: bool,
) -> ServiceResult<ValidationRun> {
    if job.status != JobStatus::Completed {
        return Err(ServiceError::Conflict(format!(
            "job \"{}\" is {}; only a completed job can be validated",
            job.name,
            job.status.as_str()
        )));
    }
    if let Some(baseline) = baseline {
        if baseline.id == job.id {
            return Err(unprocessable(
                "comparison_baseline must be another job".into(),
            ));
        }
        if baseline.status != JobStatus::Completed {
            return Err(ServiceError::Conflict(format!(
                "comparison baseline \"{}\" is {}; only a completed job can be compared",
                baseline.name,
                baseline.status.as_str()
            )));
        }
        if baseline.base_model != job.base_model {
            return Err(unprocessable(format!(
                "comparison baseline \"{}\" was trained on {}, not {}: only adapters of the same base model compare",
                baseline.name, baseline.base_model, job.base_model
            )));
        }
    }
    let run = validations::insert(
        &state.db,
        NewRun {
            job_id: job.id,
            user_id: job.user_id,
            suites: &checked.suites,
            baseline: baseline.map(|b| b.id),
            retention_file,
            gates: &checked.gates,
            max_samples: checked.max_samples,
            max_new_tokens: checked.max_new_tokens,
            automatic,
        },
    )
    .await?;
    let names: Vec<&str> = checked.suites.iter().map(|s| s.as_str()).collect();
    let event = validation_event(
        job.id,
        Severity::Info,
        format!(
            "Validation queued{}: {}",
            if automatic { " on completion" } else { "" },
            names.join(", ")
        ),
        json!({"validation_id": run.id, "test_suites": names, "comparison_baseline": run.comparison_baseline_id}),
    );
    publish(state, &run, Some(event)).await?;
    state.work_available.notify_waiters();
    Ok(run)
}

fn unprocessable(message: String) -> ServiceError {
    ServiceError::Unprocessable {
        message: message.clone(),
        rules: vec![message],
    }
}

/// Stores `event` (if any) and sends the run's state to the job's live subscribers.
async fn publish(state: &AppState, run: &ValidationRun, event: Option<Event>) -> ServiceResult<()> {
    let mut updates = vec![JobUpdate::Validation {
        job_id: run.job_id,
        validation: Box::new(live_summary(run)),
    }];
    if let Some(event) = event {
        events::insert(&state.db, &event).await?;
        updates.push(JobUpdate::Event {
            event: Box::new(event),
        });
    }
    state.live.publish_all(updates).await;
    Ok(())
}

/// What a live update carries: small enough for a PostgreSQL notification.
pub fn live_summary(run: &ValidationRun) -> Value {
    json!({
        "id": run.id, "job_id": run.job_id, "status": run.status,
        "progress": run.progress.as_ref().map(|p| &p.0),
        "overall_status": run.overall_status, "overall_score": run.overall_score,
        "error_message": run.error_message,
    })
}

/// Queues the validation a job asked for when its training ended (if it asked).
pub async fn after_training(state: &AppState, job: &Job) -> ServiceResult<()> {
    let Some(request) = job_validation_settings(job) else {
        return Ok(());
    };
    let checked = match check_request(state, &request, None) {
        Ok(checked) => checked,
        Err(error) => {
            tracing::warn!(job_id = %job.id, %error, "the job's validate_on_completion no longer checks");
            return Ok(());
        }
    };
    let baseline = match request.comparison_baseline {
        Some(id) => jobs::get_any(&state.db, id)
            .await?
            .filter(|b| b.user_id == job.user_id),
        None => None,
    };
    let retention_file = match request.retention_file_id {
        Some(id) => files::get_owned(&state.db, id, job.user_id)
            .await?
            .map(|f| f.id),
        None => None,
    };
    enqueue(
        state,
        job,
        baseline.as_ref(),
        retention_file,
        &checked,
        true,
    )
    .await?;
    Ok(())
}

/// One of `user_id`'s enriched training files, to validate on.
pub async fn check_validation_file(state: &AppState, user_id: Uuid, id: Uuid) -> ServiceResult<()> {
    let file = files::get_owned(&state.db, id, user_id)
        .await?
        .ok_or(ServiceError::NotFound("validation file"))?;
    if file.enrichment_status != crate::domain::EnrichmentStatus::Completed {
        return Err(ServiceError::Validation(vec![FieldError::new(
            "validation_file_id",
            format!("training file \"{}\" is not enriched yet", file.name),
        )]));
    }
    Ok(())
}

/// Stores a job's validation file and what to validate on completion (each checked by
/// the caller); one not given keeps the job's.
pub async fn set_job_settings(
    state: &AppState,
    job: &Job,
    validation_file_id: Option<Uuid>,
    on_completion: Option<&RunRequest>,
) -> ServiceResult<Job> {
    let on_completion = on_completion
        .map(serde_json::to_value)
        .transpose()
        .map_err(|e| ServiceError::Internal(e.to_string()))?;
    Ok(jobs::set_validation_settings(
        &state.db,
        job.id,
        validation_file_id.or(job.validation_file_id),
        on_completion
            .as_ref()
            .or(job.validate_on_completion.as_ref().map(|j| &j.0)),
    )
    .await?)
}

fn adapter_files(artifacts: &[Artifact], validation: Uuid) -> Vec<FileRef> {
    artifacts
        .iter()
        .filter(|a| a.artifact_type == ArtifactKind::AdapterWeights)
        .map(|a| FileRef {
            name: a.name.clone(),
            download_path: format!("/agent/validations/{validation}/artifacts/{}", a.id),
            sha256: a.checksum.clone().unwrap_or_default(),
        })
        .collect()
}

fn file_ref(file: &TrainingFile, validation: Uuid) -> FileRef {
    FileRef {
        name: file.name.clone(),
        download_path: format!("/agent/validations/{validation}/files/{}", file.id),
        sha256: file.sha256.clone(),
    }
}

async fn adapter_ref(state: &AppState, job: &Job, validation: Uuid) -> ServiceResult<AdapterRef> {
    let files = adapter_files(&artifacts::for_job(&state.db, job.id).await?, validation);
    if !files.iter().any(|f| f.name.ends_with(".safetensors")) {
        return Err(ServiceError::Conflict(format!(
            "job \"{}\" has no stored adapter to validate",
            job.name
        )));
    }
    Ok(AdapterRef {
        job_id: job.id,
        job_name: job.name.clone(),
        files,
    })
}

/// Gives the oldest queued validation to `agent`, with what it needs to run it. A run
/// whose inputs are gone fails at once with the reason.
pub async fn claim(state: &AppState, agent: &Agent) -> ServiceResult<Option<ValidationAssignment>> {
    while let Some(run) = validations::claim_next(&state.db, agent.id).await? {
        match assignment(state, &run).await {
            Ok(work) => {
                let event = validation_event(
                    run.job_id,
                    Severity::Info,
                    format!("Validation started on agent {}", agent.name),
                    json!({"validation_id": run.id, "agent_id": agent.id}),
                );
                publish(state, &run, Some(event)).await?;
                return Ok(Some(work));
            }
            Err(error) => {
                if let Some(failed) =
                    validations::fail(&state.db, run.id, Some(agent.id), &error.to_string()).await?
                {
                    finish_failed(state, &failed).await?;
                }
            }
        }
    }
    Ok(None)
}

async fn assignment(state: &AppState, run: &ValidationRun) -> ServiceResult<ValidationAssignment> {
    let job = jobs::get_any(&state.db, run.job_id)
        .await?
        .ok_or(ServiceError::NotFound("job"))?;
    let training = files::get(&state.db, job.training_file_id)
        .await?
        .ok_or(ServiceError::NotFound("training file"))?;
    let validation_file = match job.validation_file_id {
        Some(id) => files::get(&state.db, id).await?,
        None => None,
    };
    let hp = job
        .hyperparameters
        .as_ref()
        .map(|h| h.0.clone())
        .ok_or_else(|| ServiceError::Conflict("the job has no hyperparameters".into()))?;
    let baseline = match run.comparison_baseline_id {
        Some(id) => {
            let baseline = jobs::get_any(&state.db, id)
                .await?
                .ok_or(ServiceError::NotFound("comparison baseline"))?;
            Some(adapter_ref(state, &baseline, run.id).await?)
        }
        None => None,
    };
    let retention_prompts = match run.retention_file_id {
        Some(id) => Some(file_ref(
            &files::get(&state.db, id)
                .await?
                .ok_or(ServiceError::NotFound("retention prompt file"))?,
            run.id,
        )),
        None => None,
    };
    let (data, split) = match &validation_file {
        Some(file) => (file_ref(file, run.id), None),
        None => (
            file_ref(&training, run.id),
            Some(Split {
                fraction: 0.1,
                seed: hp.seed,
            }),
        ),
    };
    Ok(ValidationAssignment {
        validation_id: run.id,
        base_model: job.base_model.clone(),
        adapter: adapter_ref(state, &job, run.id).await?,
        baseline,
        data,
        split,
        training_data: file_ref(&training, run.id),
        retention_prompts,
        suites: run.test_suites.0.clone(),
        max_samples: run.max_samples as u32,
        max_new_tokens: run.max_new_tokens as u32,
        max_seq_len: hp.max_seq_len,
    })
}

/// The run `id` if the asking agent holds it.
async fn held_run(state: &AppState, agent: &Agent, id: Uuid) -> ServiceResult<ValidationRun> {
    validations::get(&state.db, id)
        .await?
        .filter(|run| run.agent_id == Some(agent.id) && run.status == RunStatus::Running)
        .ok_or(ServiceError::NotFound("validation"))
}

/// A training file the agent's validation reads (the job's training or validation file).
pub async fn agent_file(
    state: &AppState,
    agent: &Agent,
    id: Uuid,
    file_id: Uuid,
) -> ServiceResult<TrainingFile> {
    let run = held_run(state, agent, id).await?;
    let job = jobs::get_any(&state.db, run.job_id)
        .await?
        .ok_or(ServiceError::NotFound("job"))?;
    let readable = [
        Some(job.training_file_id),
        job.validation_file_id,
        run.retention_file_id,
    ];
    if !readable.contains(&Some(file_id)) {
        return Err(ServiceError::NotFound("training file"));
    }
    files::get(&state.db, file_id)
        .await?
        .ok_or(ServiceError::NotFound("training file"))
}

/// An adapter file of the validated job or of its baseline.
pub async fn agent_artifact(
    state: &AppState,
    agent: &Agent,
    id: Uuid,
    artifact_id: Uuid,
) -> ServiceResult<Download> {
    let run = held_run(state, agent, id).await?;
    let artifact = artifacts::get(&state.db, artifact_id)
        .await?
        .filter(|a| a.artifact_type == ArtifactKind::AdapterWeights)
        .filter(|a| a.job_id == run.job_id || Some(a.job_id) == run.comparison_baseline_id)
        .ok_or(ServiceError::NotFound("artifact"))?;
    state
        .artifacts
        .get(&artifact.file_path)
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))
}

/// Records the agent's progress and shows it live.
pub async fn progress(
    state: &AppState,
    agent: &Agent,
    id: Uuid,
    progress: &ValidationProgress,
) -> ServiceResult<()> {
    let value =
        serde_json::to_value(progress).map_err(|e| ServiceError::Internal(e.to_string()))?;
    let run = validations::set_progress(&state.db, id, agent.id, &value)
        .await?
        .ok_or(ServiceError::NotFound("validation"))?;
    publish(state, &run, None).await
}

/// Ends a run as its agent reports: the judge scores emotional intelligence, the gates
/// judge the figures, and the verdict, score and recommendations are stored. Repeating it
/// changes nothing.
pub async fn finish(
    state: &AppState,
    agent: &Agent,
    id: Uuid,
    outcome: ValidationOutcome,
) -> ServiceResult<ValidationRun> {
    let run = validations::get(&state.db, id)
        .await?
        .filter(|run| run.agent_id == Some(agent.id))
        .ok_or(ServiceError::NotFound("validation"))?;
    if run.status != RunStatus::Running {
        return Ok(run);
    }
    let mut results = match outcome {
        ValidationOutcome::Failed { message, .. } => {
            return match validations::fail(&state.db, id, Some(agent.id), &message).await? {
                Some(failed) => {
                    finish_failed(state, &failed).await?;
                    Ok(failed)
                }
                None => Ok(run),
            };
        }
        ValidationOutcome::Completed { results } => results,
    };
    let judge = &state.settings.validation.judge;
    for report in results.adapter.iter_mut() {
        super::judge::score(judge, report).await;
    }
    for report in results.baseline.iter_mut().flatten() {
        super::judge::score(judge, report).await;
    }
    let gates = judge_gates(&run.gates.0, &results.adapter);
    let verdict = verdict(&gates, &results.adapter);
    let score = overall_score(&results.adapter);
    let recommendations = recommendations(&results.adapter);
    let comparison = results
        .baseline
        .as_ref()
        .map(|baseline| comparison(&results.adapter, baseline, 5));
    let examples = serde_json::to_value(&results.examples).unwrap_or(Value::Null);
    let Some(done) = validations::complete(
        &state.db,
        id,
        agent.id,
        Completion {
            verdict,
            overall_score: score,
            reports: &results.adapter,
            baseline: results.baseline.as_deref(),
            comparison: comparison.as_ref(),
            gates: &gates,
            recommendations: &recommendations,
            examples: &examples,
        },
    )
    .await?
    else {
        return Ok(run);
    };
    let suites: Vec<(String, &'static str)> = results
        .adapter
        .iter()
        .map(|r| (r.suite.as_str().to_owned(), r.status.as_str()))
        .collect();
    state.metrics.count_validation("completed", &suites);
    let severity = match verdict {
        crate::domain::validation::Verdict::Blocked => Severity::Warning,
        _ => Severity::Info,
    };
    let event = validation_event(
        done.job_id,
        severity,
        format!(
            "Validation completed: {} (overall score {})",
            verdict.label(),
            score.map_or("-".to_owned(), |s| format!("{s:.1}"))
        ),
        json!({"validation_id": done.id, "overall_status": verdict, "overall_score": score,
               "failed_gates": done.failed_gates, "warning_gates": done.warning_gates}),
    );
    publish(state, &done, Some(event)).await?;
    Ok(done)
}

async fn finish_failed(state: &AppState, run: &ValidationRun) -> ServiceResult<()> {
    state.metrics.count_validation("failed", &[]);
    let message = run.error_message.clone().unwrap_or_default();
    let event = validation_event(
        run.job_id,
        Severity::Error,
        format!("Validation failed: {message}"),
        json!({"validation_id": run.id, "error": message}),
    );
    publish(state, run, Some(event)).await
}

/// Runs whose agent went silent go back to the queue (and fail after `MAX_CLAIMS`).
pub async fn sweep(state: &AppState, cutoff: DateTime<Utc>) -> ServiceResult<()> {
    for run in validations::orphaned(&state.db, cutoff).await? {
        let Some(agent_id) = run.agent_id else {
            continue;
        };
        if run.claim_count >= MAX_CLAIMS {
            let message = format!("its agent was lost {} times", run.claim_count);
            if let Some(failed) =
                validations::fail(&state.db, run.id, Some(agent_id), &message).await?
            {
                finish_failed(state, &failed).await?;
            }
        } else if let Some(queued) = validations::requeue(&state.db, run.id, agent_id).await? {
            tracing::warn!(validation_id = %run.id, "agent went silent; validation queued again");
            let event = validation_event(
                queued.job_id,
                Severity::Warning,
                "Validation queued again: its agent stopped responding".into(),
                json!({"validation_id": queued.id}),
            );
            publish(state, &queued, Some(event)).await?;
            state.work_available.notify_waiters();
        }
    }
    Ok(())
}

/// A run of one of the user's jobs.
pub async fn get_run(
    state: &AppState,
    user: &CurrentUser,
    id: Uuid,
) -> ServiceResult<ValidationRun> {
    let run = validations::get(&state.db, id)
        .await?
        .ok_or(ServiceError::NotFound("validation"))?;
    visible_job(state, user, run.job_id)
        .await
        .map_err(|_| ServiceError::NotFound("validation"))?;
    Ok(run)
}

/// A job's runs, newest first (at most 100).
pub async fn job_runs(
    state: &AppState,
    user: &CurrentUser,
    job_id: Uuid,
) -> ServiceResult<(Job, Vec<ValidationRun>)> {
    let job = visible_job(state, user, job_id).await?;
    let runs = validations::for_job(&state.db, job.id, 100).await?;
    Ok((job, runs))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExportLink {
    pub download_url: String,
    pub file_name: String,
    pub file_size: i64,
    pub expires_at: DateTime<Utc>,
}

/// Renders a run as `format` (pdf, csv or json), stores it as the job's
/// `validation_report` artifact and returns a signed link to it.
pub async fn export(
    state: &AppState,
    user: &CurrentUser,
    base_url: &str,
    id: Uuid,
    format: &str,
) -> ServiceResult<ExportLink> {
    use super::validation_report::{render, Format};
    let format = Format::parse(format).ok_or_else(|| {
        ServiceError::Validation(vec![FieldError::new(
            "format",
            "must be one of pdf, csv, json",
        )])
    })?;
    let run = get_run(state, user, id).await?;
    let job = visible_job(state, user, run.job_id).await?;
    let bytes = render(format, &run, &job);
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let name = format!(
        "validation-{}.{}",
        &run.id.simple().to_string()[..8],
        format.extension()
    );
    let artifact_id = Uuid::new_v4();
    let key = format!("jobs/{}/validation_report/{artifact_id}-{name}", job.id);
    let size = bytes.len() as i64;
    let body = futures::stream::iter([Ok::<_, String>(bytes::Bytes::from(bytes))]);
    state
        .artifacts
        .put_verified(&key, body, u64::MAX, &sha256)
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))?;
    let artifact = Artifact {
        id: artifact_id,
        job_id: job.id,
        attempt_id: None,
        artifact_type: ArtifactKind::ValidationReport,
        name: name.clone(),
        file_path: key.clone(),
        file_size: size,
        mime_type: Some(format.mime_type().to_owned()),
        checksum: Some(sha256),
        epoch: None,
        step: None,
        download_count: 0,
        last_downloaded_at: None,
        created_at: now(),
    };
    let stored = super::artifact::record(state, &artifact).await?;
    let DownloadLink {
        download_url,
        expires_at,
    } = signed_download(state, user, base_url, stored.id).await?;
    Ok(ExportLink {
        download_url,
        file_name: name,
        file_size: stored.file_size,
        expires_at,
    })
}
