//! A job's artifacts, checkpoints and attempts for its owner; expiring signed download
//! links (spec §5.6); an operator's resume of an interrupted or failed job.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::auth::CurrentUser;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::jobs::{apply_change, visible_job, JobView};
use super::{ApiJson, ApiQuery, AppState};
use crate::auth::{sign, verify_signature};
use crate::db::artifacts::{self, Artifact};
use crate::db::attempts::{self, Attempt, Checkpoint};
use crate::db::events::Event;
use crate::db::jobs::Change;
use crate::db::now;
use crate::domain::JobStatus;

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
    Path(id): Path<Uuid>,
) -> ApiResult<Json<ArtifactList>> {
    let job = visible_job(&state, &user, id).await?;
    Ok(Json(ArtifactList {
        data: artifacts::for_job(&state.db, job.id).await?,
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
    Path(id): Path<Uuid>,
) -> ApiResult<Json<CheckpointList>> {
    let job = visible_job(&state, &user, id).await?;
    Ok(Json(CheckpointList {
        data: attempts::checkpoints(&state.db, job.id).await?,
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
    Path(id): Path<Uuid>,
) -> ApiResult<Json<AttemptList>> {
    let job = visible_job(&state, &user, id).await?;
    Ok(Json(AttemptList {
        data: attempts::for_job(&state.db, job.id).await?,
    }))
}

/// What a job has cost so far: every attempt, GPU hours, spot savings.
#[utoipa::path(get, path = "/jobs/{id}/cost", tag = "jobs", params(("id" = Uuid, Path)),
    responses((status = 200, body = crate::costs::JobCost), (status = 404, body = ErrorBody)))]
async fn job_cost(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<crate::costs::JobCost>> {
    let job = visible_job(&state, &user, id).await?;
    Ok(Json(crate::costs::job_cost(&state, &job, now()).await?))
}

#[derive(Serialize, ToSchema)]
pub struct DownloadLink {
    pub download_url: String,
    pub expires_at: DateTime<Utc>,
}

fn signed_message(id: Uuid, expires: i64) -> String {
    format!("artifact:{id}:{expires}")
}

/// The base URL links are built on: `public_url`, else the request's Host.
fn base_url(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(url) = &state.settings.public_url {
        return url.trim_end_matches('/').to_owned();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    format!("http://{host}")
}

/// An expiring signed link to an artifact's bytes (`storage.signed_url_ttl_seconds`);
/// counts the download.
#[utoipa::path(get, path = "/artifacts/{id}/download", tag = "artifacts", params(("id" = Uuid, Path)),
    responses((status = 200, body = DownloadLink), (status = 404, body = ErrorBody)))]
async fn download_link(
    State(state): State<AppState>,
    user: CurrentUser,
    headers: HeaderMap,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<DownloadLink>> {
    Ok(Json(signed_download(&state, &user, &headers, id).await?))
}

/// A signed, expiring link to one of the user's artifacts; counts the download.
pub async fn signed_download(
    state: &AppState,
    user: &CurrentUser,
    headers: &HeaderMap,
    id: Uuid,
) -> ApiResult<DownloadLink> {
    let artifact = artifacts::get(&state.db, id)
        .await?
        .ok_or(ApiError::NotFound("artifact"))?;
    // Another user's artifact is as absent as a missing one.
    visible_job(state, user, artifact.job_id)
        .await
        .map_err(|_| ApiError::NotFound("artifact"))?;
    let at = now();
    let expires_at = at + Duration::seconds(state.settings.storage.signed_url_ttl_seconds);
    let expires = expires_at.timestamp();
    let signature = sign(&state.signing_key, &signed_message(id, expires));
    artifacts::count_download(&state.db, id, at).await?;
    Ok(DownloadLink {
        download_url: format!(
            "{}/api/v1/artifacts/{id}/content?expires={expires}&signature={signature}",
            base_url(state, headers)
        ),
        expires_at,
    })
}

#[derive(Deserialize, IntoParams)]
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
    Path(id): Path<Uuid>,
    ApiQuery(signed): ApiQuery<Signed>,
) -> ApiResult<Response> {
    if !verify_signature(
        &state.signing_key,
        &signed_message(id, signed.expires),
        &signed.signature,
    ) {
        return Err(ApiError::Forbidden("invalid download signature".into()));
    }
    if signed.expires < now().timestamp() {
        return Err(ApiError::Forbidden("this download link has expired".into()));
    }
    let artifact = artifacts::get(&state.db, id)
        .await?
        .ok_or(ApiError::NotFound("artifact"))?;
    let download = state
        .artifacts
        .get(&artifact.file_path)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
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

/// Queues an interrupted or failed job again, resuming from a checkpoint.
#[utoipa::path(post, path = "/jobs/{id}/resume", tag = "jobs", params(("id" = Uuid, Path)), request_body = Resume,
    responses((status = 200, body = JobView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn resume(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<Uuid>,
    ApiJson(request): ApiJson<Resume>,
) -> ApiResult<Json<JobView>> {
    let job = visible_job(&state, &user, id).await?;
    Ok(Json(
        resume_job(&state, &user, &job, request.checkpoint_id).await?,
    ))
}

/// Queues an interrupted or failed job again from `checkpoint_id` (default: its latest
/// checkpoint; none: from the start), logging who did it.
pub async fn resume_job(
    state: &AppState,
    user: &CurrentUser,
    job: &crate::db::jobs::Job,
    checkpoint_id: Option<Uuid>,
) -> ApiResult<JobView> {
    if !matches!(job.status, JobStatus::Interrupted | JobStatus::Failed) {
        return Err(ApiError::Conflict(format!(
            "only an interrupted or failed job can be resumed; this one is {}",
            job.status
        )));
    }
    let checkpoint = match checkpoint_id {
        Some(checkpoint_id) => Some(
            attempts::checkpoint(&state.db, checkpoint_id)
                .await?
                .filter(|c| c.job_id == job.id)
                .ok_or_else(|| ApiError::Unprocessable {
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
        "status",
        "info",
        format!("Resumed by {}{from}", user.0.email),
    )
    .with_details(json!({"from": job.status, "to": "queued", "checkpoint_id": checkpoint.as_ref().map(|c| c.id)}));
    let view = apply_change(
        state,
        job,
        Change::Resume {
            checkpoint_id: checkpoint.map(|c| c.id),
        },
        event,
    )
    .await?;
    state.work_available.notify_waiters();
    Ok(view)
}
