//! Training jobs: create (eligibility rules), configure (hyperparameters, GPU, cost
//! estimate), start, cancel, and read their metrics and events.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use chrono::Duration;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::auth::CurrentUser;
use super::error::{ApiError, ApiResult};
use super::{ApiJson, ApiQuery, AppState, Page};
use crate::db::events::{self, Event, EventFilter};
use crate::db::jobs::{self, Change, ChangeOutcome, Configuration, Job, NewJob};
use crate::db::metrics::{self, MetricPoint};
use crate::db::{files, now, presets};
use crate::domain::{FieldError, GpuType, Hyperparameters, JobStatus};
use crate::live::JobUpdate;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/jobs", get(list).post(create))
        .route("/jobs/{id}", get(detail))
        .route("/jobs/{id}/configure", put(configure))
        .route("/jobs/{id}/start", post(start))
        .route("/jobs/{id}/cancel", post(cancel))
        .route("/jobs/{id}/metrics", get(metric_history))
        .route("/jobs/{id}/metrics/latest", get(latest_metrics))
        .route("/jobs/{id}/events", get(event_log))
}

#[derive(Serialize)]
pub struct JobView {
    #[serde(flatten)]
    pub job: Job,
    pub queue_position: Option<i64>,
    pub current_metrics: Option<MetricPoint>,
}

async fn view(state: &AppState, job: Job) -> ApiResult<JobView> {
    let queue_position = jobs::queue_position(&state.db, &job).await?;
    let current_metrics = metrics::latest(&state.db, job.id).await?;
    Ok(JobView {
        job,
        queue_position,
        current_metrics,
    })
}

/// A job the user may see and act on: their own, or any for operators and admins.
pub async fn visible_job(state: &AppState, user: &CurrentUser, id: Uuid) -> ApiResult<Job> {
    jobs::get(&state.db, id, user.viewer())
        .await?
        .ok_or(ApiError::NotFound("job"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    pub training_file_id: Uuid,
    pub name: String,
    pub description: Option<String>,
    pub base_model: String,
}

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigureJob {
    pub preset_id: Option<Uuid>,
    #[serde(default)]
    pub hyperparameters: Map<String, Value>,
    pub gpu_type: String,
    pub gpu_model: String,
}

async fn configure(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<Uuid>,
    ApiJson(request): ApiJson<ConfigureJob>,
) -> ApiResult<Json<JobView>> {
    let job = visible_job(&state, &user, id).await?;
    let job = configure_job(&state, &user, job, &request).await?;
    Ok(Json(view(&state, job).await?))
}

pub async fn configure_job(
    state: &AppState,
    user: &CurrentUser,
    job: Job,
    request: &ConfigureJob,
) -> ApiResult<Job> {
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
    let preset_id = request
        .preset_id
        .or(job.preset_id)
        .unwrap_or(presets::BALANCED_PRESET_ID);
    let preset = presets::get_visible(&state.db, preset_id, job.user_id).await?;
    if preset.is_none() {
        errors.push(FieldError::new("preset_id", "no such preset"));
    }
    let hyperparameters = Hyperparameters::resolve(
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
    apply(state, user, &job, Change::Configure(configuration), event).await
}

/// Writes a status change and tells live subscribers; a concurrent change answers 409.
async fn apply(
    state: &AppState,
    user: &CurrentUser,
    job: &Job,
    change: Change<'_>,
    event: Event,
) -> ApiResult<Job> {
    match jobs::change_status(&state.db, job.id, job.status, change, &event).await? {
        ChangeOutcome::Applied(updated) => {
            tracing::info!(job_id = %job.id, from = %job.status, to = %updated.status, "job status changed");
            state
                .live
                .publish(JobUpdate::Status {
                    job: Box::new(updated.clone()),
                })
                .await;
            state
                .live
                .publish(JobUpdate::Event {
                    user_id: user.0.id,
                    event,
                })
                .await;
            Ok(updated)
        }
        ChangeOutcome::Conflict(current) => Err(ApiError::Conflict(format!(
            "job changed while this request ran; it is now {current}"
        ))),
    }
}

async fn start(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<JobView>> {
    let job = visible_job(&state, &user, id).await?;
    job.status.check(JobStatus::Queued)?;
    let hours_ahead = jobs::queued_hours_ahead(&state.db).await?;
    let estimated_start_time = now() + Duration::seconds((hours_ahead * 3600.0) as i64);
    let event = Event::new(job.id, "status", "info", "Job queued for training")
        .with_details(json!({"from": job.status, "to": "queued"}));
    let job = apply(
        &state,
        &user,
        &job,
        Change::Queue {
            estimated_start_time,
        },
        event,
    )
    .await?;
    Ok(Json(view(&state, job).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelJob {
    #[serde(default)]
    reason: String,
}

async fn cancel(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<Uuid>,
    ApiJson(request): ApiJson<CancelJob>,
) -> ApiResult<Json<JobView>> {
    let job = visible_job(&state, &user, id).await?;
    job.status.check(JobStatus::Cancelled)?;
    let reason = match request.reason.trim() {
        "" => "no reason given",
        reason if reason.chars().count() > 1000 => {
            return Err(ApiError::Validation(vec![FieldError::new(
                "reason",
                "must be at most 1000 characters",
            )]))
        }
        reason => reason,
    };
    let final_cost = jobs::accrued_cost(&job, now());
    let event = Event::new(
        job.id,
        "status",
        "warning",
        format!("Job cancelled: {reason}"),
    )
    .with_details(json!({"from": job.status, "to": "cancelled", "final_cost": final_cost}));
    let job = apply(
        &state,
        &user,
        &job,
        Change::Cancel { reason, final_cost },
        event,
    )
    .await?;
    Ok(Json(view(&state, job).await?))
}

#[derive(Deserialize)]
struct ListParams {
    status: Option<String>,
    limit: Option<i64>,
    offset: Option<i64>,
}

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
    let mut views = Vec::with_capacity(rows.len());
    for job in rows {
        views.push(view(&state, job).await?);
    }
    Ok(Json(Page::new(views, total, limit, offset)))
}

async fn detail(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<JobView>> {
    let job = visible_job(&state, &user, id).await?;
    Ok(Json(view(&state, job).await?))
}

#[derive(Deserialize)]
struct MetricParams {
    limit: Option<i64>,
    interval: Option<i64>,
}

#[derive(Serialize)]
struct MetricList {
    data: Vec<MetricPoint>,
}

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

#[derive(Deserialize)]
struct EventParams {
    event_type: Option<String>,
    severity: Option<String>,
    limit: Option<i64>,
    offset: Option<i64>,
}

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
