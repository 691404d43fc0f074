//! A job's live feed, as its SSE stream serves it: the job's status, its events and its
//! metric points, each tagged with the [`Position`] the client has reached with it. A
//! client that reconnects with that position (`Last-Event-ID`) is sent what it missed from
//! the database, then the live updates, with no metric point or event twice. The feed
//! ends with [`FeedItem::End`] once the job is settled.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use uuid::Uuid;

use super::job::visible_job;
use super::{AppState, CurrentUser, ServiceError, ServiceResult};
use crate::db::events::Event;
use crate::db::jobs::Job;
use crate::db::metrics::MetricPoint;
use crate::db::{self, Db, DbError};
use crate::domain::JobStatus;
use crate::live::JobUpdate;

/// How many rows one replay query reads; a longer gap is replayed page by page.
const REPLAY_PAGE: i64 = 1000;

/// How far a client has read a job's feed: the highest metric step and the latest stored
/// event (by the order events were stored in) it was sent. Written as `step:event`, each
/// part empty when there is none yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    step: Option<i64>,
    event: Option<i64>,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let part = |value: Option<i64>| value.map(|v| v.to_string()).unwrap_or_default();
        write!(f, "{}:{}", part(self.step), part(self.event))
    }
}

impl FromStr for Position {
    type Err = ServiceError;

    fn from_str(text: &str) -> ServiceResult<Position> {
        let invalid = || {
            ServiceError::BadRequest(format!(
                "Last-Event-ID {text:?} is not a position this stream sent (step:event)"
            ))
        };
        let part = |value: &str| match value {
            "" => Ok(None),
            value => value.parse::<i64>().map(Some).map_err(|_| invalid()),
        };
        let (step, event) = text.split_once(':').ok_or_else(invalid)?;
        Ok(Position {
            step: part(step)?,
            event: part(event)?,
        })
    }
}

impl Position {
    fn admits_metric(&self, step: i64) -> bool {
        self.step < Some(step)
    }
}

pub enum FeedItem {
    Update(JobUpdate),
    /// The job is settled; the feed ends after this.
    End {
        status: JobStatus,
    },
}

pub struct FeedMessage {
    pub item: FeedItem,
    /// The position reached with this message: what a reconnecting client sends back.
    pub position: Position,
}

/// The feed of a job the user can see: its status now, what came after `resume_from`
/// when given, then every update as it happens, until the job is settled or the client
/// goes away.
pub async fn follow(
    state: &AppState,
    user: &CurrentUser,
    job_id: Uuid,
    resume_from: Option<Position>,
) -> ServiceResult<ReceiverStream<FeedMessage>> {
    // Subscribe before reading anything, so nothing written in between is missed.
    let updates = state.live.subscribe();
    let job = visible_job(state, user, job_id).await?;
    let position = match resume_from {
        Some(position) => position,
        None => Position {
            step: db::metrics::last_step(&state.db, job_id).await?,
            event: db::events::last_seq(&state.db, job_id).await?,
        },
    };
    let (sender, receiver) = mpsc::channel(64);
    let feed = Feed {
        db: state.db.clone(),
        job_id,
        position,
        sent_events: HashSet::new(),
        sender,
    };
    tokio::spawn(feed.run(job, updates, resume_from.is_some()));
    Ok(ReceiverStream::new(receiver))
}

enum Stop {
    ClientGone,
    Database(DbError),
}

impl From<DbError> for Stop {
    fn from(error: DbError) -> Stop {
        Stop::Database(error)
    }
}

struct Feed {
    db: Db,
    job_id: Uuid,
    position: Position,
    /// Events already sent, so one that arrives both live and in a replay goes once.
    sent_events: HashSet<Uuid>,
    sender: mpsc::Sender<FeedMessage>,
}

impl Feed {
    async fn run(self, job: Job, updates: broadcast::Receiver<JobUpdate>, replay: bool) {
        let job_id = self.job_id;
        if let Err(Stop::Database(error)) = self.serve(job, updates, replay).await {
            // The client reconnects with its last position and loses nothing.
            tracing::warn!(%job_id, %error, "a job's live feed stopped early");
        }
    }

    async fn serve(
        mut self,
        job: Job,
        mut updates: broadcast::Receiver<JobUpdate>,
        replay: bool,
    ) -> Result<(), Stop> {
        let mut status = job.status;
        self.send(FeedItem::Update(JobUpdate::Status { job: Box::new(job) }))
            .await?;
        if replay {
            self.replay().await?;
        }
        // A settled job's stream stays open while one of its validations runs.
        if status.is_settled() && !db::validations::has_pending(&self.db, self.job_id).await? {
            return self.end(status).await;
        }
        loop {
            let update = tokio::select! {
                update = updates.recv() => update,
                () = self.sender.closed() => return Err(Stop::ClientGone),
            };
            match update {
                Ok(update) if update.job_id() != self.job_id => {}
                Ok(JobUpdate::Metrics { point, .. }) => self.send_metric(*point).await?,
                Ok(JobUpdate::Event { event }) => self.send_event(*event).await?,
                Ok(JobUpdate::Validation { job_id, validation }) => {
                    let ended =
                        matches!(validation["status"].as_str(), Some("completed" | "failed"));
                    self.send(FeedItem::Update(JobUpdate::Validation {
                        job_id,
                        validation,
                    }))
                    .await?;
                    if ended && status.is_settled() {
                        self.replay().await?;
                        return self.end(status).await;
                    }
                }
                Ok(JobUpdate::Status { job }) => {
                    status = job.status;
                    self.send(FeedItem::Update(JobUpdate::Status { job }))
                        .await?;
                    if status.is_settled() {
                        // The events written with the final change, and anything else
                        // committed before it, go out before the end.
                        self.replay().await?;
                        return self.end(status).await;
                    }
                }
                // This subscriber fell behind the broadcast: what it dropped is in the
                // database.
                Err(RecvError::Lagged(_)) => self.replay().await?,
                Err(RecvError::Closed) => return Ok(()),
            }
        }
    }

    /// Sends every event and metric point stored after the position, page by page.
    async fn replay(&mut self) -> Result<(), Stop> {
        loop {
            let events =
                db::events::stored_after(&self.db, self.job_id, self.position.event, REPLAY_PAGE)
                    .await?;
            let points =
                db::metrics::after(&self.db, self.job_id, self.position.step, REPLAY_PAGE).await?;
            let more = events.len() as i64 == REPLAY_PAGE || points.len() as i64 == REPLAY_PAGE;
            for event in events {
                self.send_event(event).await?;
            }
            for point in points {
                self.send_metric(point).await?;
            }
            if !more {
                return Ok(());
            }
        }
    }

    async fn send_metric(&mut self, point: MetricPoint) -> Result<(), Stop> {
        if !self.position.admits_metric(point.step) {
            return Ok(());
        }
        self.position.step = Some(point.step);
        self.send(FeedItem::Update(JobUpdate::Metrics {
            job_id: self.job_id,
            point: Box::new(point),
        }))
        .await
    }

    async fn send_event(&mut self, event: Event) -> Result<(), Stop> {
        if !self.sent_events.insert(event.id) {
            return Ok(());
        }
        // A live event was published before anyone read its sequence number back.
        let seq = match event.seq {
            Some(seq) => Some(seq),
            None => db::events::seq_of(&self.db, event.id).await?,
        };
        self.position.event = self.position.event.max(seq);
        self.send(FeedItem::Update(JobUpdate::Event {
            event: Box::new(event),
        }))
        .await
    }

    async fn end(&mut self, status: JobStatus) -> Result<(), Stop> {
        self.send(FeedItem::End { status }).await
    }

    async fn send(&mut self, item: FeedItem) -> Result<(), Stop> {
        let message = FeedMessage {
            item,
            position: self.position,
        };
        self.sender
            .send(message)
            .await
            .map_err(|_| Stop::ClientGone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_reads_back_what_it_writes() {
        let empty = Position::default();
        assert_eq!(empty.to_string(), ":");
        let full = Position {
            step: Some(42),
            event: Some(7),
        };
        assert_eq!(full.to_string(), "42:7");
        for position in [empty, full] {
            assert_eq!(
                position.to_string().parse::<Position>().ok(),
                Some(position)
            );
        }
        for bad in ["", "x:", "1", "1:2:3", ":e"] {
            assert!(bad.parse::<Position>().is_err(), "{bad:?} is refused");
        }
    }
}
