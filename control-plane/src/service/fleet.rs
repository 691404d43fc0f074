//! The agent protocol's operations (wire types in `protocol::agent`): heartbeats, claims
//! (long-poll), the files an attempt needs, report batches from the agent's outbox,
//! artifact uploads and the end of an attempt. The agent is authenticated by its secret.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use protocol::agent::{
    ArtifactKind, ArtifactUpload, AttemptOutcome, ClaimRequest, Heartbeat, HeartbeatReply, Report,
    ReportBatch, ReportReply,
};
use uuid::Uuid;

use super::recovery::{end_attempt, Ending};
use super::transition::{change_status, Origin};
use super::{AppState, ServiceError, ServiceResult};
use crate::auth::token_hash;
use crate::db::agents::{self, Agent};
use crate::db::artifacts::Artifact;
use crate::db::attempts::{self, Attempt, AttemptReports, Checkpoint, Progress};
use crate::db::events::Event;
use crate::db::files::TrainingFile;
use crate::db::jobs::{self, Change};
use crate::db::metrics::MetricPoint;
use crate::db::{files, now};
use crate::domain::{AgentStatus, EventType, FieldError, JobStatus, Severity};
use crate::live::JobUpdate;
use crate::storage::{Download, StorageError};

/// Facts this replica has read once and keeps, because they do not go stale while it
/// uses them; bounded: past [`Memo::MAX`] entries it starts over rather than grow.
pub struct Memo<K, V>(std::sync::RwLock<std::collections::HashMap<K, V>>);

impl<K, V> Default for Memo<K, V> {
    fn default() -> Self {
        Memo(std::sync::RwLock::default())
    }
}

impl<K: std::hash::Hash + Eq, V: Clone> Memo<K, V> {
    const MAX: usize = 10_000;

    fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.0.read().ok()?.get(key).cloned()
    }

    fn insert(&self, key: K, value: V) {
        if let Ok(mut known) = self.0.write() {
            if known.len() >= Self::MAX {
                known.clear();
            }
            known.insert(key, value);
        }
    }

    fn update(&self, key: &K, change: impl FnOnce(&mut V)) {
        if let Some(value) = self
            .0
            .write()
            .ok()
            .as_mut()
            .and_then(|known| known.get_mut(key))
        {
            change(value);
        }
    }

    fn forget(&self, key: &K) {
        if let Ok(mut known) = self.0.write() {
            known.remove(key);
        }
    }
}

/// Agent ids by the hash of their secret, as this replica has met them. An agent's secret
/// never changes and agents are never removed, so an entry never goes stale; the report
/// path, the busiest an agent calls, then needs no read to know who is asking.
pub type KnownAgents = Memo<String, Uuid>;

/// What the report path needs of an attempt, kept by this replica from the attempt's first
/// report on: the attempt as it began, what its job's earlier attempts cost, and whether
/// its training has begun. While an attempt runs, none of that changes but the last (an
/// attempt's row changes only when it ends, and a job's next attempt begins only after
/// that), and the report's write changes nothing once the job no longer runs the attempt;
/// so a report is one statement, not two reads and a write.
pub type RunningAttempts = Memo<Uuid, RunningAttempt>;

#[derive(Clone)]
pub struct RunningAttempt {
    /// Shared, not copied, by every report of the attempt.
    attempt: Arc<Attempt>,
    /// The final cost of the job's attempts before this one.
    earlier_cost: f64,
    /// The job has left provisioning under this attempt.
    training: bool,
}

/// The running attempt `attempt_id` of `agent_id`, from memory once this replica has seen
/// it; `None` when it has ended.
async fn running_attempt(
    state: &AppState,
    agent_id: Uuid,
    attempt_id: Uuid,
) -> ServiceResult<Option<RunningAttempt>> {
    let running = match state.running_attempts.get(&attempt_id) {
        Some(running) => running,
        None => {
            let siblings = attempts::with_siblings(&state.db, attempt_id).await?;
            let Some(attempt) = siblings.iter().find(|a| a.id == attempt_id).cloned() else {
                return Err(ServiceError::NotFound("attempt"));
            };
            let others = siblings.iter().filter(|a| a.id != attempt_id);
            let at = now();
            let running = RunningAttempt {
                earlier_cost: others.clone().map(|a| a.cost_at(at)).sum(),
                attempt: Arc::new(attempt),
                training: false,
            };
            // Kept only while every other attempt has ended, so their cost is final.
            if running.attempt.ended_at.is_none() && others.clone().all(|a| a.ended_at.is_some()) {
                state.running_attempts.insert(attempt_id, running.clone());
            }
            running
        }
    };
    if running.attempt.agent_id != Some(agent_id) {
        return Err(ServiceError::NotFound("attempt"));
    }
    Ok(running.attempt.ended_at.is_none().then_some(running))
}

/// The id of the agent a secret belongs to, from memory once it has been seen.
pub async fn authenticate_id(state: &AppState, secret: &str) -> ServiceResult<Uuid> {
    let secret_hash = token_hash(secret.trim());
    if let Some(id) = state.known_agents.get(&secret_hash) {
        return Ok(id);
    }
    let agent = agents::authenticate(&state.db, &secret_hash)
        .await?
        .ok_or(ServiceError::Unauthorized)?;
    state.known_agents.insert(secret_hash, agent.id);
    Ok(agent.id)
}

/// The agent a secret belongs to.
pub async fn authenticate(state: &AppState, secret: &str) -> ServiceResult<Agent> {
    agents::authenticate(&state.db, &token_hash(secret.trim()))
        .await?
        .ok_or(ServiceError::Unauthorized)
}

async fn store_heartbeat(
    state: &AppState,
    agent: &Agent,
    beat: &Heartbeat,
) -> ServiceResult<Agent> {
    let retain = chrono::Duration::minutes(state.settings.fleet.telemetry_retention_minutes);
    Ok(agents::heartbeat(&state.db, agent.id, beat, now() - retain).await?)
}

/// The attempt `id` if it belongs to the asking agent.
async fn own_attempt(state: &AppState, agent: &Agent, id: Uuid) -> ServiceResult<Attempt> {
    attempts::get(&state.db, id)
        .await?
        .filter(|attempt| attempt.agent_id == Some(agent.id))
        .ok_or(ServiceError::NotFound("attempt"))
}

/// Whether the agent should stop the attempt: it ended, its job was cancelled or given to
/// another agent, or a budget's cap stopped it (then publishing its adapter).
async fn instruction(state: &AppState, attempt: &Attempt) -> ServiceResult<Instruction> {
    let job = match attempt.ended_at {
        Some(_) => None,
        None => jobs::get_any(&state.db, attempt.job_id).await?,
    };
    let Some(job) = job.filter(|job| runs_attempt(job, attempt)) else {
        return Ok(Instruction::STOP);
    };
    // While it runs, its live cost moves with time, and its budgets see it: alerts go out
    // as it crosses them, and a stop_at_cap budget at its amount stops it.
    let job = super::cost::refresh_live_cost(state, job).await?;
    let job = match job.stop_requested {
        Some(_) => job,
        None => super::budget::watch_running(state, job, 0.0).await?,
    };
    Ok(Instruction::for_running(&job))
}

/// What a heartbeat's or report batch's reply tells the agent about its attempt.
struct Instruction {
    stop_attempt: bool,
    publish_adapter: bool,
}

impl Instruction {
    const STOP: Instruction = Instruction {
        stop_attempt: true,
        publish_adapter: false,
    };

    /// For a job the attempt still runs: go on, or stop at a budget's cap.
    fn for_running(job: &jobs::Job) -> Instruction {
        let capped = job.stop_requested.is_some();
        Instruction {
            stop_attempt: capped,
            publish_adapter: capped,
        }
    }
}

/// Whether `job` (as read) is still the attempt's to run.
fn runs_attempt(job: &jobs::Job, attempt: &Attempt) -> bool {
    job.agent_id == attempt.agent_id
        && matches!(job.status, JobStatus::Provisioning | JobStatus::Training)
}

/// Records the agent's telemetry; tells it whether to stop its current attempt.
pub async fn heartbeat(
    state: &AppState,
    agent: &Agent,
    beat: &Heartbeat,
) -> ServiceResult<HeartbeatReply> {
    store_heartbeat(state, agent, beat).await?;
    abandon_unnamed_attempt(state, agent, beat).await?;
    let instruction = match beat.attempt_id {
        Some(id) => instruction(state, &own_attempt(state, agent, id).await?).await?,
        None => Instruction {
            stop_attempt: false,
            publish_adapter: false,
        },
    };
    Ok(HeartbeatReply {
        interval_seconds: state.settings.fleet.heartbeat_interval_seconds,
        stop_attempt: instruction.stop_attempt,
        publish_adapter: instruction.publish_adapter,
    })
}

/// An attempt the control plane thinks the agent runs, but its heartbeats have not named
/// for `fleet.offline_after_seconds` since it began, is one the agent lost (its state wiped,
/// a bug): end it as lost so the job goes back to the queue instead of hanging.
async fn abandon_unnamed_attempt(
    state: &AppState,
    agent: &Agent,
    beat: &Heartbeat,
) -> ServiceResult<()> {
    let Some(current) = agent
        .current_attempt_id
        .filter(|a| beat.attempt_id != Some(*a))
    else {
        return Ok(());
    };
    let Some(attempt) = attempts::get(&state.db, current).await? else {
        return Ok(());
    };
    let grace = chrono::Duration::seconds(state.settings.fleet.offline_after_seconds as i64);
    if attempt.ended_at.is_none() && now() - attempt.started_at > grace {
        tracing::warn!(agent = %agent.name, attempt_id = %attempt.id, "agent no longer reports its attempt; ending it as lost");
        end_attempt(state, &attempt, Ending::Lost, Origin::AgentReport).await?;
    }
    Ok(())
}

/// Waits for work: a training assignment as soon as a fitting job is queued (else a
/// queued validation), or `None` after
/// `wait_seconds` (capped by `fleet.max_claim_wait_seconds`). A draining agent gets none.
pub async fn claim(
    state: &AppState,
    agent: &Agent,
    request: &ClaimRequest,
) -> ServiceResult<Option<protocol::agent::Work>> {
    let agent = store_heartbeat(state, agent, &request.heartbeat).await?;
    if agent.status == AgentStatus::Draining {
        return Ok(None);
    }
    let wait = request
        .wait_seconds
        .min(state.settings.fleet.max_claim_wait_seconds);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    loop {
        // Register interest before looking, so a job queued in between wakes us.
        let notified = state.work_available.notified();
        if let Some(assignment) = super::scheduler::claim(state, &agent, &request.heartbeat).await?
        {
            // Its stop_at_cap budgets hold from its first step, not from its first heartbeat.
            if let Some(job) = jobs::get_any(&state.db, assignment.job_id).await? {
                super::budget::watch_running(state, job, 0.0).await?;
            }
            return Ok(Some(protocol::agent::Work::Training(assignment)));
        }
        if let Some(work) = super::validation::claim(state, &agent).await? {
            return Ok(Some(protocol::agent::Work::Validation(work)));
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        // Jobs queued through another replica raise no local signal: look again each second.
        let _ = tokio::time::timeout((deadline - now).min(Duration::from_secs(1)), notified).await;
    }
}

/// The training file of an attempt the agent runs.
pub async fn attempt_training_file(
    state: &AppState,
    agent: &Agent,
    attempt_id: Uuid,
) -> ServiceResult<TrainingFile> {
    let attempt = own_attempt(state, agent, attempt_id).await?;
    let job = jobs::get_any(&state.db, attempt.job_id)
        .await?
        .ok_or(ServiceError::NotFound("job"))?;
    files::get(&state.db, job.training_file_id)
        .await?
        .ok_or(ServiceError::NotFound("training file"))
}

/// The validation file of an attempt the agent runs (its job's `validation_file_id`).
pub async fn attempt_validation_file(
    state: &AppState,
    agent: &Agent,
    attempt_id: Uuid,
) -> ServiceResult<TrainingFile> {
    let attempt = own_attempt(state, agent, attempt_id).await?;
    let job = jobs::get_any(&state.db, attempt.job_id)
        .await?
        .ok_or(ServiceError::NotFound("job"))?;
    let id = job
        .validation_file_id
        .ok_or(ServiceError::NotFound("validation file"))?;
    files::get(&state.db, id)
        .await?
        .ok_or(ServiceError::NotFound("validation file"))
}

/// A checkpoint archive (tar) of a job the agent runs an attempt of.
pub async fn checkpoint_archive(
    state: &AppState,
    agent: &Agent,
    checkpoint_id: Uuid,
) -> ServiceResult<Download> {
    let checkpoint = attempts::checkpoint(&state.db, checkpoint_id)
        .await?
        .ok_or(ServiceError::NotFound("checkpoint"))?;
    let runs_job = jobs::get_any(&state.db, checkpoint.job_id)
        .await?
        .is_some_and(|job| job.agent_id == Some(agent.id));
    if !runs_job {
        return Err(ServiceError::NotFound("checkpoint"));
    }
    state
        .artifacts
        .get(&checkpoint.storage_path)
        .await
        .map_err(storage_error)
}

fn metric_point(metric: &protocol::agent::MetricReport) -> MetricPoint {
    MetricPoint {
        step: metric.step as i64,
        epoch: Some(metric.epoch.floor() as i64),
        training_loss: Some(metric.training_loss).filter(|v| v.is_finite()),
        validation_loss: metric.validation_loss.filter(|v| v.is_finite()),
        learning_rate: Some(metric.learning_rate),
        grad_norm: Some(metric.grad_norm).filter(|v| v.is_finite()),
        tokens_per_second: Some(metric.tokens_per_second),
        gpu_utilization: metric.gpu_utilization.map(i64::from),
        memory_used_gb: metric.memory_used_gb,
        recorded_at: metric.recorded_at,
    }
}

/// Stores a batch from the agent's outbox: stages, per-step metrics and events, each once
/// however often it arrives. The first report moves the job from provisioning to
/// training. The reply says whether to stop.
pub async fn reports(
    state: &AppState,
    agent_id: Uuid,
    attempt_id: Uuid,
    batch: &ReportBatch,
) -> ServiceResult<ReportReply> {
    let Some(RunningAttempt {
        attempt,
        earlier_cost,
        training,
    }) = running_attempt(state, agent_id, attempt_id).await?
    else {
        return Ok(STOP_ATTEMPT);
    };
    if !training && !batch.reports.is_empty() && !start_training(state, &attempt).await? {
        return Ok(STOP_ATTEMPT);
    }
    let mut metrics = Vec::new();
    let mut events = Vec::new();
    let mut stage = None;
    let mut latest = None;
    for report in &batch.reports {
        match report {
            Report::Stage { key, stage: s, at } => {
                stage = Some(s.as_str());
                let mut event = Event::new(
                    attempt.job_id,
                    EventType::Info,
                    Severity::Info,
                    format!("Stage: {}", s.as_str().replace('_', " ")),
                )
                .with_details(serde_json::json!({"stage": s.as_str()}));
                event.created_at = *at;
                events.push(agent_event(event, &attempt, key));
            }
            Report::Metric { metric, .. } => {
                stage = Some("training");
                metrics.push(metric_point(metric));
                latest = Some(metric);
            }
            Report::Event {
                key,
                event_type,
                severity,
                message,
                details,
                at,
            } => {
                // Agents report warnings, errors, checkpoints and metrics; the rest is info.
                let event_type = match event_type.parse::<EventType>() {
                    Ok(EventType::Status) | Err(_) => EventType::Info,
                    Ok(known) => known,
                };
                let mut event = Event::new(attempt.job_id, event_type, *severity, message.clone());
                event.details = details.clone().map(sqlx::types::Json);
                event.created_at = *at;
                events.push(agent_event(event, &attempt, key));
            }
        }
    }
    let at = now();
    let cost = earlier_cost + attempt.cost_at(at);
    let step_seconds = latest.map(|m| {
        let done = m
            .step
            .saturating_sub(attempt.resumed_from_step.unwrap_or(0) as u64)
            .max(1);
        m.elapsed_seconds / done as f64
    });
    let remaining = latest
        .zip(step_seconds)
        .map(|(m, per_step)| (per_step * m.total_steps.saturating_sub(m.step) as f64) as i64);
    let step_cost =
        step_seconds.map(|per_step| per_step * attempt.hourly_rate.unwrap_or(0.0) / 3600.0);
    let progress = Progress {
        stage,
        step: latest.map(|m| m.step as i64),
        total_steps: latest.map(|m| m.total_steps as i64),
        epoch: latest.map(|m| m.epoch.floor() as i64),
        total_epochs: None,
        elapsed_seconds: Some((at - attempt.started_at).num_seconds()),
        remaining_seconds: remaining,
        cost: jobs::round_cents(cost),
    };
    let job_id = attempt.job_id;
    let outcome = state
        .reports
        .record(AttemptReports {
            attempt,
            metrics,
            events,
            progress,
        })
        .await?;
    let Some(job) = outcome.job else {
        // The job no longer runs the attempt: nothing was stored.
        state.running_attempts.forget(&attempt_id);
        return Ok(STOP_ATTEMPT);
    };
    let mut updates = Vec::with_capacity(1 + outcome.new_metrics.len() + outcome.new_events.len());
    updates.push(JobUpdate::Status {
        job: Box::new(job.clone()),
    });
    updates.extend(
        outcome
            .new_metrics
            .into_iter()
            .map(|point| JobUpdate::Metrics {
                job_id,
                point: Box::new(point),
            }),
    );
    updates.extend(
        outcome
            .new_events
            .into_iter()
            .map(|event| JobUpdate::Event {
                event: Box::new(event),
            }),
    );
    state.live.publish_all(updates).await;
    let job = stop_before_cap(state, job, cost, step_cost).await?;
    let instruction = Instruction::for_running(&job);
    Ok(ReportReply {
        accepted: outcome.accepted,
        stop_attempt: instruction.stop_attempt,
        publish_adapter: instruction.publish_adapter,
    })
}

/// Budgets are checked on heartbeats, off the report path, which only compares the job's
/// fresh cost with the `stop_cost` heartbeats keep (the cap less the stop's checkpoint).
/// Agents report every step, and the agent hears the reply while the next step runs; so
/// the stop is asked for when two more steps would reach the cap. The job then ends under
/// its cap by at most a step's cost, when its stop takes as long as its last checkpoint.
async fn stop_before_cap(
    state: &AppState,
    job: jobs::Job,
    cost: f64,
    step_cost: Option<f64>,
) -> ServiceResult<jobs::Job> {
    let in_flight = 2.0 * step_cost.unwrap_or(0.0);
    match job.stop_cost {
        Some(stop_cost) if job.stop_requested.is_none() && cost + in_flight >= stop_cost => {
            let job = super::cost::refresh_live_cost(state, job).await?;
            super::budget::watch_running(state, job, in_flight).await
        }
        _ => Ok(job),
    }
}

/// The reply to a report for an attempt its job no longer runs.
const STOP_ATTEMPT: ReportReply = ReportReply {
    accepted: 0,
    stop_attempt: true,
    publish_adapter: false,
};

/// The attempt's first report: provisioning is over, training has begun. Read once per
/// attempt, until this replica has seen its job in training; false when the job no longer
/// runs the attempt.
async fn start_training(state: &AppState, attempt: &Attempt) -> ServiceResult<bool> {
    let job = jobs::get_any(&state.db, attempt.job_id).await?;
    let Some(job) = job.filter(|job| runs_attempt(job, attempt)) else {
        return Ok(false);
    };
    if let (JobStatus::Provisioning, Some(agent_id)) = (job.status, attempt.agent_id) {
        let mut event = Event::new(
            job.id,
            EventType::Status,
            Severity::Info,
            format!("Training started (attempt {})", attempt.attempt_number),
        )
        .with_details(serde_json::json!({"from": job.status, "to": JobStatus::Training}));
        event.attempt_id = Some(attempt.id);
        let change = Change::StartTraining { agent_id };
        match change_status(state, &job, change, vec![event], Origin::AgentReport).await {
            // Two batches raced to start it, or it was cancelled meanwhile: the write that
            // follows stores the reports only if the job still runs the attempt.
            Ok(_) | Err(ServiceError::Conflict(_)) => {}
            Err(error) => return Err(error),
        }
    }
    state
        .running_attempts
        .update(&attempt.id, |running| running.training = true);
    Ok(true)
}

fn agent_event(mut event: Event, attempt: &Attempt, key: &str) -> Event {
    event.attempt_id = Some(attempt.id);
    event.source = Some("agent".into());
    event.idempotency_key = Some(format!("attempt-{}:{key}", attempt.attempt_number));
    event
}

fn storage_error(error: StorageError) -> ServiceError {
    match error {
        StorageError::TooLarge(_) => ServiceError::PayloadTooLarge(error.to_string()),
        StorageError::ChecksumMismatch { .. } => ServiceError::Unprocessable {
            message: error.to_string(),
            rules: vec!["checksum".into()],
        },
        StorageError::Body(_) => ServiceError::BadRequest(error.to_string()),
        StorageError::Store(object_store::Error::NotFound { .. }) => {
            ServiceError::NotFound("artifact content")
        }
        other => ServiceError::Internal(other.to_string()),
    }
}

/// Streams an attempt's artifact to the artifact store, checked against `sha256` (422
/// when it differs; nothing is kept). A repeated upload of the same bytes answers with
/// the stored artifact. A checkpoint is recorded as one the job can resume from.
pub async fn upload_artifact(
    state: &AppState,
    agent: &Agent,
    attempt_id: Uuid,
    upload: &ArtifactUpload,
    body: impl Stream<Item = Result<Bytes, String>> + Send + Unpin,
) -> ServiceResult<(Artifact, Option<Checkpoint>)> {
    let attempt = own_attempt(state, agent, attempt_id).await?;
    let name = upload.name.trim();
    if name.is_empty() || name.len() > 200 || name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(ServiceError::Validation(vec![FieldError::new(
            "name",
            "must be a plain file name of 1 to 200 characters",
        )]));
    }
    if upload.sha256.len() != 64 || !upload.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ServiceError::Validation(vec![FieldError::new(
            "sha256",
            "must be 64 hex digits",
        )]));
    }
    let artifact_id = Uuid::new_v4();
    let key = format!(
        "jobs/{}/{}/{artifact_id}-{name}",
        attempt.job_id,
        upload.kind.as_str()
    );
    let size = state
        .artifacts
        .put_verified(
            &key,
            body,
            state.settings.storage.max_artifact_bytes,
            &upload.sha256,
        )
        .await
        .map_err(storage_error)?;
    let artifact = Artifact {
        id: artifact_id,
        job_id: attempt.job_id,
        attempt_id: Some(attempt.id),
        artifact_type: upload.kind,
        name: name.to_owned(),
        file_path: key.clone(),
        file_size: size as i64,
        mime_type: Some(mime_type(name).to_owned()),
        checksum: Some(upload.sha256.to_ascii_lowercase()),
        epoch: upload.epoch.map(|e| e as i64),
        step: upload.step.map(|s| s as i64),
        download_count: 0,
        last_downloaded_at: None,
        created_at: now(),
    };
    let artifact = super::artifact::record(state, &artifact).await?;
    let checkpoint = match (upload.kind, upload.step) {
        (ArtifactKind::Checkpoint, Some(step)) => Some(
            attempts::insert_checkpoint(
                &state.db,
                &Checkpoint {
                    id: Uuid::new_v4(),
                    job_id: attempt.job_id,
                    attempt_id: Some(attempt.id),
                    step: step as i64,
                    epoch: upload.epoch.map(|e| e as i64),
                    storage_path: artifact.file_path.clone(),
                    size_bytes: artifact.file_size,
                    sha256: artifact.checksum.clone().unwrap_or_default(),
                    artifact_id: Some(artifact.id),
                    created_at: now(),
                },
            )
            .await?,
        ),
        _ => None,
    };
    tracing::info!(job_id = %attempt.job_id, kind = upload.kind.as_str(), name, size, "artifact stored");
    Ok((artifact, checkpoint))
}

fn mime_type(name: &str) -> &'static str {
    match name.rsplit('.').next() {
        Some("json") => "application/json",
        Some("jsonl") => "application/x-ndjson",
        Some("tar") => "application/x-tar",
        _ => "application/octet-stream",
    }
}

/// Ends an attempt as its agent reports; the job's status afterwards. Repeating it
/// changes nothing.
pub async fn finish(
    state: &AppState,
    agent: &Agent,
    attempt_id: Uuid,
    outcome: AttemptOutcome,
) -> ServiceResult<Option<JobStatus>> {
    let attempt = own_attempt(state, agent, attempt_id).await?;
    state.running_attempts.forget(&attempt_id);
    end_attempt(
        state,
        &attempt,
        Ending::Reported(outcome),
        Origin::AgentReport,
    )
    .await?;
    let job = jobs::get_any(&state.db, attempt.job_id).await?;
    Ok(job.map(|j| j.status))
}

/// Enrolls an agent with an enrollment token; returns it with its secret (shown once).
pub async fn enroll(
    state: &AppState,
    enrollment_token: &str,
    name: &str,
    labels: serde_json::Map<String, serde_json::Value>,
    gpus: Vec<serde_json::Value>,
) -> ServiceResult<(Agent, String)> {
    let name = name.trim();
    let mut errors = Vec::new();
    if name.is_empty() || name.chars().count() > 200 {
        errors.push(FieldError::new("name", "must be 1 to 200 characters"));
    }
    for (key, value) in &labels {
        if !value.is_string() {
            errors.push(FieldError::new(
                format!("labels.{key}"),
                "label values must be strings",
            ));
        }
    }
    if !errors.is_empty() {
        return Err(ServiceError::Validation(errors));
    }
    let secret = crate::auth::new_token("lca_");
    let agent = agents::register(
        &state.db,
        &token_hash(enrollment_token.trim()),
        agents::NewAgent {
            name,
            labels: &serde_json::Value::Object(labels),
            gpus: &serde_json::Value::Array(gpus),
            secret_hash: &token_hash(&secret),
        },
    )
    .await?
    .ok_or(ServiceError::Unauthorized)?;
    tracing::info!(agent_id = %agent.id, name = %agent.name, "agent enrolled");
    Ok((agent, secret))
}

fn operators_only(user: &super::CurrentUser) -> ServiceResult<()> {
    if user.is_operator() {
        Ok(())
    } else {
        Err(ServiceError::Forbidden(
            "the fleet is visible to operators and admins only".into(),
        ))
    }
}

/// Every enrolled agent (operators and admins).
pub async fn list_agents(state: &AppState, user: &super::CurrentUser) -> ServiceResult<Vec<Agent>> {
    operators_only(user)?;
    Ok(agents::list(&state.db).await?)
}

/// An agent's recent heartbeats, oldest first (operators and admins).
pub async fn agent_telemetry(
    state: &AppState,
    user: &super::CurrentUser,
    id: Uuid,
) -> ServiceResult<Vec<agents::TelemetryPoint>> {
    operators_only(user)?;
    Ok(agents::telemetry(&state.db, id, 720).await?)
}
