//! A job's artifacts, checkpoints, attempts and cost for its owner; expiring signed
//! download links (spec §5.6); resuming an interrupted or failed job.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::error::ErrorBody;
use super::{ApiJson, ApiPath, ApiQuery};
use crate::db::artifacts::Artifact;
use crate::db::attempts::{Attempt, Checkpoint};
use crate::db::now;
use crate::request::base_url;
use crate::service::artifact::{self, DownloadLink};
use crate::service::cost::{self, JobCost};
use crate::service::job::{self, JobView};
use crate::service::{AppState, CurrentUser, ServiceResult};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_artifacts))
        .routes(routes!(list_checkpoints))
        .routes(routes!(list_attempts))
        .routes(routes!(job_cost))
        .routes(routes!(download_link))
        .routes(routes!(content))
        .routes(routes!(resume))
}

#[derive(Serialize, ToSchema)]
struct ArtifactList {
    data: Vec<Artifact>,
}

/// A job's artifacts: adapter files, checkpoints, the training report.
#[utoipa::path(get, path = "/jobs/{id}/artifacts", tag = "artifacts", params(("id" = Uuid, Path)),
    responses((status = 200, body = ArtifactList), (status = 404, body = ErrorBody)))]
async fn list_artifacts(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiPath(id): ApiPath<Uuid>,
) -> ServiceResult<Json<ArtifactList>> {
    Ok(Json(ArtifactList {
        data: artifact::job_artifacts(&state, &user, id).await?,
    }))
}

#[derive(Serialize, ToSchema)]
struct CheckpointList {
    data: Vec<Checkpoint>,
}

/// A job's checkpoints, by step; any of them can be resumed from.
#[utoipa::path(get, path = "/jobs/{id}/checkpoints", tag = "artifacts", params(("id" = Uuid, Path)),
    responses((status = 200, body = CheckpointList), (status = 404, body = ErrorBody)))]
async fn list_checkpoints(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiPath(id): ApiPath<Uuid>,
) -> ServiceResult<Json<CheckpointList>> {
    Ok(Json(CheckpointList {
        data: artifact::job_checkpoints(&state, &user, id).await?,
    }))
}

#[derive(Serialize, ToSchema)]
struct AttemptList {
    data: Vec<Attempt>,
}

/// A job's attempts: which agent ran it, how each ended, what each cost.
#[utoipa::path(get, path = "/jobs/{id}/attempts", tag = "jobs", params(("id" = Uuid, Path)),
    responses((status = 200, body = AttemptList), (status = 404, body = ErrorBody)))]
async fn list_attempts(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiPath(id): ApiPath<Uuid>,
) -> ServiceResult<Json<AttemptList>> {
    Ok(Json(AttemptList {
        data: artifact::job_attempts(&state, &user, id).await?,
    }))
}

/// What a job has cost so far: every attempt, GPU hours, spot savings.
#[utoipa::path(get, path = "/jobs/{id}/cost", tag = "jobs", params(("id" = Uuid, Path)),
    responses((status = 200, body = JobCost), (status = 404, body = ErrorBody)))]
async fn job_cost(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiPath(id): ApiPath<Uuid>,
) -> ServiceResult<Json<JobCost>> {
    let found = job::visible_job(&state, &user, id).await?;
    Ok(Json(cost::job_cost(&state, &found, now()).await?))
}

/// An expiring signed link to an artifact's bytes (`storage.signed_url_ttl_seconds`);
/// counts the download.
#[utoipa::path(get, path = "/artifacts/{id}/download", tag = "artifacts", params(("id" = Uuid, Path)),
    responses((status = 200, body = DownloadLink), (status = 404, body = ErrorBody)))]
async fn download_link(
    State(state): State<AppState>,
    user: CurrentUser,
    headers: HeaderMap,
    ApiPath(id): ApiPath<Uuid>,
) -> ServiceResult<Json<DownloadLink>> {
    let base = base_url(&state, &headers);
    Ok(Json(
        artifact::signed_download(&state, &user, &base, id).await?,
    ))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct Signed {
    expires: i64,
    signature: String,
}

/// An artifact's bytes through a signed link; no session needed, 403 once it expired or
/// when the signature does not match.
#[utoipa::path(get, path = "/artifacts/{id}/content", tag = "artifacts", security(), params(("id" = Uuid, Path), Signed),
    responses((status = 200, content_type = "application/octet-stream", body = String), (status = 403, body = ErrorBody)))]
async fn content(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(signed): ApiQuery<Signed>,
) -> ServiceResult<Response> {
    let (artifact, download) =
        artifact::signed_content(&state, id, signed.expires, &signed.signature).await?;
    let disposition = format!(
        "attachment; filename=\"{}\"",
        artifact.name.replace('"', "")
    );
    Ok((
        [
            (
                header::CONTENT_TYPE,
                artifact
                    .mime_type
                    .unwrap_or_else(|| "application/octet-stream".into()),
            ),
            (header::CONTENT_LENGTH, download.size.to_string()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        Body::from_stream(download.bytes),
    )
        .into_response())
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
struct Resume {
    /// Default: the latest checkpoint (none: start over).
    checkpoint_id: Option<Uuid>,
}

/// Queues an interrupted or failed job again, resuming from a checkpoint (the owner, an
/// operator or an admin).
#[utoipa::path(post, path = "/jobs/{id}/resume", tag = "jobs", params(("id" = Uuid, Path)), request_body = Resume,
    responses((status = 200, body = JobView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn resume(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(request): ApiJson<Resume>,
) -> ServiceResult<Json<JobView>> {
    let found = job::visible_job(&state, &user, id).await?;
    let resumed = job::resume_job(&state, &user, &found, request.checkpoint_id).await?;
    Ok(Json(job::view(&state, resumed).await?))
}
