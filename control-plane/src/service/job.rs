//! Job operations: create a draft on an eligible file (spec §7.1), configure it
//! (hyperparameters, GPU, recovery policy, cost estimate), queue, cancel and resume it,
//! and read jobs, their metrics and events, for the user acting.

use chrono::Duration;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use super::transition::{change_status, Origin};
use super::{estimate, preset, AppState, CurrentUser, ServiceError, ServiceResult};
use crate::db::events::{self, Event, EventFilter};
use crate::db::files::TrainingFile;
use crate::db::jobs::{self, Change, Configuration, Job, NewJob};
use crate::db::metrics::{self, MetricPoint};
use crate::db::{attempts, files, now, presets};
use crate::domain::{
    Attribution, EnrichmentStatus, EventType, FieldError, JobStatus, RecoveryPolicy, Severity,
};
use protocol::agent::ExportFormat;

#[derive(Serialize, ToSchema)]
pub struct JobView {
    #[serde(flatten)]
    pub job: Job,
    pub queue_position: Option<i64>,
    pub current_metrics: Option<MetricPoint>,
}

/// Jobs with their queue positions and latest metrics, in two queries for the whole list.
pub async fn views(state: &AppState, jobs: Vec<Job>) -> ServiceResult<Vec<JobView>> {
    let queue = if jobs.iter().any(|job| job.status == JobStatus::Queued) {
        jobs::queue_order(&state.db).await?
    } else {
        Vec::new()
    };
    let ids: Vec<Uuid> = jobs.iter().map(|job| job.id).collect();
    let mut latest = metrics::latest_for(&state.db, &ids).await?;
    Ok(jobs
        .into_iter()
        .map(|job| JobView {
            queue_position: queue
                .iter()
                .position(|id| *id == job.id)
                .map(|i| i as i64 + 1),
            current_metrics: latest.remove(&job.id),
            job,
        })
        .collect())
}

pub async fn view(state: &AppState, job: Job) -> ServiceResult<JobView> {
    let mut views = views(state, vec![job]).await?;
    views
        .pop()
        .ok_or_else(|| ServiceError::Internal("a job view went missing".into()))
}

/// The eligibility rules (spec §7.1) a training file does not meet yet.
pub fn unmet_eligibility(state: &AppState, file: &TrainingFile) -> Vec<String> {
    let mut unmet = Vec::new();
    if file.enrichment_status != EnrichmentStatus::Completed {
        unmet.push(format!(
            "enrichment must be completed; it is {}",
            file.enrichment_status
        ));
    }
    let minimum = state.settings.eligibility.min_conversations;
    if file.conversation_count < minimum {
        unmet.push(format!(
            "at least {minimum} conversations are required; the file has {}",
            file.conversation_count
        ));
    }
    unmet
}

/// A job the user may see and act on: their own, or any for operators and admins.
pub async fn visible_job(state: &AppState, user: &CurrentUser, id: Uuid) -> ServiceResult<Job> {
    jobs::get(&state.db, id, user.viewer())
        .await?
        .ok_or(ServiceError::NotFound("job"))
}

/// The caller's jobs (every job for operators and admins), newest first, and how many.
pub async fn list_jobs(
    state: &AppState,
    user: &CurrentUser,
    status: Option<&str>,
    limit: i64,
    offset: i64,
) -> ServiceResult<(Vec<JobView>, i64)> {
    let status = status
        .map(|s| {
            s.parse::<JobStatus>()
                .map_err(|m| ServiceError::Validation(vec![FieldError::new("status", m)]))
        })
        .transpose()?;
    let (rows, total) = jobs::list(&state.db, user.viewer(), status, limit, offset).await?;
    Ok((views(state, rows).await?, total))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    pub training_file_id: Uuid,
    pub name: String,
    pub description: Option<String>,
    /// A model directory on the agents or a hub id such as meta-llama/Llama-3.2-1B.
    pub base_model: String,
    /// The team the job's spend is charged to.
    pub team: Option<String>,
    pub project: Option<String>,
    pub cost_center: Option<String>,
    /// Labels for cost reports: an object of strings, such as {"experiment": "lr-sweep"}.
    #[schema(value_type = Option<Object>)]
    pub tags: Option<Map<String, Value>>,
    /// Another of your enriched training files for validation (as OpenAI's fine-tuning
    /// API has it); default: the trainer's seeded 10% split of the training file.
    #[serde(default)]
    pub validation_file_id: Option<Uuid>,
}

/// A base model as a request names it, trimmed; a problem is pushed to `errors`.
pub(super) fn checked_base_model<'a>(base_model: &'a str, errors: &mut Vec<FieldError>) -> &'a str {
    let base_model = base_model.trim();
    if base_model.is_empty()
        || base_model.len() > 500
        || base_model.chars().any(char::is_whitespace)
    {
        errors.push(FieldError::new(
            "base_model",
            "must be a model directory or a hub id such as meta-llama/Llama-3.2-1B, without spaces",
        ));
    }
    base_model
}

/// Creates a draft after checking the fields and the training file's eligibility (§7.1).
pub async fn create_draft(
    state: &AppState,
    user: &CurrentUser,
    request: &CreateJob,
    preset_id: Option<Uuid>,
) -> ServiceResult<Job> {
    let mut errors = Vec::new();
    let name = request.name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        errors.push(FieldError::new("name", "must be 1 to 200 characters"));
    }
    let attribution = Attribution::parse(
        request.team.as_deref(),
        request.project.as_deref(),
        request.cost_center.as_deref(),
        request.tags.as_ref(),
        &mut errors,
    )
    .or(&user.default_attribution());
    let base_model = checked_base_model(&request.base_model, &mut errors);
    if !errors.is_empty() {
        return Err(ServiceError::Validation(errors));
    }
    let file = files::get_owned(&state.db, request.training_file_id, user.0.id)
        .await?
        .ok_or(ServiceError::NotFound("training file"))?;
    let unmet = unmet_eligibility(state, &file);
    if !unmet.is_empty() {
        return Err(ServiceError::Unprocessable {
            message: format!(
                "training file \"{}\" is not eligible for training: {}",
                file.name,
                unmet.join("; ")
            ),
            rules: unmet,
        });
    }
    if let Some(validation_file) = request.validation_file_id {
        super::validation::check_validation_file(state, user.0.id, validation_file).await?;
    }
    let id = Uuid::new_v4();
    let event = Event::new(
        id,
        EventType::Status,
        Severity::Info,
        format!("Job \"{name}\" created as a draft"),
    )
    .with_details(json!({"to": JobStatus::Draft}));
    let job = NewJob {
        user_id: user.0.id,
        name,
        description: request.description.as_deref(),
        base_model,
        training_file_id: file.id,
        preset_id,
        attribution: &attribution,
    };
    let job = jobs::insert_draft(&state.db, id, job, &event).await?;
    match request.validation_file_id {
        Some(file) => super::validation::set_job_settings(state, &job, Some(file), None).await,
        None => Ok(job),
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigureJob {
    /// Defaults to the job's preset, else Balanced.
    pub preset_id: Option<Uuid>,
    /// Overrides of the preset's values, field by field.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub hyperparameters: Map<String, Value>,
    /// spot or ondemand
    pub gpu_type: String,
    /// A model from the GPU catalog, such as H100-80GB.
    pub gpu_model: String,
    /// Agent labels a host must carry to run the job, such as {"zone": "eu-west-1a"}.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub required_labels: Map<String, Value>,
    /// Overrides of the recovery policy (`max_retries`, `max_interruptions`, 0 to 20 each,
    /// and `auto_resume`), on top of the template's or preset's policy, else 3, 5, true.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub recovery: Map<String, Value>,
    /// Attribution (as on create); each one given replaces the job's.
    pub team: Option<String>,
    pub project: Option<String>,
    pub cost_center: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub tags: Option<Map<String, Value>>,
    /// Validate on its own when training completes: the body of
    /// `POST /validation/{job_id}/run` (`test_suites`, `gates`, …); its gates also apply
    /// to validations run by hand.
    #[serde(default)]
    pub validate_on_completion: Option<super::validation::RunRequest>,
    /// Also write the adapter in these formats after training, each uploaded as its own
    /// artifact: `gguf` (a llama.cpp LoRA adapter, artifact `gguf_adapter`). Absent: the
    /// job's current choice (none at first).
    #[serde(default)]
    pub exports: Option<Vec<String>>,
}

/// The export formats a request names; an unknown one is reported by its index.
fn parse_exports(requested: &[String], errors: &mut Vec<FieldError>) -> Vec<ExportFormat> {
    let mut formats = Vec::new();
    for (index, name) in requested.iter().enumerate() {
        match name.as_str() {
            "gguf" => {
                if !formats.contains(&ExportFormat::Gguf) {
                    formats.push(ExportFormat::Gguf);
                }
            }
            other => errors.push(FieldError::new(
                format!("exports[{index}]"),
                format!("unknown export format \"{other}\"; known: gguf"),
            )),
        }
    }
    formats
}

/// Sets hyperparameters, GPU and recovery policy, with the cost estimate. Every invalid
/// field is reported, each named.
pub async fn configure_job(
    state: &AppState,
    job: Job,
    request: &ConfigureJob,
    base_recovery: Option<RecoveryPolicy>,
) -> ServiceResult<Job> {
    job.status.check(JobStatus::Configured)?;
    let mut errors = Vec::new();
    let attribution = Attribution::parse(
        request.team.as_deref(),
        request.project.as_deref(),
        request.cost_center.as_deref(),
        request.tags.as_ref(),
        &mut errors,
    )
    .or(&job.attribution());
    let preset_id = request
        .preset_id
        .or(job.preset_id)
        .unwrap_or(presets::BALANCED_PRESET_ID);
    let plan = estimate::plan(
        state,
        job.user_id,
        preset_id,
        &request.hyperparameters,
        (&request.gpu_type, &request.gpu_model),
        &mut errors,
    )
    .await?;
    let exports = match &request.exports {
        Some(requested) => parse_exports(requested, &mut errors),
        None => job
            .exports
            .as_ref()
            .map(|e| e.0.clone())
            .unwrap_or_default(),
    };
    for (key, value) in &request.required_labels {
        if !value.is_string() {
            errors.push(FieldError::new(
                format!("required_labels.{key}"),
                "label values must be strings",
            ));
        }
    }
    // A reconfigured job keeps its policy where the request is silent.
    let base_recovery = base_recovery
        .or_else(|| (job.status == JobStatus::Configured).then(|| job.recovery()))
        .or_else(|| {
            plan.as_ref()
                .and_then(|p| p.preset.recovery.as_ref().map(|r| r.0))
        })
        .unwrap_or_default();
    let recovery = RecoveryPolicy::resolve(base_recovery, &request.recovery)
        .map_err(|field_errors| errors.extend(field_errors));
    let (Some(plan), Ok(recovery), true) = (plan, recovery, errors.is_empty()) else {
        return Err(ServiceError::Validation(errors));
    };
    if let Some(on_completion) = &request.validate_on_completion {
        super::validation::check_request(state, on_completion, None).map_err(
            |error| match error {
                ServiceError::Validation(errors) => ServiceError::Validation(
                    errors
                        .into_iter()
                        .map(|e| {
                            FieldError::new(
                                format!("validate_on_completion.{}", e.field),
                                e.message,
                            )
                        })
                        .collect(),
                ),
                other => other,
            },
        )?;
    }
    let completed = presets::completed_jobs_of(&state.db, job.user_id).await?;
    if let Some(rule) = preset::requirement_unmet(&plan.preset, completed) {
        return Err(ServiceError::Unprocessable {
            message: rule.clone(),
            rules: vec![rule],
        });
    }
    let file = files::get(&state.db, job.training_file_id)
        .await?
        .ok_or(ServiceError::NotFound("training file"))?;
    let estimate = estimate::estimate(state, &file, &job.base_model, &plan).await?;
    let configuration = Configuration {
        preset_id: Some(plan.preset.id),
        gpu_type: plan.gpu_type,
        gpu_model: &plan.gpu.model,
        hyperparameters: &plan.hyperparameters,
        required_labels: &request.required_labels,
        recovery,
        estimate: &estimate,
        attribution: &attribution,
        exports: &exports,
    };
    let resume = if recovery.auto_resume {
        format!(
            "up to {} interruptions resume on their own",
            recovery.max_interruptions
        )
    } else {
        "interruptions wait for a manual resume".to_owned()
    };
    let event = Event::new(
        job.id,
        EventType::Status,
        Severity::Info,
        format!(
            "Configured with the {} preset on {} {} (estimated ${:.2}–${:.2}, {}); {} retries, {resume}",
            plan.preset.name,
            plan.gpu_type.as_str(),
            plan.gpu.model,
            estimate.cost_min,
            estimate.cost_max,
            estimate.throughput.describe(),
            recovery.max_retries,
        ),
    )
    .with_details(json!({
        "from": job.status, "to": JobStatus::Configured,
        "hyperparameters": plan.hyperparameters, "recovery": recovery, "estimate": estimate,
        "exports": exports,
    }));
    let changed = change_status(
        state,
        &job,
        Change::Configure(configuration),
        vec![event],
        Origin::User,
    )
    .await?;
    match &request.validate_on_completion {
        Some(on_completion) => {
            super::validation::set_job_settings(state, &changed.job, None, Some(on_completion))
                .await
        }
        None => Ok(changed.job),
    }
}

/// Queues a configured job unless a `block_start` budget refuses it; agents waiting for
/// work are woken.
pub async fn queue_job(state: &AppState, job: &Job) -> ServiceResult<Job> {
    job.status.check(JobStatus::Queued)?;
    super::budget::check_start(state, job).await?;
    let hours_ahead = jobs::queued_hours_ahead(&state.db).await?;
    let estimated_start_time = now() + Duration::seconds((hours_ahead * 3600.0) as i64);
    let event = Event::new(
        job.id,
        EventType::Status,
        Severity::Info,
        "Job queued for training",
    )
    .with_details(json!({"from": job.status, "to": JobStatus::Queued}));
    let change = Change::Queue {
        estimated_start_time,
    };
    Ok(change_status(state, job, change, vec![event], Origin::User)
        .await?
        .job)
}

/// Cancels a job with a reason (at most 1000 characters), its final cost being what its
/// attempts cost so far; the agent running it stops at its next step.
pub async fn cancel_job(state: &AppState, job: &Job, reason: &str) -> ServiceResult<Job> {
    job.status.check(JobStatus::Cancelled)?;
    let reason = match reason.trim() {
        "" => "no reason given",
        reason if reason.chars().count() > 1000 => {
            return Err(ServiceError::Validation(vec![FieldError::new(
                "reason",
                "must be at most 1000 characters",
            )]))
        }
        reason => reason,
    };
    let final_cost = jobs::round_cents(attempts::job_cost(&state.db, job.id, now()).await?);
    let event = Event::new(
        job.id,
        EventType::Status,
        Severity::Warning,
        format!("Job cancelled: {reason}"),
    )
    .with_details(
        json!({"from": job.status, "to": JobStatus::Cancelled, "final_cost": final_cost}),
    );
    let change = Change::Cancel { reason, final_cost };
    Ok(change_status(state, job, change, vec![event], Origin::User)
        .await?
        .job)
}

/// Queues an interrupted or failed job again from `checkpoint_id` (default: its latest
/// checkpoint; none: from the start), logging who did it.
pub async fn resume_job(
    state: &AppState,
    user: &CurrentUser,
    job: &Job,
    checkpoint_id: Option<Uuid>,
) -> ServiceResult<Job> {
    if !matches!(job.status, JobStatus::Interrupted | JobStatus::Failed) {
        return Err(ServiceError::Conflict(format!(
            "only an interrupted or failed job can be resumed; this one is {}",
            job.status
        )));
    }
    let checkpoint = match checkpoint_id {
        Some(checkpoint_id) => Some(
            attempts::checkpoint(&state.db, checkpoint_id)
                .await?
                .filter(|c| c.job_id == job.id)
                .ok_or_else(|| ServiceError::Unprocessable {
                    message: "checkpoint_id is not a checkpoint of this job".into(),
                    rules: vec!["checkpoint_of_job".into()],
                })?,
        ),
        None => attempts::latest_checkpoint(&state.db, job.id).await?,
    };
    let from = checkpoint
        .as_ref()
        .map(|c| format!(" from the checkpoint at step {}", c.step))
        .unwrap_or_else(|| " from the start".into());
    let event = Event::new(
        job.id,
        EventType::Status,
        Severity::Info,
        format!("Resumed by {}{from}", user.0.email),
    )
    .with_details(json!({"from": job.status, "to": JobStatus::Queued,
                         "checkpoint_id": checkpoint.as_ref().map(|c| c.id)}));
    let change = Change::Resume {
        checkpoint_id: checkpoint.map(|c| c.id),
    };
    Ok(change_status(state, job, change, vec![event], Origin::User)
        .await?
        .job)
}

/// A job's latest metrics point.
pub async fn latest_metrics(
    state: &AppState,
    user: &CurrentUser,
    id: Uuid,
) -> ServiceResult<MetricPoint> {
    visible_job(state, user, id).await?;
    metrics::latest(&state.db, id)
        .await?
        .ok_or(ServiceError::NotFound("metrics for this job"))
}

/// A job's events, oldest first, filtered by type and severity, and how many match.
pub async fn event_log(
    state: &AppState,
    user: &CurrentUser,
    id: Uuid,
    event_type: Option<&str>,
    severity: Option<&str>,
    limit: i64,
    offset: i64,
) -> ServiceResult<(Vec<Event>, i64)> {
    visible_job(state, user, id).await?;
    let mut errors = Vec::new();
    let event_type = event_type
        .map(|t| t.parse::<EventType>())
        .transpose()
        .map_err(|m| errors.push(FieldError::new("event_type", m)))
        .ok()
        .flatten();
    let severity = severity
        .map(|s| s.parse::<Severity>())
        .transpose()
        .map_err(|m| errors.push(FieldError::new("severity", m)))
        .ok()
        .flatten();
    if !errors.is_empty() {
        return Err(ServiceError::Validation(errors));
    }
    let filter = EventFilter {
        event_type,
        severity,
        limit,
        offset,
    };
    Ok(events::list(&state.db, id, &filter).await?)
}
