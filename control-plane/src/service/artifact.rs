//! A job's artifacts, checkpoints and attempts for its owner, and expiring signed
//! download links to artifacts' bytes (spec §5.6).

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::job::visible_job;
use super::{AppState, CurrentUser, ServiceError, ServiceResult};
use crate::auth::{sign, verify_signature};
use crate::db::artifacts::{self, Artifact, Stored};
use crate::db::attempts::{self, Attempt, Checkpoint};
use crate::db::now;
use crate::storage::Download;

pub async fn job_artifacts(
    state: &AppState,
    user: &CurrentUser,
    job_id: Uuid,
) -> ServiceResult<Vec<Artifact>> {
    let job = visible_job(state, user, job_id).await?;
    Ok(artifacts::for_job(&state.db, job.id).await?)
}

/// A job's checkpoints and its other artifacts, for a job the caller already found
/// visible (the job page reads the job once).
pub async fn outputs_of(
    state: &AppState,
    job: &crate::db::jobs::Job,
) -> ServiceResult<(Vec<Checkpoint>, Vec<Artifact>)> {
    let (checkpoints, artifacts) = futures::try_join!(
        attempts::checkpoints(&state.db, job.id),
        artifacts::for_job(&state.db, job.id)
    )?;
    let artifacts = artifacts
        .into_iter()
        .filter(|a| a.artifact_type != protocol::agent::ArtifactKind::Checkpoint)
        .collect();
    Ok((checkpoints, artifacts))
}

pub async fn job_checkpoints(
    state: &AppState,
    user: &CurrentUser,
    job_id: Uuid,
) -> ServiceResult<Vec<Checkpoint>> {
    let job = visible_job(state, user, job_id).await?;
    Ok(attempts::checkpoints(&state.db, job.id).await?)
}

pub async fn job_attempts(
    state: &AppState,
    user: &CurrentUser,
    job_id: Uuid,
) -> ServiceResult<Vec<Attempt>> {
    let job = visible_job(state, user, job_id).await?;
    Ok(attempts::for_job(&state.db, job.id).await?)
}

#[derive(Serialize, ToSchema)]
pub struct DownloadLink {
    pub download_url: String,
    pub expires_at: DateTime<Utc>,
}

fn signed_message(id: Uuid, expires: i64) -> String {
    format!("artifact:{id}:{expires}")
}

/// A signed link under `base_url` to one of the user's artifacts, valid for
/// `storage.signed_url_ttl_seconds`.
pub async fn signed_download(
    state: &AppState,
    user: &CurrentUser,
    base_url: &str,
    id: Uuid,
) -> ServiceResult<DownloadLink> {
    let artifact = artifacts::get(&state.db, id)
        .await?
        .ok_or(ServiceError::NotFound("artifact"))?;
    // Another user's artifact is as absent as a missing one.
    visible_job(state, user, artifact.job_id)
        .await
        .map_err(|_| ServiceError::NotFound("artifact"))?;
    let at = now();
    let expires_at = at + Duration::seconds(state.settings.storage.signed_url_ttl_seconds);
    let expires = expires_at.timestamp();
    let signature = sign(&state.signing_key, &signed_message(id, expires));
    Ok(DownloadLink {
        download_url: format!(
            "{base_url}/api/v1/artifacts/{id}/content?expires={expires}&signature={signature}"
        ),
        expires_at,
    })
}

/// An artifact and its bytes, through a signed link (counting the download): refused once
/// it expired or when the signature does not match.
pub async fn signed_content(
    state: &AppState,
    id: Uuid,
    expires: i64,
    signature: &str,
) -> ServiceResult<(Artifact, Download)> {
    if !verify_signature(&state.signing_key, &signed_message(id, expires), signature) {
        return Err(ServiceError::Forbidden("invalid download signature".into()));
    }
    if expires < now().timestamp() {
        return Err(ServiceError::Forbidden(
            "this download link has expired".into(),
        ));
    }
    let artifact = artifacts::get(&state.db, id)
        .await?
        .ok_or(ServiceError::NotFound("artifact"))?;
    let download = state
        .artifacts
        .get(&artifact.file_path)
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))?;
    // Each fetch of the bytes is a download: counted, and priced as network cost.
    artifacts::count_download(&state.db, id, now()).await?;
    super::cost::after_download(state, artifact.job_id).await;
    Ok((artifact, download))
}

/// Records `artifact` (stored under `artifact.file_path`) and keeps one object per
/// artifact: the new bytes when they are new, else the object already recorded.
pub(super) async fn record(state: &AppState, artifact: &Artifact) -> ServiceResult<Artifact> {
    Ok(match artifacts::upsert(&state.db, artifact).await? {
        Stored::New(artifact) => artifact,
        Stored::Existing(existing) => {
            state.artifacts.delete(&artifact.file_path).await;
            existing
        }
        Stored::Replaced { artifact, old_path } => {
            state.artifacts.delete(&old_path).await;
            artifact
        }
    })
}
