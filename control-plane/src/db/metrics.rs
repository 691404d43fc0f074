//! Per-step training metrics. One row per (job, step): a step reported twice is kept once.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use futures::future::Either;
use futures::StreamExt;
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

/// Metric rows per INSERT: 13 parameters each, well under SQLite's 32,766 (and
/// PostgreSQL's 65,535) bound parameters per statement.
pub(crate) const ROWS_PER_INSERT: usize = 1_000;

/// Inserts a job's points, at most [`ROWS_PER_INSERT`] of them, in one multi-row
/// statement that keeps the first point of each step, on any executor of either backend.
/// Evaluates to the set of steps that were new.
macro_rules! insert_points {
    ($executor:expr, $job_id:expr, $attempt_id:expr, $points:expr) => {
        async {
            let points: &[$crate::db::metrics::MetricPoint] = $points;
            let (job_id, attempt_id): (uuid::Uuid, Option<uuid::Uuid>) = ($job_id, $attempt_id);
            let mut insert = sqlx::QueryBuilder::new(
                "INSERT INTO training_metrics (id, job_id, attempt_id, step, epoch, training_loss,
                     validation_loss, learning_rate, grad_norm, tokens_per_second, gpu_utilization,
                     memory_used_gb, recorded_at) ",
            );
            insert.push_values(points, |mut row, point| {
                row.push_bind(uuid::Uuid::new_v4())
                    .push_bind(job_id)
                    .push_bind(attempt_id)
                    .push_bind(point.step)
                    .push_bind(point.epoch)
                    .push_bind(point.training_loss)
                    .push_bind(point.validation_loss)
                    .push_bind(point.learning_rate)
                    .push_bind(point.grad_norm)
                    .push_bind(point.tokens_per_second)
                    .push_bind(point.gpu_utilization)
                    .push_bind(point.memory_used_gb)
                    .push_bind(point.recorded_at);
            });
            insert.push(" ON CONFLICT (job_id, step) DO NOTHING RETURNING step");
            let stored: Result<std::collections::HashSet<i64>, sqlx::Error> = insert
                .build_query_scalar::<i64>()
                .fetch_all($executor)
                .await
                .map(|steps| steps.into_iter().collect());
            stored
        }
    };
}
pub(crate) use insert_points;

/// Stores a point; returns false when that step was already recorded.
pub async fn record(
    db: &Db,
    job_id: Uuid,
    attempt_id: Option<Uuid>,
    point: &MetricPoint,
) -> Result<bool, DbError> {
    let points = std::slice::from_ref(point);
    let stored = on_pool!(db, pool => insert_points!(pool, job_id, attempt_id, points).await)?;
    Ok(!stored.is_empty())
}

/// Stores many points of one job in one transaction (imports, benchmarks); returns how
/// many were new.
pub async fn record_all(db: &Db, job_id: Uuid, points: &[MetricPoint]) -> Result<u64, DbError> {
    Ok(on_pool!(db, pool => {
        let mut tx = pool.begin_write().await?;
        let mut inserted = 0;
        for chunk in points.chunks(ROWS_PER_INSERT) {
            inserted += insert_points!(&mut *tx, job_id, None, chunk).await?.len() as u64;
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

/// Every `interval`-th step of a job's history (and always the last), at most `limit`
/// points, oldest first, as a stream read while it is sent: memory stays flat however
/// long the run. The query runs in a task of its own and stops when the stream is dropped;
/// it hands over the rows it has ready in chunks, not one by one (a wake-up per chunk).
pub fn history_stream(
    db: &Db,
    job_id: Uuid,
    interval: i64,
    limit: i64,
) -> impl futures::Stream<Item = Result<MetricPoint, DbError>> + Send + 'static {
    let (sender, receiver) = tokio::sync::mpsc::channel(STREAM_BUFFER);
    let db = db.clone();
    tokio::spawn(async move {
        let sql = format!(
            "SELECT {COLUMNS} FROM training_metrics
             WHERE job_id = $1 AND (step % $2 = 0 OR step = (SELECT MAX(step) FROM training_metrics WHERE job_id = $1))
             ORDER BY step LIMIT $3"
        );
        on_pool!(&db, pool => {
            let mut rows = sqlx::query_as::<_, MetricPoint>(&sql)
                .bind(job_id)
                .bind(interval)
                .bind(limit)
                .fetch(pool);
            let mut chunks = (&mut rows).ready_chunks(STREAM_CHUNK);
            while let Some(chunk) = chunks.next().await {
                let chunk: Result<Vec<MetricPoint>, sqlx::Error> = chunk.into_iter().collect();
                let failed = chunk.is_err();
                if sender.send(chunk.map_err(DbError::from)).await.is_err() || failed {
                    break;
                }
            }
        });
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver).flat_map(|chunk| match chunk {
        Ok(points) => Either::Left(futures::stream::iter(points).map(Ok)),
        Err(error) => Either::Right(futures::stream::once(std::future::ready(Err(error)))),
    })
}

/// Rows a history stream hands over at most at once.
const STREAM_CHUNK: usize = 256;
/// Chunks a history stream reads ahead of the client.
const STREAM_BUFFER: usize = 4;

/// The first and the last step of a job's history (two index seeks).
pub async fn step_range(db: &Db, job_id: Uuid) -> Result<Option<(i64, i64)>, DbError> {
    // Two subqueries, not MIN and MAX in one: SQLite answers a lone MIN or MAX from the
    // index, both together by reading every row.
    let sql = "SELECT (SELECT MIN(step) FROM training_metrics WHERE job_id = $1),
                      (SELECT MAX(step) FROM training_metrics WHERE job_id = $1)";
    let (first, last): (Option<i64>, Option<i64>) =
        on_pool!(db, pool => sqlx::query_as(sql).bind(job_id).fetch_one(pool).await)?;
    Ok(first.zip(last))
}

/// About `points` points spread evenly over steps `first..=last` (the first stored step
/// at or after each mark) and the point at `last`, oldest first. Each mark costs an index
/// seek or two, so the cost follows `points`, not the run's length.
pub async fn sampled(
    db: &Db,
    job_id: Uuid,
    (first, last): (i64, i64),
    points: i64,
) -> Result<Vec<MetricPoint>, DbError> {
    let spacing = ((last - first) / points.max(1)).max(1);
    let marks = "WITH RECURSIVE marks(step) AS (
             SELECT CAST($2 AS BIGINT) UNION ALL SELECT step + $3 FROM marks WHERE step + $3 <= $4)";
    // Written as "the job's points whose step is one of the sampled steps", both databases
    // plan a pass over all the job's points, each tested against that set (10,000 points:
    // 4.7 ms a job page on PostgreSQL, most of the page's database time; 1.9 ms on SQLite).
    // These start from the marks and read only their rows (2.0 and 0.9 ms).
    let sql = match db {
        // SQLite has no LATERAL: each mark's step, then each step's row; CROSS JOIN keeps
        // the sampled steps as the outer loop.
        Db::Sqlite(_) => format!(
            "{marks},
             sampled(at) AS (SELECT $4 UNION SELECT (SELECT MIN(m.step) FROM training_metrics m
                 WHERE m.job_id = $1 AND m.step >= marks.step) FROM marks)
             SELECT {COLUMNS} FROM sampled CROSS JOIN training_metrics
             WHERE job_id = $1 AND step = sampled.at
             ORDER BY step"
        ),
        // One seek a mark, straight to its row.
        Db::Postgres(_) => format!(
            "{marks}
             SELECT DISTINCT ON (point.step) point.* FROM (SELECT $4 AS step UNION ALL SELECT step FROM marks) mark
             CROSS JOIN LATERAL (SELECT {COLUMNS} FROM training_metrics m
                 WHERE m.job_id = $1 AND m.step >= mark.step ORDER BY m.step LIMIT 1) point
             ORDER BY point.step"
        ),
    };
    Ok(on_pool!(db, pool => sqlx::query_as::<_, MetricPoint>(&sql)
        .bind(job_id)
        .bind(first)
        .bind(spacing)
        .bind(last)
        .fetch_all(pool)
        .await)?)
}

/// The job's latest `limit` points that carry a validation loss, oldest first (a partial
/// index holds just these).
pub async fn evaluations(db: &Db, job_id: Uuid, limit: i64) -> Result<Vec<MetricPoint>, DbError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM (SELECT {COLUMNS} FROM training_metrics
             WHERE job_id = $1 AND validation_loss IS NOT NULL ORDER BY step DESC LIMIT $2) latest
         ORDER BY step"
    );
    Ok(on_pool!(db, pool => sqlx::query_as::<_, MetricPoint>(&sql)
        .bind(job_id)
        .bind(limit)
        .fetch_all(pool)
        .await)?)
}

/// The job's evaluation with the lowest validation loss (the earliest of equals): the
/// step a keep-best run's adapter comes from.
pub async fn best_evaluation(db: &Db, job_id: Uuid) -> Result<Option<MetricPoint>, DbError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM training_metrics
         WHERE job_id = $1 AND validation_loss IS NOT NULL ORDER BY validation_loss, step LIMIT 1"
    );
    Ok(on_pool!(db, pool => sqlx::query_as::<_, MetricPoint>(&sql)
        .bind(job_id)
        .fetch_optional(pool)
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
