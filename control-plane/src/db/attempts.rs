//! Attempts: one agent's run of a job, its checkpoints and its reports. Starting and
//! ending an attempt change the job's status, so they are written by
//! `db::jobs::change_status`; this module reads attempts and stores what they report.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use uuid::Uuid;

use super::events::Event;
use super::jobs::Job;
use super::metrics::MetricPoint;
use super::{on_pool, BeginWrite, Db, DbError};
use crate::domain::{AgentStatus, AttemptStatus, GpuType, Hyperparameters};

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Attempt {
    pub id: Uuid,
    pub job_id: Uuid,
    pub agent_id: Option<Uuid>,
    pub attempt_number: i64,
    pub status: AttemptStatus,
    pub resumed_from_checkpoint_id: Option<Uuid>,
    pub resumed_from_step: Option<i64>,
    pub gpu_type: Option<GpuType>,
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

/// An attempt's columns but its last step.
macro_rules! attempt_columns_but_last_step {
    () => {
        "id, job_id, agent_id, attempt_number, status, resumed_from_checkpoint_id, \
         resumed_from_step, gpu_type, hourly_rate, cost, error_message, notice_deadline, \
         started_at, ended_at, recipe, interruption_provider, notice_seconds_used"
    };
}

/// The step of a `job_attempts` row's newest metric point, or its stored `last_step`
/// when it has none past it. The stored value is the step the attempt resumed from until
/// it ends, and this one then; reports do not update the attempt's row (SQLite 1×1
/// ingest: about 5,700 → 6,800 points/s without that write). The read walks the
/// (job, step) index down from the top and stops at once: an assignment deletes every
/// point past the step it resumes from, so those past it are the attempt's own.
macro_rules! newest_step {
    () => {
        "COALESCE((SELECT m.step FROM training_metrics m
                   WHERE m.job_id = job_attempts.job_id AND m.step > job_attempts.last_step
                     AND m.attempt_id = job_attempts.id
                   ORDER BY m.step DESC LIMIT 1), job_attempts.last_step)"
    };
}
pub(crate) use newest_step;

/// An attempt's columns as stored (for `RETURNING`).
pub(crate) const STORED_ATTEMPT_COLUMNS: &str =
    concat!(attempt_columns_but_last_step!(), ", last_step");

/// An attempt's columns for `SELECT … FROM job_attempts`: a running attempt's last step
/// is its newest point's.
pub(crate) const ATTEMPT_COLUMNS: &str = concat!(
    attempt_columns_but_last_step!(),
    ", CASE WHEN ended_at IS NULL THEN ",
    newest_step!(),
    " ELSE last_step END AS last_step"
);

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

pub(crate) const CHECKPOINT_COLUMNS: &str =
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

/// Every attempt of the job that attempt `id` belongs to, in order: one read where a
/// caller needs the attempt and its job's cost. Empty when there is no such attempt.
pub async fn with_siblings(db: &Db, id: Uuid) -> Result<Vec<Attempt>, DbError> {
    let sql = format!(
        "SELECT {ATTEMPT_COLUMNS} FROM job_attempts
         WHERE job_id = (SELECT job_id FROM job_attempts WHERE id = $1) ORDER BY attempt_number"
    );
    Ok(on_pool!(db, pool => sqlx::query_as::<_, Attempt>(&sql).bind(id).fetch_all(pool).await)?)
}

/// `$1`'s next attempt number.
pub(crate) const NEXT_NUMBER: &str =
    "SELECT COALESCE(MAX(attempt_number), 0) + 1 FROM job_attempts WHERE job_id = $1";

/// The number the job's next attempt takes.
pub async fn next_number(db: &Db, job_id: Uuid) -> Result<i64, DbError> {
    let (number,): (i64,) = on_pool!(db, pool => sqlx::query_as(NEXT_NUMBER)
    .bind(job_id)
    .fetch_one(pool)
    .await)?;
    Ok(number)
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

/// How long the job's latest checkpoint took to be stored: from its step's metric to the
/// archive's arrival (saving, packing and uploading it).
pub async fn latest_checkpoint_seconds(db: &Db, job_id: Uuid) -> Result<Option<f64>, DbError> {
    let times: Option<(DateTime<Utc>, DateTime<Utc>)> = on_pool!(db, pool => sqlx::query_as(
        "SELECT m.recorded_at, c.created_at FROM checkpoints c
         JOIN training_metrics m ON m.job_id = c.job_id AND m.step = c.step
         WHERE c.job_id = $1 ORDER BY c.step DESC LIMIT 1",
    )
    .bind(job_id)
    .fetch_optional(pool)
    .await)?;
    Ok(times.map(|(step_done, stored)| (stored - step_done).as_seconds_f64().max(0.0)))
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

/// The tokens/s of the newest `limit` attempts that trained to their end on `base_model`
/// and `gpu_model`, across all users: a fleet's measured speed, no one's data.
pub async fn throughput_samples(
    db: &Db,
    base_model: &str,
    gpu_model: &str,
    limit: i64,
) -> Result<Vec<ThroughputSample>, DbError> {
    let rows: Vec<(f64, Option<Json<Hyperparameters>>)> = on_pool!(db, pool => sqlx::query_as(
        "SELECT a.tokens_per_second, j.hyperparameters
         FROM job_attempts a JOIN training_jobs j ON j.id = a.job_id
         WHERE j.base_model = $1 AND j.gpu_model = $2 AND a.tokens_per_second > 0
         ORDER BY a.ended_at DESC LIMIT $3",
    )
    .bind(base_model)
    .bind(gpu_model)
    .bind(limit)
    .fetch_all(pool)
    .await)?;
    Ok(rows
        .into_iter()
        .map(|(tokens_per_second, hyperparameters)| ThroughputSample {
            tokens_per_second,
            gradient_checkpointing: hyperparameters.is_some_and(|h| h.gradient_checkpointing),
        })
        .collect())
}

/// An ended attempt's measured tokens/s, and whether its job checkpoints (which runs the
/// forward twice, so its speed is no sample for a job that does not, nor the reverse).
pub struct ThroughputSample {
    pub tokens_per_second: f64,
    pub gradient_checkpointing: bool,
}

/// Progress carried by a report batch, applied to the job row.
pub struct Progress {
    pub stage: Option<&'static str>,
    pub step: Option<i64>,
    pub total_steps: Option<i64>,
    pub epoch: Option<i64>,
    pub total_epochs: Option<i64>,
    pub elapsed_seconds: Option<i64>,
    pub remaining_seconds: Option<i64>,
    pub cost: f64,
}

/// One report batch of an attempt, ready to store: metrics (one per step), events (one
/// per idempotency key), and the job's progress while the attempt's agent still trains it.
pub struct AttemptReports {
    pub attempt: std::sync::Arc<Attempt>,
    pub metrics: Vec<MetricPoint>,
    pub events: Vec<Event>,
    pub progress: Progress,
}

pub struct ReportOutcome {
    /// Items not seen before.
    pub accepted: usize,
    /// The job row as the batch left it; `None` when the job no longer runs the attempt
    /// (it ended, or the job was cancelled or given elsewhere), and nothing was stored.
    pub job: Option<Job>,
    pub new_metrics: Vec<MetricPoint>,
    pub new_events: Vec<Event>,
}

/// The job row's progress update, the same on both backends: `$1` job, `$2` agent,
/// `$3` now, `$4`…`$11` the progress, `$12` cost, `$13`, `$14` the statuses it may be in,
/// `$15` the attempt. It changes the row only while the job runs that attempt of that
/// agent, so the report path needs no read to know whether it still does.
const UPDATE_JOB_PROGRESS: &str = "UPDATE training_jobs SET updated_at = $3,
         current_stage = COALESCE($4, current_stage),
         current_step = COALESCE($5, current_step),
         total_steps = COALESCE($6, total_steps),
         current_epoch = COALESCE($7, current_epoch),
         total_epochs = COALESCE($8, total_epochs),
         progress_percentage = COALESCE($9, progress_percentage),
         elapsed_seconds = COALESCE($10, elapsed_seconds),
         estimated_remaining_seconds = COALESCE($11, estimated_remaining_seconds),
         current_cost = $12
     WHERE id = $1 AND agent_id = $2 AND status IN ($13, $14)
       AND EXISTS (SELECT 1 FROM job_attempts WHERE id = $15 AND ended_at IS NULL)
     RETURNING *";

impl Progress {
    fn percentage(&self) -> Option<i64> {
        match (self.step, self.total_steps) {
            (Some(step), Some(total)) if total > 0 => Some((step * 100 / total).clamp(0, 100)),
            _ => None,
        }
    }
}

/// Binds [`UPDATE_JOB_PROGRESS`]'s parameters, in order, to a query of either backend.
macro_rules! bind_job_progress {
    ($query:expr, $attempt:expr, $progress:expr, $now:expr) => {{
        let (attempt, progress): (&Attempt, &Progress) = ($attempt, $progress);
        $query
            .bind(attempt.job_id)
            .bind(attempt.agent_id)
            .bind($now)
            .bind(progress.stage)
            .bind(progress.step)
            .bind(progress.total_steps)
            .bind(progress.epoch)
            .bind(progress.total_epochs)
            .bind(progress.percentage())
            .bind(progress.elapsed_seconds)
            .bind(progress.remaining_seconds)
            .bind(progress.cost)
            .bind(crate::domain::JobStatus::Provisioning)
            .bind(crate::domain::JobStatus::Training)
            .bind(attempt.id)
    }};
}

impl ReportOutcome {
    /// The outcome once the store named the steps and events that were new; within a
    /// batch the first point of a step is the one stored.
    fn from_stored(
        batch: &AttemptReports,
        new_steps: &HashSet<i64>,
        new_events: &HashSet<Uuid>,
        job: Option<Job>,
    ) -> ReportOutcome {
        let mut seen = HashSet::new();
        let new_metrics: Vec<MetricPoint> = batch
            .metrics
            .iter()
            .filter(|point| new_steps.contains(&point.step) && seen.insert(point.step))
            .cloned()
            .collect();
        let new_events: Vec<Event> = batch
            .events
            .iter()
            .filter(|event| new_events.contains(&event.id))
            .cloned()
            .collect();
        ReportOutcome {
            accepted: new_metrics.len() + new_events.len(),
            job,
            new_metrics,
            new_events,
        }
    }
}

/// Stores a [`AttemptReports`] inside an open SQLite transaction: one update of the job
/// row, and while the job still runs the attempt, one multi-row INSERT of its metrics per
/// chunk and its events; `db::report_writer` commits.
pub(crate) async fn store_reports_sqlite(
    tx: &mut sqlx::SqliteConnection,
    batch: &AttemptReports,
) -> Result<ReportOutcome, sqlx::Error> {
    let (attempt, progress) = (&batch.attempt, &batch.progress);
    let job = bind_job_progress!(
        sqlx::query_as::<_, Job>(UPDATE_JOB_PROGRESS),
        attempt,
        progress,
        super::now()
    )
    .fetch_optional(&mut *tx)
    .await?;
    if job.is_none() {
        return Ok(ReportOutcome::from_stored(
            batch,
            &HashSet::new(),
            &HashSet::new(),
            None,
        ));
    }
    let mut new_steps = HashSet::new();
    for chunk in batch.metrics.chunks(super::metrics::ROWS_PER_INSERT) {
        // RETURNING names the steps that were new: a resent step conflicts and is skipped.
        new_steps.extend(
            super::metrics::insert_points!(&mut *tx, attempt.job_id, Some(attempt.id), chunk)
                .await?,
        );
    }
    let mut new_events = HashSet::new();
    for event in &batch.events {
        let inserted = super::events::insert_event!(event)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if inserted == 1 {
            new_events.insert(event.id);
        }
    }
    Ok(ReportOutcome::from_stored(
        batch,
        &new_steps,
        &new_events,
        job,
    ))
}

/// [`store_reports_postgres`]'s statement, written out once: `$1`…`$15` as in
/// [`UPDATE_JOB_PROGRESS`], `$16`…`$25` the points' columns, `$26`…`$33` the events'
/// columns. Points and events are stored only when the job row changed
/// (`EXISTS (SELECT 1 FROM job)`): while the job still runs the attempt.
static STORE_REPORTS_POSTGRES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH job AS ({UPDATE_JOB_PROGRESS}),
         stored_points AS (
             INSERT INTO training_metrics (id, job_id, attempt_id, step, epoch, training_loss,
                 validation_loss, learning_rate, grad_norm, tokens_per_second, gpu_utilization,
                 memory_used_gb, recorded_at)
             SELECT gen_random_uuid(), $1, $15, step, epoch, training_loss, validation_loss,
                    learning_rate, grad_norm, tokens_per_second, gpu_utilization,
                    memory_used_gb, recorded_at
             FROM unnest($16::bigint[], $17::bigint[], $18::float8[], $19::float8[],
                         $20::float8[], $21::float8[], $22::float8[], $23::bigint[],
                         $24::float8[], $25::timestamptz[])
                  WITH ORDINALITY AS point(step, epoch, training_loss, validation_loss,
                      learning_rate, grad_norm, tokens_per_second, gpu_utilization,
                      memory_used_gb, recorded_at, position)
             WHERE EXISTS (SELECT 1 FROM job)
             ORDER BY position
             ON CONFLICT (job_id, step) DO NOTHING RETURNING step),
         stored_events AS (
             INSERT INTO event_logs (id, job_id, attempt_id, event_type, severity, message,
                 details, source, idempotency_key, created_at)
             SELECT id, $1, $15, event_type, severity, message, details::jsonb, source,
                    idempotency_key, created_at
             FROM unnest($26::uuid[], $27::text[], $28::text[], $29::text[], $30::text[],
                         $31::text[], $32::text[], $33::timestamptz[])
                  WITH ORDINALITY AS event(id, event_type, severity, message, details,
                      source, idempotency_key, created_at, position)
             WHERE EXISTS (SELECT 1 FROM job)
             ORDER BY position
             ON CONFLICT (job_id, idempotency_key) DO NOTHING RETURNING id)
         SELECT (SELECT array_agg(step) FROM stored_points) AS new_steps,
                (SELECT array_agg(id) FROM stored_events) AS new_events, job.*
         FROM (VALUES (1)) AS one LEFT JOIN job ON true"
    )
});

/// Stores a [`AttemptReports`] on PostgreSQL in one statement, atomic on its own: the
/// metrics and events from arrays (`unnest`, in the batch's order) and the job row, as
/// data-modifying parts of one query. One round trip where a
/// transaction of separate statements takes five.
pub(crate) async fn store_reports_postgres(
    pool: &sqlx::PgPool,
    batch: &AttemptReports,
) -> Result<ReportOutcome, sqlx::Error> {
    use sqlx::Row;
    let (attempt, progress) = (&batch.attempt, &batch.progress);
    /// One column of the batch, as the array `unnest` reads.
    fn each<'a, T, U>(items: &'a [T], value: impl Fn(&'a T) -> U) -> Vec<U> {
        items.iter().map(value).collect()
    }
    let (points, events) = (&batch.metrics, &batch.events);
    let row = bind_job_progress!(
        sqlx::query(&STORE_REPORTS_POSTGRES),
        attempt,
        progress,
        super::now()
    )
    .bind(each(points, |p| p.step))
    .bind(each(points, |p| p.epoch))
    .bind(each(points, |p| p.training_loss))
    .bind(each(points, |p| p.validation_loss))
    .bind(each(points, |p| p.learning_rate))
    .bind(each(points, |p| p.grad_norm))
    .bind(each(points, |p| p.tokens_per_second))
    .bind(each(points, |p| p.gpu_utilization))
    .bind(each(points, |p| p.memory_used_gb))
    .bind(each(points, |p| p.recorded_at))
    .bind(each(events, |e| e.id))
    .bind(each(events, |e| e.event_type.as_str()))
    .bind(each(events, |e| e.severity.as_str()))
    .bind(each(events, |e| e.message.as_str()))
    .bind(each(events, |e| {
        e.details.as_ref().map(|d| d.0.to_string())
    }))
    .bind(each(events, |e| e.source.as_deref()))
    .bind(each(events, |e| e.idempotency_key.as_deref()))
    .bind(each(events, |e| e.created_at))
    .fetch_one(pool)
    .await?;
    let new_steps: HashSet<i64> = row
        .try_get::<Option<Vec<i64>>, _>("new_steps")?
        .unwrap_or_default()
        .into_iter()
        .collect();
    let new_events: HashSet<Uuid> = row
        .try_get::<Option<Vec<Uuid>>, _>("new_events")?
        .unwrap_or_default()
        .into_iter()
        .collect();
    // The job's columns are NULL when its row did not change: the job no longer runs the
    // attempt.
    let job = match row.try_get::<Option<Uuid>, _>("id")? {
        Some(_) => Some(<Job as sqlx::FromRow<_>>::from_row(&row)?),
        None => None,
    };
    Ok(ReportOutcome::from_stored(
        batch,
        &new_steps,
        &new_events,
        job,
    ))
}

/// Ends an attempt whose job already left it (cancelled by its user, given elsewhere):
/// only the attempt row changes. `false` when it had already ended.
pub async fn end_detached(
    db: &Db,
    attempt: &Attempt,
    status: AttemptStatus,
) -> Result<bool, DbError> {
    let at = super::now();
    Ok(on_pool!(db, pool => {
        let mut tx = pool.begin_write().await?;
        let ended = sqlx::query(
            concat!(
                "UPDATE job_attempts SET status = $2, cost = $3, ended_at = $4, updated_at = $4,
                     last_step = ",
                newest_step!(),
                " WHERE id = $1 AND status = $5"
            ),
        )
        .bind(attempt.id)
        .bind(status)
        .bind(attempt.cost_at(at))
        .bind(at)
        .bind(AttemptStatus::Running)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("UPDATE agents SET current_attempt_id = NULL WHERE id = $1 AND current_attempt_id = $2")
            .bind(attempt.agent_id)
            .bind(attempt.id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        ended == 1
    }))
}

/// Running attempts on agents that have not sent a heartbeat since `cutoff`; marks
/// those agents offline.
pub async fn orphaned(db: &Db, cutoff: DateTime<Utc>) -> Result<Vec<Attempt>, DbError> {
    let sql = format!(
        "SELECT {ATTEMPT_COLUMNS} FROM job_attempts WHERE status = $2 AND agent_id IN
             (SELECT id FROM agents WHERE last_heartbeat_at < $1)"
    );
    Ok(on_pool!(db, pool => {
        sqlx::query("UPDATE agents SET status = $2 WHERE last_heartbeat_at < $1 AND status != $2")
            .bind(cutoff)
            .bind(AgentStatus::Offline)
            .execute(pool)
            .await?;
        sqlx::query_as::<_, Attempt>(&sql)
            .bind(cutoff)
            .bind(AttemptStatus::Running)
            .fetch_all(pool)
            .await?
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
