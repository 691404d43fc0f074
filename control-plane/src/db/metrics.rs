//! Per-step training metrics. One row per (job, step): a step reported twice is kept once.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::QueryBuilder;
use uuid::Uuid;

use super::{on_pool, BeginWrite, Db, DbError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct MetricPoint {
    pub step: i64,
    pub epoch: Option<i64>,
    pub training_loss: Option<f64>,
    pub validation_loss: Option<f64>,
    pub learning_rate: Option<f64>,
    pub grad_norm: Option<f64>,
    pub tokens_per_second: Option<f64>,
    pub gpu_utilization: Option<i64>,
    pub memory_used_gb: Option<f64>,
    pub recorded_at: DateTime<Utc>,
}

const COLUMNS: &str = "step, epoch, training_loss, validation_loss, learning_rate, grad_norm, \
                       tokens_per_second, gpu_utilization, memory_used_gb, recorded_at";

/// An `INSERT` of a job's metric point that keeps the first point of each step, ready to
/// run on any executor of either backend.
macro_rules! insert_metric {
    ($job_id:expr, $attempt_id:expr, $point:expr) => {{
        let point: &$crate::db::metrics::MetricPoint = $point;
        sqlx::query(
            "INSERT INTO training_metrics (id, job_id, attempt_id, step, epoch, training_loss, validation_loss,
                 learning_rate, grad_norm, tokens_per_second, gpu_utilization, memory_used_gb, recorded_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
             ON CONFLICT (job_id, step) DO NOTHING",
        )
        .bind(uuid::Uuid::new_v4())
        .bind($job_id)
        .bind($attempt_id)
        .bind(point.step)
        .bind(point.epoch)
        .bind(point.training_loss)
        .bind(point.validation_loss)
        .bind(point.learning_rate)
        .bind(point.grad_norm)
        .bind(point.tokens_per_second)
        .bind(point.gpu_utilization)
        .bind(point.memory_used_gb)
        .bind(point.recorded_at)
    }};
}

/// Stores a point; returns false when that step was already recorded.
pub async fn record(
    db: &Db,
    job_id: Uuid,
    attempt_id: Option<Uuid>,
    point: &MetricPoint,
) -> Result<bool, DbError> {
    let inserted = on_pool!(db, pool => insert_metric!(job_id, attempt_id, point)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(inserted == 1)
}

/// Stores many points of one job in one transaction (imports, benchmarks); returns how
/// many were new.
pub async fn record_all(db: &Db, job_id: Uuid, points: &[MetricPoint]) -> Result<u64, DbError> {
    Ok(on_pool!(db, pool => {
        let mut tx = pool.begin_write().await?;
        let mut inserted = 0;
        for point in points {
            inserted += insert_metric!(job_id, None::<Uuid>, point)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        inserted
    }))
}

/// Up to `limit` points, oldest first, keeping every `interval`-th step (and always the last).
pub async fn history(
    db: &Db,
    job_id: Uuid,
    interval: i64,
    limit: i64,
) -> Result<Vec<MetricPoint>, DbError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM training_metrics
         WHERE job_id = $1 AND (step % $2 = 0 OR step = (SELECT MAX(step) FROM training_metrics WHERE job_id = $1))
         ORDER BY step LIMIT $3"
    );
    Ok(on_pool!(db, pool => sqlx::query_as::<_, MetricPoint>(&sql)
        .bind(job_id)
        .bind(interval)
        .bind(limit)
        .fetch_all(pool)
        .await)?)
}

#[derive(sqlx::FromRow)]
struct JobPoint {
    job_id: Uuid,
    #[sqlx(flatten)]
    point: MetricPoint,
}

/// The latest point of each of `job_ids` that has one, in one query.
pub async fn latest_for(db: &Db, job_ids: &[Uuid]) -> Result<HashMap<Uuid, MetricPoint>, DbError> {
    if job_ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<JobPoint> = on_pool!(db, pool => {
        let mut query = QueryBuilder::new(format!("SELECT job_id, {COLUMNS} FROM training_metrics m WHERE job_id IN ("));
        let mut ids = query.separated(", ");
        for id in job_ids {
            ids.push_bind(*id);
        }
        query.push(") AND step = (SELECT MAX(step) FROM training_metrics WHERE job_id = m.job_id)");
        query.build_query_as::<JobPoint>().fetch_all(pool).await?
    });
    Ok(rows
        .into_iter()
        .map(|row| (row.job_id, row.point))
        .collect())
}

pub async fn latest(db: &Db, job_id: Uuid) -> Result<Option<MetricPoint>, DbError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM training_metrics WHERE job_id = $1 ORDER BY step DESC LIMIT 1"
    );
    Ok(on_pool!(db, pool => sqlx::query_as::<_, MetricPoint>(&sql)
        .bind(job_id)
        .fetch_optional(pool)
        .await)?)
}

/// Up to `limit` points after `after_step` (all of them when `None`), oldest first.
pub async fn after(
    db: &Db,
    job_id: Uuid,
    after_step: Option<i64>,
    limit: i64,
) -> Result<Vec<MetricPoint>, DbError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM training_metrics WHERE job_id = $1 AND step > $2 ORDER BY step LIMIT $3"
    );
    Ok(on_pool!(db, pool => sqlx::query_as::<_, MetricPoint>(&sql)
        .bind(job_id)
        .bind(after_step.unwrap_or(i64::MIN))
        .bind(limit)
        .fetch_all(pool)
        .await)?)
}

/// The job's highest step so far.
pub async fn last_step(db: &Db, job_id: Uuid) -> Result<Option<i64>, DbError> {
    let sql = "SELECT MAX(step) FROM training_metrics WHERE job_id = $1";
    let (step,): (Option<i64>,) =
        on_pool!(db, pool => sqlx::query_as(sql).bind(job_id).fetch_one(pool).await)?;
    Ok(step)
}
