//! Quality validation (spec §5.7): run the suites on a completed job, read the results,
//! export a report.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::error::ErrorBody;
use super::{ApiJson, ApiPath, ApiQuery};
use crate::db::validations::ValidationRun;
use crate::request::base_url;
use crate::service::validation::{self, Accepted, ExportLink, RunRequest};
use crate::service::{AppState, CurrentUser, ServiceError, ServiceResult};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(run_validation))
        .routes(routes!(job_validation))
        .routes(routes!(validation_run))
        .routes(routes!(export_run))
}

/// Queues the suites on a completed job's adapter; an agent runs them. 409 for a job
/// that is not completed, 422 naming an unknown suite or bad gate, 422 for a baseline of
/// another base model, 404 for another user's job or baseline.
#[utoipa::path(post, path = "/validation/{job_id}/run", tag = "validation", params(("job_id" = Uuid, Path)),
    request_body = RunRequest,
    responses((status = 202, body = Accepted), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 422, body = ErrorBody)))]
async fn run_validation(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiPath(job_id): ApiPath<Uuid>,
    ApiJson(request): ApiJson<RunRequest>,
) -> ServiceResult<(StatusCode, Json<Accepted>)> {
    let accepted = validation::request_run(&state, &user, job_id, &request).await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct History {
    /// Every run of the job, newest first, instead of the latest.
    #[serde(default)]
    all: bool,
}

#[derive(Serialize, ToSchema)]
#[serde(untagged)]
enum JobValidation {
    Latest(Box<ValidationRun>),
    All { data: Vec<ValidationRun> },
}

/// The job's latest validation (`?all=true`: every run, newest first).
#[utoipa::path(get, path = "/validation/{job_id}", tag = "validation", params(("job_id" = Uuid, Path), History),
    responses((status = 200, body = ValidationRun), (status = 404, body = ErrorBody)))]
async fn job_validation(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiPath(job_id): ApiPath<Uuid>,
    ApiQuery(history): ApiQuery<History>,
) -> ServiceResult<Json<JobValidation>> {
    let (_, runs) = validation::job_runs(&state, &user, job_id).await?;
    if history.all {
        return Ok(Json(JobValidation::All { data: runs }));
    }
    let latest = runs
        .into_iter()
        .next()
        .ok_or(ServiceError::NotFound("validation"))?;
    Ok(Json(JobValidation::Latest(Box::new(latest))))
}

/// One validation run.
#[utoipa::path(get, path = "/validation/runs/{id}", tag = "validation", params(("id" = Uuid, Path)),
    responses((status = 200, body = ValidationRun), (status = 404, body = ErrorBody)))]
async fn validation_run(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiPath(id): ApiPath<Uuid>,
) -> ServiceResult<Json<ValidationRun>> {
    Ok(Json(validation::get_run(&state, &user, id).await?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ExportRequest {
    /// pdf, csv or json
    format: String,
}

/// Renders the run as a report (PDF, CSV with one row per metric, or JSON), keeps it as
/// the job's `validation_report` artifact, and returns a signed download link.
#[utoipa::path(post, path = "/validation/runs/{id}/export", tag = "validation", params(("id" = Uuid, Path)),
    request_body = ExportRequest,
    responses((status = 200, body = ExportLink), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn export_run(
    State(state): State<AppState>,
    user: CurrentUser,
    headers: HeaderMap,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(request): ApiJson<ExportRequest>,
) -> ServiceResult<Json<ExportLink>> {
    let base = base_url(&state, &headers);
    Ok(Json(
        validation::export(&state, &user, &base, id, &request.format).await?,
    ))
}
