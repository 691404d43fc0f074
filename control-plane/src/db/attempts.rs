//! Attempts: one agent's run of a job. Assignment, reports and the end of an attempt each
//! change the job in the same transaction as the attempt, compare-and-set on the job's
//! status, so two agents (or two replicas) can never both own a job.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use uuid::Uuid;

use super::events::{insert_event, Event};
use super::jobs::Job;
use super::metrics::{insert_metric, MetricPoint};
use super::{on_pool, Db, DbError};
use crate::domain::JobStatus;

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Attempt {
    pub id: Uuid,
    pub job_id: Uuid,
    pub agent_id: Option<Uuid>,
    pub attempt_number: i64,
    pub status: String,
    pub resumed_from_checkpoint_id: Option<Uuid>,
    pub resumed_from_step: Option<i64>,
    pub gpu_type: Option<String>,
    pub hourly_rate: Option<f64>,
    pub cost: f64,
    pub error_message: Option<String>,
    pub notice_deadline: Option<DateTime<Utc>>,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    #[schema(value_type = Option<Object>)]
    pub recipe: Option<Json<serde_json::Value>>,
    pub interruption_provider: Option<String>,
    pub notice_seconds_used: Option<f64>,
    pub last_step: i64,
}

const ATTEMPT_COLUMNS: &str = "id, job_id, agent_id, attempt_number, status, resumed_from_checkpoint_id, \
     resumed_from_step, gpu_type, hourly_rate, cost, error_message, notice_deadline, started_at, ended_at, \
     recipe, interruption_provider, notice_seconds_used, last_step";

impl Attempt {
    /// What the attempt has cost by `at` (its final cost once it has ended).
    pub fn cost_at(&self, at: DateTime<Utc>) -> f64 {
        if self.ended_at.is_some() {
            return self.cost;
        }
        let hours = (at - self.started_at).num_milliseconds().max(0) as f64 / 3_600_000.0;
        hours * self.hourly_rate.unwrap_or(0.0)
    }

    pub fn hours(&self, at: DateTime<Utc>) -> f64 {
        let end = self.ended_at.unwrap_or(at);
        (end - self.started_at).num_milliseconds().max(0) as f64 / 3_600_000.0
    }
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Checkpoint {
    pub id: Uuid,
    pub job_id: Uuid,
    pub attempt_id: Option<Uuid>,
    pub step: i64,
    pub epoch: Option<i64>,
    #[serde(skip)]
    pub storage_path: String,
    pub size_bytes: i64,
    pub sha256: String,
    pub artifact_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
}

const CHECKPOINT_COLUMNS: &str =
    "id, job_id, attempt_id, step, epoch, storage_path, size_bytes, sha256, artifact_id, created_at";

pub async fn get(db: &Db, id: Uuid) -> Result<Option<Attempt>, DbError> {
    let sql = format!("SELECT {ATTEMPT_COLUMNS} FROM job_attempts WHERE id = $1");
    Ok(
        on_pool!(db, pool => sqlx::query_as::<_, Attempt>(&sql).bind(id).fetch_optional(pool).await)?,
    )
}

pub async fn for_job(db: &Db, job_id: Uuid) -> Result<Vec<Attempt>, DbError> {
    let sql = format!(
        "SELECT {ATTEMPT_COLUMNS} FROM job_attempts WHERE job_id = $1 ORDER BY attempt_number"
    );
    Ok(on_pool!(db, pool => sqlx::query_as::<_, Attempt>(&sql).bind(job_id).fetch_all(pool).await)?)
}

/// Cost of every attempt of a job by `at`.
pub async fn job_cost(db: &Db, job_id: Uuid, at: DateTime<Utc>) -> Result<f64, DbError> {
    Ok(for_job(db, job_id)
        .await?
        .iter()
        .map(|a| a.cost_at(at))
        .sum())
}

pub async fn checkpoints(db: &Db, job_id: Uuid) -> Result<Vec<Checkpoint>, DbError> {
    let sql =
        format!("SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE job_id = $1 ORDER BY step");
    Ok(
        on_pool!(db, pool => sqlx::query_as::<_, Checkpoint>(&sql).bind(job_id).fetch_all(pool).await)?,
    )
}

pub async fn checkpoint(db: &Db, id: Uuid) -> Result<Option<Checkpoint>, DbError> {
    let sql = format!("SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE id = $1");
    Ok(
        on_pool!(db, pool => sqlx::query_as::<_, Checkpoint>(&sql).bind(id).fetch_optional(pool).await)?,
    )
}

/// Records a checkpoint's archive (already stored as artifact `artifact_id`).
pub async fn insert_checkpoint(db: &Db, checkpoint: &Checkpoint) -> Result<Checkpoint, DbError> {
    let sql = format!(
        "INSERT INTO checkpoints ({CHECKPOINT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (job_id, step) DO UPDATE SET attempt_id = excluded.attempt_id,
             storage_path = excluded.storage_path, size_bytes = excluded.size_bytes,
             sha256 = excluded.sha256, artifact_id = excluded.artifact_id
         RETURNING {CHECKPOINT_COLUMNS}"
    );
    Ok(on_pool!(db, pool => sqlx::query_as::<_, Checkpoint>(&sql)
        .bind(checkpoint.id)
        .bind(checkpoint.job_id)
        .bind(checkpoint.attempt_id)
        .bind(checkpoint.step)
        .bind(checkpoint.epoch)
        .bind(&checkpoint.storage_path)
        .bind(checkpoint.size_bytes)
        .bind(&checkpoint.sha256)
        .bind(checkpoint.artifact_id)
        .bind(checkpoint.created_at)
        .fetch_one(pool)
        .await)?)
}

/// Queued jobs, oldest first: the scheduler's candidates.
pub async fn queued(db: &Db, limit: i64) -> Result<Vec<Job>, DbError> {
    Ok(on_pool!(db, pool => sqlx::query_as::<_, Job>(
        "SELECT * FROM training_jobs WHERE status = 'queued' ORDER BY queued_at, id LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await)?)
}

pub struct Assignment<'a> {
    pub agent_id: Uuid,
    pub agent_name: &'a str,
    pub recipe: &'a serde_json::Value,
    pub gpu_type: &'a str,
    pub hourly_rate: f64,
}

/// Gives `job_id` to an agent if it is still queued: the job becomes `provisioning`, a
/// new attempt starts (resuming from the job's `resume_from_checkpoint_id`), and metrics
/// past the resumed step are dropped so the replayed steps replace them.
/// `None` when another agent got it first.
pub async fn assign(
    db: &Db,
    job_id: Uuid,
    assignment: Assignment<'_>,
) -> Result<Option<(Job, Attempt, Option<Checkpoint>)>, DbError> {
    debug_assert!(JobStatus::Queued.check(JobStatus::Provisioning).is_ok());
    let now = super::now();
    let attempt_sql = format!(
        "INSERT INTO job_attempts (id, job_id, agent_id, attempt_number, status, resumed_from_checkpoint_id,
             resumed_from_step, gpu_type, hourly_rate, cost, started_at, created_at, updated_at, recipe, last_step)
         VALUES ($1, $2, $3, $4, 'running', $5, $6, $7, $8, 0, $9, $9, $9, $10, $11)
         RETURNING {ATTEMPT_COLUMNS}"
    );
    let checkpoint_sql = format!("SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE id = $1");
    Ok(on_pool!(db, pool => {
        let mut tx = pool.begin().await?;
        let job = sqlx::query_as::<_, Job>(
            "UPDATE training_jobs SET status = 'provisioning', agent_id = $2, updated_at = $3,
                 started_at = COALESCE(started_at, $3), current_stage = 'provisioning',
                 stage_substatus = NULL, estimated_start_time = NULL
             WHERE id = $1 AND status = 'queued' RETURNING *",
        )
        .bind(job_id)
        .bind(assignment.agent_id)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(job) = job else { return Ok(None) };
        let checkpoint = match job.resume_from_checkpoint_id {
            Some(id) => sqlx::query_as::<_, Checkpoint>(&checkpoint_sql)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?,
            None => None,
        };
        let resumed_step = checkpoint.as_ref().map_or(0, |c| c.step);
        let (number,): (i64,) = sqlx::query_as(
            "SELECT COALESCE(MAX(attempt_number), 0) + 1 FROM job_attempts WHERE job_id = $1",
        )
        .bind(job_id)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM training_metrics WHERE job_id = $1 AND step > $2")
            .bind(job_id)
            .bind(resumed_step)
            .execute(&mut *tx)
            .await?;
        let attempt = sqlx::query_as::<_, Attempt>(&attempt_sql)
            .bind(Uuid::new_v4())
            .bind(job_id)
            .bind(assignment.agent_id)
            .bind(number)
            .bind(checkpoint.as_ref().map(|c| c.id))
            .bind(checkpoint.as_ref().map(|c| c.step))
            .bind(assignment.gpu_type)
            .bind(assignment.hourly_rate)
            .bind(now)
            .bind(Json(assignment.recipe))
            .bind(resumed_step)
            .fetch_one(&mut *tx)
            .await?;
        sqlx::query("UPDATE agents SET current_attempt_id = $2 WHERE id = $1")
            .bind(assignment.agent_id)
            .bind(attempt.id)
            .execute(&mut *tx)
            .await?;
        let resumed = match &checkpoint {
            Some(c) => format!(", resuming from the checkpoint at step {}", c.step),
            None => String::new(),
        };
        let mut event = Event::new(
            job_id,
            "status",
            "info",
            format!("Attempt {number} assigned to agent {}{resumed}", assignment.agent_name),
        )
        .with_details(serde_json::json!({
            "from": "queued", "to": "provisioning", "agent_id": assignment.agent_id,
            "attempt_number": number, "resumed_from_step": checkpoint.as_ref().map(|c| c.step),
        }));
        event.attempt_id = Some(attempt.id);
        event.created_at = now;
        insert_event!(&event).execute(&mut *tx).await?;
        tx.commit().await?;
        Some((job, attempt, checkpoint))
    }))
}

/// Progress carried by a report batch, applied to the job row.
pub struct Progress<'a> {
    pub stage: Option<&'a str>,
    pub step: Option<i64>,
    pub total_steps: Option<i64>,
    pub epoch: Option<i64>,
    pub total_epochs: Option<i64>,
    pub elapsed_seconds: Option<i64>,
    pub remaining_seconds: Option<i64>,
    pub cost: f64,
}

pub struct ReportOutcome {
    /// Items not seen before.
    pub accepted: usize,
    /// Present when the job row changed.
    pub job: Option<Job>,
    pub new_metrics: Vec<MetricPoint>,
    pub new_events: Vec<Event>,
}

/// Stores a batch of an attempt's reports: metrics (one per step), events (one per
/// idempotency key), and the job's progress. The first report moves the job from
/// `provisioning` to `training`. Nothing changes unless the attempt is still the job's
/// running attempt.
pub async fn record_reports(
    db: &Db,
    attempt: &Attempt,
    metrics: &[MetricPoint],
    events: &[Event],
    progress: &Progress<'_>,
) -> Result<ReportOutcome, DbError> {
    let now = super::now();
    Ok(on_pool!(db, pool => {
        let mut tx = pool.begin().await?;
        let mut outcome = ReportOutcome { accepted: 0, job: None, new_metrics: Vec::new(), new_events: Vec::new() };
        let started = sqlx::query_as::<_, Job>(
            "UPDATE training_jobs SET status = 'training', updated_at = $3
             WHERE id = $1 AND status = 'provisioning' AND agent_id = $2 RETURNING *",
        )
        .bind(attempt.job_id)
        .bind(attempt.agent_id)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        if started.is_some() {
            let mut event = Event::new(attempt.job_id, "status", "info", format!("Training started (attempt {})", attempt.attempt_number))
                .with_details(serde_json::json!({"from": "provisioning", "to": "training"}));
            event.attempt_id = Some(attempt.id);
            insert_event!(&event).execute(&mut *tx).await?;
            outcome.new_events.push(event);
        }
        for point in metrics {
            let inserted = insert_metric!(attempt.job_id, Some(attempt.id), point)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if inserted == 1 {
                outcome.accepted += 1;
                outcome.new_metrics.push(point.clone());
            }
        }
        for event in events {
            let inserted = insert_event!(event).execute(&mut *tx).await?.rows_affected();
            if inserted == 1 {
                outcome.accepted += 1;
                outcome.new_events.push(event.clone());
            }
        }
        if let Some(step) = progress.step {
            sqlx::query("UPDATE job_attempts SET last_step = $2 WHERE id = $1 AND last_step < $2")
                .bind(attempt.id)
                .bind(step)
                .execute(&mut *tx)
                .await?;
        }
        let percentage = match (progress.step, progress.total_steps) {
            (Some(step), Some(total)) if total > 0 => Some((step * 100 / total).clamp(0, 100)),
            _ => None,
        };
        outcome.job = sqlx::query_as::<_, Job>(
            "UPDATE training_jobs SET updated_at = $3,
                 current_stage = COALESCE($4, current_stage),
                 current_step = COALESCE($5, current_step),
                 total_steps = COALESCE($6, total_steps),
                 current_epoch = COALESCE($7, current_epoch),
                 total_epochs = COALESCE($8, total_epochs),
                 progress_percentage = COALESCE($9, progress_percentage),
                 elapsed_seconds = COALESCE($10, elapsed_seconds),
                 estimated_remaining_seconds = COALESCE($11, estimated_remaining_seconds),
                 current_cost = $12
             WHERE id = $1 AND agent_id = $2 AND status IN ('provisioning', 'training') RETURNING *",
        )
        .bind(attempt.job_id)
        .bind(attempt.agent_id)
        .bind(now)
        .bind(progress.stage)
        .bind(progress.step)
        .bind(progress.total_steps)
        .bind(progress.epoch)
        .bind(progress.total_epochs)
        .bind(percentage)
        .bind(progress.elapsed_seconds)
        .bind(progress.remaining_seconds)
        .bind(progress.cost)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        outcome
    }))
}

/// How an attempt ended, as stored on the attempt row.
pub struct AttemptEnd<'a> {
    /// `succeeded`, `failed`, `interrupted`, `cancelled` or `lost`.
    pub status: &'a str,
    pub error_message: Option<&'a str>,
    pub notice_deadline: Option<DateTime<Utc>>,
    pub interruption_provider: Option<&'a str>,
    pub notice_seconds_used: Option<f64>,
}

/// What becomes of the job when its attempt ends.
pub enum JobAfter<'a> {
    Complete,
    Fail {
        message: &'a str,
        stage: Option<&'a str>,
    },
    /// Back to the queue; `interruption` counts against the interruption budget, else
    /// against the retry budget.
    Requeue {
        resume_from: Option<Uuid>,
        hyperparameters: Option<&'a serde_json::Value>,
        interruption: bool,
    },
    /// The job already left the attempt (cancelled by its user): only the attempt ends.
    Unchanged,
}

/// Ends a running attempt and moves its job, logging `events` with it. Returns the job
/// when it changed, `None` when the attempt had already ended.
pub async fn end_attempt(
    db: &Db,
    attempt: &Attempt,
    end: AttemptEnd<'_>,
    after: JobAfter<'_>,
    events: &[Event],
) -> Result<Option<Job>, DbError> {
    let now = super::now();
    let cost = attempt.cost_at(now);
    Ok(on_pool!(db, pool => {
        let mut tx = pool.begin().await?;
        let ended = sqlx::query(
            "UPDATE job_attempts SET status = $2, error_message = $3, notice_deadline = $4,
                 interruption_provider = $5, notice_seconds_used = $6, cost = $7, ended_at = $8, updated_at = $8
             WHERE id = $1 AND status = 'running'",
        )
        .bind(attempt.id)
        .bind(end.status)
        .bind(end.error_message)
        .bind(end.notice_deadline)
        .bind(end.interruption_provider)
        .bind(end.notice_seconds_used)
        .bind(cost)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if ended == 0 {
            return Ok(None);
        }
        sqlx::query("UPDATE agents SET current_attempt_id = NULL WHERE id = $1 AND current_attempt_id = $2")
            .bind(attempt.agent_id)
            .bind(attempt.id)
            .execute(&mut *tx)
            .await?;
        let (total_cost,): (f64,) = sqlx::query_as("SELECT COALESCE(SUM(cost), 0.0) FROM job_attempts WHERE job_id = $1")
            .bind(attempt.job_id)
            .fetch_one(&mut *tx)
            .await?;
        let total_cost = super::jobs::round_cents(total_cost);
        let live = "WHERE id = $1 AND agent_id = $2 AND status IN ('provisioning', 'training') RETURNING *";
        let job = match after {
            JobAfter::Complete => sqlx::query_as::<_, Job>(&format!(
                "UPDATE training_jobs SET status = 'completed', updated_at = $3, completed_at = $3,
                     progress_percentage = 100, current_stage = 'completed', estimated_remaining_seconds = 0,
                     current_cost = $4, final_cost = $4 {live}"))
                .bind(attempt.job_id).bind(attempt.agent_id).bind(now).bind(total_cost)
                .fetch_optional(&mut *tx).await?,
            JobAfter::Fail { message, stage } => sqlx::query_as::<_, Job>(&format!(
                "UPDATE training_jobs SET status = 'failed', updated_at = $3, completed_at = $3,
                     error_message = $5, failed_stage = COALESCE($6, current_stage),
                     current_cost = $4, final_cost = $4 {live}"))
                .bind(attempt.job_id).bind(attempt.agent_id).bind(now).bind(total_cost)
                .bind(message).bind(stage)
                .fetch_optional(&mut *tx).await?,
            JobAfter::Requeue { resume_from, hyperparameters, interruption, .. } => sqlx::query_as::<_, Job>(&format!(
                "UPDATE training_jobs SET status = 'queued', updated_at = $3, queued_at = $3,
                     current_cost = $4, agent_id = NULL, current_stage = 'queued',
                     resume_from_checkpoint_id = $5,
                     hyperparameters = COALESCE($6, hyperparameters),
                     interruption_count = interruption_count + $7,
                     retry_count = retry_count + $8,
                     progress_percentage = CASE WHEN $5 IS NULL THEN 0 ELSE progress_percentage END
                 WHERE id = $1 AND agent_id = $2 AND status IN ('provisioning', 'training') RETURNING *"))
                .bind(attempt.job_id).bind(attempt.agent_id).bind(now).bind(total_cost)
                .bind(resume_from).bind(hyperparameters.map(Json))
                .bind(i64::from(interruption)).bind(i64::from(!interruption))
                .fetch_optional(&mut *tx).await?,
            JobAfter::Unchanged => None,
        };
        for event in events {
            let mut event = event.clone();
            event.attempt_id = Some(attempt.id);
            insert_event!(&event).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        job
    }))
}

/// Running attempts on agents that have not sent a heartbeat since `cutoff`; marks
/// those agents offline.
pub async fn orphaned(db: &Db, cutoff: DateTime<Utc>) -> Result<Vec<Attempt>, DbError> {
    let sql = format!(
        "SELECT {ATTEMPT_COLUMNS} FROM job_attempts WHERE status = 'running' AND agent_id IN
             (SELECT id FROM agents WHERE last_heartbeat_at < $1)"
    );
    Ok(on_pool!(db, pool => {
        sqlx::query("UPDATE agents SET status = 'offline' WHERE last_heartbeat_at < $1 AND status != 'offline'")
            .bind(cutoff)
            .execute(pool)
            .await?;
        sqlx::query_as::<_, Attempt>(&sql).bind(cutoff).fetch_all(pool).await?
    }))
}

/// The latest checkpoint of a job, the one a resumed attempt starts from.
pub async fn latest_checkpoint(db: &Db, job_id: Uuid) -> Result<Option<Checkpoint>, DbError> {
    let sql = format!(
        "SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE job_id = $1 ORDER BY step DESC LIMIT 1"
    );
    Ok(
        on_pool!(db, pool => sqlx::query_as::<_, Checkpoint>(&sql).bind(job_id).fetch_optional(pool).await)?,
    )
}
