//! The agent protocol under `/api/v1/agent/…` (wire types in `protocol::agent`):
//! heartbeats, claims (long-poll), the training file and checkpoints to fetch, report
//! batches from the agent's outbox, artifact uploads and the end of an attempt. Every
//! route authenticates the agent by its secret.

use axum::body::Body;
use axum::extract::{FromRequestParts, State};
use axum::http::{header, request::Parts, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::TryStreamExt;
use protocol::agent::{
    ArtifactUpload, AttemptOutcome, ClaimRequest, Heartbeat, HeartbeatReply, ReportBatch,
    ReportReply,
};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::error::ErrorBody;
use super::{ApiJson, ApiPath, ApiQuery};
use crate::db::agents::Agent;
use crate::db::artifacts::Artifact;
use crate::db::attempts::Checkpoint;
use crate::domain::JobStatus;
use crate::service::{fleet, validation, AppState, ServiceError, ServiceResult};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(heartbeat))
        .routes(routes!(claim))
        .routes(routes!(training_file))
        .routes(routes!(validation_file_of_attempt))
        .routes(routes!(checkpoint_archive))
        .routes(routes!(reports))
        .routes(routes!(upload_artifact))
        .routes(routes!(finish))
        .routes(routes!(validation_file))
        .routes(routes!(validation_artifact))
        .routes(routes!(validation_progress))
        .routes(routes!(finish_validation))
}

/// The agent making the request, authenticated by `Authorization: Bearer <agent secret>`.
pub struct CurrentAgent(pub Agent);

impl FromRequestParts<AppState> for CurrentAgent {
    type Rejection = ServiceError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        fleet::authenticate(state, bearer_secret(parts)?)
            .await
            .map(CurrentAgent)
    }
}

/// The asking agent's id alone, which the report path needs: known without a read once
/// this replica has seen the agent.
pub struct CurrentAgentId(pub Uuid);

impl FromRequestParts<AppState> for CurrentAgentId {
    type Rejection = ServiceError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        fleet::authenticate_id(state, bearer_secret(parts)?)
            .await
            .map(CurrentAgentId)
    }
}

fn bearer_secret(parts: &Parts) -> Result<&str, ServiceError> {
    crate::request::bearer_token(&parts.headers).ok_or(ServiceError::Unauthorized)
}

/// Records the agent's telemetry; tells it whether to stop its current attempt.
#[utoipa::path(post, path = "/agent/heartbeat", tag = "agent protocol",
    request_body(content = Object, description = "protocol::agent::Heartbeat"),
    responses((status = 200, body = Object, description = "protocol::agent::HeartbeatReply"), (status = 401, body = ErrorBody)))]
async fn heartbeat(
    State(state): State<AppState>,
    CurrentAgent(agent): CurrentAgent,
    ApiJson(beat): ApiJson<Heartbeat>,
) -> ServiceResult<Json<HeartbeatReply>> {
    Ok(Json(fleet::heartbeat(&state, &agent, &beat).await?))
}

/// Long-poll for work: answers 200 with an assignment as soon as a fitting job is
/// queued, or 204 after `wait_seconds` (capped by `fleet.max_claim_wait_seconds`).
#[utoipa::path(post, path = "/agent/claim", tag = "agent protocol",
    request_body(content = Object, description = "protocol::agent::ClaimRequest"),
    responses((status = 200, body = Object, description = "protocol::agent::Work: a training assignment or a validation"), (status = 204), (status = 401, body = ErrorBody)))]
async fn claim(
    State(state): State<AppState>,
    CurrentAgent(agent): CurrentAgent,
    ApiJson(request): ApiJson<ClaimRequest>,
) -> ServiceResult<Response> {
    Ok(match fleet::claim(&state, &agent, &request).await? {
        Some(assignment) => Json(assignment).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

fn streamed(size: u64, content_type: &str, bytes: Body) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type.to_owned()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        bytes,
    )
        .into_response()
}

/// A stored training file's bytes, streamed from disk.
async fn stream_file(path: &str) -> ServiceResult<Response> {
    let handle = tokio::fs::File::open(path).await?;
    let size = handle.metadata().await?.len();
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(handle));
    Ok(streamed(size, "application/octet-stream", body))
}

/// The training file of an attempt the agent runs.
#[utoipa::path(get, path = "/agent/attempts/{id}/training-file", tag = "agent protocol", params(("id" = Uuid, Path)),
    responses((status = 200, content_type = "application/octet-stream", body = String), (status = 404, body = ErrorBody)))]
async fn training_file(
    State(state): State<AppState>,
    CurrentAgent(agent): CurrentAgent,
    ApiPath(id): ApiPath<Uuid>,
) -> ServiceResult<Response> {
    let file = fleet::attempt_training_file(&state, &agent, id).await?;
    stream_file(&file.file_path).await
}

/// The validation file of an attempt the agent runs, when its job has one.
#[utoipa::path(get, path = "/agent/attempts/{id}/validation-file", tag = "agent protocol", params(("id" = Uuid, Path)),
    responses((status = 200, content_type = "application/octet-stream", body = String), (status = 404, body = ErrorBody)))]
async fn validation_file_of_attempt(
    State(state): State<AppState>,
    CurrentAgent(agent): CurrentAgent,
    ApiPath(id): ApiPath<Uuid>,
) -> ServiceResult<Response> {
    let file = fleet::attempt_validation_file(&state, &agent, id).await?;
    stream_file(&file.file_path).await
}

/// A checkpoint archive (tar) of a job the agent runs an attempt of.
#[utoipa::path(get, path = "/agent/checkpoints/{id}/archive", tag = "agent protocol", params(("id" = Uuid, Path)),
    responses((status = 200, content_type = "application/x-tar", body = String), (status = 404, body = ErrorBody)))]
async fn checkpoint_archive(
    State(state): State<AppState>,
    CurrentAgent(agent): CurrentAgent,
    ApiPath(id): ApiPath<Uuid>,
) -> ServiceResult<Response> {
    let download = fleet::checkpoint_archive(&state, &agent, id).await?;
    Ok(streamed(
        download.size,
        "application/x-tar",
        Body::from_stream(download.bytes),
    ))
}

/// A batch from the agent's outbox: stages, per-step metrics and events, each stored
/// once however often it arrives. The reply says whether to stop.
#[utoipa::path(post, path = "/agent/attempts/{id}/reports", tag = "agent protocol", params(("id" = Uuid, Path)),
    request_body(content = Object, description = "protocol::agent::ReportBatch"),
    responses((status = 200, body = Object, description = "protocol::agent::ReportReply"), (status = 404, body = ErrorBody)))]
async fn reports(
    State(state): State<AppState>,
    CurrentAgentId(agent_id): CurrentAgentId,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(batch): ApiJson<ReportBatch>,
) -> ServiceResult<Json<ReportReply>> {
    Ok(Json(fleet::reports(&state, agent_id, id, &batch).await?))
}

#[derive(Serialize, ToSchema)]
struct UploadedArtifact {
    artifact: Artifact,
    /// Set for checkpoints.
    checkpoint: Option<Checkpoint>,
}

/// Uploads an artifact of an attempt; the body is the file, streamed to the artifact
/// store and checked against `sha256` (422 when it differs; nothing is kept). A repeated
/// upload of the same bytes answers with the stored artifact.
#[utoipa::path(put, path = "/agent/attempts/{id}/artifacts", tag = "agent protocol",
    params(("id" = Uuid, Path), ("kind" = String, Query), ("name" = String, Query), ("sha256" = String, Query),
           ("step" = Option<u64>, Query), ("epoch" = Option<u64>, Query)),
    request_body(content = String, content_type = "application/octet-stream"),
    responses((status = 201, body = UploadedArtifact), (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn upload_artifact(
    State(state): State<AppState>,
    CurrentAgent(agent): CurrentAgent,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(upload): ApiQuery<ArtifactUpload>,
    body: Body,
) -> ServiceResult<(StatusCode, Json<UploadedArtifact>)> {
    let stream = body.into_data_stream().map_err(|e| e.to_string());
    let (artifact, checkpoint) =
        fleet::upload_artifact(&state, &agent, id, &upload, stream).await?;
    Ok((
        StatusCode::CREATED,
        Json(UploadedArtifact {
            artifact,
            checkpoint,
        }),
    ))
}

#[derive(Serialize, ToSchema)]
struct Finished {
    /// The job's status after this attempt.
    job_status: Option<JobStatus>,
}

/// Ends an attempt: succeeded, failed (with the kind of failure), interrupted by a spot
/// notice, or stopped after a cancel. Repeating it changes nothing.
#[utoipa::path(post, path = "/agent/attempts/{id}/finish", tag = "agent protocol", params(("id" = Uuid, Path)),
    request_body(content = Object, description = "protocol::agent::AttemptOutcome"),
    responses((status = 200, body = Finished), (status = 404, body = ErrorBody)))]
async fn finish(
    State(state): State<AppState>,
    CurrentAgent(agent): CurrentAgent,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(outcome): ApiJson<AttemptOutcome>,
) -> ServiceResult<Json<Finished>> {
    Ok(Json(Finished {
        job_status: fleet::finish(&state, &agent, id, outcome).await?,
    }))
}

/// A training file of the validation the agent runs (the job's training or validation file).
#[utoipa::path(get, path = "/agent/validations/{id}/files/{file_id}", tag = "agent protocol",
    params(("id" = Uuid, Path), ("file_id" = Uuid, Path)),
    responses((status = 200, content_type = "application/octet-stream", body = String), (status = 404, body = ErrorBody)))]
async fn validation_file(
    State(state): State<AppState>,
    CurrentAgent(agent): CurrentAgent,
    ApiPath((id, file_id)): ApiPath<(Uuid, Uuid)>,
) -> ServiceResult<Response> {
    let file = validation::agent_file(&state, &agent, id, file_id).await?;
    stream_file(&file.file_path).await
}

/// An adapter file of the validated job or of its comparison baseline.
#[utoipa::path(get, path = "/agent/validations/{id}/artifacts/{artifact_id}", tag = "agent protocol",
    params(("id" = Uuid, Path), ("artifact_id" = Uuid, Path)),
    responses((status = 200, content_type = "application/octet-stream", body = String), (status = 404, body = ErrorBody)))]
async fn validation_artifact(
    State(state): State<AppState>,
    CurrentAgent(agent): CurrentAgent,
    ApiPath((id, artifact_id)): ApiPath<(Uuid, Uuid)>,
) -> ServiceResult<Response> {
    let download = validation::agent_artifact(&state, &agent, id, artifact_id).await?;
    Ok(streamed(
        download.size,
        "application/octet-stream",
        Body::from_stream(download.bytes),
    ))
}

#[derive(Serialize, ToSchema)]
struct Noted {
    ok: bool,
}

/// Progress of a validation the agent runs, shown live on the job's stream.
#[utoipa::path(post, path = "/agent/validations/{id}/progress", tag = "agent protocol", params(("id" = Uuid, Path)),
    request_body(content = Object, description = "protocol::validation::ValidationProgress"),
    responses((status = 200, body = Noted), (status = 404, body = ErrorBody)))]
async fn validation_progress(
    State(state): State<AppState>,
    CurrentAgent(agent): CurrentAgent,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(progress): ApiJson<protocol::validation::ValidationProgress>,
) -> ServiceResult<Json<Noted>> {
    validation::progress(&state, &agent, id, &progress).await?;
    Ok(Json(Noted { ok: true }))
}

/// Ends a validation with its suites' reports (or the failure); the control plane adds
/// the judge's scores, gates and verdict. Repeating it changes nothing.
#[utoipa::path(post, path = "/agent/validations/{id}/finish", tag = "agent protocol", params(("id" = Uuid, Path)),
    request_body(content = Object, description = "protocol::validation::ValidationOutcome"),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)))]
async fn finish_validation(
    State(state): State<AppState>,
    CurrentAgent(agent): CurrentAgent,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(outcome): ApiJson<protocol::validation::ValidationOutcome>,
) -> ServiceResult<Json<serde_json::Value>> {
    let run = validation::finish(&state, &agent, id, outcome).await?;
    Ok(Json(
        serde_json::json!({"status": run.status, "overall_status": run.overall_status}),
    ))
}
