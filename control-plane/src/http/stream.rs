//! `GET /api/v1/jobs/{id}/stream`: a job's status changes and events as SSE.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::stream::{self, Stream, StreamExt};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::error::ErrorBody;
use super::ApiPath;
use crate::live::JobUpdate;
use crate::service::job::visible_job;
use crate::service::{AppState, CurrentUser, ServiceResult};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(stream_job))
}

fn to_sse(update: &JobUpdate) -> SseEvent {
    let data = match update {
        JobUpdate::Status { job } => serde_json::to_string(job),
        JobUpdate::Event { event, .. } => serde_json::to_string(event),
        JobUpdate::Metrics { point, .. } => serde_json::to_string(point),
    }
    .unwrap_or_default();
    SseEvent::default().event(update.name()).data(data)
}

/// Live updates of one job as server-sent events: `status` (the job), `event` (a log
/// entry), `metrics` (a training step), `resync` (the client fell behind: refetch).
#[utoipa::path(get, path = "/jobs/{id}/stream", tag = "jobs", params(("id" = Uuid, Path)),
    responses((status = 200, content_type = "text/event-stream", body = String), (status = 404, body = ErrorBody)))]
async fn stream_job(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiPath(id): ApiPath<Uuid>,
) -> ServiceResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    // Subscribe before reading the snapshot so nothing written in between is missed.
    let updates = BroadcastStream::new(state.live.subscribe());
    let job = visible_job(&state, &user, id).await?;
    let snapshot = to_sse(&JobUpdate::Status { job: Box::new(job) });
    let live = updates.filter_map(move |update| async move {
        match update {
            Ok(update) if update.job_id() == id => Some(Ok(to_sse(&update))),
            Ok(_) => None,
            // The client fell behind: tell it to refetch rather than silently skip.
            Err(BroadcastStreamRecvError::Lagged(missed)) => Some(Ok(SseEvent::default()
                .event("resync")
                .data(missed.to_string()))),
        }
    });
    let stream = stream::once(async move { Ok(snapshot) }).chain(live);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
