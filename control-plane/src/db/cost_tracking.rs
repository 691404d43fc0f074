//! Cost records (spec §4.2.10) and the aggregates over them: a job's record is rewritten
//! whenever the job stops running; a job that runs now counts with its live cost instead
//! (its record, if an earlier attempt left one, is already inside that live cost).

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::jobs::{Job, Viewer};
use super::{on_pool, BeginWrite, Db, DbError};
use crate::domain::JobStatus;

/// What a job's record holds besides the job's own attribution.
pub struct CostRecord {
    pub compute: f64,
    pub gpu_hours: f64,
    pub spot_savings: f64,
}

/// Replaces the job's `cost_tracking` row.
pub async fn replace(
    db: &Db,
    job: &Job,
    record: &CostRecord,
    at: DateTime<Utc>,
) -> Result<(), DbError> {
    on_pool!(db, pool => {
        let mut tx = pool.begin_write().await?;
        sqlx::query("DELETE FROM cost_tracking WHERE job_id = $1")
            .bind(job.id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO cost_tracking (id, job_id, user_id, incurred_at, compute_cost, storage_cost, network_cost,
                                        total_cost, gpu_hours, spot_savings, team, project, cost_center, tags,
                                        created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, 0, 0, $5, $6, $7, $8, $9, $10, $11, $12, $12)",
        )
        .bind(Uuid::new_v4())
        .bind(job.id)
        .bind(job.user_id)
        .bind(incurred_at(job))
        .bind(record.compute)
        .bind(record.gpu_hours)
        .bind(record.spot_savings)
        .bind(job.team.as_deref())
        .bind(job.project.as_deref())
        .bind(job.cost_center.as_deref())
        .bind(job.tags.as_ref())
        .bind(at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    });
    Ok(())
}

/// When a job's spend counts as incurred: its first start (its creation before that).
/// Reports and budget periods place a job's whole cost there.
pub fn incurred_at(job: &Job) -> DateTime<Utc> {
    job.started_at.unwrap_or(job.created_at)
}

/// Every job's spend, one row each: the cost record of a job that is not running, the
/// live cost of one that is. Binds $1 and $2 to the running statuses.
const SPEND: &str = "WITH spend AS (
    SELECT c.job_id, c.user_id, c.incurred_at, c.compute_cost, c.storage_cost, c.network_cost,
           c.total_cost, c.gpu_hours, c.spot_savings, c.team, c.project, c.cost_center
      FROM cost_tracking c JOIN training_jobs j ON j.id = c.job_id
     WHERE j.status NOT IN ($1, $2)
    UNION ALL
    SELECT id, user_id, COALESCE(started_at, created_at), current_cost, 0.0, 0.0,
           current_cost, NULL, 0.0, team, project, cost_center
      FROM training_jobs WHERE status IN ($1, $2)
)";

/// Which spend an aggregate covers.
#[derive(Debug, Clone, Default)]
pub struct SpendFilter {
    /// `None`: everyone's.
    pub user_id: Option<Uuid>,
    pub from: Option<DateTime<Utc>>,
    /// Exclusive.
    pub until: Option<DateTime<Utc>>,
    pub team: Option<String>,
    pub project: Option<String>,
    pub cost_center: Option<String>,
}

impl SpendFilter {
    /// What `viewer` may see: their own, or everyone's for operators and admins.
    pub fn visible_to(viewer: Viewer) -> SpendFilter {
        SpendFilter {
            user_id: (!viewer.sees_everything).then_some(viewer.user_id),
            ..SpendFilter::default()
        }
    }
}

/// The filter's conditions on `spend`, binding $3 to $8.
const WHERE: &str = " WHERE ($3 IS NULL OR user_id = $3)
    AND ($4 IS NULL OR incurred_at >= $4) AND ($5 IS NULL OR incurred_at < $5)
    AND ($6 IS NULL OR team = $6) AND ($7 IS NULL OR project = $7) AND ($8 IS NULL OR cost_center = $8)";

macro_rules! spend_query {
    ($query:expr, $filter:expr) => {{
        let filter: &SpendFilter = $filter;
        $query
            .bind(JobStatus::Provisioning)
            .bind(JobStatus::Training)
            .bind(filter.user_id)
            .bind(filter.from)
            .bind(filter.until)
            .bind(filter.team.as_deref())
            .bind(filter.project.as_deref())
            .bind(filter.cost_center.as_deref())
    }};
}

/// Sums over the spend a filter covers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Totals {
    pub total_cost: f64,
    pub compute_cost: f64,
    pub storage_cost: f64,
    pub network_cost: f64,
    pub total_gpu_hours: f64,
    pub total_spot_savings: f64,
    pub job_count: i64,
}

pub async fn totals(db: &Db, filter: &SpendFilter) -> Result<Totals, DbError> {
    let sql = format!(
        "{SPEND} SELECT COALESCE(SUM(total_cost), 0.0) AS total_cost, COALESCE(SUM(compute_cost), 0.0) AS compute_cost,
                COALESCE(SUM(storage_cost), 0.0) AS storage_cost, COALESCE(SUM(network_cost), 0.0) AS network_cost,
                COALESCE(SUM(gpu_hours), 0.0) AS total_gpu_hours, COALESCE(SUM(spot_savings), 0.0) AS total_spot_savings,
                COUNT(*) AS job_count FROM spend{WHERE}"
    );
    Ok(
        on_pool!(db, pool => spend_query!(sqlx::query_as::<_, Totals>(&sql), filter).fetch_one(pool).await)?,
    )
}

/// One job's line in a breakdown.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct JobSpend {
    pub job_id: Uuid,
    pub job_name: String,
    pub total_cost: f64,
    pub gpu_hours: f64,
    pub spot_savings: f64,
    pub team: Option<String>,
    pub project: Option<String>,
    pub cost_center: Option<String>,
    pub incurred_at: DateTime<Utc>,
}

/// The costliest `limit` jobs the filter covers.
pub async fn by_job(db: &Db, filter: &SpendFilter, limit: i64) -> Result<Vec<JobSpend>, DbError> {
    let sql = format!(
        "{SPEND} SELECT s.job_id, j.name AS job_name, s.total_cost, COALESCE(s.gpu_hours, 0.0) AS gpu_hours,
                s.spot_savings, s.team, s.project, s.cost_center, s.incurred_at
           FROM (SELECT * FROM spend{WHERE}) s JOIN training_jobs j ON j.id = s.job_id
          ORDER BY s.total_cost DESC, s.incurred_at DESC LIMIT $9"
    );
    Ok(
        on_pool!(db, pool => spend_query!(sqlx::query_as::<_, JobSpend>(&sql), filter)
        .bind(limit)
        .fetch_all(pool)
        .await)?,
    )
}

/// Spend per day (UTC), oldest first; days without spend are absent.
#[derive(Debug, Clone, PartialEq)]
pub struct DaySpend {
    pub day: NaiveDate,
    pub total_cost: f64,
    pub compute_cost: f64,
    pub job_count: i64,
}

pub async fn by_day(db: &Db, filter: &SpendFilter) -> Result<Vec<DaySpend>, DbError> {
    // The one dialect difference: the UTC date of a timestamp (SQLite keeps RFC 3339 text
    // in UTC, whose first ten characters are the date).
    let day = match db {
        Db::Sqlite(_) => "substr(incurred_at, 1, 10)",
        Db::Postgres(_) => "to_char(incurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    };
    let sql = format!(
        "{SPEND} SELECT {day} AS day, SUM(total_cost), SUM(compute_cost), COUNT(*)
           FROM spend{WHERE} GROUP BY 1 ORDER BY 1"
    );
    let rows: Vec<(String, f64, f64, i64)> =
        on_pool!(db, pool => spend_query!(sqlx::query_as(&sql), filter).fetch_all(pool).await)?;
    Ok(rows
        .into_iter()
        .filter_map(|(day, total_cost, compute_cost, job_count)| {
            Some(DaySpend {
                day: day.parse().ok()?,
                total_cost,
                compute_cost,
                job_count,
            })
        })
        .collect())
}

/// Spend by one attribution dimension, costliest first.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct GroupSpend {
    /// The team, project or cost center; none for spend without one.
    pub name: Option<String>,
    pub total_cost: f64,
    pub job_count: i64,
}

/// An attribution dimension.
#[derive(Debug, Clone, Copy)]
pub enum Dimension {
    Team,
    Project,
    CostCenter,
}

pub async fn by_dimension(
    db: &Db,
    filter: &SpendFilter,
    dimension: Dimension,
) -> Result<Vec<GroupSpend>, DbError> {
    let column = match dimension {
        Dimension::Team => "team",
        Dimension::Project => "project",
        Dimension::CostCenter => "cost_center",
    };
    let sql = format!(
        "{SPEND} SELECT {column} AS name, SUM(total_cost) AS total_cost, COUNT(*) AS job_count
           FROM spend{WHERE} GROUP BY {column} ORDER BY 2 DESC"
    );
    Ok(
        on_pool!(db, pool => spend_query!(sqlx::query_as::<_, GroupSpend>(&sql), filter).fetch_all(pool).await)?,
    )
}
