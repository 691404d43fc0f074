//! The agent protocol under `/api/v1/agent/…` (wire types in `protocol::agent`):
//! heartbeats, claims (long-poll), the training file and checkpoints to fetch, report
//! batches from the agent's outbox, artifact uploads and the end of an attempt. Every
//! route authenticates the agent by its secret.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::{header, request::Parts, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::TryStreamExt;
use protocol::agent::{
    ArtifactUpload, AttemptOutcome, ClaimRequest, Heartbeat, HeartbeatReply, Report, ReportBatch,
    ReportReply,
};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::error::{ApiError, ApiResult, ErrorBody};
use super::{ApiJson, ApiQuery, AppState};
use crate::auth::token_hash;
use crate::db::agents::{self, Agent};
use crate::db::artifacts::{self, Artifact, Stored};
use crate::db::attempts::{self, Attempt, Checkpoint, Progress};
use crate::db::events::Event;
use crate::db::metrics::MetricPoint;
use crate::db::{files, jobs, now};
use crate::domain::JobStatus;
use crate::live::JobUpdate;
use crate::recovery::{end_attempt, Ending};
use crate::storage::StorageError;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(heartbeat))
        .routes(routes!(claim))
        .routes(routes!(training_file))
        .routes(routes!(checkpoint_archive))
        .routes(routes!(reports))
        .routes(routes!(upload_artifact))
        .routes(routes!(finish))
}

/// The agent making the request, authenticated by `Authorization: Bearer <agent secret>`.
pub struct CurrentAgent(pub Agent);

impl FromRequestParts<AppState> for CurrentAgent {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let secret = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(ApiError::Unauthorized)?;
        agents::authenticate(&state.db, &token_hash(secret.trim()))
            .await?
            .map(CurrentAgent)
            .ok_or(ApiError::Unauthorized)
    }
}

async fn store_heartbeat(state: &AppState, agent: &Agent, beat: &Heartbeat) -> ApiResult<Agent> {
    let retain = chrono::Duration::minutes(state.settings.fleet.telemetry_retention_minutes);
    Ok(agents::heartbeat(&state.db, agent.id, beat, now() - retain).await?)
}

/// The attempt `id` if it belongs to the asking agent.
async fn own_attempt(state: &AppState, agent: &Agent, id: Uuid) -> ApiResult<Attempt> {
    attempts::get(&state.db, id)
        .await?
        .filter(|attempt| attempt.agent_id == Some(agent.id))
        .ok_or(ApiError::NotFound("attempt"))
}

/// Whether the agent should stop the attempt: its job was cancelled or given to
/// another agent.
async fn should_stop(state: &AppState, attempt: &Attempt) -> ApiResult<bool> {
    if attempt.ended_at.is_some() {
        return Ok(true);
    }
    let job = jobs::get_any(&state.db, attempt.job_id).await?;
    Ok(!job.is_some_and(|job| {
        job.agent_id == attempt.agent_id
            && matches!(job.status, JobStatus::Provisioning | JobStatus::Training)
    }))
}

/// Records the agent's telemetry; tells it whether to stop its current attempt.
#[utoipa::path(post, path = "/agent/heartbeat", tag = "agent protocol",
    request_body(content = Object, description = "protocol::agent::Heartbeat"),
    responses((status = 200, body = Object, description = "protocol::agent::HeartbeatReply"), (status = 401, body = ErrorBody)))]
async fn heartbeat(
    State(state): State<AppState>,
    CurrentAgent(agent): CurrentAgent,
    ApiJson(beat): ApiJson<Heartbeat>,
) -> ApiResult<Json<HeartbeatReply>> {
    store_heartbeat(&state, &agent, &beat).await?;
    abandon_unnamed_attempt(&state, &agent, &beat).await?;
    let stop_attempt = match beat.attempt_id {
        Some(id) => should_stop(&state, &own_attempt(&state, &agent, id).await?).await?,
        None => false,
    };
    Ok(Json(HeartbeatReply {
        interval_seconds: state.settings.fleet.heartbeat_interval_seconds,
        stop_attempt,
    }))
}

/// An attempt the control plane thinks the agent runs, but its heartbeats have not named
/// for `fleet.offline_after_seconds` since it began, is one the agent lost (its state wiped,
/// a bug): end it as lost so the job goes back to the queue instead of hanging.
async fn abandon_unnamed_attempt(
    state: &AppState,
    agent: &Agent,
    beat: &Heartbeat,
) -> ApiResult<()> {
    let Some(current) = agent
        .current_attempt_id
        .filter(|a| beat.attempt_id != Some(*a))
    else {
        return Ok(());
    };
    let Some(attempt) = attempts::get(&state.db, current).await? else {
        return Ok(());
    };
    let grace = chrono::Duration::seconds(state.settings.fleet.offline_after_seconds as i64);
    if attempt.ended_at.is_none() && now() - attempt.started_at > grace {
        tracing::warn!(agent = %agent.name, attempt_id = %attempt.id, "agent no longer reports its attempt; ending it as lost");
        end_attempt(state, &attempt, Ending::Lost).await?;
    }
    Ok(())
}

/// Long-poll for work: answers 200 with an assignment as soon as a fitting job is
/// queued, or 204 after `wait_seconds` (capped by `fleet.max_claim_wait_seconds`).
#[utoipa::path(post, path = "/agent/claim", tag = "agent protocol",
    request_body(content = Object, description = "protocol::agent::ClaimRequest"),
    responses((status = 200, body = Object, description = "protocol::agent::Assignment"), (status = 204), (status = 401, body = ErrorBody)))]
async fn claim(
    State(state): State<AppState>,
    CurrentAgent(agent): CurrentAgent,
    ApiJson(request): ApiJson<ClaimRequest>,
) -> ApiResult<Response> {
    let agent = store_heartbeat(&state, &agent, &request.heartbeat).await?;
    if agent.status == "draining" {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let wait = request
        .wait_seconds
        .min(state.settings.fleet.max_claim_wait_seconds);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    loop {
        // Register interest before looking, so a job queued in between wakes us.
        let notified = state.work_available.notified();
        if let Some(assignment) =
            crate::scheduler::claim(&state, &agent, &request.heartbeat).await?
        {
            return Ok(Json(assignment).into_response());
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        // Jobs queued through another replica raise no local signal: look again each second.
        let _ = tokio::time::timeout((deadline - now).min(Duration::from_secs(1)), notified).await;
    }
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

/// The training file of an attempt the agent runs.
#[utoipa::path(get, path = "/agent/attempts/{id}/training-file", tag = "agent protocol", params(("id" = Uuid, Path)),
    responses((status = 200, content_type = "application/octet-stream", body = String), (status = 404, body = ErrorBody)))]
async fn training_file(
    State(state): State<AppState>,
    CurrentAgent(agent): CurrentAgent,
    Path(id): Path<Uuid>,
) -> ApiResult<Response> {
    let attempt = own_attempt(&state, &agent, id).await?;
    let job = jobs::get_any(&state.db, attempt.job_id)
        .await?
        .ok_or(ApiError::NotFound("job"))?;
    let file = files::get(&state.db, job.training_file_id)
        .await?
        .ok_or(ApiError::NotFound("training file"))?;
    let handle = tokio::fs::File::open(&file.file_path).await?;
    let size = handle.metadata().await?.len();
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(handle));
    Ok(streamed(size, "application/octet-stream", body))
}

/// A checkpoint archive (tar) of a job the agent runs an attempt of.
#[utoipa::path(get, path = "/agent/checkpoints/{id}/archive", tag = "agent protocol", params(("id" = Uuid, Path)),
    responses((status = 200, content_type = "application/x-tar", body = String), (status = 404, body = ErrorBody)))]
async fn checkpoint_archive(
    State(state): State<AppState>,
    CurrentAgent(agent): CurrentAgent,
    Path(id): Path<Uuid>,
) -> ApiResult<Response> {
    let checkpoint = attempts::checkpoint(&state.db, id)
        .await?
        .ok_or(ApiError::NotFound("checkpoint"))?;
    let runs_job = jobs::get_any(&state.db, checkpoint.job_id)
        .await?
        .is_some_and(|job| job.agent_id == Some(agent.id));
    if !runs_job {
        return Err(ApiError::NotFound("checkpoint"));
    }
    let download = state
        .artifacts
        .get(&checkpoint.storage_path)
        .await
        .map_err(storage_error)?;
    Ok(streamed(
        download.size,
        "application/x-tar",
        Body::from_stream(download.bytes),
    ))
}

fn metric_point(metric: &protocol::agent::MetricReport) -> MetricPoint {
    MetricPoint {
        step: metric.step as i64,
        epoch: Some(metric.epoch.floor() as i64),
        training_loss: Some(metric.training_loss).filter(|v| v.is_finite()),
        validation_loss: metric.validation_loss.filter(|v| v.is_finite()),
        learning_rate: Some(metric.learning_rate),
        grad_norm: Some(metric.grad_norm).filter(|v| v.is_finite()),
        tokens_per_second: Some(metric.tokens_per_second),
        gpu_utilization: metric.gpu_utilization.map(i64::from),
        memory_used_gb: metric.memory_used_gb,
        recorded_at: metric.recorded_at,
    }
}

/// A batch from the agent's outbox: stages, per-step metrics and events, each stored
/// once however often it arrives. The reply says whether to stop.
#[utoipa::path(post, path = "/agent/attempts/{id}/reports", tag = "agent protocol", params(("id" = Uuid, Path)),
    request_body(content = Object, description = "protocol::agent::ReportBatch"),
    responses((status = 200, body = Object, description = "protocol::agent::ReportReply"), (status = 404, body = ErrorBody)))]
async fn reports(
    State(state): State<AppState>,
    CurrentAgent(agent): CurrentAgent,
    Path(id): Path<Uuid>,
    ApiJson(batch): ApiJson<ReportBatch>,
) -> ApiResult<Json<ReportReply>> {
    let attempt = own_attempt(&state, &agent, id).await?;
    if should_stop(&state, &attempt).await? {
        return Ok(Json(ReportReply {
            accepted: 0,
            stop_attempt: true,
        }));
    }
    let mut metrics = Vec::new();
    let mut events = Vec::new();
    let mut stage = None;
    let mut latest = None;
    for report in &batch.reports {
        match report {
            Report::Stage { key, stage: s, at } => {
                stage = Some(s.as_str());
                let mut event = Event::new(
                    attempt.job_id,
                    "info",
                    "info",
                    format!("Stage: {}", s.as_str().replace('_', " ")),
                )
                .with_details(serde_json::json!({"stage": s.as_str()}));
                event.created_at = *at;
                events.push(agent_event(event, &attempt, key));
            }
            Report::Metric { metric, .. } => {
                stage = Some("training");
                metrics.push(metric_point(metric));
                latest = Some(metric);
            }
            Report::Event {
                key,
                event_type,
                severity,
                message,
                details,
                at,
            } => {
                let event_type = match event_type.as_str() {
                    "warning" | "error" | "checkpoint" | "metrics" => event_type.as_str(),
                    _ => "info",
                };
                let mut event = Event::new(
                    attempt.job_id,
                    event_type,
                    severity.as_str(),
                    message.clone(),
                );
                event.details = details.clone().map(sqlx::types::Json);
                event.created_at = *at;
                events.push(agent_event(event, &attempt, key));
            }
        }
    }
    let at = now();
    let cost = attempts::job_cost(&state.db, attempt.job_id, at).await?;
    let remaining = latest.map(|m| {
        let done = m
            .step
            .saturating_sub(attempt.resumed_from_step.unwrap_or(0) as u64)
            .max(1);
        let left = m.total_steps.saturating_sub(m.step);
        let per_step = m.elapsed_seconds / done as f64;
        (per_step * left as f64) as i64
    });
    let progress = Progress {
        stage,
        step: latest.map(|m| m.step as i64),
        total_steps: latest.map(|m| m.total_steps as i64),
        epoch: latest.map(|m| m.epoch.floor() as i64),
        total_epochs: None,
        elapsed_seconds: Some((at - attempt.started_at).num_seconds()),
        remaining_seconds: remaining,
        cost: crate::db::jobs::round_cents(cost),
    };
    let outcome =
        attempts::record_reports(&state.db, &attempt, &metrics, &events, &progress).await?;
    if let Some(job) = outcome.job {
        state
            .live
            .publish(JobUpdate::Status { job: Box::new(job) })
            .await;
    }
    for point in outcome.new_metrics {
        state
            .live
            .publish(JobUpdate::Metrics {
                job_id: attempt.job_id,
                point: Box::new(point),
            })
            .await;
    }
    for event in outcome.new_events {
        state
            .live
            .publish(JobUpdate::Event {
                event: Box::new(event),
            })
            .await;
    }
    Ok(Json(ReportReply {
        accepted: outcome.accepted,
        stop_attempt: false,
    }))
}

fn agent_event(mut event: Event, attempt: &Attempt, key: &str) -> Event {
    event.attempt_id = Some(attempt.id);
    event.source = Some("agent".into());
    event.idempotency_key = Some(format!("attempt-{}:{key}", attempt.attempt_number));
    event
}

fn storage_error(error: StorageError) -> ApiError {
    match error {
        StorageError::TooLarge(_) => ApiError::PayloadTooLarge(error.to_string()),
        StorageError::ChecksumMismatch { .. } => ApiError::Unprocessable {
            message: error.to_string(),
            rules: vec!["checksum".into()],
        },
        StorageError::Body(_) => ApiError::BadRequest(error.to_string()),
        StorageError::Store(object_store::Error::NotFound { .. }) => {
            ApiError::NotFound("artifact content")
        }
        other => ApiError::Internal(other.to_string()),
    }
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
    Path(id): Path<Uuid>,
    ApiQuery(upload): ApiQuery<ArtifactUpload>,
    body: Body,
) -> ApiResult<(StatusCode, Json<UploadedArtifact>)> {
    let attempt = own_attempt(&state, &agent, id).await?;
    let name = upload.name.trim();
    if name.is_empty() || name.len() > 200 || name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(ApiError::Validation(vec![crate::domain::FieldError::new(
            "name",
            "must be a plain file name of 1 to 200 characters",
        )]));
    }
    if upload.sha256.len() != 64 || !upload.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ApiError::Validation(vec![crate::domain::FieldError::new(
            "sha256",
            "must be 64 hex digits",
        )]));
    }
    let artifact_id = Uuid::new_v4();
    let key = format!(
        "jobs/{}/{}/{artifact_id}-{name}",
        attempt.job_id,
        upload.kind.as_str()
    );
    let stream = body.into_data_stream().map_err(|e| e.to_string());
    let size = state
        .artifacts
        .put_verified(
            &key,
            stream,
            state.settings.storage.max_artifact_bytes,
            &upload.sha256,
        )
        .await
        .map_err(storage_error)?;
    let artifact = Artifact {
        id: artifact_id,
        job_id: attempt.job_id,
        attempt_id: Some(attempt.id),
        artifact_type: upload.kind.as_str().to_owned(),
        name: name.to_owned(),
        file_path: key.clone(),
        file_size: size as i64,
        mime_type: Some(mime_type(name).to_owned()),
        checksum: Some(upload.sha256.to_ascii_lowercase()),
        epoch: upload.epoch.map(|e| e as i64),
        step: upload.step.map(|s| s as i64),
        download_count: 0,
        last_downloaded_at: None,
        created_at: now(),
    };
    let artifact = match artifacts::upsert(&state.db, &artifact).await? {
        Stored::New(artifact) => artifact,
        Stored::Existing(artifact) => {
            state.artifacts.delete(&key).await;
            artifact
        }
        Stored::Replaced { artifact, old_path } => {
            state.artifacts.delete(&old_path).await;
            artifact
        }
    };
    let checkpoint = match (upload.kind, upload.step) {
        (protocol::agent::ArtifactKind::Checkpoint, Some(step)) => {
            let checkpoint = attempts::insert_checkpoint(
                &state.db,
                &Checkpoint {
                    id: Uuid::new_v4(),
                    job_id: attempt.job_id,
                    attempt_id: Some(attempt.id),
                    step: step as i64,
                    epoch: upload.epoch.map(|e| e as i64),
                    storage_path: artifact.file_path.clone(),
                    size_bytes: artifact.file_size,
                    sha256: artifact.checksum.clone().unwrap_or_default(),
                    artifact_id: Some(artifact.id),
                    created_at: now(),
                },
            )
            .await?;
            Some(checkpoint)
        }
        _ => None,
    };
    tracing::info!(job_id = %attempt.job_id, kind = upload.kind.as_str(), name, size, "artifact stored");
    Ok((
        StatusCode::CREATED,
        Json(UploadedArtifact {
            artifact,
            checkpoint,
        }),
    ))
}

fn mime_type(name: &str) -> &'static str {
    match name.rsplit('.').next() {
        Some("json") => "application/json",
        Some("jsonl") => "application/x-ndjson",
        Some("tar") => "application/x-tar",
        _ => "application/octet-stream",
    }
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
    Path(id): Path<Uuid>,
    ApiJson(outcome): ApiJson<AttemptOutcome>,
) -> ApiResult<Json<Finished>> {
    let attempt = own_attempt(&state, &agent, id).await?;
    end_attempt(&state, &attempt, Ending::Reported(outcome)).await?;
    let job = jobs::get_any(&state.db, attempt.job_id).await?;
    Ok(Json(Finished {
        job_status: job.map(|j| j.status),
    }))
}
