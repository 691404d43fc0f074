//! Training jobs. Status changes happen only through [`change_status`], which applies the
//! change if the job is still in the status the caller saw, and logs the event with it.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::QueryBuilder;
use uuid::Uuid;

use super::events::{insert_event, Event};
use super::{on_pool, Db, DbError};
use crate::domain::{GpuType, Hyperparameters, JobStatus};

#[derive(Debug, Clone, Serialize, serde::Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Job {
    pub id: Uuid,
    pub user_id: Uuid,
    pub name: String,
    pub description: Option<String>,
    pub base_model: String,
    pub training_file_id: Uuid,
    pub preset_id: Option<Uuid>,
    pub gpu_type: Option<String>,
    pub gpu_model: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub hyperparameters: Option<Json<serde_json::Value>>,
    #[sqlx(try_from = "String")]
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
    pub retry_count: i64,
    pub max_retries: i64,
    pub interruption_count: i64,
    pub max_interruptions: i64,
    pub resume_from_checkpoint_id: Option<Uuid>,
    pub agent_id: Option<Uuid>,
    pub external_job_id: Option<String>,
    /// Agent labels a host must carry to run this job, such as {"zone": "eu-west-1a"}.
    #[schema(value_type = Object)]
    pub required_labels: Json<serde_json::Value>,
}

pub struct NewJob<'a> {
    pub user_id: Uuid,
    pub name: &'a str,
    pub description: Option<&'a str>,
    pub base_model: &'a str,
    pub training_file_id: Uuid,
    /// Configuration carried over from a template; the job still starts as a draft.
    pub preset_id: Option<Uuid>,
}

/// Creates a draft and logs its creation.
pub async fn insert_draft(db: &Db, job: NewJob<'_>) -> Result<Job, DbError> {
    let id = Uuid::new_v4();
    let event = Event::new(
        id,
        "status",
        "info",
        format!("Job \"{}\" created as a draft", job.name),
    )
    .with_details(serde_json::json!({"to": "draft"}));
    Ok(on_pool!(db, pool => {
        let mut tx = pool.begin().await?;
        let row = sqlx::query_as::<_, Job>(
            "INSERT INTO training_jobs (id, user_id, name, description, base_model, training_file_id, preset_id,
                                        status, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'draft', $8, $8)
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
        .fetch_one(&mut *tx)
        .await?;
        insert_event!(&event).execute(&mut *tx).await?;
        tx.commit().await?;
        row
    }))
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
        &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    {
        query.push(" FROM training_jobs WHERE 1 = 1");
        if !viewer.sees_everything {
            query.push(" AND user_id = ").push_bind(viewer.user_id);
        }
        if let Some(status) = status {
            query.push(" AND status = ").push_bind(status.as_str());
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
        "SELECT id FROM training_jobs WHERE status = 'queued' ORDER BY queued_at, id",
    )
    .fetch_all(pool)
    .await)?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// Estimated hours of queued work ahead of a job that would be queued now.
pub async fn queued_hours_ahead(db: &Db) -> Result<f64, DbError> {
    let (hours,): (Option<f64>,) = on_pool!(db, pool => sqlx::query_as(
        "SELECT SUM((estimated_duration_hours_min + estimated_duration_hours_max) / 2) FROM training_jobs
         WHERE status IN ('queued', 'provisioning', 'training')",
    )
    .fetch_one(pool)
    .await)?;
    Ok(hours.unwrap_or(0.0))
}

pub struct Configuration<'a> {
    pub preset_id: Option<Uuid>,
    pub gpu_type: GpuType,
    pub gpu_model: &'a str,
    pub hyperparameters: &'a Hyperparameters,
    pub required_labels: &'a serde_json::Map<String, serde_json::Value>,
    pub hourly_rate: f64,
    pub estimated_duration_hours: (f64, f64),
    pub estimated_cost: (f64, f64),
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
    /// Back to the queue by hand, resuming from a checkpoint (or from the start).
    Resume {
        checkpoint_id: Option<Uuid>,
    },
}

impl Change<'_> {
    fn target(&self) -> JobStatus {
        match self {
            Change::Configure(_) => JobStatus::Configured,
            Change::Queue { .. } => JobStatus::Queued,
            Change::Cancel { .. } => JobStatus::Cancelled,
            Change::Resume { .. } => JobStatus::Queued,
        }
    }
}

pub enum ChangeOutcome {
    Applied(Box<Job>),
    /// The job was no longer in the expected status; it is in this one.
    Conflict(JobStatus),
}

/// Applies `change` to a job that is in `from`, and logs `event` in the same transaction.
/// `updated_at` is set here as well as by the trigger: SQLite's RETURNING shows the row
/// before AFTER triggers run.
/// The state machine check is the caller's ([`JobStatus::check`]); this guards against a
/// concurrent change between the caller's read and this write.
pub async fn change_status(
    db: &Db,
    job_id: Uuid,
    from: JobStatus,
    change: Change<'_>,
    event: &Event,
) -> Result<ChangeOutcome, DbError> {
    let to = change.target();
    let at = event.created_at;
    Ok(on_pool!(db, pool => {
        let mut tx = pool.begin().await?;
        let query = match &change {
            Change::Configure(c) => sqlx::query_as::<_, Job>(
                "UPDATE training_jobs SET status = $3, updated_at = $14, preset_id = $4, gpu_type = $5, gpu_model = $6,
                     hyperparameters = $7, total_epochs = $8, hourly_rate = $9,
                     estimated_duration_hours_min = $10, estimated_duration_hours_max = $11,
                     estimated_cost_min = $12, estimated_cost_max = $13, required_labels = $15
                 WHERE id = $1 AND status = $2 RETURNING *",
            )
            .bind(job_id)
            .bind(from.as_str())
            .bind(to.as_str())
            .bind(c.preset_id)
            .bind(c.gpu_type.as_str())
            .bind(c.gpu_model)
            .bind(Json(c.hyperparameters))
            .bind(i64::from(c.hyperparameters.epochs))
            .bind(c.hourly_rate)
            .bind(c.estimated_duration_hours.0)
            .bind(c.estimated_duration_hours.1)
            .bind(c.estimated_cost.0)
            .bind(c.estimated_cost.1)
            .bind(at)
            .bind(Json(c.required_labels)),
            Change::Queue { estimated_start_time } => sqlx::query_as::<_, Job>(
                "UPDATE training_jobs SET status = $3, updated_at = $4, queued_at = $4, estimated_start_time = $5
                 WHERE id = $1 AND status = $2 RETURNING *",
            )
            .bind(job_id)
            .bind(from.as_str())
            .bind(to.as_str())
            .bind(at)
            .bind(*estimated_start_time),
            Change::Cancel { reason, final_cost } => sqlx::query_as::<_, Job>(
                "UPDATE training_jobs SET status = $3, updated_at = $5, cancelled_reason = $4, cancelled_at = $5,
                     completed_at = $5, final_cost = $6, current_cost = $6, estimated_start_time = NULL
                 WHERE id = $1 AND status = $2 RETURNING *",
            )
            .bind(job_id)
            .bind(from.as_str())
            .bind(to.as_str())
            .bind(*reason)
            .bind(at)
            .bind(*final_cost),
            Change::Resume { checkpoint_id } => sqlx::query_as::<_, Job>(
                "UPDATE training_jobs SET status = $3, updated_at = $4, queued_at = $4, agent_id = NULL,
                     resume_from_checkpoint_id = $5, error_message = NULL, failed_stage = NULL,
                     completed_at = NULL, final_cost = NULL, current_stage = 'queued',
                     progress_percentage = CASE WHEN $5 IS NULL THEN 0 ELSE progress_percentage END
                 WHERE id = $1 AND status = $2 RETURNING *",
            )
            .bind(job_id)
            .bind(from.as_str())
            .bind(to.as_str())
            .bind(at)
            .bind(*checkpoint_id),
        };
        match query.fetch_optional(&mut *tx).await? {
            Some(job) => {
                insert_event!(event).execute(&mut *tx).await?;
                tx.commit().await?;
                ChangeOutcome::Applied(Box::new(job))
            }
            None => {
                let (status,): (String,) = sqlx::query_as("SELECT status FROM training_jobs WHERE id = $1")
                    .bind(job_id)
                    .fetch_one(&mut *tx)
                    .await?;
                ChangeOutcome::Conflict(status.parse().unwrap_or(from))
            }
        }
    }))
}

pub fn round_cents(amount: f64) -> f64 {
    (amount * 100.0).round() / 100.0
}
