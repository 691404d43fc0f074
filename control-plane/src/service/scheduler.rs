//! Placing queued jobs on agents: the oldest queued job that fits the asking agent.
//! Assignment is a compare-and-set on the job's status, so under any number of
//! concurrent claims (and replicas) a job goes to exactly one agent.

use protocol::agent::{Assignment, Heartbeat, ResumePoint};
use serde_json::json;

use super::transition::{change_status, Origin};
use super::{AppState, ServiceError, ServiceResult};
use crate::db::agents::Agent;
use crate::db::attempts::{self, Checkpoint};
use crate::db::events::Event;
use crate::db::files;
use crate::db::jobs::{self, Change, NewAttempt};
use crate::domain::placement::{estimated_memory_gib, unfit_reason};
use crate::domain::{EventType, GpuType, JobStatus, Severity};

/// How many queued jobs one claim looks at.
const CANDIDATES: i64 = 100;

/// Assigns the oldest queued job that fits `agent`, if any.
pub async fn claim(
    state: &AppState,
    agent: &Agent,
    beat: &Heartbeat,
) -> ServiceResult<Option<Assignment>> {
    for job in jobs::queued(&state.db, CANDIDATES).await? {
        let Some(hp) = job.hyperparameters.as_ref().map(|h| h.0.clone()) else {
            tracing::warn!(job_id = %job.id, "queued job without hyperparameters skipped");
            continue;
        };
        let labels = match job.required_labels() {
            Ok(labels) => labels,
            // Fail closed: a requirement that cannot be read fits no host.
            Err(problem) => {
                tracing::warn!(job_id = %job.id, problem, "queued job with unreadable label requirements skipped");
                continue;
            }
        };
        let memory = estimated_memory_gib(&job.base_model, &hp);
        if let Some(reason) = unfit_reason(job.gpu_type, &labels, memory, beat) {
            tracing::debug!(job_id = %job.id, agent = %agent.name, reason, "job does not fit");
            continue;
        }
        let checkpoint = match job.resume_from_checkpoint_id {
            Some(id) => attempts::checkpoint(&state.db, id).await?,
            None => None,
        };
        let number = attempts::next_number(&state.db, job.id).await?;
        let resumed = match &checkpoint {
            Some(c) => format!(", resuming from the checkpoint at step {}", c.step),
            None => String::new(),
        };
        let event = Event::new(
            job.id,
            EventType::Status,
            Severity::Info,
            format!("Attempt {number} assigned to agent {}{resumed}", agent.name),
        )
        .with_details(json!({
            "from": job.status, "to": JobStatus::Provisioning, "agent_id": agent.id,
            "attempt_number": number, "resumed_from_step": checkpoint.as_ref().map(|c| c.step),
        }));
        let change = Change::Assign(NewAttempt {
            number,
            agent_id: agent.id,
            recipe: &hp,
            gpu_type: job.gpu_type.unwrap_or(GpuType::Ondemand),
            hourly_rate: job.hourly_rate.unwrap_or(0.0),
        });
        let changed = match change_status(state, &job, change, vec![event], Origin::Scheduler).await
        {
            Ok(changed) => changed,
            // Another agent took it between the read and the write: try the next one.
            Err(ServiceError::Conflict(_)) => continue,
            Err(error) => return Err(error),
        };
        let Some((attempt, checkpoint)) = changed.started else {
            continue;
        };
        let job = changed.job;
        let Some(file) = files::get(&state.db, job.training_file_id).await? else {
            continue;
        };
        let validation_file = match job.validation_file_id {
            Some(id) => files::get(&state.db, id).await?.map(|f| {
                (
                    format!("/agent/attempts/{}/validation-file", attempt.id),
                    f.sha256,
                )
            }),
            None => None,
        };
        tracing::info!(job_id = %job.id, agent = %agent.name, attempt = attempt.attempt_number, "job assigned");
        return Ok(Some(Assignment {
            attempt_id: attempt.id,
            attempt_number: attempt.attempt_number as u32,
            job_id: job.id,
            job_name: job.name.clone(),
            base_model: job.base_model.clone(),
            training_file_path: format!("/agent/attempts/{}/training-file", attempt.id),
            training_file_sha256: file.sha256,
            validation_file,
            hyperparameters: hp,
            checkpoint_every: state.settings.fleet.checkpoint_every_steps,
            exports: job
                .exports
                .as_ref()
                .map(|e| e.0.clone())
                .unwrap_or_default(),
            resume_from: checkpoint.map(resume_point),
        }));
    }
    Ok(None)
}

fn resume_point(checkpoint: Checkpoint) -> ResumePoint {
    ResumePoint {
        checkpoint_id: checkpoint.id,
        step: checkpoint.step as u64,
        download_path: format!("/agent/checkpoints/{}/archive", checkpoint.id),
        sha256: checkpoint.sha256,
    }
}
