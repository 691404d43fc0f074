//! Training files: upload (streamed to disk), list, detail, conversation preview, delete.

use axum::extract::{DefaultBodyLimit, Multipart, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::auth::CurrentUser;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::{ApiQuery, AppState, Page};
use crate::db::files::{self, FileFilter, NewFile, StoredConversation, TrainingFile};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, upload))
        .routes(routes!(detail, remove))
        .routes(routes!(conversations))
        // Uploads enforce their own, configurable limit while streaming.
        .layer(DefaultBodyLimit::disable())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListParams {
    /// active, archived or deleted
    status: Option<String>,
    /// pending, processing, completed or failed
    enrichment_status: Option<String>,
    /// Case-insensitive substring of the name.
    search: Option<String>,
    /// 1 to 500, default 50.
    limit: Option<i64>,
    offset: Option<i64>,
}

/// The caller's training files, newest first.
#[utoipa::path(get, path = "/training-files", tag = "training-files", params(ListParams),
    responses((status = 200, body = Page<TrainingFile>), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiQuery(params): ApiQuery<ListParams>,
) -> ApiResult<Json<Page<TrainingFile>>> {
    let (limit, offset) = super::page_bounds(params.limit, params.offset, 50)?;
    if let Some(status) = &params.status {
        super::one_of("status", status, &["active", "archived", "deleted"])?;
    }
    if let Some(status) = &params.enrichment_status {
        super::one_of(
            "enrichment_status",
            status,
            &["pending", "processing", "completed", "failed"],
        )?;
    }
    let filter = FileFilter {
        status: params.status,
        enrichment_status: params.enrichment_status,
        search: params.search.filter(|s| !s.trim().is_empty()),
        limit,
        offset,
    };
    let (rows, total) = files::list(&state.db, user.0.id, &filter).await?;
    Ok(Json(Page::new(rows, total, limit, offset)))
}

async fn owned_file(state: &AppState, user: &CurrentUser, id: Uuid) -> ApiResult<TrainingFile> {
    files::get_owned(&state.db, id, user.0.id)
        .await?
        .ok_or(ApiError::NotFound("training file"))
}

/// One training file with its enrichment results.
#[utoipa::path(get, path = "/training-files/{id}", tag = "training-files", params(("id" = Uuid, Path)),
    responses((status = 200, body = TrainingFile), (status = 404, body = ErrorBody)))]
async fn detail(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<TrainingFile>> {
    Ok(Json(owned_file(&state, &user, id).await?))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ConversationParams {
    /// Default 5.
    limit: Option<i64>,
    /// Only conversations scored at least this (0-10).
    quality_min: Option<f64>,
}

#[derive(Serialize, ToSchema)]
struct ConversationList {
    data: Vec<StoredConversation>,
    count: usize,
}

/// Stored conversations for preview, best-scored first.
#[utoipa::path(get, path = "/training-files/{id}/conversations", tag = "training-files",
    params(("id" = Uuid, Path), ConversationParams),
    responses((status = 200, body = ConversationList), (status = 404, body = ErrorBody)))]
async fn conversations(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<Uuid>,
    ApiQuery(params): ApiQuery<ConversationParams>,
) -> ApiResult<Json<ConversationList>> {
    owned_file(&state, &user, id).await?;
    let (limit, _) = super::page_bounds(params.limit.or(Some(5)), None, 5)?;
    let data = files::conversations(&state.db, id, params.quality_min, limit).await?;
    Ok(Json(ConversationList {
        count: data.len(),
        data,
    }))
}

/// Soft-deletes a training file; refused while a live job uses it.
#[utoipa::path(delete, path = "/training-files/{id}", tag = "training-files", params(("id" = Uuid, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn remove(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<Uuid>,
) -> ApiResult<StatusCode> {
    match files::soft_delete(&state.db, id, user.0.id).await? {
        Ok(true) => Ok(StatusCode::NO_CONTENT),
        Ok(false) => Err(ApiError::NotFound("training file")),
        Err(job) => Err(ApiError::Conflict(format!(
            "training file is in use by job \"{job}\"; cancel or finish it first"
        ))),
    }
}

/// The multipart form of an upload.
#[derive(ToSchema)]
#[allow(dead_code)] // describes the request for the OpenAPI document only
struct UploadForm {
    /// Chat JSONL, a JSON array of conversations, or CSV prompt,completion[,system].
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
    name: Option<String>,
    description: Option<String>,
}

/// Uploads a training file; enrichment then runs in the background.
///
/// Streams the `file` part to disk, enforcing the size limit as bytes arrive.
#[utoipa::path(post, path = "/training-files", tag = "training-files",
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses((status = 201, body = TrainingFile), (status = 400, body = ErrorBody), (status = 413, body = ErrorBody)))]
async fn upload(
    State(state): State<AppState>,
    user: CurrentUser,
    headers: HeaderMap,
    multipart: Multipart,
) -> ApiResult<(StatusCode, Json<TrainingFile>)> {
    let file = receive_upload(&state, &user, &headers, multipart).await?;
    Ok((StatusCode::CREATED, Json(file)))
}

/// Streams a multipart upload (`file`, `name`, `description`) to disk within the upload
/// limit, stores the file's row and queues its enrichment. Nothing is kept on failure.
pub async fn receive_upload(
    state: &AppState,
    user: &CurrentUser,
    headers: &HeaderMap,
    mut multipart: Multipart,
) -> ApiResult<TrainingFile> {
    let max = state.settings.limits.max_upload_bytes;
    let too_large =
        || ApiError::PayloadTooLarge(format!("training files are limited to {max} bytes"));
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // Multipart framing adds a little; anything much larger cannot fit.
    if declared.is_some_and(|length| length > max.saturating_add(64 * 1024)) {
        return Err(too_large());
    }

    let id = Uuid::new_v4();
    let directory = state.settings.uploads_dir().join(user.0.id.to_string());
    tokio::fs::create_dir_all(&directory).await?;
    let path = directory.join(id.to_string());
    let mut stored: Option<Stored> = None;
    let mut name = None;
    let mut description = None;

    let result = async {
        while let Some(mut field) = multipart
            .next_field()
            .await
            .map_err(|e| ApiError::BadRequest(format!("malformed multipart body: {e}")))?
        {
            match field.name() {
                Some("file") => {
                    let original_name = field.file_name().map(str::to_owned);
                    let mime_type = field.content_type().map(str::to_owned);
                    let mut out = tokio::fs::File::create(&path).await?;
                    let mut hasher = Sha256::new();
                    let mut size: u64 = 0;
                    while let Some(chunk) = field
                        .chunk()
                        .await
                        .map_err(|e| ApiError::BadRequest(format!("upload interrupted: {e}")))?
                    {
                        size += chunk.len() as u64;
                        if size > max {
                            return Err(too_large());
                        }
                        hasher.update(&chunk);
                        out.write_all(&chunk).await?;
                    }
                    out.flush().await?;
                    out.sync_all().await?;
                    stored = Some(Stored {
                        original_name,
                        mime_type,
                        size,
                        sha256: hex::encode(hasher.finalize()),
                    });
                }
                Some("name") => name = Some(text_field(field, "name").await?),
                Some("description") => description = Some(text_field(field, "description").await?),
                _ => {}
            }
        }
        Ok(())
    }
    .await;
    if let Err(error) = result {
        let _ = tokio::fs::remove_file(&path).await;
        return Err(error);
    }
    let Some(stored) = stored else {
        return Err(ApiError::BadRequest(
            "multipart field \"file\" is missing".into(),
        ));
    };
    if stored.size == 0 {
        let _ = tokio::fs::remove_file(&path).await;
        return Err(ApiError::BadRequest("the uploaded file is empty".into()));
    }
    let name = name
        .filter(|n| !n.trim().is_empty())
        .or(stored.original_name)
        .unwrap_or_else(|| format!("training-file-{id}"));
    let path_text = path.to_string_lossy().into_owned();
    let file = files::insert(
        &state.db,
        NewFile {
            id,
            user_id: user.0.id,
            name: name.trim(),
            description: description.as_deref().filter(|d| !d.trim().is_empty()),
            file_path: &path_text,
            file_size: stored.size as i64,
            mime_type: stored.mime_type.as_deref(),
            sha256: &stored.sha256,
        },
    )
    .await;
    let file = match file {
        Ok(file) => file,
        Err(error) => {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(error.into());
        }
    };
    tracing::info!(file_id = %id, size = stored.size, "training file uploaded");
    state.enricher.enqueue(id);
    Ok(file)
}

struct Stored {
    original_name: Option<String>,
    mime_type: Option<String>,
    size: u64,
    sha256: String,
}

async fn text_field(field: axum::extract::multipart::Field<'_>, name: &str) -> ApiResult<String> {
    let text = field
        .text()
        .await
        .map_err(|e| ApiError::BadRequest(format!("multipart field \"{name}\": {e}")))?;
    if text.len() > 10_000 {
        return Err(ApiError::Validation(vec![crate::domain::FieldError::new(
            name,
            "must be at most 10000 bytes",
        )]));
    }
    Ok(text)
}
