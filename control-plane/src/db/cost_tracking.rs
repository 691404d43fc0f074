//! Cost records (spec §4.2.10) and the aggregates over them: a job's record is rewritten
//! whenever the job stops running; a job that runs now counts with its live cost instead
//! (its record, if an earlier attempt left one, is already inside that live cost).

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use uuid::Uuid;

use sqlx::QueryBuilder;

use super::jobs::{Job, Viewer};
use super::{on_pool, BeginWrite, Db, DbError};
use crate::domain::gpu_catalog::Pricing;
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

/// Rewrites the storage and network cost of the cost record of `job` (of every record when
/// `None`) from its artifacts as of `at`: each artifact's bytes × the storage price ×
/// the months it has been kept, and × the network price × its downloads; the total follows.
/// One statement; only the date arithmetic differs between the backends.
pub async fn refresh_artifact_costs(
    db: &Db,
    job: Option<Uuid>,
    pricing: &Pricing,
    at: DateTime<Utc>,
) -> Result<u64, DbError> {
    const GB: f64 = 1e9;
    const MONTH_DAYS: f64 = 30.4375;
    let days_kept = match db {
        Db::Sqlite(_) => "MAX(0, julianday($1) - julianday(a.created_at))",
        Db::Postgres(_) => {
            "GREATEST(0, EXTRACT(EPOCH FROM ($1::timestamptz - a.created_at)) / 86400.0)"
        }
    };
    let storage = format!(
        "COALESCE((SELECT SUM(a.file_size * {days_kept}) FROM model_artifacts a
                   WHERE a.job_id = cost_tracking.job_id), 0) * $2"
    );
    let network = "COALESCE((SELECT SUM(a.file_size * a.download_count) FROM model_artifacts a
                    WHERE a.job_id = cost_tracking.job_id), 0) * $3";
    let sql = format!(
        "UPDATE cost_tracking SET storage_cost = {storage}, network_cost = {network},
             total_cost = compute_cost + {storage} + {network}
         WHERE $4 IS NULL OR job_id = $4"
    );
    let updated = on_pool!(db, pool => sqlx::query(&sql)
        .bind(at)
        .bind(pricing.storage_gb_month / GB / MONTH_DAYS)
        .bind(pricing.network_gb / GB)
        .bind(job)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(updated)
}

/// The storage and network cost on the job's record; `None` before it has one.
pub async fn artifact_costs(db: &Db, job_id: Uuid) -> Result<Option<(f64, f64)>, DbError> {
    Ok(on_pool!(db, pool => sqlx::query_as(
        "SELECT storage_cost, network_cost FROM cost_tracking WHERE job_id = $1",
    )
    .bind(job_id)
    .fetch_optional(pool)
    .await)?)
}

/// When a job's spend counts as incurred: its first start (its creation before that).
/// Reports and budget periods place a job's whole cost there.
pub fn incurred_at(job: &Job) -> DateTime<Utc> {
    job.started_at.unwrap_or(job.created_at)
}

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

/// Starts `query` with `WITH spend AS (…)`: one row per job the filter covers, the cost
/// record of a job that is not running and the live cost of one that is. The filter's
/// conditions go inside each branch, and only those it sets, so each branch reads
/// through an index (owner and time, team, project) instead of every record.
fn push_spend<'a, DB: sqlx::Database>(query: &mut QueryBuilder<'a, DB>, filter: &'a SpendFilter)
where
    Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    DateTime<Utc>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    JobStatus: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    fn running<'a, DB: sqlx::Database>(query: &mut QueryBuilder<'a, DB>)
    where
        JobStatus: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    {
        query
            .push("status IN (")
            .push_bind(JobStatus::Provisioning)
            .push(", ")
            .push_bind(JobStatus::Training)
            .push(")");
    }
    fn conditions<'a, DB: sqlx::Database>(query: &mut QueryBuilder<'a, DB>, filter: &'a SpendFilter)
    where
        Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
        DateTime<Utc>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
        &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    {
        if let Some(user_id) = filter.user_id {
            query.push(" AND user_id = ").push_bind(user_id);
        }
        if let Some(from) = filter.from {
            query.push(" AND incurred_at >= ").push_bind(from);
        }
        if let Some(until) = filter.until {
            query.push(" AND incurred_at < ").push_bind(until);
        }
        for (column, value) in [
            ("team", &filter.team),
            ("project", &filter.project),
            ("cost_center", &filter.cost_center),
        ] {
            if let Some(value) = value {
                query
                    .push(format!(" AND {column} = "))
                    .push_bind(value.as_str());
            }
        }
    }
    // The running jobs first, by the status index alone (a handful of rows); left to
    // itself the planner reached them through the owner's index, reading all their jobs.
    query.push(
        "WITH running AS MATERIALIZED (
           SELECT id, user_id, COALESCE(started_at, created_at) AS incurred_at, current_cost, team,
                  project, cost_center
             FROM training_jobs WHERE ",
    );
    running(query);
    query.push(
        "), spend AS (
           SELECT job_id, user_id, incurred_at, compute_cost, storage_cost, network_cost, total_cost,
                  gpu_hours, spot_savings, team, project, cost_center
             FROM cost_tracking WHERE job_id NOT IN (SELECT id FROM running)",
    );
    conditions(query, filter);
    query.push(
        " UNION ALL
           SELECT id, user_id, incurred_at, current_cost, 0.0, 0.0, current_cost, NULL, 0.0, team,
                  project, cost_center
             FROM running WHERE 1 = 1",
    );
    conditions(query, filter);
    query.push(") ");
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
    Ok(on_pool!(db, pool => {
        let mut query = QueryBuilder::new("");
        push_spend(&mut query, filter);
        query.push(
            "SELECT COALESCE(SUM(total_cost), 0.0) AS total_cost, COALESCE(SUM(compute_cost), 0.0) AS compute_cost,
                    COALESCE(SUM(storage_cost), 0.0) AS storage_cost, COALESCE(SUM(network_cost), 0.0) AS network_cost,
                    COALESCE(SUM(gpu_hours), 0.0) AS total_gpu_hours,
                    COALESCE(SUM(spot_savings), 0.0) AS total_spot_savings, COUNT(*) AS job_count
               FROM spend",
        );
        query.build_query_as::<Totals>().fetch_one(pool).await
    })?)
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
    Ok(on_pool!(db, pool => {
        let mut query = QueryBuilder::new("");
        push_spend(&mut query, filter);
        query.push(
            "SELECT s.job_id, j.name AS job_name, s.total_cost, COALESCE(s.gpu_hours, 0.0) AS gpu_hours,
                    s.spot_savings, s.team, s.project, s.cost_center, s.incurred_at
               FROM spend s JOIN training_jobs j ON j.id = s.job_id
              ORDER BY s.total_cost DESC, s.incurred_at DESC LIMIT ",
        );
        query.push_bind(limit);
        query.build_query_as::<JobSpend>().fetch_all(pool).await
    })?)
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
    let rows: Vec<(String, f64, f64, i64)> = on_pool!(db, pool => {
        let mut query = QueryBuilder::new("");
        push_spend(&mut query, filter);
        query.push(format!(
            "SELECT {day} AS day, SUM(total_cost), SUM(compute_cost), COUNT(*) FROM spend GROUP BY 1 ORDER BY 1"
        ));
        query.build_query_as().fetch_all(pool).await
    })?;
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
    Ok(on_pool!(db, pool => {
        let mut query = QueryBuilder::new("");
        push_spend(&mut query, filter);
        query.push(format!(
            "SELECT {column} AS name, SUM(total_cost) AS total_cost, COUNT(*) AS job_count
               FROM spend GROUP BY {column} ORDER BY 2 DESC"
        ));
        query.build_query_as::<GroupSpend>().fetch_all(pool).await
    })?)
}
