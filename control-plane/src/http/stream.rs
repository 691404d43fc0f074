//! `GET /api/v1/jobs/{id}/stream`: a job's status changes and events as SSE.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::stream::{Stream, StreamExt};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::error::ErrorBody;
use super::ApiPath;
use crate::live::JobUpdate;
use crate::service::feed::{self, FeedItem, FeedMessage, Position};
use crate::service::{AppState, CurrentUser, ServiceError, ServiceResult};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(stream_job))
}

/// One server-sent event of a job's stream, as a client reads it off the wire.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // describes the stream for the OpenAPI document only
struct JobStreamEvent {
    /// status, event, metrics, validation or end.
    event: String,
    /// JSON: the job (status), a log entry (event), a training step (metrics), or
    /// `{"status"}` (end).
    data: String,
    /// The position to resume after, as `Last-Event-ID`.
    id: Option<String>,
}

fn to_sse(message: FeedMessage) -> SseEvent {
    let (name, data) = match &message.item {
        FeedItem::Update(update) => (
            update.name(),
            match update {
                JobUpdate::Status { job } => serde_json::to_string(job),
                JobUpdate::Event { event, .. } => serde_json::to_string(event),
                JobUpdate::Metrics { point, .. } => serde_json::to_string(point),
                JobUpdate::Validation { validation, .. } => serde_json::to_string(validation),
            },
        ),
        FeedItem::End { status } => (
            "end",
            serde_json::to_string(&serde_json::json!({"status": status})),
        ),
    };
    SseEvent::default()
        .id(message.position.to_string())
        .event(name)
        .data(data.unwrap_or_default())
}

/// Live updates of one job as server-sent events: `status` (the job; first, then on every
/// change), `event` (a log entry), `metrics` (a training step) and, once the job is
/// completed, failed or cancelled, `end` (`{"status"}`), after which the stream closes.
/// Every event has an `id`; a client reconnecting with it as `Last-Event-ID` (browsers do
/// so by themselves) is sent the events and steps it missed, none twice.
#[utoipa::path(get, path = "/jobs/{id}/stream", tag = "jobs",
    params(("id" = Uuid, Path), ("Last-Event-ID" = Option<String>, Header, description = "the id of the last event received, to resume after it")),
    responses((status = 200, description = "the job's live updates", content_type = "text/event-stream", body = JobStreamEvent),
        (status = 400, description = "Last-Event-ID is not a position this stream sent", body = ErrorBody),
        (status = 404, description = "no such job, or another user's", body = ErrorBody)))]
async fn stream_job(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiPath(id): ApiPath<Uuid>,
    headers: HeaderMap,
) -> ServiceResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let resume_from = match headers.get("last-event-id") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| ServiceError::BadRequest("Last-Event-ID is not text".into()))?
                .parse::<Position>()?,
        ),
    };
    let messages = feed::follow(&state, &user, id, resume_from).await?;
    let stream = messages.map(|message| Ok(to_sse(message)));
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
