//! Placing queued jobs on agents: the oldest queued job that fits the asking agent.
//! Assignment is a compare-and-set on the job's status, so under any number of
//! concurrent claims (and replicas) a job goes to exactly one agent.

use std::collections::BTreeMap;

use protocol::agent::{Assignment, Heartbeat, ResumePoint};

use crate::db::agents::Agent;
use crate::db::attempts::{self, Checkpoint};
use crate::db::jobs::Job;
use crate::db::{files, DbError};
use crate::domain::placement::{estimated_memory_gib, unfit_reason};
use crate::domain::Hyperparameters;
use crate::http::AppState;
use crate::live::JobUpdate;

/// How many queued jobs one claim looks at.
const CANDIDATES: i64 = 100;

fn hyperparameters(job: &Job) -> Option<Hyperparameters> {
    serde_json::from_value(job.hyperparameters.as_ref()?.0.clone()).ok()
}

fn required_labels(job: &Job) -> BTreeMap<String, String> {
    serde_json::from_value(job.required_labels.0.clone()).unwrap_or_default()
}

/// Assigns the oldest queued job that fits `agent`, if any.
pub async fn claim(
    state: &AppState,
    agent: &Agent,
    beat: &Heartbeat,
) -> Result<Option<Assignment>, DbError> {
    for job in attempts::queued(&state.db, CANDIDATES).await? {
        let Some(hp) = hyperparameters(&job) else {
            tracing::warn!(job_id = %job.id, "queued job without hyperparameters skipped");
            continue;
        };
        let memory = estimated_memory_gib(&job.base_model, &hp);
        if let Some(reason) = unfit_reason(
            job.gpu_type.as_deref(),
            &required_labels(&job),
            memory,
            beat,
        ) {
            tracing::debug!(job_id = %job.id, agent = %agent.name, reason, "job does not fit");
            continue;
        }
        let recipe = serde_json::to_value(&hp).unwrap_or_default();
        let assigned = attempts::assign(
            &state.db,
            job.id,
            attempts::Assignment {
                agent_id: agent.id,
                agent_name: &agent.name,
                recipe: &recipe,
                gpu_type: job.gpu_type.as_deref().unwrap_or("ondemand"),
                hourly_rate: job.hourly_rate.unwrap_or(0.0),
            },
        )
        .await?;
        // Another agent took it between the read and the write: try the next one.
        let Some((job, attempt, checkpoint)) = assigned else {
            continue;
        };
        let Some(file) = files::get(&state.db, job.training_file_id).await? else {
            continue;
        };
        tracing::info!(job_id = %job.id, agent = %agent.name, attempt = attempt.attempt_number, "job assigned");
        state
            .live
            .publish(JobUpdate::Status {
                job: Box::new(job.clone()),
            })
            .await;
        return Ok(Some(Assignment {
            attempt_id: attempt.id,
            attempt_number: attempt.attempt_number as u32,
            job_id: job.id,
            job_name: job.name.clone(),
            base_model: job.base_model.clone(),
            training_file_path: format!("/agent/attempts/{}/training-file", attempt.id),
            training_file_sha256: file.sha256,
            hyperparameters: hp,
            checkpoint_every: state.settings.fleet.checkpoint_every_steps,
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
