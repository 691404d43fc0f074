//! How an attempt ends and what becomes of its job: completed, failed, retried from the
//! latest checkpoint within the retry budget, or interrupted. An interrupted job resumes
//! on its own while its recovery policy allows (`auto_resume`, `max_interruptions`), else
//! it waits in `interrupted` for someone to resume it. Also the sweeper that treats a
//! silent agent's attempts as lost.

use std::time::Duration;

use chrono::{DateTime, Utc};
use protocol::agent::{AttemptOutcome, FailureKind};
use serde_json::json;

use super::transition::{change_status, Origin};
use super::{AppState, ServiceError, ServiceResult};
use crate::db::attempts::{self, Attempt};
use crate::db::events::Event;
use crate::db::jobs::{self, AttemptEnd, Change, Job, JobAfter};
use crate::db::now;
use crate::domain::{AttemptStatus, EventType, Hyperparameters, JobStatus, Severity};

/// An attempt's end as the control plane sees it: reported by its agent, or lost.
pub enum Ending {
    Reported(AttemptOutcome),
    /// The agent stopped sending heartbeats, or no longer names the attempt.
    Lost,
}

/// Ends `attempt` and moves its job. `None` when the attempt had already ended (a
/// repeated report) or its job had already left it.
pub async fn end_attempt(
    state: &AppState,
    attempt: &Attempt,
    ending: Ending,
    origin: Origin,
) -> ServiceResult<Option<Job>> {
    if attempt.ended_at.is_some() {
        return Ok(None);
    }
    let Some(job) = jobs::get_any(&state.db, attempt.job_id).await? else {
        return Ok(None);
    };
    let owns_job = job.agent_id == attempt.agent_id
        && matches!(job.status, JobStatus::Provisioning | JobStatus::Training);
    if !owns_job {
        // The job left the attempt (cancelled by its user, say): only the attempt ends.
        let status = match &ending {
            Ending::Lost => AttemptStatus::Lost,
            _ => AttemptStatus::Cancelled,
        };
        attempts::end_detached(&state.db, attempt, status).await?;
        return Ok(None);
    }
    let number = attempt.attempt_number;
    let latest = attempts::latest_checkpoint(&state.db, job.id).await?;
    let resume_from = latest.as_ref().map(|c| c.id);
    let resume_note = match &latest {
        Some(c) => format!("; it will resume from the checkpoint at step {}", c.step),
        None => "; it will start over (no checkpoint yet)".to_owned(),
    };
    let status_event = |severity: Severity, message: String, details: serde_json::Value| {
        Event::new(job.id, EventType::Status, severity, message).with_details(details)
    };
    let smaller_batch;
    let stop_reason = job
        .stop_requested
        .as_deref()
        .filter(|_| !matches!(ending, Ending::Reported(AttemptOutcome::Succeeded { .. })));
    let (end, after, events) = match (&ending, stop_reason) {
        // A job asked to stop (a budget's cap) ends cancelled however its attempt ended:
        // past its cap it neither retries nor resumes.
        (ending, Some(reason)) => stopped_on_request(&job, number, ending, reason),
        (ending, None) => match ending {
            Ending::Reported(AttemptOutcome::Succeeded { summary }) => (
                AttemptEnd {
                    tokens_per_second: measured_throughput(summary),
                    ..AttemptEnd::new(AttemptStatus::Succeeded)
                },
                JobAfter::Complete,
                vec![status_event(
                    Severity::Info,
                    format!("Training completed (attempt {number})"),
                    json!({"from": job.status, "to": JobStatus::Completed, "summary": summary}),
                )],
            ),
            Ending::Reported(AttemptOutcome::Failed { kind, message }) => {
                let failed = AttemptEnd {
                    error_message: Some(message.as_str()),
                    ..AttemptEnd::new(AttemptStatus::Failed)
                };
                let retries_left = job.retry_count < job.max_retries;
                smaller_batch = matches!(kind, FailureKind::OutOfMemory)
                    .then(|| lighter(&job))
                    .flatten();
                match kind {
                    FailureKind::OutOfMemory if retries_left && smaller_batch.is_some() => {
                        let (hp, change) = smaller_batch
                            .as_ref()
                            .map_or((None, ""), |(hp, change)| (Some(hp), change.as_str()));
                        let event = Event::new(
                        job.id,
                        EventType::Warning,
                        Severity::Warning,
                        format!(
                            "Out of memory on attempt {number}: retrying with {change}{resume_note}"
                        ),
                    )
                    .with_details(json!({"error": message,
                                         "batch_size": hp.map(|hp| hp.batch_size),
                                         "gradient_accumulation_steps": hp.map(|hp| hp.gradient_accumulation_steps),
                                         "gradient_checkpointing": hp.map(|hp| hp.gradient_checkpointing),
                                         "from": job.status, "to": JobStatus::Queued}));
                        (
                            failed,
                            JobAfter::Retry {
                                resume_from,
                                hyperparameters: hp,
                            },
                            vec![event],
                        )
                    }
                    FailureKind::OutOfMemory if retries_left => fail(
                        &job,
                        failed,
                        message,
                        "out of memory at micro-batch 1 with gradient checkpointing",
                    ),
                    FailureKind::Other if retries_left => {
                        let event = Event::new(
                            job.id,
                            EventType::Warning,
                            Severity::Warning,
                            format!(
                                "Attempt {number} failed ({message}); retry {} of {}{resume_note}",
                                job.retry_count + 1,
                                job.max_retries
                            ),
                        )
                        .with_details(
                            json!({"error": message, "from": job.status, "to": JobStatus::Queued}),
                        );
                        (
                            failed,
                            JobAfter::Retry {
                                resume_from,
                                hyperparameters: None,
                            },
                            vec![event],
                        )
                    }
                    FailureKind::Dataset => fail(&job, failed, message, "dataset error"),
                    _ => fail(&job, failed, message, "retries exhausted"),
                }
            }
            Ending::Reported(AttemptOutcome::Interrupted {
                provider,
                notice_deadline,
                seconds_used,
                checkpoint_step,
            }) => {
                let checkpoint = checkpoint_step
                    .map(|s| format!(", checkpointed at step {s}"))
                    .unwrap_or_default();
                let end = AttemptEnd {
                    notice_deadline: *notice_deadline,
                    interruption_provider: Some(provider.as_str()),
                    notice_seconds_used: Some(*seconds_used),
                    ..AttemptEnd::new(AttemptStatus::Interrupted)
                };
                let event = status_event(
                Severity::Warning,
                format!("Spot interruption ({provider}) on attempt {number}{checkpoint} in {seconds_used:.1} s"),
                json!({"from": job.status, "to": JobStatus::Interrupted, "provider": provider,
                       "notice_deadline": notice_deadline, "seconds_used": seconds_used,
                       "checkpoint_step": checkpoint_step}),
            );
                (end, JobAfter::Interrupt { resume_from }, vec![event])
            }
            // An agent stopped on its own (an operator's Ctrl-C) while it still owned the
            // job; a stop that publishes the adapter the control plane did not ask for (its
            // request was lost) is one too.
            Ending::Reported(AttemptOutcome::Cancelled | AttemptOutcome::Stopped { .. }) => (
                AttemptEnd::new(AttemptStatus::Interrupted),
                JobAfter::Interrupt { resume_from },
                vec![status_event(
                    Severity::Warning,
                    format!("Agent stopped attempt {number}"),
                    json!({"from": job.status, "to": JobStatus::Interrupted}),
                )],
            ),
            Ending::Lost => (
                AttemptEnd::new(AttemptStatus::Lost),
                JobAfter::Interrupt { resume_from },
                vec![status_event(
                    Severity::Error,
                    format!("Lost contact with the agent running attempt {number}"),
                    json!({"from": job.status, "to": JobStatus::Interrupted}),
                )],
            ),
        },
    };
    let interrupted = matches!(after, JobAfter::Interrupt { .. });
    let mut events = events;
    if interrupted {
        // Whether the job will wait is known now: say so with the interruption itself.
        events.extend(waiting_event(&job, job.interruption_count + 1));
    }
    let change = Change::EndAttempt {
        attempt,
        end,
        after,
    };
    let ended = match change_status(state, &job, change, events, origin).await {
        Ok(changed) => changed.job,
        // Another report or replica ended the attempt, or the job moved on, first.
        Err(ServiceError::Conflict(_)) => return Ok(None),
        Err(error) => return Err(error),
    };
    tracing::info!(job_id = %ended.id, attempt = number, status = %ended.status, "attempt ended");
    if interrupted {
        return Ok(Some(
            after_interruption(state, ended, &resume_note, origin).await?,
        ));
    }
    if ended.status == JobStatus::Completed {
        // A validation that cannot be queued must not undo the completion.
        if let Err(error) = super::validation::after_training(state, &ended).await {
            tracing::warn!(job_id = %ended.id, %error, "could not queue the job's validation");
        }
    }
    Ok(Some(ended))
}

/// The event saying the job will wait in `interrupted` for a person after interruption
/// number `interruptions`, and why; `None` when its policy resumes it.
fn waiting_event(job: &Job, interruptions: i64) -> Option<Event> {
    let policy = job.recovery();
    if policy.resumes_interruption(interruptions) {
        return None;
    }
    let why = if policy.auto_resume {
        format!(
            "its {} automatic resumes are spent",
            policy.max_interruptions
        )
    } else {
        "automatic resume is off".to_owned()
    };
    Some(
        Event::new(
            job.id,
            EventType::Status,
            Severity::Warning,
            format!(
                "Waiting in interrupted after interruption {interruptions}: {why}; resume it from the latest checkpoint or another"
            ),
        )
        .with_details(json!({"interruptions": interruptions, "recovery": policy})),
    )
}

/// An interrupted job goes back to the queue while its policy allows; otherwise it waits
/// (the interruption's events said why).
async fn after_interruption(
    state: &AppState,
    job: Job,
    resume_note: &str,
    origin: Origin,
) -> ServiceResult<Job> {
    let policy = job.recovery();
    if !policy.resumes_interruption(job.interruption_count) {
        return Ok(job);
    }
    let event = Event::new(
        job.id,
        EventType::Status,
        Severity::Info,
        format!(
            "Job queued again after interruption {} of {}{resume_note}",
            job.interruption_count, policy.max_interruptions
        ),
    )
    .with_details(
        json!({"from": JobStatus::Interrupted, "to": JobStatus::Queued,
                         "resume_from_checkpoint_id": job.resume_from_checkpoint_id}),
    );
    let change = Change::Resume {
        checkpoint_id: job.resume_from_checkpoint_id,
    };
    match change_status(state, &job, change, vec![event], origin).await {
        Ok(changed) => Ok(changed.job),
        // Someone resumed (or cancelled) it first.
        Err(ServiceError::Conflict(_)) => Ok(job),
        Err(error) => Err(error),
    }
}

/// The tokens/s a trainer's summary reports, which later estimates use.
fn measured_throughput(summary: &serde_json::Value) -> Option<f64> {
    summary["tokens_per_second"]
        .as_f64()
        .filter(|tps| tps.is_finite() && *tps > 0.0)
}

/// How a job asked to stop for `reason` ends with its attempt: cancelled with that reason.
/// When the agent stopped as asked, the adapter as of its last checkpoint was published
/// with the attempt's outputs; the event says which step it is.
fn stopped_on_request<'a>(
    job: &Job,
    number: i64,
    ending: &'a Ending,
    reason: &'a str,
) -> (AttemptEnd<'a>, JobAfter<'a>, Vec<Event>) {
    let why = reason.replace('_', " ");
    let (end, message, checkpoint_step) = match ending {
        Ending::Reported(AttemptOutcome::Stopped {
            checkpoint_step: Some(step),
            summary,
        }) => (
            AttemptEnd {
                tokens_per_second: measured_throughput(summary),
                ..AttemptEnd::new(AttemptStatus::Cancelled)
            },
            format!(
                "Stopped at the {why} after step {step} (attempt {number}): the adapter as of the checkpoint at step {step} is the job's adapter"
            ),
            Some(*step),
        ),
        Ending::Reported(AttemptOutcome::Failed { message, .. }) => (
            AttemptEnd {
                error_message: Some(message.as_str()),
                ..AttemptEnd::new(AttemptStatus::Failed)
            },
            format!("Stopped at the {why} after attempt {number} failed ({message}); no adapter was published"),
            None,
        ),
        Ending::Lost => (
            AttemptEnd::new(AttemptStatus::Lost),
            format!("Stopped at the {why}: contact with the agent running attempt {number} was lost before it published an adapter"),
            None,
        ),
        Ending::Reported(_) => (
            AttemptEnd::new(AttemptStatus::Cancelled),
            format!(
                "Stopped at the {why}: attempt {number} ended without publishing an adapter (no step since its last checkpoint)"
            ),
            None,
        ),
    };
    let event = Event::new(job.id, EventType::Status, Severity::Warning, message).with_details(
        json!({"from": job.status, "to": JobStatus::Cancelled, "reason": reason,
               "checkpoint_step": checkpoint_step}),
    );
    (end, JobAfter::Stop { reason }, vec![event])
}

fn fail<'a>(
    job: &Job,
    end: AttemptEnd<'a>,
    message: &'a str,
    why: &str,
) -> (AttemptEnd<'a>, JobAfter<'a>, Vec<Event>) {
    let event = Event::new(
        job.id,
        EventType::Status,
        Severity::Error,
        format!("Training failed ({why}): {message}"),
    )
    .with_details(json!({"from": job.status, "to": JobStatus::Failed, "error": message}));
    (end, JobAfter::Fail { message }, vec![event])
}

/// The job's hyperparameters for a retry after running out of memory, and what changed:
/// half the micro-batch and twice the accumulation (the same effective batch) while the
/// micro-batch is above 1, then gradient checkpointing (the same gradients, about a third
/// more compute); `None` when both are spent. Neither changes the run's maths, so the
/// retry resumes from the last checkpoint.
fn lighter(job: &Job) -> Option<(Hyperparameters, String)> {
    let mut hp = job.hyperparameters.as_ref()?.0.clone();
    let change = if hp.batch_size > 1 {
        hp.batch_size /= 2;
        hp.gradient_accumulation_steps *= 2;
        format!(
            "micro-batch {} and gradient accumulation {} (same effective batch)",
            hp.batch_size, hp.gradient_accumulation_steps
        )
    } else if !hp.gradient_checkpointing {
        hp.gradient_checkpointing = true;
        "gradient checkpointing (each layer computed again in the backward; same gradients)"
            .to_owned()
    } else {
        return None;
    };
    Some((hp, change))
}

/// Every few seconds: agents silent for `offline_after_seconds` go offline and their
/// running attempts are ended as lost; interrupted jobs whose policy resumes them are
/// requeued (should a replica have stopped between the two changes). Safe on several
/// replicas: every change is a compare-and-set.
pub fn spawn_sweeper(state: AppState) {
    tokio::spawn(async move {
        let period = Duration::from_secs(state.settings.fleet.heartbeat_interval_seconds.max(1));
        loop {
            tokio::time::sleep(period).await;
            if let Err(error) = sweep(&state, now()).await {
                tracing::warn!(%error, "fleet sweep failed");
            }
        }
    });
}

pub async fn sweep(state: &AppState, at: DateTime<Utc>) -> ServiceResult<()> {
    let offline_after =
        chrono::Duration::seconds(state.settings.fleet.offline_after_seconds as i64);
    for attempt in attempts::orphaned(&state.db, at - offline_after).await? {
        tracing::warn!(attempt_id = %attempt.id, job_id = %attempt.job_id, "agent went silent; attempt lost");
        end_attempt(state, &attempt, Ending::Lost, Origin::Sweeper).await?;
    }
    super::validation::sweep(state, at - offline_after).await?;
    for job in jobs::awaiting_auto_resume(&state.db).await? {
        tracing::info!(job_id = %job.id, "resuming an interrupted job its policy resumes");
        let note = match job.resume_from_checkpoint_id {
            Some(_) => "; it will resume from its latest checkpoint",
            None => "; it will start over (no checkpoint yet)",
        };
        after_interruption(state, job, note, Origin::Sweeper).await?;
    }
    Ok(())
}
