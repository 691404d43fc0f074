//! How an attempt ends and what becomes of its job: completed, failed, or back in the
//! queue (resuming from the latest checkpoint) within the job's retry and interruption
//! budgets. Also the sweeper that treats a silent agent's attempts as lost.

use std::time::Duration;

use chrono::{DateTime, Utc};
use protocol::agent::{AttemptOutcome, FailureKind};
use serde_json::json;
use uuid::Uuid;

use crate::db::attempts::{self, Attempt, AttemptEnd, JobAfter};
use crate::db::events::Event;
use crate::db::jobs::{self, Job};
use crate::db::{now, DbError};
use crate::domain::{Hyperparameters, JobStatus};
use crate::http::AppState;
use crate::live::JobUpdate;

/// An attempt's end as the control plane sees it: reported by its agent, or lost.
pub enum Ending {
    Reported(AttemptOutcome),
    /// The agent stopped sending heartbeats.
    Lost,
}

/// Ends `attempt` and moves its job; publishes the change. `None` when the attempt had
/// already ended (a repeated report).
pub async fn end_attempt(
    state: &AppState,
    attempt: &Attempt,
    ending: Ending,
) -> Result<Option<Job>, DbError> {
    let Some(job) = jobs::get_any(&state.db, attempt.job_id).await? else {
        return Ok(None);
    };
    let owns_job = job.agent_id == attempt.agent_id
        && matches!(job.status, JobStatus::Provisioning | JobStatus::Training);
    let number = attempt.attempt_number;
    let latest = attempts::latest_checkpoint(&state.db, job.id).await?;
    let resume_from = latest.as_ref().map(|c| c.id);
    let resume_note = match &latest {
        Some(c) => format!("; it will resume from the checkpoint at step {}", c.step),
        None => "; it will start over (no checkpoint yet)".to_owned(),
    };
    let mut events = Vec::new();
    let mut event = |kind: &str, severity: &str, message: String, details: serde_json::Value| {
        events.push(Event::new(job.id, kind, severity, message).with_details(details));
    };
    let requeue_hyperparameters;
    let (end, after) = match &ending {
        Ending::Reported(AttemptOutcome::Succeeded { summary }) => {
            event(
                "status",
                "info",
                format!("Training completed (attempt {number})"),
                json!({"from": job.status, "to": "completed", "summary": summary}),
            );
            (end_as("succeeded"), JobAfter::Complete)
        }
        Ending::Reported(AttemptOutcome::Cancelled) if !owns_job => {
            (end_as("cancelled"), JobAfter::Unchanged)
        }
        Ending::Reported(AttemptOutcome::Failed { kind, message }) => {
            let retries_left = job.retry_count < job.max_retries;
            match kind {
                FailureKind::OutOfMemory if retries_left => {
                    requeue_hyperparameters = halved_micro_batch(&job);
                    match &requeue_hyperparameters {
                        Some((value, hp)) => {
                            event(
                                "warning",
                                "warning",
                                format!(
                                    "Out of memory on attempt {number}: retrying with micro-batch {} and gradient accumulation {} (same effective batch){resume_note}",
                                    hp.batch_size, hp.gradient_accumulation_steps
                                ),
                                json!({"error": message, "batch_size": hp.batch_size,
                                       "gradient_accumulation_steps": hp.gradient_accumulation_steps}),
                            );
                            (
                                failed(message),
                                JobAfter::Requeue {
                                    resume_from,
                                    hyperparameters: Some(value),
                                    interruption: false,
                                },
                            )
                        }
                        None => {
                            fail_job(&mut event, &job, message, "out of memory at micro-batch 1")
                        }
                    }
                }
                FailureKind::Other if retries_left => {
                    event(
                        "warning",
                        "warning",
                        format!(
                            "Attempt {number} failed ({message}); retry {} of {}{resume_note}",
                            job.retry_count + 1,
                            job.max_retries
                        ),
                        json!({"error": message}),
                    );
                    (
                        failed(message),
                        JobAfter::Requeue {
                            resume_from,
                            hyperparameters: None,
                            interruption: false,
                        },
                    )
                }
                FailureKind::Dataset => fail_job(&mut event, &job, message, "dataset error"),
                _ => fail_job(&mut event, &job, message, "retries exhausted"),
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
            event(
                "status",
                "warning",
                format!("Spot interruption ({provider}) on attempt {number}{checkpoint} in {seconds_used:.1} s"),
                json!({"from": job.status, "to": "interrupted", "provider": provider,
                       "notice_deadline": notice_deadline, "seconds_used": seconds_used,
                       "checkpoint_step": checkpoint_step}),
            );
            let end = AttemptEnd {
                status: "interrupted",
                error_message: None,
                notice_deadline: *notice_deadline,
                interruption_provider: Some(provider),
                notice_seconds_used: Some(*seconds_used),
            };
            (
                end,
                requeue_interrupted(&mut event, &job, resume_from, &resume_note),
            )
        }
        // An agent stopped on its own (an operator's Ctrl-C) while it still owned the job.
        Ending::Reported(AttemptOutcome::Cancelled) => {
            event(
                "status",
                "warning",
                format!("Agent stopped attempt {number}"),
                json!({"from": job.status, "to": "interrupted"}),
            );
            (
                end_as("interrupted"),
                requeue_interrupted(&mut event, &job, resume_from, &resume_note),
            )
        }
        Ending::Lost => {
            event(
                "status",
                "error",
                format!("Lost contact with the agent running attempt {number}"),
                json!({"from": job.status, "to": "interrupted"}),
            );
            (
                end_as("lost"),
                requeue_interrupted(&mut event, &job, resume_from, &resume_note),
            )
        }
    };
    let after = if owns_job { after } else { JobAfter::Unchanged };
    let events = if owns_job { events } else { Vec::new() };
    let changed = attempts::end_attempt(&state.db, attempt, end, after, &events).await?;
    if let Some(job) = &changed {
        tracing::info!(job_id = %job.id, attempt = number, status = %job.status, "attempt ended");
        if job.status == JobStatus::Queued {
            state.work_available.notify_waiters();
        }
        state
            .live
            .publish(JobUpdate::Status {
                job: Box::new(job.clone()),
            })
            .await;
        for event in events {
            state
                .live
                .publish(JobUpdate::Event {
                    event: Box::new(event),
                })
                .await;
        }
        if job.status.is_terminal() || job.status == JobStatus::Failed {
            crate::costs::record(state, job).await?;
        }
    }
    Ok(changed)
}

fn end_as(status: &str) -> AttemptEnd<'_> {
    AttemptEnd {
        status,
        error_message: None,
        notice_deadline: None,
        interruption_provider: None,
        notice_seconds_used: None,
    }
}

fn failed(message: &str) -> AttemptEnd<'_> {
    AttemptEnd {
        error_message: Some(message),
        ..end_as("failed")
    }
}

fn fail_job<'a>(
    event: &mut impl FnMut(&str, &str, String, serde_json::Value),
    job: &Job,
    message: &'a str,
    why: &str,
) -> (AttemptEnd<'a>, JobAfter<'a>) {
    event(
        "status",
        "error",
        format!("Training failed ({why}): {message}"),
        json!({"from": job.status, "to": "failed", "error": message}),
    );
    (
        failed(message),
        JobAfter::Fail {
            message,
            stage: None,
        },
    )
}

fn requeue_interrupted<'a>(
    event: &mut impl FnMut(&str, &str, String, serde_json::Value),
    job: &Job,
    resume_from: Option<Uuid>,
    resume_note: &str,
) -> JobAfter<'a> {
    if job.interruption_count >= job.max_interruptions {
        let message = "interruption budget spent";
        event(
            "status",
            "error",
            format!(
                "Training failed: {} interruptions, the most this job allows",
                job.interruption_count + 1
            ),
            json!({"from": "interrupted", "to": "failed"}),
        );
        return JobAfter::Fail {
            message,
            stage: None,
        };
    }
    event(
        "status",
        "info",
        format!(
            "Job queued again after interruption {} of {}{resume_note}",
            job.interruption_count + 1,
            job.max_interruptions
        ),
        json!({"from": "interrupted", "to": "queued", "resume_from_checkpoint_id": resume_from}),
    );
    JobAfter::Requeue {
        resume_from,
        hyperparameters: None,
        interruption: true,
    }
}

/// The job's hyperparameters with half the micro-batch and twice the accumulation, or
/// `None` at micro-batch 1.
fn halved_micro_batch(job: &Job) -> Option<(serde_json::Value, Hyperparameters)> {
    let value = job.hyperparameters.as_ref()?.0.clone();
    let mut hp: Hyperparameters = serde_json::from_value(value).ok()?;
    if hp.batch_size <= 1 {
        return None;
    }
    hp.batch_size /= 2;
    hp.gradient_accumulation_steps *= 2;
    Some((serde_json::to_value(&hp).ok()?, hp))
}

/// Every few seconds: agents silent for `offline_after_seconds` go offline and their
/// running attempts are ended as lost (their jobs requeued). Safe on several replicas:
/// ending an attempt is a compare-and-set.
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

pub async fn sweep(state: &AppState, at: DateTime<Utc>) -> Result<(), DbError> {
    let offline_after =
        chrono::Duration::seconds(state.settings.fleet.offline_after_seconds as i64);
    for attempt in attempts::orphaned(&state.db, at - offline_after).await? {
        tracing::warn!(attempt_id = %attempt.id, job_id = %attempt.job_id, "agent went silent; attempt lost");
        end_attempt(state, &attempt, Ending::Lost).await?;
    }
    Ok(())
}
