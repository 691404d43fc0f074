//! A multipart training-file upload (`file`, `name`, `description`), streamed to disk
//! within the upload limit and then registered by the service. Nothing is kept on failure.

use axum::extract::Multipart;
use axum::http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use crate::db::files::TrainingFile;
use crate::domain::FieldError;
use crate::service::file::{register_upload, ReceivedFile};
use crate::service::{AppState, CurrentUser, ServiceError, ServiceResult};

/// Streams the upload to `uploads/<user>/<id>` and registers it as a training file.
pub async fn receive_upload(
    state: &AppState,
    user: &CurrentUser,
    headers: &HeaderMap,
    mut multipart: Multipart,
) -> ServiceResult<TrainingFile> {
    let max = state.settings.limits.max_upload_bytes;
    let too_large =
        || ServiceError::PayloadTooLarge(format!("training files are limited to {max} bytes"));
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
    let mut received: Option<ReceivedFile> = None;
    let mut name = None;
    let mut description = None;

    let result = async {
        while let Some(mut field) = multipart
            .next_field()
            .await
            .map_err(|e| ServiceError::BadRequest(format!("malformed multipart body: {e}")))?
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
                        .map_err(|e| ServiceError::BadRequest(format!("upload interrupted: {e}")))?
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
                    received = Some(ReceivedFile {
                        id,
                        path: path.clone(),
                        original_name,
                        mime_type,
                        size,
                        sha256: hex::encode(hasher.finalize()),
                        name: None,
                        description: None,
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
    let Some(mut received) = received else {
        return Err(ServiceError::BadRequest(
            "multipart field \"file\" is missing".into(),
        ));
    };
    received.name = name;
    received.description = description;
    register_upload(state, user, received).await
}

async fn text_field(
    field: axum::extract::multipart::Field<'_>,
    name: &str,
) -> ServiceResult<String> {
    let text = field
        .text()
        .await
        .map_err(|e| ServiceError::BadRequest(format!("multipart field \"{name}\": {e}")))?;
    if text.len() > 10_000 {
        return Err(ServiceError::Validation(vec![FieldError::new(
            name,
            "must be at most 10000 bytes",
        )]));
    }
    Ok(text)
}
