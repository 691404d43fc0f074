//! Training files: registering an upload (enrichment then runs in the background),
//! listing, reading, previewing and deleting the owner's files.

use std::path::PathBuf;

use uuid::Uuid;

use super::{one_of, AppState, CurrentUser, ServiceError, ServiceResult};
use crate::db::files::{self, FileFilter, NewFile, StoredConversation, TrainingFile};
use crate::domain::{EnrichmentStatus, FieldError};

/// The longest name a training file may have.
pub const MAX_NAME_CHARS: usize = 200;

/// An upload already streamed to disk at `path`.
pub struct ReceivedFile {
    pub id: Uuid,
    pub path: PathBuf,
    pub original_name: Option<String>,
    pub mime_type: Option<String>,
    pub size: u64,
    pub sha256: String,
    pub name: Option<String>,
    pub description: Option<String>,
}

/// Stores the file's row and queues its enrichment; removes the bytes when it cannot.
pub async fn register_upload(
    state: &AppState,
    user: &CurrentUser,
    received: ReceivedFile,
) -> ServiceResult<TrainingFile> {
    if received.size == 0 {
        let _ = tokio::fs::remove_file(&received.path).await;
        return Err(ServiceError::BadRequest(
            "the uploaded file is empty".into(),
        ));
    }
    let id = received.id;
    let given = received.name.filter(|n| !n.trim().is_empty());
    if given
        .as_ref()
        .is_some_and(|n| n.trim().chars().count() > MAX_NAME_CHARS)
    {
        let _ = tokio::fs::remove_file(&received.path).await;
        return Err(ServiceError::Validation(vec![FieldError::new(
            "name",
            format!("must be at most {MAX_NAME_CHARS} characters"),
        )]));
    }
    // The file's own name stands in for a missing one, cut to the same length.
    let name = given
        .or_else(|| {
            received
                .original_name
                .map(|n| n.trim().chars().take(MAX_NAME_CHARS).collect())
        })
        .filter(|n: &String| !n.trim().is_empty())
        .unwrap_or_else(|| format!("training-file-{id}"));
    let path_text = received.path.to_string_lossy().into_owned();
    let file = files::insert(
        &state.db,
        NewFile {
            id,
            user_id: user.0.id,
            name: name.trim(),
            description: received
                .description
                .as_deref()
                .filter(|d| !d.trim().is_empty()),
            file_path: &path_text,
            file_size: received.size as i64,
            mime_type: received.mime_type.as_deref(),
            sha256: &received.sha256,
        },
    )
    .await;
    let file = match file {
        Ok(file) => file,
        Err(error) => {
            let _ = tokio::fs::remove_file(&received.path).await;
            return Err(error.into());
        }
    };
    tracing::info!(file_id = %id, size = received.size, "training file uploaded");
    state.enricher.enqueue(id);
    Ok(file)
}

/// The filters of a file list, as the caller gave them.
pub struct FileQuery {
    pub status: Option<String>,
    pub enrichment_status: Option<String>,
    pub search: Option<String>,
    pub limit: i64,
    pub offset: i64,
}

/// The caller's training files, newest first, and how many match.
pub async fn list_files(
    state: &AppState,
    user: &CurrentUser,
    query: FileQuery,
) -> ServiceResult<(Vec<TrainingFile>, i64)> {
    if let Some(status) = &query.status {
        one_of("status", status, &["active", "archived", "deleted"])?;
    }
    if let Some(status) = &query.enrichment_status {
        status.parse::<EnrichmentStatus>().map_err(|message| {
            ServiceError::Validation(vec![FieldError::new("enrichment_status", message)])
        })?;
    }
    let filter = FileFilter {
        status: query.status,
        enrichment_status: query.enrichment_status,
        search: query.search.filter(|s| !s.trim().is_empty()),
        limit: query.limit,
        offset: query.offset,
    };
    Ok(files::list(&state.db, user.0.id, &filter).await?)
}

/// One of the caller's training files; another user's is as absent as a missing one.
pub async fn owned_file(
    state: &AppState,
    user: &CurrentUser,
    id: Uuid,
) -> ServiceResult<TrainingFile> {
    files::get_owned(&state.db, id, user.0.id)
        .await?
        .ok_or(ServiceError::NotFound("training file"))
}

/// Stored conversations of one of the caller's files, best-scored first.
pub async fn preview(
    state: &AppState,
    user: &CurrentUser,
    id: Uuid,
    quality_min: Option<f64>,
    limit: i64,
) -> ServiceResult<Vec<StoredConversation>> {
    owned_file(state, user, id).await?;
    Ok(files::conversations(&state.db, id, quality_min, limit).await?)
}

/// Soft-deletes one of the caller's files; refused while a live job uses it.
pub async fn delete_file(state: &AppState, user: &CurrentUser, id: Uuid) -> ServiceResult<()> {
    // Ownership before any other rule: another user's file is absent, in use or not.
    owned_file(state, user, id).await?;
    match files::soft_delete(&state.db, id, user.0.id).await? {
        Ok(true) => Ok(()),
        Ok(false) => Err(ServiceError::NotFound("training file")),
        Err(job) => Err(ServiceError::Conflict(format!(
            "training file is in use by job \"{job}\"; cancel or finish it first"
        ))),
    }
}
