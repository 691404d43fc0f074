//! Training files: upload (streamed to disk), list, detail, conversation preview, delete.

use axum::extract::{DefaultBodyLimit, Multipart, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::error::ErrorBody;
use super::{ApiPath, ApiQuery, Page};
use crate::db::files::{StoredConversation, TrainingFile};
use crate::request::upload::receive_upload;
use crate::service::file::{self, FileQuery};
use crate::service::{page_bounds, AppState, CurrentUser, ServiceError, ServiceResult};
use axum::extract::multipart::MultipartRejection;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_training_files, upload))
        .routes(routes!(get_training_file, remove))
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
async fn list_training_files(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiQuery(params): ApiQuery<ListParams>,
) -> ServiceResult<Json<Page<TrainingFile>>> {
    let (limit, offset) = page_bounds(params.limit, params.offset, 50)?;
    let query = FileQuery {
        status: params.status,
        enrichment_status: params.enrichment_status,
        search: params.search,
        limit,
        offset,
    };
    let (rows, total) = file::list_files(&state, &user, query).await?;
    Ok(Json(Page::new(rows, total, limit, offset)))
}

/// One training file with its enrichment results.
#[utoipa::path(get, path = "/training-files/{id}", tag = "training-files", params(("id" = Uuid, Path)),
    responses((status = 200, body = TrainingFile), (status = 404, body = ErrorBody)))]
async fn get_training_file(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiPath(id): ApiPath<Uuid>,
) -> ServiceResult<Json<TrainingFile>> {
    Ok(Json(file::owned_file(&state, &user, id).await?))
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
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(params): ApiQuery<ConversationParams>,
) -> ServiceResult<Json<ConversationList>> {
    let (limit, _) = page_bounds(params.limit.or(Some(5)), None, 5)?;
    let data = file::preview(&state, &user, id, params.quality_min, limit).await?;
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
    ApiPath(id): ApiPath<Uuid>,
) -> ServiceResult<StatusCode> {
    file::delete_file(&state, &user, id).await?;
    Ok(StatusCode::NO_CONTENT)
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
    multipart: Result<Multipart, MultipartRejection>,
) -> ServiceResult<(StatusCode, Json<TrainingFile>)> {
    let multipart = multipart.map_err(|rejection| {
        ServiceError::BadRequest(format!(
            "an upload is a multipart/form-data body with a \"file\" part: {}",
            rejection.body_text()
        ))
    })?;
    let file = receive_upload(&state, &user, &headers, multipart).await?;
    Ok((StatusCode::CREATED, Json(file)))
}
