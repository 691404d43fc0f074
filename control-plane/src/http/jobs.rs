//! Training jobs: create, configure, start, cancel, and read their metrics and events.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::error::ErrorBody;
use super::{ApiJson, ApiPath, ApiQuery, Page};
use crate::db::events::Event;
use crate::db::metrics::MetricPoint;
use crate::service::job::{self, ConfigureJob, CreateJob, JobView};
use crate::service::{page_bounds, AppState, CurrentUser, ServiceResult};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_jobs, create_job))
        .routes(routes!(get_job))
        .routes(routes!(configure))
        .routes(routes!(start))
        .routes(routes!(cancel))
        .routes(routes!(metric_history))
        .routes(routes!(latest_metrics))
        .routes(routes!(event_log))
}

/// Creates a draft job on an eligible training file (spec §7.1).
#[utoipa::path(post, path = "/jobs", tag = "jobs", request_body = CreateJob,
    responses((status = 201, body = JobView), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn create_job(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(request): ApiJson<CreateJob>,
) -> ServiceResult<(StatusCode, Json<JobView>)> {
    let created = job::create_draft(&state, &user, &request, None).await?;
    Ok((StatusCode::CREATED, Json(job::view(&state, created).await?)))
}

/// Sets hyperparameters, GPU and recovery policy; answers with the cost estimate.
#[utoipa::path(put, path = "/jobs/{id}/configure", tag = "jobs", params(("id" = Uuid, Path)), request_body = ConfigureJob,
    responses((status = 200, body = JobView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn configure(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(request): ApiJson<ConfigureJob>,
) -> ServiceResult<Json<JobView>> {
    let found = job::visible_job(&state, &user, id).await?;
    let configured = job::configure_job(&state, found, &request, None).await?;
    Ok(Json(job::view(&state, configured).await?))
}

/// Queues a configured job for training.
#[utoipa::path(post, path = "/jobs/{id}/start", tag = "jobs", params(("id" = Uuid, Path)),
    responses((status = 200, body = JobView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn start(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiPath(id): ApiPath<Uuid>,
) -> ServiceResult<Json<JobView>> {
    let found = job::visible_job(&state, &user, id).await?;
    let queued = job::queue_job(&state, &found).await?;
    Ok(Json(job::view(&state, queued).await?))
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
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(request): ApiJson<CancelJob>,
) -> ServiceResult<Json<JobView>> {
    let found = job::visible_job(&state, &user, id).await?;
    let cancelled = job::cancel_job(&state, &found, &request.reason).await?;
    Ok(Json(job::view(&state, cancelled).await?))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListParams {
    /// A job status, such as queued, training or interrupted.
    status: Option<String>,
    limit: Option<i64>,
    offset: Option<i64>,
}

/// The caller's jobs (every job for operators and admins), newest first.
#[utoipa::path(get, path = "/jobs", tag = "jobs", params(ListParams),
    responses((status = 200, body = Page<JobView>), (status = 422, body = ErrorBody)))]
async fn list_jobs(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiQuery(params): ApiQuery<ListParams>,
) -> ServiceResult<Json<Page<JobView>>> {
    let (limit, offset) = page_bounds(params.limit, params.offset, 50)?;
    let (rows, total) =
        job::list_jobs(&state, &user, params.status.as_deref(), limit, offset).await?;
    Ok(Json(Page::new(rows, total, limit, offset)))
}

/// One job with its queue position and latest metrics.
#[utoipa::path(get, path = "/jobs/{id}", tag = "jobs", params(("id" = Uuid, Path)),
    responses((status = 200, body = JobView), (status = 404, body = ErrorBody)))]
async fn get_job(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiPath(id): ApiPath<Uuid>,
) -> ServiceResult<Json<JobView>> {
    let found = job::visible_job(&state, &user, id).await?;
    Ok(Json(job::view(&state, found).await?))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct MetricParams {
    /// Points to return, default 100.
    limit: Option<i64>,
    /// Keep every n-th step (and the last), default 1.
    interval: Option<i64>,
    /// `rows` (default): one object per step under `data`; `columns`: one array per metric
    /// under `columns`, index-aligned with `columns.step` (a third of the bytes for charts).
    #[param(inline)]
    format: Option<MetricFormat>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum MetricFormat {
    #[default]
    Rows,
    Columns,
}

#[derive(Serialize, ToSchema)]
struct MetricList {
    data: Vec<MetricPoint>,
}

/// A job's metrics as one array per field, index-aligned.
#[derive(Serialize, ToSchema)]
struct MetricColumns {
    step: Vec<i64>,
    epoch: Vec<Option<i64>>,
    training_loss: Vec<Option<f64>>,
    validation_loss: Vec<Option<f64>>,
    learning_rate: Vec<Option<f64>>,
    grad_norm: Vec<Option<f64>>,
    tokens_per_second: Vec<Option<f64>>,
    gpu_utilization: Vec<Option<i64>>,
    memory_used_gb: Vec<Option<f64>>,
    recorded_at: Vec<chrono::DateTime<chrono::Utc>>,
}

impl From<Vec<MetricPoint>> for MetricColumns {
    fn from(points: Vec<MetricPoint>) -> MetricColumns {
        let column = |f: fn(&MetricPoint) -> Option<f64>| points.iter().map(f).collect();
        MetricColumns {
            step: points.iter().map(|p| p.step).collect(),
            epoch: points.iter().map(|p| p.epoch).collect(),
            training_loss: column(|p| p.training_loss),
            validation_loss: column(|p| p.validation_loss),
            learning_rate: column(|p| p.learning_rate),
            grad_norm: column(|p| p.grad_norm),
            tokens_per_second: column(|p| p.tokens_per_second),
            gpu_utilization: points.iter().map(|p| p.gpu_utilization).collect(),
            memory_used_gb: column(|p| p.memory_used_gb),
            recorded_at: points.iter().map(|p| p.recorded_at).collect(),
        }
    }
}

#[derive(Serialize, ToSchema)]
struct MetricTable {
    columns: MetricColumns,
}

/// The history in the form asked for.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
enum MetricHistory {
    Rows(MetricList),
    Columns(Box<MetricTable>),
}

/// A job's per-step metrics, oldest first.
#[utoipa::path(get, path = "/jobs/{id}/metrics", tag = "jobs", params(("id" = Uuid, Path), MetricParams),
    responses((status = 200, body = MetricHistory), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn metric_history(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(params): ApiQuery<MetricParams>,
) -> ServiceResult<Json<MetricHistory>> {
    let data = job::metric_history(&state, &user, id, params.limit, params.interval).await?;
    Ok(Json(match params.format.unwrap_or_default() {
        MetricFormat::Rows => MetricHistory::Rows(MetricList { data }),
        MetricFormat::Columns => MetricHistory::Columns(Box::new(MetricTable {
            columns: data.into(),
        })),
    }))
}

/// A job's latest metrics point.
#[utoipa::path(get, path = "/jobs/{id}/metrics/latest", tag = "jobs", params(("id" = Uuid, Path)),
    responses((status = 200, body = MetricPoint), (status = 404, body = ErrorBody)))]
async fn latest_metrics(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiPath(id): ApiPath<Uuid>,
) -> ServiceResult<Json<MetricPoint>> {
    Ok(Json(job::latest_metrics(&state, &user, id).await?))
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
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(params): ApiQuery<EventParams>,
) -> ServiceResult<Json<Page<Event>>> {
    let (limit, offset) = page_bounds(params.limit, params.offset, 100)?;
    let (rows, total) = job::event_log(
        &state,
        &user,
        id,
        params.event_type.as_deref(),
        params.severity.as_deref(),
        limit,
        offset,
    )
    .await?;
    Ok(Json(Page::new(rows, total, limit, offset)))
}
