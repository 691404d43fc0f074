//! The one function that changes a job's status. Configure, start, cancel, resume,
//! scheduling, agent reports, the end of an attempt, recovery and the sweeper all call
//! [`change_status`], which checks the change against the state machine
//! (`domain::job_status`), writes it with a compare-and-set on the status it was read in
//! (with its events and attempt rows, in one transaction), tells live subscribers, wakes
//! agents waiting for work, and records the job's cost when it stops running.

use uuid::Uuid;

use super::{cost, AppState, ServiceError, ServiceResult};
use crate::db::attempts::{Attempt, Checkpoint};
use crate::db::events::Event;
use crate::db::jobs::{self, Change, ChangeOutcome, Job};
use crate::domain::{EventType, JobStatus, Severity};
use crate::live::JobUpdate;

/// Who asks for a change: a person through the API or dashboard, or the control plane
/// itself on an agent's behalf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    User,
    Scheduler,
    AgentReport,
    Recovery,
    Sweeper,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::User => "user",
            Origin::Scheduler => "scheduler",
            Origin::AgentReport => "agent report",
            Origin::Recovery => "recovery",
            Origin::Sweeper => "sweeper",
        }
    }
}

/// A change that was applied.
pub struct Changed {
    pub job: Job,
    /// The attempt an assignment started, and the checkpoint it resumes from.
    pub started: Option<(Attempt, Option<Checkpoint>)>,
}

/// Applies `change` to `job` (as read), logging `events` with it.
///
/// An illegal change is refused with [`ServiceError::IllegalTransition`]; one the control
/// plane itself attempted (not a person's request, which is answered 409) is also logged,
/// counted in `/metrics` and noted in the job's event log. A job that changed since it
/// was read answers [`ServiceError::Conflict`] and nothing is written.
pub async fn change_status(
    state: &AppState,
    job: &Job,
    change: Change<'_>,
    events: Vec<Event>,
    origin: Origin,
) -> ServiceResult<Changed> {
    let to = change.target();
    if let Err(illegal) = job.status.check(to) {
        if origin != Origin::User {
            refuse(state, job.id, &illegal, origin).await;
        }
        return Err(illegal.into());
    }
    let (updated, started) =
        match jobs::change_status(&state.db, job.id, job.status, &change, &events).await? {
            ChangeOutcome::Applied { job, started } => (*job, started.map(|s| *s)),
            ChangeOutcome::Conflict(current) => {
                return Err(ServiceError::Conflict(format!(
                    "job changed while this request ran; it is now {current}"
                )))
            }
            ChangeOutcome::AttemptAlreadyEnded => {
                return Err(ServiceError::Conflict(
                    "the attempt had already ended".into(),
                ))
            }
        };
    tracing::info!(job_id = %job.id, from = %job.status, to = %updated.status, origin = origin.as_str(), "job status changed");
    let attempt_id = started
        .as_ref()
        .map(|(attempt, _)| attempt.id)
        .or(match &change {
            Change::EndAttempt { attempt, .. } => Some(attempt.id),
            _ => None,
        });
    state
        .live
        .publish(JobUpdate::Status {
            job: Box::new(updated.clone()),
        })
        .await;
    for mut event in events {
        event.attempt_id = event.attempt_id.or(attempt_id);
        state
            .live
            .publish(JobUpdate::Event {
                event: Box::new(event),
            })
            .await;
    }
    if to == JobStatus::Queued {
        state.work_available.notify_waiters();
    }
    if matches!(
        to,
        JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled | JobStatus::Interrupted
    ) {
        cost::record(state, &updated).await?;
    }
    Ok(Changed {
        job: updated,
        started,
    })
}

/// Logs, counts and notes a change the control plane attempted against the state machine.
async fn refuse(
    state: &AppState,
    job_id: Uuid,
    illegal: &crate::domain::job_status::IllegalTransition,
    origin: Origin,
) {
    tracing::warn!(%job_id, from = %illegal.from, to = %illegal.to, origin = origin.as_str(), "illegal status change refused");
    state.metrics.count_refused_transition(origin.as_str());
    let event = Event::new(
        job_id,
        EventType::Warning,
        Severity::Warning,
        format!(
            "Refused a status change from {} to {} ({})",
            illegal.from,
            illegal.to,
            origin.as_str()
        ),
    )
    .with_details(
        serde_json::json!({"from": illegal.from, "to": illegal.to, "origin": origin.as_str()}),
    );
    if let Err(error) = crate::db::events::insert(&state.db, &event).await {
        tracing::warn!(%error, "could not log a refused status change");
    }
}
