//! Cost records (spec §4.2.10) and the aggregates over them: a job's record is rewritten
//! whenever the job stops running; a job that runs now counts with its live cost instead
//! (its record, if an earlier attempt left one, is already inside that live cost).

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
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
    let roll = rollup_job_sql(db);
    on_pool!(db, pool => {
        let mut tx = pool.begin_write().await?;
        sqlx::query(&roll).bind(job.id).bind(-1.0).bind(-1i64).execute(&mut *tx).await?;
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
        sqlx::query(&roll).bind(job.id).bind(1.0).bind(1i64).execute(&mut *tx).await?;
        tx.commit().await?;
    });
    Ok(())
}

/// The UTC day (YYYY-MM-DD) of `incurred_at`: SQLite keeps RFC 3339 text in UTC, whose
/// first ten characters are the date.
fn incurred_day(db: &Db) -> &'static str {
    match db {
        Db::Sqlite(_) => "substr(incurred_at, 1, 10)",
        Db::Postgres(_) => "to_char(incurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    }
}

/// Adds the record of job `$1` to its day's rollup row, times `$2` (1.0 or -1.0) with a
/// job count of `$3` (1 or -1): taken away before the record changes, added back after.
fn rollup_job_sql(db: &Db) -> String {
    let day = incurred_day(db);
    format!(
        "INSERT INTO cost_daily (user_id, day, team, project, cost_center, total_cost, compute_cost,
                                 storage_cost, network_cost, gpu_hours, spot_savings, job_count)
         SELECT user_id, {day}, COALESCE(team, ''), COALESCE(project, ''), COALESCE(cost_center, ''),
                $2 * total_cost, $2 * compute_cost, $2 * storage_cost, $2 * network_cost,
                $2 * COALESCE(gpu_hours, 0), $2 * spot_savings, $3
           FROM cost_tracking WHERE job_id = $1 AND user_id IS NOT NULL
         ON CONFLICT (user_id, day, team, project, cost_center) DO UPDATE SET
           total_cost = cost_daily.total_cost + excluded.total_cost,
           compute_cost = cost_daily.compute_cost + excluded.compute_cost,
           storage_cost = cost_daily.storage_cost + excluded.storage_cost,
           network_cost = cost_daily.network_cost + excluded.network_cost,
           gpu_hours = cost_daily.gpu_hours + excluded.gpu_hours,
           spot_savings = cost_daily.spot_savings + excluded.spot_savings,
           job_count = cost_daily.job_count + excluded.job_count"
    )
}

/// Rebuilds the whole rollup from the records (after every record changed at once).
fn rebuild_rollup_sql(db: &Db) -> String {
    let day = incurred_day(db);
    format!(
        "INSERT INTO cost_daily (user_id, day, team, project, cost_center, total_cost, compute_cost,
                                 storage_cost, network_cost, gpu_hours, spot_savings, job_count)
         SELECT user_id, {day}, COALESCE(team, ''), COALESCE(project, ''), COALESCE(cost_center, ''),
                SUM(total_cost), SUM(compute_cost), SUM(storage_cost), SUM(network_cost),
                SUM(COALESCE(gpu_hours, 0)), SUM(spot_savings), COUNT(*)
           FROM cost_tracking WHERE user_id IS NOT NULL
          GROUP BY 1, 2, 3, 4, 5"
    )
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
    let (roll, rebuild) = (rollup_job_sql(db), rebuild_rollup_sql(db));
    // The rollup moves with the records: one job's contribution around its update, or
    // rebuilt after all of them changed.
    let updated = on_pool!(db, pool => {
        let mut tx = pool.begin_write().await?;
        if let Some(job) = job {
            sqlx::query(&roll).bind(job).bind(-1.0).bind(-1i64).execute(&mut *tx).await?;
        }
        let updated = sqlx::query(&sql)
            .bind(at)
            .bind(pricing.storage_gb_month / GB / MONTH_DAYS)
            .bind(pricing.network_gb / GB)
            .bind(job)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        match job {
            Some(job) => {
                sqlx::query(&roll).bind(job).bind(1.0).bind(1i64).execute(&mut *tx).await?;
            }
            None => {
                sqlx::query("DELETE FROM cost_daily").execute(&mut *tx).await?;
                sqlx::query(&rebuild).execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        updated
    });
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

/// The filter's conditions on a record or a running job, only those it sets, so each
/// branch reads through an index (owner and time, team, project) instead of every row.
fn push_conditions<'a, DB: sqlx::Database>(
    query: &mut QueryBuilder<'a, DB>,
    filter: &'a SpendFilter,
) where
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
    push_attribution(query, filter);
}

/// The filter's team, project and cost center, those it sets (the same columns on records,
/// jobs and the rollup).
fn push_attribution<'a, DB: sqlx::Database>(
    query: &mut QueryBuilder<'a, DB>,
    filter: &'a SpendFilter,
) where
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
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

/// Starts `query` with `WITH running AS (…)`: the jobs running now. They are reached
/// through the partial index of attempts that have not ended (a handful), their status
/// checked after: bound statuses alone left PostgreSQL's cached generic plan scanning
/// every job, not knowing which statuses they named.
fn push_running<'a, DB: sqlx::Database>(query: &mut QueryBuilder<'a, DB>)
where
    JobStatus: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    query.push(
        "WITH running AS MATERIALIZED (
           SELECT id, user_id, COALESCE(started_at, created_at) AS incurred_at, current_cost, team,
                  project, cost_center
             FROM training_jobs
            WHERE id IN (SELECT job_id FROM job_attempts WHERE ended_at IS NULL) AND status IN (",
    );
    query
        .push_bind(JobStatus::Provisioning)
        .push(", ")
        .push_bind(JobStatus::Training)
        .push(")) ");
}

/// Starts `query` with `WITH running AS (…), spend_rows AS (…)`: one row per job the
/// filter covers, the cost record of a job that is not running and the live cost of one
/// that is.
fn push_spend_rows<'a, DB: sqlx::Database>(
    query: &mut QueryBuilder<'a, DB>,
    filter: &'a SpendFilter,
) where
    Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    DateTime<Utc>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    JobStatus: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    push_running(query);
    query.push(
        ", spend_rows AS (
           SELECT job_id, user_id, incurred_at, compute_cost, storage_cost, network_cost, total_cost,
                  gpu_hours, spot_savings, team, project, cost_center
             FROM cost_tracking WHERE job_id NOT IN (SELECT id FROM running)",
    );
    push_conditions(query, filter);
    query.push(
        " UNION ALL
           SELECT id, user_id, incurred_at, current_cost, 0.0, 0.0, current_cost, NULL, 0.0, team,
                  project, cost_center
             FROM running WHERE 1 = 1",
    );
    push_conditions(query, filter);
    query.push(") ");
}

/// A filter's range as whole UTC days (`day >= from`, `day < until`, as YYYY-MM-DD), for
/// the rollup; `None` when either end falls inside a day, so the records are read instead.
fn day_bounds(filter: &SpendFilter) -> Option<(Option<String>, Option<String>)> {
    let day = |at: Option<DateTime<Utc>>| match at {
        None => Some(None),
        Some(at) if at.time() == NaiveTime::MIN => Some(Some(at.date_naive().to_string())),
        Some(_) => None,
    };
    Some((day(filter.from)?, day(filter.until)?))
}

/// Starts `query` with `WITH … spend AS (…)` for sums: rows of (day, team, project,
/// cost_center, total_cost, compute_cost, storage_cost, network_cost, gpu_hours,
/// spot_savings, jobs) whose sums are the filter's spend. Over whole days it reads the
/// daily rollup, takes away the records of the jobs running now and adds their live
/// cost; otherwise it reads the records (`jobs` is then 1 a row).
fn push_summed<'a, DB: sqlx::Database>(
    query: &mut QueryBuilder<'a, DB>,
    filter: &'a SpendFilter,
    days: Option<&'a (Option<String>, Option<String>)>,
    incurred_day: &'static str,
) where
    Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    DateTime<Utc>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    JobStatus: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let Some((from_day, until_day)) = days else {
        push_spend_rows(query, filter);
        query.push(format!(
            ", spend AS (SELECT {incurred_day} AS day, team, project, cost_center, total_cost,
                    compute_cost, storage_cost, network_cost, COALESCE(gpu_hours, 0.0) AS gpu_hours,
                    spot_savings, 1 AS jobs FROM spend_rows) "
        ));
        return;
    };
    push_running(query);
    query.push(
        ", spend AS (
           SELECT day, NULLIF(team, '') AS team, NULLIF(project, '') AS project,
                  NULLIF(cost_center, '') AS cost_center, total_cost, compute_cost, storage_cost,
                  network_cost, gpu_hours, spot_savings, job_count AS jobs
             FROM cost_daily WHERE 1 = 1",
    );
    if let Some(user_id) = filter.user_id {
        query.push(" AND user_id = ").push_bind(user_id);
    }
    if let Some(from) = from_day {
        query.push(" AND day >= ").push_bind(from.as_str());
    }
    if let Some(until) = until_day {
        query.push(" AND day < ").push_bind(until.as_str());
    }
    push_attribution(query, filter);
    query.push(format!(
        " UNION ALL
           SELECT {incurred_day}, team, project, cost_center, -total_cost, -compute_cost,
                  -storage_cost, -network_cost, -COALESCE(gpu_hours, 0.0), -spot_savings, -1
             FROM cost_tracking WHERE job_id IN (SELECT id FROM running)"
    ));
    push_conditions(query, filter);
    query.push(format!(
        " UNION ALL
           SELECT {incurred_day}, team, project, cost_center, current_cost, current_cost, 0.0, 0.0,
                  0.0, 0.0, 1
             FROM running WHERE 1 = 1"
    ));
    push_conditions(query, filter);
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
    let (days, day) = (day_bounds(filter), incurred_day(db));
    Ok(on_pool!(db, pool => {
        let mut query = QueryBuilder::new("");
        push_summed(&mut query, filter, days.as_ref(), day);
        query.push(
            "SELECT COALESCE(SUM(total_cost), 0.0) AS total_cost, COALESCE(SUM(compute_cost), 0.0) AS compute_cost,
                    COALESCE(SUM(storage_cost), 0.0) AS storage_cost, COALESCE(SUM(network_cost), 0.0) AS network_cost,
                    COALESCE(SUM(gpu_hours), 0.0) AS total_gpu_hours,
                    COALESCE(SUM(spot_savings), 0.0) AS total_spot_savings,
                    CAST(COALESCE(SUM(jobs), 0) AS BIGINT) AS job_count
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

/// The costliest `limit` jobs the filter covers: the records' costliest found in the
/// report index alone (no record read but the ones listed), and the running jobs at their
/// live cost.
pub async fn by_job(db: &Db, filter: &SpendFilter, limit: i64) -> Result<Vec<JobSpend>, DbError> {
    Ok(on_pool!(db, pool => {
        let mut query = QueryBuilder::new("");
        push_running(&mut query);
        query.push(
            ", top AS (
               SELECT job_id FROM cost_tracking WHERE job_id NOT IN (SELECT id FROM running)",
        );
        push_conditions(&mut query, filter);
        query.push(" ORDER BY total_cost DESC, incurred_at DESC LIMIT ");
        query.push_bind(limit);
        query.push(
            "), spend AS (
               SELECT job_id, incurred_at, total_cost, gpu_hours, spot_savings, team, project, cost_center
                 FROM cost_tracking WHERE job_id IN (SELECT job_id FROM top)
               UNION ALL
               SELECT id, incurred_at, current_cost, NULL, 0.0, team, project, cost_center
                 FROM running WHERE 1 = 1",
        );
        push_conditions(&mut query, filter);
        query.push(
            ") SELECT s.job_id, j.name AS job_name, s.total_cost, COALESCE(s.gpu_hours, 0.0) AS gpu_hours,
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
    let (days, day) = (day_bounds(filter), incurred_day(db));
    let rows: Vec<(String, f64, f64, i64)> = on_pool!(db, pool => {
        let mut query = QueryBuilder::new("");
        push_summed(&mut query, filter, days.as_ref(), day);
        query.push(
            "SELECT day, SUM(total_cost), SUM(compute_cost), CAST(SUM(jobs) AS BIGINT) FROM spend
              GROUP BY day HAVING SUM(jobs) > 0 ORDER BY day",
        );
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
    let (days, day) = (day_bounds(filter), incurred_day(db));
    Ok(on_pool!(db, pool => {
        let mut query = QueryBuilder::new("");
        push_summed(&mut query, filter, days.as_ref(), day);
        query.push(format!(
            "SELECT {column} AS name, SUM(total_cost) AS total_cost,
                    CAST(SUM(jobs) AS BIGINT) AS job_count
               FROM spend GROUP BY {column} HAVING SUM(jobs) > 0 ORDER BY 2 DESC"
        ));
        query.build_query_as::<GroupSpend>().fetch_all(pool).await
    })?)
}
