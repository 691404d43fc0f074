//! Training files: the list with uploads (with or without JavaScript) and a file's page
//! (eligibility, scores, problems by line, a conversation preview).
use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use uuid::Uuid;

use super::frame::{Frame, PageResult};
use super::{render, PageUser};
use crate::db::files::{StoredConversation, TrainingFile};
use crate::domain::EnrichmentStatus;
use crate::service::file::FileQuery;
use crate::service::job::unmet_eligibility;
use crate::service::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/training/files",
            get(file_list)
                .post(upload)
                // Uploads enforce their own, configurable limit while streaming.
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/training/files/{id}", get(file_detail))
}

#[derive(Deserialize)]
struct FileSearch {
    search: Option<String>,
    enrichment_status: Option<String>,
}

#[derive(Template)]
#[template(path = "files.html")]
struct FilesPage {
    frame: Frame,
    files: Vec<TrainingFile>,
    search: String,
    enrichment_status: String,
    statuses: Vec<&'static str>,
}

async fn file_list(
    State(state): State<AppState>,
    user: PageUser,
    Query(query): Query<FileSearch>,
) -> PageResult {
    let search = query.search.unwrap_or_default();
    let statuses: Vec<&'static str> = EnrichmentStatus::ALL.iter().map(|s| s.as_str()).collect();
    let enrichment_status = query
        .enrichment_status
        .filter(|s| statuses.contains(&s.as_str()))
        .unwrap_or_default();
    let filter = FileQuery {
        status: None,
        enrichment_status: Some(enrichment_status.clone()).filter(|s| !s.is_empty()),
        search: Some(search.clone()),
        limit: 200,
        offset: 0,
    };
    let (list, _) = crate::service::file::list_files(&state, &user.0, filter).await?;
    let page = FilesPage {
        frame: Frame::new(&user, "files", &[("Training files", "/training/files")]),
        files: list,
        search,
        enrichment_status,
        statuses,
    };
    Ok(render(&page))
}

/// The upload form without JavaScript: store the file, then show its page.
async fn upload(
    State(state): State<AppState>,
    user: PageUser,
    headers: HeaderMap,
    multipart: axum::extract::Multipart,
) -> PageResult {
    let file = crate::request::upload::receive_upload(&state, &user.0, &headers, multipart).await?;
    Ok(Redirect::to(&format!("/training/files/{}", file.id)).into_response())
}

#[derive(Template)]
#[template(path = "file.html")]
struct FilePage {
    frame: Frame,
    file: TrainingFile,
    unmet: Vec<String>,
    errors: Vec<String>,
    conversations: Vec<(StoredConversation, Vec<PreviewMessage>)>,
    quality: Vec<(String, String)>,
    scaffolding: Vec<(String, String)>,
    review: Vec<(String, String)>,
}

/// A metadata value as a person reads it: numbers with two decimals unless whole, "—" for
/// nothing, distributions as "name 12 (30%)" lists.
fn shown(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Null => "—".into(),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.to_string(),
            (None, Some(f)) if f.fract() == 0.0 => format!("{f:.0}"),
            (None, Some(f)) => format!("{f:.2}"),
            _ => n.to_string(),
        },
        Value::String(s) => s.clone(),
        Value::Array(items) if items.is_empty() => "none".into(),
        Value::Array(items) => items
            .iter()
            .map(|item| match item.as_object() {
                Some(entry) => {
                    let name = entry
                        .iter()
                        .find(|(k, _)| !matches!(k.as_str(), "count" | "percentage"))
                        .map(|(_, v)| shown(v))
                        .unwrap_or_default();
                    let count = entry.get("count").map(shown).unwrap_or_default();
                    let share = entry.get("percentage").map(shown).unwrap_or_default();
                    format!("{name} {count} ({share}%)")
                }
                None => shown(item),
            })
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    }
}

fn pairs(value: &serde_json::Value) -> Vec<(String, String)> {
    value
        .as_object()
        .map(|map| {
            map.iter()
                .map(|(k, v)| (k.replace('_', " "), shown(v)))
                .collect()
        })
        .unwrap_or_default()
}

/// A stored conversation's messages as (role, content) for the preview.
pub struct PreviewMessage {
    pub role: String,
    pub content: String,
}

fn preview(conversation: &StoredConversation) -> Vec<PreviewMessage> {
    if let Some(text) = &conversation.text {
        return vec![PreviewMessage {
            role: "text".into(),
            content: text.clone(),
        }];
    }
    let messages = conversation.messages.0.as_array();
    messages
        .into_iter()
        .flatten()
        .map(|m| {
            let mut content = m["content"].as_str().unwrap_or_default().to_owned();
            for call in m["tool_calls"].as_array().into_iter().flatten() {
                let function = &call["function"];
                let arguments = match &function["arguments"] {
                    serde_json::Value::String(text) => text.clone(),
                    other => other.to_string(),
                };
                content.push_str(&format!(
                    "\n→ {}({arguments})",
                    function["name"].as_str().unwrap_or("?")
                ));
            }
            let mut role = m["role"].as_str().unwrap_or("?").to_owned();
            if let Some(name) = m["name"].as_str() {
                role = format!("{role} ({name})");
            }
            if m["weight"] == 0 {
                role.push_str(", not trained");
            }
            PreviewMessage {
                role,
                content: content.trim().to_owned(),
            }
        })
        .collect()
}

async fn file_detail(
    State(state): State<AppState>,
    user: PageUser,
    Path(id): Path<Uuid>,
) -> PageResult {
    let file = crate::service::file::owned_file(&state, &user.0, id).await?;
    let conversations = crate::service::file::preview(&state, &user.0, file.id, None, 5)
        .await?
        .into_iter()
        .map(|c| {
            let messages = preview(&c);
            (c, messages)
        })
        .collect();
    let page = FilePage {
        frame: Frame::new(
            &user,
            "files",
            &[("Training files", "/training/files"), (&file.name, "")],
        ),
        unmet: unmet_eligibility(&state, &file),
        errors: file
            .enrichment_error
            .as_deref()
            .map(|e| e.lines().map(str::to_owned).collect())
            .unwrap_or_default(),
        quality: pairs(&file.quality_scores.0),
        scaffolding: pairs(&file.scaffolding_distribution.0),
        review: pairs(&file.human_review.0),
        conversations,
        file,
    };
    Ok(render(&page))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_reads_as_text() {
        use serde_json::json;
        assert_eq!(shown(&json!(null)), "—");
        assert_eq!(shown(&json!(40.0)), "40");
        assert_eq!(shown(&json!(4.256)), "4.26");
        assert_eq!(shown(&json!([])), "none");
        assert_eq!(
            shown(&json!([{"type": "anxious", "count": 3, "percentage": 60.0}])),
            "anxious 3 (60%)"
        );
    }
}
