//! Training jobs: create (eligibility rules), configure (hyperparameters, GPU, cost
//! estimate), start, cancel, and read their metrics and events.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::Duration;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::auth::CurrentUser;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::{ApiJson, ApiQuery, AppState, Page};
use crate::db::events::{self, Event, EventFilter};
use crate::db::jobs::{self, Change, ChangeOutcome, Configuration, Job, NewJob};
use crate::db::metrics::{self, MetricPoint};
use crate::db::{attempts, files, now, presets};
use crate::domain::{hyperparameters, FieldError, GpuType, JobStatus};
use crate::live::JobUpdate;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(detail))
        .routes(routes!(configure))
        .routes(routes!(start))
        .routes(routes!(cancel))
        .routes(routes!(metric_history))
        .routes(routes!(latest_metrics))
        .routes(routes!(event_log))
}

#[derive(Serialize, ToSchema)]
pub struct JobView {
    #[serde(flatten)]
    pub job: Job,
    pub queue_position: Option<i64>,
    pub current_metrics: Option<MetricPoint>,
}

/// Jobs with their queue positions and latest metrics, in two queries for the whole list.
async fn views(state: &AppState, jobs: Vec<Job>) -> ApiResult<Vec<JobView>> {
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

async fn view(state: &AppState, job: Job) -> ApiResult<JobView> {
    let mut views = views(state, vec![job]).await?;
    views
        .pop()
        .ok_or_else(|| ApiError::Internal("a job view went missing".into()))
}

/// The eligibility rules (spec §7.1) a training file does not meet yet.
pub fn unmet_eligibility(state: &AppState, file: &crate::db::files::TrainingFile) -> Vec<String> {
    let mut unmet = Vec::new();
    if file.enrichment_status != "completed" {
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
pub async fn visible_job(state: &AppState, user: &CurrentUser, id: Uuid) -> ApiResult<Job> {
    jobs::get(&state.db, id, user.viewer())
        .await?
        .ok_or(ApiError::NotFound("job"))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    pub training_file_id: Uuid,
    pub name: String,
    pub description: Option<String>,
    /// A model directory on the agents or a hub id such as meta-llama/Llama-3.2-1B.
    pub base_model: String,
}

/// Creates a draft job on an eligible training file (spec §7.1).
#[utoipa::path(post, path = "/jobs", tag = "jobs", request_body = CreateJob,
    responses((status = 201, body = JobView), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn create(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(request): ApiJson<CreateJob>,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    let job = create_draft(&state, &user, &request, None).await?;
    Ok((StatusCode::CREATED, Json(view(&state, job).await?)))
}

/// Creates a draft after checking the fields and the training file's eligibility (§7.1).
pub async fn create_draft(
    state: &AppState,
    user: &CurrentUser,
    request: &CreateJob,
    preset_id: Option<Uuid>,
) -> ApiResult<Job> {
    let mut errors = Vec::new();
    let name = request.name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        errors.push(FieldError::new("name", "must be 1 to 200 characters"));
    }
    let base_model = request.base_model.trim();
    if base_model.is_empty()
        || base_model.len() > 500
        || base_model.chars().any(char::is_whitespace)
    {
        errors.push(FieldError::new(
            "base_model",
            "must be a model directory or a hub id such as meta-llama/Llama-3.2-1B, without spaces",
        ));
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let file = files::get_owned(&state.db, request.training_file_id, user.0.id)
        .await?
        .ok_or(ApiError::NotFound("training file"))?;
    let unmet = unmet_eligibility(state, &file);
    if !unmet.is_empty() {
        return Err(ApiError::Unprocessable {
            message: format!(
                "training file \"{}\" is not eligible for training: {}",
                file.name,
                unmet.join("; ")
            ),
            rules: unmet,
        });
    }
    Ok(jobs::insert_draft(
        &state.db,
        NewJob {
            user_id: user.0.id,
            name,
            description: request.description.as_deref(),
            base_model,
            training_file_id: file.id,
            preset_id,
        },
    )
    .await?)
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
}

/// Sets hyperparameters and GPU; answers with the cost estimate.
#[utoipa::path(put, path = "/jobs/{id}/configure", tag = "jobs", params(("id" = Uuid, Path)), request_body = ConfigureJob,
    responses((status = 200, body = JobView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn configure(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<Uuid>,
    ApiJson(request): ApiJson<ConfigureJob>,
) -> ApiResult<Json<JobView>> {
    let job = visible_job(&state, &user, id).await?;
    let job = configure_job(&state, job, &request).await?;
    Ok(Json(view(&state, job).await?))
}

pub async fn configure_job(state: &AppState, job: Job, request: &ConfigureJob) -> ApiResult<Job> {
    job.status.check(JobStatus::Configured)?;
    let mut errors = Vec::new();
    let gpu_type = GpuType::parse(&request.gpu_type);
    if gpu_type.is_none() {
        errors.push(FieldError::new("gpu_type", "must be spot or ondemand"));
    }
    let gpu = state.catalog.find(&request.gpu_model);
    if gpu.is_none() {
        errors.push(FieldError::new(
            "gpu_model",
            format!(
                "unknown GPU model; available: {}",
                state.catalog.model_names()
            ),
        ));
    }
    if let Some((key, _)) = request.required_labels.iter().find(|(_, v)| !v.is_string()) {
        errors.push(FieldError::new(
            format!("required_labels.{key}"),
            "label values must be strings",
        ));
    }
    let preset_id = request
        .preset_id
        .or(job.preset_id)
        .unwrap_or(presets::BALANCED_PRESET_ID);
    let preset = presets::get_visible(&state.db, preset_id, job.user_id).await?;
    if preset.is_none() {
        errors.push(FieldError::new("preset_id", "no such preset"));
    }
    let hyperparameters = hyperparameters::resolve(
        preset.as_ref().map_or(&Map::new(), |p| &p.parameters.0),
        &request.hyperparameters,
        &state.settings.limits,
    )
    .map_err(|field_errors| {
        errors.extend(
            field_errors
                .into_iter()
                .map(|e| FieldError::new(format!("hyperparameters.{}", e.field), e.message)),
        )
    });
    let (Some(gpu_type), Some(gpu), Some(preset), Ok(hyperparameters)) =
        (gpu_type, gpu, preset, hyperparameters)
    else {
        return Err(ApiError::Validation(errors));
    };
    let completed = presets::completed_jobs_of(&state.db, job.user_id).await?;
    if let Some(rule) = super::presets::requirement_unmet(&preset, completed) {
        return Err(ApiError::Unprocessable {
            message: rule.clone(),
            rules: vec![rule],
        });
    }
    let file = files::get(&state.db, job.training_file_id)
        .await?
        .ok_or(ApiError::NotFound("training file"))?;

    // Spec §7.1: preset estimates are for 200 conversations and scale linearly; we also scale
    // by epochs relative to the preset's, and price the hours with the catalog's GPU rate.
    let scale = file.conversation_count as f64 / 200.0;
    let preset_epochs = preset
        .parameters
        .0
        .get("epochs")
        .and_then(Value::as_f64)
        .unwrap_or(1.0);
    let epoch_scale = f64::from(hyperparameters.epochs) / preset_epochs.max(1.0);
    let hours = |base: f64| base * scale * epoch_scale;
    let duration = (
        hours(preset.estimates.0.duration_hours_min),
        hours(preset.estimates.0.duration_hours_max),
    );
    let rate = gpu.hourly(gpu_type);
    let configuration = Configuration {
        preset_id: Some(preset.id),
        gpu_type,
        gpu_model: &gpu.model,
        hyperparameters: &hyperparameters,
        required_labels: &request.required_labels,
        hourly_rate: rate,
        estimated_duration_hours: duration,
        estimated_cost: (
            jobs::round_cents(duration.0 * rate),
            jobs::round_cents(duration.1 * rate),
        ),
    };
    let event = Event::new(
        job.id,
        "status",
        "info",
        format!(
            "Configured with the {} preset on {} {} (estimated ${:.2}–${:.2})",
            preset.name,
            gpu_type.as_str(),
            gpu.model,
            configuration.estimated_cost.0,
            configuration.estimated_cost.1
        ),
    )
    .with_details(
        json!({"from": job.status, "to": "configured", "hyperparameters": hyperparameters}),
    );
    apply(state, &job, Change::Configure(configuration), event).await
}

/// Writes a status change and tells live subscribers; a concurrent change answers 409.
/// Applies a status change and answers with the job's view.
pub async fn apply_change(
    state: &AppState,
    job: &Job,
    change: Change<'_>,
    event: Event,
) -> ApiResult<JobView> {
    let job = apply(state, job, change, event).await?;
    view(state, job).await
}

async fn apply(state: &AppState, job: &Job, change: Change<'_>, event: Event) -> ApiResult<Job> {
    match jobs::change_status(&state.db, job.id, job.status, change, &event).await? {
        ChangeOutcome::Applied(updated) => {
            tracing::info!(job_id = %job.id, from = %job.status, to = %updated.status, "job status changed");
            state
                .live
                .publish(JobUpdate::Status {
                    job: updated.clone(),
                })
                .await;
            state
                .live
                .publish(JobUpdate::Event {
                    event: Box::new(event),
                })
                .await;
            Ok(*updated)
        }
        ChangeOutcome::Conflict(current) => Err(ApiError::Conflict(format!(
            "job changed while this request ran; it is now {current}"
        ))),
    }
}

/// Queues a configured job for training.
#[utoipa::path(post, path = "/jobs/{id}/start", tag = "jobs", params(("id" = Uuid, Path)),
    responses((status = 200, body = JobView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn start(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<JobView>> {
    let job = visible_job(&state, &user, id).await?;
    let job = queue_job(&state, &job).await?;
    Ok(Json(view(&state, job).await?))
}

/// Queues a configured job and wakes agents waiting for work.
pub async fn queue_job(state: &AppState, job: &Job) -> ApiResult<Job> {
    job.status.check(JobStatus::Queued)?;
    let hours_ahead = jobs::queued_hours_ahead(&state.db).await?;
    let estimated_start_time = now() + Duration::seconds((hours_ahead * 3600.0) as i64);
    let event = Event::new(job.id, "status", "info", "Job queued for training")
        .with_details(json!({"from": job.status, "to": "queued"}));
    let job = apply(
        state,
        job,
        Change::Queue {
            estimated_start_time,
        },
        event,
    )
    .await?;
    state.work_available.notify_waiters();
    Ok(job)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CancelJob {
    #[serde(default)]
    reason: String,
}

/// Cancels a job that has not ended; records its final cost.
#[utoipa::path(post, path = "/jobs/{id}/cancel", tag = "jobs", params(("id" = Uuid, Path)), request_body = CancelJob,
    responses((status = 200, body = JobView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn cancel(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<Uuid>,
    ApiJson(request): ApiJson<CancelJob>,
) -> ApiResult<Json<JobView>> {
    let job = visible_job(&state, &user, id).await?;
    let job = cancel_job(&state, &job, &request.reason).await?;
    Ok(Json(view(&state, job).await?))
}

/// Cancels a job with a reason (at most 1000 characters), its final cost being what its
/// attempts cost so far; the agent running it stops at its next step.
pub async fn cancel_job(state: &AppState, job: &Job, reason: &str) -> ApiResult<Job> {
    job.status.check(JobStatus::Cancelled)?;
    let reason = match reason.trim() {
        "" => "no reason given",
        reason if reason.chars().count() > 1000 => {
            return Err(ApiError::Validation(vec![FieldError::new(
                "reason",
                "must be at most 1000 characters",
            )]))
        }
        reason => reason,
    };
    let final_cost = jobs::round_cents(attempts::job_cost(&state.db, job.id, now()).await?);
    let event = Event::new(
        job.id,
        "status",
        "warning",
        format!("Job cancelled: {reason}"),
    )
    .with_details(json!({"from": job.status, "to": "cancelled", "final_cost": final_cost}));
    let job = apply(state, job, Change::Cancel { reason, final_cost }, event).await?;
    crate::costs::record(state, &job).await?;
    Ok(job)
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListParams {
    /// A job status, such as queued or training.
    status: Option<String>,
    limit: Option<i64>,
    offset: Option<i64>,
}

/// The caller's jobs (every job for operators and admins), newest first.
#[utoipa::path(get, path = "/jobs", tag = "jobs", params(ListParams),
    responses((status = 200, body = Page<JobView>), (status = 422, body = ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiQuery(params): ApiQuery<ListParams>,
) -> ApiResult<Json<Page<JobView>>> {
    let (limit, offset) = super::page_bounds(params.limit, params.offset, 50)?;
    let status = params
        .status
        .map(|s| {
            s.parse::<JobStatus>()
                .map_err(|m| ApiError::Validation(vec![FieldError::new("status", m)]))
        })
        .transpose()?;
    let (rows, total) = jobs::list(&state.db, user.viewer(), status, limit, offset).await?;
    Ok(Json(Page::new(
        views(&state, rows).await?,
        total,
        limit,
        offset,
    )))
}

/// One job with its queue position and latest metrics.
#[utoipa::path(get, path = "/jobs/{id}", tag = "jobs", params(("id" = Uuid, Path)),
    responses((status = 200, body = JobView), (status = 404, body = ErrorBody)))]
async fn detail(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<JobView>> {
    let job = visible_job(&state, &user, id).await?;
    Ok(Json(view(&state, job).await?))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct MetricParams {
    /// Points to return, default 100.
    limit: Option<i64>,
    /// Keep every n-th step (and the last), default 1.
    interval: Option<i64>,
}

#[derive(Serialize, ToSchema)]
struct MetricList {
    data: Vec<MetricPoint>,
}

/// A job's per-step metrics, oldest first.
#[utoipa::path(get, path = "/jobs/{id}/metrics", tag = "jobs", params(("id" = Uuid, Path), MetricParams),
    responses((status = 200, body = MetricList), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn metric_history(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<Uuid>,
    ApiQuery(params): ApiQuery<MetricParams>,
) -> ApiResult<Json<MetricList>> {
    visible_job(&state, &user, id).await?;
    let limit = params.limit.unwrap_or(100);
    let interval = params.interval.unwrap_or(1);
    let mut errors = Vec::new();
    if !(1..=100_000).contains(&limit) {
        errors.push(FieldError::new("limit", "must be between 1 and 100000"));
    }
    if interval < 1 {
        errors.push(FieldError::new("interval", "must be at least 1"));
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let data = metrics::history(&state.db, id, interval, limit).await?;
    Ok(Json(MetricList { data }))
}

/// A job's latest metrics point.
#[utoipa::path(get, path = "/jobs/{id}/metrics/latest", tag = "jobs", params(("id" = Uuid, Path)),
    responses((status = 200, body = MetricPoint), (status = 404, body = ErrorBody)))]
async fn latest_metrics(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<MetricPoint>> {
    visible_job(&state, &user, id).await?;
    metrics::latest(&state.db, id)
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound("metrics for this job"))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct EventParams {
    /// status, metrics, warning, error, checkpoint or info
    event_type: Option<String>,
    /// info, warning, error or critical
    severity: Option<String>,
    /// 1 to 500, default 100.
    limit: Option<i64>,
    offset: Option<i64>,
}

/// A job's event log, oldest first.
#[utoipa::path(get, path = "/jobs/{id}/events", tag = "jobs", params(("id" = Uuid, Path), EventParams),
    responses((status = 200, body = Page<Event>), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn event_log(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<Uuid>,
    ApiQuery(params): ApiQuery<EventParams>,
) -> ApiResult<Json<Page<Event>>> {
    visible_job(&state, &user, id).await?;
    let (limit, offset) = super::page_bounds(params.limit, params.offset, 100)?;
    if let Some(event_type) = &params.event_type {
        super::one_of(
            "event_type",
            event_type,
            &[
                "status",
                "metrics",
                "warning",
                "error",
                "checkpoint",
                "info",
            ],
        )?;
    }
    if let Some(severity) = &params.severity {
        super::one_of(
            "severity",
            severity,
            &["info", "warning", "error", "critical"],
        )?;
    }
    let filter = EventFilter {
        event_type: params.event_type,
        severity: params.severity,
        limit,
        offset,
    };
    let (rows, total) = events::list(&state.db, id, &filter).await?;
    Ok(Json(Page::new(rows, total, limit, offset)))
}
