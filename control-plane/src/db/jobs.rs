//! Training jobs. A status is written only by [`change_status`] (called only by
//! `service::transition`): a compare-and-set on the status the caller saw, with what the
//! change writes besides (an attempt started or ended, the agent's current attempt) and
//! its events, in one transaction.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::QueryBuilder;
use uuid::Uuid;

use super::attempts::{
    self, newest_step, Attempt, Checkpoint, CHECKPOINT_COLUMNS, STORED_ATTEMPT_COLUMNS,
};
use super::events::{insert_event, Event};
use super::{now, on_pool, BeginWrite, Db, DbError};
use crate::domain::estimate::Estimate;
use crate::domain::{
    AttemptStatus, Attribution, GpuType, Hyperparameters, JobStatus, RecoveryPolicy,
};
use protocol::agent::ExportFormat;

#[derive(Debug, Clone, Serialize, serde::Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Job {
    pub id: Uuid,
    pub user_id: Uuid,
    pub name: String,
    pub description: Option<String>,
    pub base_model: String,
    pub training_file_id: Uuid,
    pub preset_id: Option<Uuid>,
    pub gpu_type: Option<GpuType>,
    pub gpu_model: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub hyperparameters: Option<Json<Hyperparameters>>,
    pub status: JobStatus,
    pub progress_percentage: i64,
    pub current_step: i64,
    pub total_steps: Option<i64>,
    pub current_epoch: i64,
    pub total_epochs: Option<i64>,
    pub current_stage: Option<String>,
    pub stage_substatus: Option<String>,
    pub queued_at: Option<DateTime<Utc>>,
    pub estimated_start_time: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub elapsed_seconds: i64,
    pub estimated_remaining_seconds: Option<i64>,
    pub current_cost: f64,
    pub estimated_cost_min: Option<f64>,
    pub estimated_cost_max: Option<f64>,
    pub estimated_duration_hours_min: Option<f64>,
    pub estimated_duration_hours_max: Option<f64>,
    pub hourly_rate: Option<f64>,
    pub final_cost: Option<f64>,
    pub error_message: Option<String>,
    pub failed_stage: Option<String>,
    pub cancelled_reason: Option<String>,
    pub cancelled_at: Option<DateTime<Utc>>,
    /// `budget_cap` once a `stop_at_cap` budget reached its amount while the job ran: its
    /// agent stops at the next step boundary, publishes the adapter of the checkpoint it
    /// takes there, and the job ends cancelled with that reason.
    #[sqlx(default)]
    pub stop_requested: Option<String>,
    /// While it runs under a `stop_at_cap` budget: the job cost at which its agent is asked
    /// to stop (with a step in flight): where the tightest such budget runs out, less what
    /// the stop itself costs (twice its latest checkpoint's time). Kept by
    /// heartbeats; report batches compare the job's cost with it.
    #[sqlx(default)]
    pub stop_cost: Option<f64>,
    /// Formats the adapter is also exported to after training (`gguf`), each its own
    /// artifact.
    #[sqlx(default)]
    #[schema(value_type = Option<Vec<String>>)]
    pub exports: Option<Json<Vec<ExportFormat>>>,
    /// The configured estimate in full: tokens, the throughput it rests on (measured,
    /// modelled or the preset's table), duration, cost and completion window.
    #[sqlx(default)]
    #[schema(value_type = Option<Estimate>)]
    pub estimate_basis: Option<Json<Estimate>>,
    pub retry_count: i64,
    pub max_retries: i64,
    pub interruption_count: i64,
    pub max_interruptions: i64,
    /// Off: interruptions wait in `interrupted` for someone to resume the job.
    pub auto_resume: bool,
    pub resume_from_checkpoint_id: Option<Uuid>,
    pub agent_id: Option<Uuid>,
    pub external_job_id: Option<String>,
    /// Agent labels a host must carry to run this job, such as {"zone": "eu-west-1a"}.
    #[schema(value_type = Object)]
    pub required_labels: Json<serde_json::Value>,
    /// Who the job's spend is charged to (spec §4.2.10).
    pub team: Option<String>,
    pub project: Option<String>,
    pub cost_center: Option<String>,
    /// Free-form labels for cost reports, such as {"experiment": "lr-sweep"}.
    #[schema(value_type = Option<Object>)]
    pub tags: Option<Json<serde_json::Map<String, serde_json::Value>>>,
    /// Another enriched training file whose conversations validation uses (default: the
    /// trainer's seeded split of the training file).
    #[sqlx(default)]
    pub validation_file_id: Option<Uuid>,
    /// {test_suites, gates, …}: the validation queued when training completes.
    #[sqlx(default)]
    #[schema(value_type = Option<Object>)]
    pub validate_on_completion: Option<Json<serde_json::Value>>,
}

impl Job {
    /// Who the job's spend is charged to.
    pub fn attribution(&self) -> Attribution {
        Attribution {
            team: self.team.clone(),
            project: self.project.clone(),
            cost_center: self.cost_center.clone(),
            tags: self.tags.as_ref().map(|tags| tags.0.clone()),
        }
    }
}

impl Job {
    pub fn recovery(&self) -> RecoveryPolicy {
        RecoveryPolicy {
            max_retries: self.max_retries.clamp(0, i64::from(u32::MAX)) as u32,
            max_interruptions: self.max_interruptions.clamp(0, i64::from(u32::MAX)) as u32,
            auto_resume: self.auto_resume,
        }
    }

    /// The labels a host must carry. A stored requirement that does not parse (not an
    /// object of strings) is an error, never "no requirement".
    pub fn required_labels(&self) -> Result<std::collections::BTreeMap<String, String>, String> {
        let Some(labels) = self.required_labels.0.as_object() else {
            return Err("required_labels is not an object".into());
        };
        labels
            .iter()
            .map(|(key, value)| match value.as_str() {
                Some(text) => Ok((key.clone(), text.to_owned())),
                None => Err(format!("required label {key} is not a string")),
            })
            .collect()
    }
}

pub struct NewJob<'a> {
    pub user_id: Uuid,
    pub name: &'a str,
    pub description: Option<&'a str>,
    pub base_model: &'a str,
    pub training_file_id: Uuid,
    /// Configuration carried over from a template; the job still starts as a draft.
    pub preset_id: Option<Uuid>,
    pub attribution: &'a Attribution,
}

/// Creates job `id` as a draft and logs `event` (its creation) with it.
pub async fn insert_draft(
    db: &Db,
    id: Uuid,
    job: NewJob<'_>,
    event: &Event,
) -> Result<Job, DbError> {
    Ok(on_pool!(db, pool => {
        let mut tx = pool.begin_write().await?;
        let row = sqlx::query_as::<_, Job>(
            "INSERT INTO training_jobs (id, user_id, name, description, base_model, training_file_id, preset_id,
                                        status, created_at, updated_at, team, project, cost_center, tags)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $9, $8, $8, $10, $11, $12, $13)
             RETURNING *",
        )
        .bind(id)
        .bind(job.user_id)
        .bind(job.name)
        .bind(job.description)
        .bind(job.base_model)
        .bind(job.training_file_id)
        .bind(job.preset_id)
        .bind(event.created_at)
        .bind(JobStatus::Draft)
        .bind(job.attribution.team.as_deref())
        .bind(job.attribution.project.as_deref())
        .bind(job.attribution.cost_center.as_deref())
        .bind(job.attribution.tags.as_ref().map(Json))
        .fetch_one(&mut *tx)
        .await?;
        insert_event!(event).execute(&mut *tx).await?;
        tx.commit().await?;
        row
    }))
}

/// Sets a job's validation file and validate-on-completion settings.
pub async fn set_validation_settings(
    db: &Db,
    id: Uuid,
    validation_file_id: Option<Uuid>,
    validate_on_completion: Option<&serde_json::Value>,
) -> Result<Job, DbError> {
    Ok(on_pool!(db, pool => sqlx::query_as::<_, Job>(
        "UPDATE training_jobs SET validation_file_id = $2, validate_on_completion = $3 WHERE id = $1 RETURNING *",
    )
    .bind(id)
    .bind(validation_file_id)
    .bind(validate_on_completion.map(Json))
    .fetch_one(pool)
    .await?))
}

/// Who is asking: operators and admins see every job, users their own.
#[derive(Debug, Clone, Copy)]
pub struct Viewer {
    pub user_id: Uuid,
    pub sees_everything: bool,
}

pub async fn get(db: &Db, id: Uuid, viewer: Viewer) -> Result<Option<Job>, DbError> {
    Ok(on_pool!(db, pool => sqlx::query_as::<_, Job>(
        "SELECT * FROM training_jobs WHERE id = $1 AND (user_id = $2 OR $3)",
    )
    .bind(id)
    .bind(viewer.user_id)
    .bind(viewer.sees_everything)
    .fetch_optional(pool)
    .await)?)
}

/// A job regardless of owner, for the agent protocol and background work.
pub async fn get_any(db: &Db, id: Uuid) -> Result<Option<Job>, DbError> {
    Ok(
        on_pool!(db, pool => sqlx::query_as::<_, Job>("SELECT * FROM training_jobs WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await)?,
    )
}

pub async fn list(
    db: &Db,
    viewer: Viewer,
    status: Option<JobStatus>,
    limit: i64,
    offset: i64,
) -> Result<(Vec<Job>, i64), DbError> {
    fn conditions<'a, DB: sqlx::Database>(
        query: &mut QueryBuilder<'a, DB>,
        viewer: Viewer,
        status: Option<JobStatus>,
    ) where
        Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
        JobStatus: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    {
        query.push(" FROM training_jobs WHERE 1 = 1");
        if !viewer.sees_everything {
            query.push(" AND user_id = ").push_bind(viewer.user_id);
        }
        if let Some(status) = status {
            query.push(" AND status = ").push_bind(status);
        }
    }
    Ok(on_pool!(db, pool => {
        let mut count = QueryBuilder::new("SELECT COUNT(*)");
        conditions(&mut count, viewer, status);
        let (total,): (i64,) = count.build_query_as().fetch_one(pool).await?;
        let mut select = QueryBuilder::new("SELECT *");
        conditions(&mut select, viewer, status);
        select
            .push(" ORDER BY created_at DESC, id LIMIT ")
            .push_bind(limit)
            .push(" OFFSET ")
            .push_bind(offset);
        (select.build_query_as::<Job>().fetch_all(pool).await?, total)
    }))
}

/// Every queued job's id, in queue order (first = next to run).
pub async fn queue_order(db: &Db) -> Result<Vec<Uuid>, DbError> {
    let rows: Vec<(Uuid,)> = on_pool!(db, pool => sqlx::query_as(
        "SELECT id FROM training_jobs WHERE status = $1 ORDER BY queued_at, id",
    )
    .bind(JobStatus::Queued)
    .fetch_all(pool)
    .await)?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// Estimated hours of queued work ahead of a job that would be queued now.
pub async fn queued_hours_ahead(db: &Db) -> Result<f64, DbError> {
    let (hours,): (Option<f64>,) = on_pool!(db, pool => sqlx::query_as(
        "SELECT SUM((estimated_duration_hours_min + estimated_duration_hours_max) / 2) FROM training_jobs
         WHERE status IN ($1, $2, $3)",
    )
    .bind(JobStatus::Queued)
    .bind(JobStatus::Provisioning)
    .bind(JobStatus::Training)
    .fetch_one(pool)
    .await)?;
    Ok(hours.unwrap_or(0.0))
}

/// Asks the agent running the job to stop for `reason` (`budget_cap`); `None` when the job
/// no longer runs or a stop was already asked for (only the first request counts).
pub async fn request_stop(db: &Db, job_id: Uuid, reason: &str) -> Result<Option<Job>, DbError> {
    Ok(on_pool!(db, pool => sqlx::query_as::<_, Job>(
        "UPDATE training_jobs SET stop_requested = $2, updated_at = $3
         WHERE id = $1 AND stop_requested IS NULL AND status IN ($4, $5) RETURNING *",
    )
    .bind(job_id)
    .bind(reason)
    .bind(now())
    .bind(JobStatus::Provisioning)
    .bind(JobStatus::Training)
    .fetch_optional(pool)
    .await)?)
}

/// Sets a running job's `stop_cost` (`None`: no `stop_at_cap` budget).
pub async fn set_stop_cost(db: &Db, job_id: Uuid, stop_cost: Option<f64>) -> Result<(), DbError> {
    on_pool!(db, pool => sqlx::query("UPDATE training_jobs SET stop_cost = $2 WHERE id = $1")
    .bind(job_id)
    .bind(stop_cost)
    .execute(pool)
    .await
    .map(|_| ()))?;
    Ok(())
}

/// Writes a running job's live cost; `None` when it no longer runs.
pub async fn set_live_cost(db: &Db, job_id: Uuid, cost: f64) -> Result<Option<Job>, DbError> {
    Ok(on_pool!(db, pool => sqlx::query_as::<_, Job>(
        "UPDATE training_jobs SET current_cost = $2, updated_at = $3
         WHERE id = $1 AND status IN ($4, $5) RETURNING *",
    )
    .bind(job_id)
    .bind(cost)
    .bind(now())
    .bind(JobStatus::Provisioning)
    .bind(JobStatus::Training)
    .fetch_optional(pool)
    .await)?)
}

/// Queued jobs, oldest first: the scheduler's candidates.
pub async fn queued(db: &Db, limit: i64) -> Result<Vec<Job>, DbError> {
    Ok(on_pool!(db, pool => sqlx::query_as::<_, Job>(
        "SELECT * FROM training_jobs WHERE status = $1 ORDER BY queued_at, id LIMIT $2",
    )
    .bind(JobStatus::Queued)
    .bind(limit)
    .fetch_all(pool)
    .await)?)
}

/// Jobs an agent runs (provisioning or training), of one owner or of everyone.
pub async fn running(db: &Db, owner: Option<Uuid>) -> Result<Vec<Job>, DbError> {
    Ok(on_pool!(db, pool => sqlx::query_as::<_, Job>(
        "SELECT * FROM training_jobs WHERE status IN ($1, $2) AND ($3 IS NULL OR user_id = $3)",
    )
    .bind(JobStatus::Provisioning)
    .bind(JobStatus::Training)
    .bind(owner)
    .fetch_all(pool)
    .await)?)
}

/// Interrupted jobs whose policy resumes them on their own: normally requeued at once,
/// listed here for the sweeper in case a replica stopped between the two changes.
pub async fn awaiting_auto_resume(db: &Db) -> Result<Vec<Job>, DbError> {
    Ok(on_pool!(db, pool => sqlx::query_as::<_, Job>(
        "SELECT * FROM training_jobs WHERE status = $1 AND auto_resume AND interruption_count <= max_interruptions",
    )
    .bind(JobStatus::Interrupted)
    .fetch_all(pool)
    .await)?)
}

pub struct Configuration<'a> {
    pub preset_id: Option<Uuid>,
    pub gpu_type: GpuType,
    pub gpu_model: &'a str,
    pub hyperparameters: &'a Hyperparameters,
    pub required_labels: &'a serde_json::Map<String, serde_json::Value>,
    pub recovery: RecoveryPolicy,
    /// Its duration, cost and rate, and what they rest on.
    pub estimate: &'a Estimate,
    pub attribution: &'a Attribution,
    pub exports: &'a [ExportFormat],
}

/// A new attempt, started when a queued job is given to an agent.
pub struct NewAttempt<'a> {
    /// From [`super::attempts::next_number`]; the compare-and-set on `queued` means no
    /// other attempt of the job starts in between.
    pub number: i64,
    pub agent_id: Uuid,
    pub recipe: &'a Hyperparameters,
    pub gpu_type: GpuType,
    pub hourly_rate: f64,
}

/// How an attempt ended, as stored on the attempt row.
pub struct AttemptEnd<'a> {
    pub status: AttemptStatus,
    pub error_message: Option<&'a str>,
    pub notice_deadline: Option<DateTime<Utc>>,
    pub interruption_provider: Option<&'a str>,
    pub notice_seconds_used: Option<f64>,
    /// What the trainer measured, for later estimates (a run that trained to its end).
    pub tokens_per_second: Option<f64>,
}

impl AttemptEnd<'_> {
    pub fn new(status: AttemptStatus) -> AttemptEnd<'static> {
        AttemptEnd {
            status,
            error_message: None,
            notice_deadline: None,
            interruption_provider: None,
            notice_seconds_used: None,
            tokens_per_second: None,
        }
    }
}

/// What becomes of the job when its attempt ends.
pub enum JobAfter<'a> {
    Complete,
    Fail {
        message: &'a str,
    },
    /// Back to the queue, retrying after a failure within the retry budget.
    Retry {
        resume_from: Option<Uuid>,
        /// Replaces the job's hyperparameters (an out-of-memory retry's smaller micro-batch).
        hyperparameters: Option<&'a Hyperparameters>,
    },
    /// Interrupted (spot notice, lost or stopped agent): counts against the interruption
    /// budget and keeps the checkpoint to resume from.
    Interrupt {
        resume_from: Option<Uuid>,
    },
    /// Stopped at the control plane's request (`stop_requested`): cancelled with `reason`.
    Stop {
        reason: &'a str,
    },
}

/// What a status change writes besides the status itself.
pub enum Change<'a> {
    Configure(Configuration<'a>),
    Queue {
        estimated_start_time: DateTime<Utc>,
    },
    Cancel {
        reason: &'a str,
        final_cost: f64,
    },
    /// Back to the queue, resuming from a checkpoint (or from the start).
    Resume {
        checkpoint_id: Option<Uuid>,
    },
    /// A queued job given to an agent: a new attempt starts, resuming from the job's
    /// `resume_from_checkpoint_id`; metrics past that step are dropped so the replayed
    /// steps replace them.
    Assign(NewAttempt<'a>),
    /// The agent's first report: provisioning is over.
    StartTraining {
        agent_id: Uuid,
    },
    /// The job's running attempt ended.
    EndAttempt {
        attempt: &'a Attempt,
        end: AttemptEnd<'a>,
        after: JobAfter<'a>,
    },
}

impl Change<'_> {
    pub fn target(&self) -> JobStatus {
        match self {
            Change::Configure(_) => JobStatus::Configured,
            Change::Queue { .. } | Change::Resume { .. } => JobStatus::Queued,
            Change::Cancel { .. } => JobStatus::Cancelled,
            Change::Assign(_) => JobStatus::Provisioning,
            Change::StartTraining { .. } => JobStatus::Training,
            Change::EndAttempt { after, .. } => match after {
                JobAfter::Complete => JobStatus::Completed,
                JobAfter::Fail { .. } => JobStatus::Failed,
                JobAfter::Retry { .. } => JobStatus::Queued,
                JobAfter::Interrupt { .. } => JobStatus::Interrupted,
                JobAfter::Stop { .. } => JobStatus::Cancelled,
            },
        }
    }

    /// The agent that must still hold the job for the change to apply.
    fn holder(&self) -> Option<Uuid> {
        match self {
            Change::StartTraining { agent_id } => Some(*agent_id),
            Change::EndAttempt { attempt, .. } => attempt.agent_id,
            _ => None,
        }
    }
}

pub enum ChangeOutcome {
    Applied {
        job: Box<Job>,
        /// The attempt an assignment started, and the checkpoint it resumes from.
        started: Option<Box<(Attempt, Option<Checkpoint>)>>,
    },
    /// The job was no longer in the expected status (or held by another agent); it is
    /// in this one.
    Conflict(JobStatus),
    /// The attempt had already ended (a repeated report): nothing changed.
    AttemptAlreadyEnded,
}

/// An `UPDATE training_jobs SET …` with the compare-and-set every status change shares:
/// `$1` the job, `$2` the status it was read in, `$5` the agent that must still hold it
/// (NULL when the change names none). `$3` is the new status, `$4` the time.
macro_rules! guarded {
    ($update:literal) => {
        concat!(
            $update,
            " WHERE id = $1 AND status = $2 AND (agent_id = $5 OR $5 IS NULL) RETURNING *"
        )
    };
}

/// Applies `change` to a job that is in `from`, and logs `events` in the same transaction.
/// `updated_at` is set here as well as by the trigger: SQLite's RETURNING shows the row
/// before AFTER triggers run. The state machine check is the caller's; this guards against
/// a concurrent change between the caller's read and this write.
pub async fn change_status(
    db: &Db,
    job_id: Uuid,
    from: JobStatus,
    change: &Change<'_>,
    events: &[Event],
) -> Result<ChangeOutcome, DbError> {
    let to = change.target();
    let at = events.first().map_or_else(super::now, |e| e.created_at);
    let checkpoint_sql = format!("SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE id = $1");
    let attempt_sql = format!(
        "INSERT INTO job_attempts (id, job_id, agent_id, attempt_number, status, resumed_from_checkpoint_id,
             resumed_from_step, gpu_type, hourly_rate, cost, started_at, created_at, updated_at, recipe, last_step)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, $10, $10, $10, $11, $12)
         RETURNING {STORED_ATTEMPT_COLUMNS}"
    );
    Ok(on_pool!(db, pool => {
        let mut tx = pool.begin_write().await?;
        // An attempt ends first: a repeated end finds it ended and changes nothing.
        let mut total_cost = 0.0;
        if let Change::EndAttempt { attempt, end, .. } = change {
            let cost = attempt.cost_at(at);
            let ended = sqlx::query(concat!(
                "UPDATE job_attempts SET status = $2, error_message = $3, notice_deadline = $4,
                     interruption_provider = $5, notice_seconds_used = $6, cost = $7, ended_at = $8, updated_at = $8,
                     tokens_per_second = $10, last_step = ",
                newest_step!(),
                " WHERE id = $1 AND status = $9"
            ))
            .bind(attempt.id)
            .bind(end.status)
            .bind(end.error_message)
            .bind(end.notice_deadline)
            .bind(end.interruption_provider)
            .bind(end.notice_seconds_used)
            .bind(cost)
            .bind(at)
            .bind(AttemptStatus::Running)
            .bind(end.tokens_per_second)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if ended == 0 {
                return Ok(ChangeOutcome::AttemptAlreadyEnded);
            }
            sqlx::query("UPDATE agents SET current_attempt_id = NULL WHERE id = $1 AND current_attempt_id = $2")
                .bind(attempt.agent_id)
                .bind(attempt.id)
                .execute(&mut *tx)
                .await?;
            let (sum,): (f64,) = sqlx::query_as("SELECT COALESCE(SUM(cost), 0.0) FROM job_attempts WHERE job_id = $1")
                .bind(attempt.job_id)
                .fetch_one(&mut *tx)
                .await?;
            total_cost = round_cents(sum);
        }
        let query = match change {
            Change::Configure(c) => sqlx::query_as::<_, Job>(guarded!(
                "UPDATE training_jobs SET status = $3, updated_at = $4, preset_id = $6, gpu_type = $7, gpu_model = $8,
                     hyperparameters = $9, total_epochs = $10, hourly_rate = $11,
                     estimated_duration_hours_min = $12, estimated_duration_hours_max = $13,
                     estimated_cost_min = $14, estimated_cost_max = $15, required_labels = $16,
                     max_retries = $17, max_interruptions = $18, auto_resume = $19,
                     team = $20, project = $21, cost_center = $22, tags = $23, estimate_basis = $24,
                     exports = $25"))
            .bind(job_id).bind(from).bind(to).bind(at).bind(change.holder())
            .bind(c.preset_id)
            .bind(c.gpu_type)
            .bind(c.gpu_model)
            .bind(Json(c.hyperparameters))
            .bind(i64::from(c.hyperparameters.epochs))
            .bind(c.estimate.hourly_rate)
            .bind(c.estimate.duration_hours_min)
            .bind(c.estimate.duration_hours_max)
            .bind(c.estimate.cost_min)
            .bind(c.estimate.cost_max)
            .bind(Json(c.required_labels))
            .bind(i64::from(c.recovery.max_retries))
            .bind(i64::from(c.recovery.max_interruptions))
            .bind(c.recovery.auto_resume)
            .bind(c.attribution.team.as_deref())
            .bind(c.attribution.project.as_deref())
            .bind(c.attribution.cost_center.as_deref())
            .bind(c.attribution.tags.as_ref().map(Json))
            .bind(Json(c.estimate))
            .bind(Json(c.exports)),
            Change::Queue { estimated_start_time } => sqlx::query_as::<_, Job>(guarded!(
                "UPDATE training_jobs SET status = $3, updated_at = $4, queued_at = $4, estimated_start_time = $6"))
            .bind(job_id).bind(from).bind(to).bind(at).bind(change.holder())
            .bind(*estimated_start_time),
            Change::Cancel { reason, final_cost } => sqlx::query_as::<_, Job>(guarded!(
                "UPDATE training_jobs SET status = $3, updated_at = $4, cancelled_reason = $6, cancelled_at = $4,
                     completed_at = $4, final_cost = $7, current_cost = $7, estimated_start_time = NULL"))
            .bind(job_id).bind(from).bind(to).bind(at).bind(change.holder())
            .bind(*reason)
            .bind(*final_cost),
            Change::Resume { checkpoint_id } => sqlx::query_as::<_, Job>(guarded!(
                "UPDATE training_jobs SET status = $3, updated_at = $4, queued_at = $4, agent_id = NULL,
                     resume_from_checkpoint_id = $6, error_message = NULL, failed_stage = NULL,
                     completed_at = NULL, final_cost = NULL, current_stage = $3,
                     progress_percentage = CASE WHEN $6 IS NULL THEN 0 ELSE progress_percentage END"))
            .bind(job_id).bind(from).bind(to).bind(at).bind(change.holder())
            .bind(*checkpoint_id),
            Change::Assign(a) => sqlx::query_as::<_, Job>(guarded!(
                "UPDATE training_jobs SET status = $3, agent_id = $6, updated_at = $4,
                     started_at = COALESCE(started_at, $4), current_stage = $3,
                     stage_substatus = NULL, estimated_start_time = NULL"))
            .bind(job_id).bind(from).bind(to).bind(at).bind(change.holder())
            .bind(a.agent_id),
            Change::StartTraining { .. } => sqlx::query_as::<_, Job>(guarded!(
                "UPDATE training_jobs SET status = $3, updated_at = $4"))
            .bind(job_id).bind(from).bind(to).bind(at).bind(change.holder()),
            Change::EndAttempt { end, after, .. } => match after {
                JobAfter::Complete => sqlx::query_as::<_, Job>(guarded!(
                    "UPDATE training_jobs SET status = $3, updated_at = $4, completed_at = $4,
                         progress_percentage = 100, current_stage = $3, estimated_remaining_seconds = 0,
                         current_cost = $6, final_cost = $6"))
                .bind(job_id).bind(from).bind(to).bind(at).bind(change.holder())
                .bind(total_cost),
                JobAfter::Fail { message } => sqlx::query_as::<_, Job>(guarded!(
                    "UPDATE training_jobs SET status = $3, updated_at = $4, completed_at = $4,
                         error_message = $7, failed_stage = current_stage,
                         current_cost = $6, final_cost = $6"))
                .bind(job_id).bind(from).bind(to).bind(at).bind(change.holder())
                .bind(total_cost)
                .bind(*message),
                JobAfter::Retry { resume_from, hyperparameters } => sqlx::query_as::<_, Job>(guarded!(
                    "UPDATE training_jobs SET status = $3, updated_at = $4, queued_at = $4,
                         current_cost = $6, agent_id = NULL, current_stage = $3,
                         resume_from_checkpoint_id = $7,
                         hyperparameters = COALESCE($8, hyperparameters),
                         retry_count = retry_count + 1,
                         progress_percentage = CASE WHEN $7 IS NULL THEN 0 ELSE progress_percentage END"))
                .bind(job_id).bind(from).bind(to).bind(at).bind(change.holder())
                .bind(total_cost)
                .bind(*resume_from)
                .bind(hyperparameters.map(Json)),
                JobAfter::Interrupt { resume_from } => sqlx::query_as::<_, Job>(guarded!(
                    "UPDATE training_jobs SET status = $3, updated_at = $4,
                         current_cost = $6, agent_id = NULL, current_stage = $3,
                         resume_from_checkpoint_id = $7, estimated_remaining_seconds = NULL,
                         error_message = $8, interruption_count = interruption_count + 1"))
                .bind(job_id).bind(from).bind(to).bind(at).bind(change.holder())
                .bind(total_cost)
                .bind(*resume_from)
                .bind(end.error_message),
                JobAfter::Stop { reason } => sqlx::query_as::<_, Job>(guarded!(
                    "UPDATE training_jobs SET status = $3, updated_at = $4, completed_at = $4,
                         cancelled_at = $4, cancelled_reason = $7, current_stage = $3, estimated_remaining_seconds = NULL,
                         current_cost = $6, final_cost = $6"))
                .bind(job_id).bind(from).bind(to).bind(at).bind(change.holder())
                .bind(total_cost)
                .bind(*reason),
            },
        };
        let Some(job) = query.fetch_optional(&mut *tx).await? else {
            let (status,): (JobStatus,) = sqlx::query_as("SELECT status FROM training_jobs WHERE id = $1")
                .bind(job_id)
                .fetch_one(&mut *tx)
                .await?;
            // A job that moved on leaves its ended attempt ended: commit that part.
            if matches!(change, Change::EndAttempt { .. }) {
                tx.commit().await?;
            }
            return Ok(ChangeOutcome::Conflict(status));
        };
        let mut started = None;
        if let Change::Assign(a) = change {
            // The number was read before this transaction: when another claim assigned the
            // job and its attempt ended meanwhile, the number is taken. Leave the job as it was.
            let (next,): (i64,) = sqlx::query_as(attempts::NEXT_NUMBER)
                .bind(job_id)
                .fetch_one(&mut *tx)
                .await?;
            if next != a.number {
                return Ok(ChangeOutcome::Conflict(from));
            }
            let checkpoint = match job.resume_from_checkpoint_id {
                Some(id) => sqlx::query_as::<_, Checkpoint>(&checkpoint_sql)
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?,
                None => None,
            };
            let resumed_step = checkpoint.as_ref().map_or(0, |c| c.step);
            sqlx::query("DELETE FROM training_metrics WHERE job_id = $1 AND step > $2")
                .bind(job_id)
                .bind(resumed_step)
                .execute(&mut *tx)
                .await?;
            let attempt = sqlx::query_as::<_, Attempt>(&attempt_sql)
                .bind(Uuid::new_v4())
                .bind(job_id)
                .bind(a.agent_id)
                .bind(a.number)
                .bind(AttemptStatus::Running)
                .bind(checkpoint.as_ref().map(|c| c.id))
                .bind(checkpoint.as_ref().map(|c| c.step))
                .bind(a.gpu_type)
                .bind(a.hourly_rate)
                .bind(at)
                .bind(Json(a.recipe))
                .bind(resumed_step)
                .fetch_one(&mut *tx)
                .await?;
            sqlx::query("UPDATE agents SET current_attempt_id = $2 WHERE id = $1")
                .bind(a.agent_id)
                .bind(attempt.id)
                .execute(&mut *tx)
                .await?;
            started = Some(Box::new((attempt, checkpoint)));
        }
        let attempt_id = started.as_ref().map(|started| started.0.id).or(match change {
            Change::EndAttempt { attempt, .. } => Some(attempt.id),
            _ => None,
        });
        for event in events {
            let mut event = event.clone();
            event.attempt_id = event.attempt_id.or(attempt_id);
            insert_event!(&event).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        ChangeOutcome::Applied { job: Box::new(job), started }
    }))
}

pub fn round_cents(amount: f64) -> f64 {
    (amount * 100.0).round() / 100.0
}
