//! Training jobs: create, configure, start, cancel, and read their metrics and events.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::error::ErrorBody;
use super::{ApiJson, ApiPath, ApiQuery, Page};
use crate::db::events::Event;
use crate::db::metrics::MetricPoint;
use crate::domain::estimate::Estimate;
use crate::service::estimate::EstimateRequest;
use crate::service::job::{self, ConfigureJob, CreateJob, JobView};
use crate::service::metric_history::{self, HistoryQuery, HistoryStream, Series};
use crate::service::{page_bounds, AppState, CurrentUser, ServiceError, ServiceResult};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_jobs, create_job))
        .routes(routes!(estimate))
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

/// The duration, cost and completion window a job would have, before anything exists:
/// the body of `POST /jobs` and `PUT /jobs/{id}/configure` together (fields the estimate
/// does not need are ignored). Tokens are estimated from characters; the throughput is
/// measured on earlier runs of the same base model and GPU model, else modelled from the
/// GPU's peak, else the preset's table; the answer says which.
#[utoipa::path(post, path = "/jobs/estimate", tag = "jobs", request_body = EstimateRequest,
    responses((status = 200, body = Estimate), (status = 422, body = ErrorBody)))]
async fn estimate(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(request): ApiJson<EstimateRequest>,
) -> ServiceResult<Json<Estimate>> {
    Ok(Json(
        crate::service::estimate::estimate_request(&state, &user, &request).await?,
    ))
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
    /// Points to return, 1 to 100000, default 100.
    limit: Option<i64>,
    /// Keep every n-th step (and the last), default 1.
    interval: Option<i64>,
    /// A downsample for charts instead of `limit`/`interval`: at most this many points
    /// (4 to 100000), the steps holding the minimum and the maximum of `series` in each of
    /// `(max_points - 2) / 2` equal step buckets, plus the series' first and last points.
    max_points: Option<i64>,
    /// The series `max_points` keeps the extremes of (default `training_loss`); only
    /// points that carry it are returned.
    #[param(inline)]
    series: Option<Series>,
    /// `rows` (default): one object per step under `data`, streamed as it is read;
    /// `columns`: one array per metric under `columns`, index-aligned with
    /// `columns.step` (a third of the bytes for charts).
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

/// The history in the form asked for (documentation: the rows form is streamed).
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // the OpenAPI schema of the two bodies the handler writes
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
) -> ServiceResult<Response> {
    let query = HistoryQuery {
        limit: params.limit,
        interval: params.interval,
        max_points: params.max_points,
        series: params.series,
    };
    let points = metric_history::stream(&state, &user, id, &query).await?;
    Ok(match params.format.unwrap_or_default() {
        MetricFormat::Rows => (
            [(header::CONTENT_TYPE, "application/json")],
            Body::from_stream(streamed_rows(points)),
        )
            .into_response(),
        MetricFormat::Columns => {
            let points: Vec<MetricPoint> =
                points.try_collect().await.map_err(ServiceError::from)?;
            Json(MetricTable {
                columns: points.into(),
            })
            .into_response()
        }
    })
}

/// Points the rows form serialises per body chunk.
const ROWS_PER_CHUNK: usize = 256;

/// `{"data": [...]}` written chunk by chunk as the rows arrive. A database error after
/// the first chunk can only end the body early (the client sees invalid JSON).
fn streamed_rows(
    points: HistoryStream,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    let mut written = false;
    let rows = points.ready_chunks(ROWS_PER_CHUNK).map(move |chunk| {
        let mut out = Vec::with_capacity(chunk.len() * 256);
        for point in chunk {
            let point = point.map_err(|error| {
                tracing::warn!(%error, "a metric history stream failed");
                std::io::Error::other(error)
            })?;
            if std::mem::replace(&mut written, true) {
                out.push(b',');
            }
            serde_json::to_writer(&mut out, &point).map_err(std::io::Error::other)?;
        }
        Ok(Bytes::from(out))
    });
    futures::stream::once(async { Ok(Bytes::from_static(b"{\"data\":[")) })
        .chain(rows)
        .chain(futures::stream::once(async {
            Ok(Bytes::from_static(b"]}"))
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
