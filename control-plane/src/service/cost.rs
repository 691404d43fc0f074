//! A job's cost record (spec §7): every attempt's GPU hours and cost, and what spot
//! capacity saved against the on-demand price of the same GPU, plus its artifacts' storage
//! (prorated while kept) and network (per download) at the catalog's `[pricing]`; cost
//! reports (spec §5.8), summed by the database over the cost records.

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{AppState, CurrentUser, ServiceError, ServiceResult};
use crate::db::attempts;
use crate::db::cost_tracking::{
    self, CostRecord, Dimension, GroupSpend, JobSpend, SpendFilter, Totals,
};
use crate::db::jobs::{round_cents, Job};
use crate::db::{now, DbError};
use crate::domain::{AttemptStatus, BudgetPeriod, FieldError, GpuType};

/// What a job has cost so far, attempt by attempt.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobCost {
    /// Compute + storage + network.
    pub total_cost: f64,
    pub compute_cost: f64,
    /// Its artifacts kept so far, prorated (as of the record's last update).
    pub storage_cost: f64,
    /// Its artifacts' downloads.
    pub network_cost: f64,
    pub gpu_hours: f64,
    /// What the spot attempts saved against the on-demand price of the same GPU.
    pub spot_savings: f64,
    pub attempts: Vec<AttemptCost>,
    pub as_of: DateTime<Utc>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AttemptCost {
    pub attempt_number: i64,
    pub status: AttemptStatus,
    pub gpu_type: Option<GpuType>,
    pub hourly_rate: Option<f64>,
    pub hours: f64,
    pub cost: f64,
}

/// The on-demand hourly price of the job's GPU, what spot savings are measured against.
fn ondemand_rate(state: &AppState, job: &Job) -> Option<f64> {
    let offer = state.catalog.find(job.gpu_model.as_deref()?)?;
    Some(offer.hourly(GpuType::Ondemand))
}

/// Sums a job's attempts at `at` (a running attempt counts up to then).
pub async fn job_cost(state: &AppState, job: &Job, at: DateTime<Utc>) -> Result<JobCost, DbError> {
    let ondemand = ondemand_rate(state, job);
    let (storage_cost, network_cost) = cost_tracking::artifact_costs(&state.db, job.id)
        .await?
        .unwrap_or_default();
    let mut total = JobCost {
        total_cost: 0.0,
        compute_cost: 0.0,
        storage_cost: round_cents(storage_cost),
        network_cost: round_cents(network_cost),
        gpu_hours: 0.0,
        spot_savings: 0.0,
        attempts: Vec::new(),
        as_of: at,
    };
    for attempt in attempts::for_job(&state.db, job.id).await? {
        let hours = attempt.hours(at);
        let cost = attempt.cost_at(at);
        total.compute_cost += cost;
        total.gpu_hours += hours;
        if let (Some(GpuType::Spot), Some(full), Some(paid)) =
            (attempt.gpu_type, ondemand, attempt.hourly_rate)
        {
            total.spot_savings += hours * (full - paid).max(0.0);
        }
        total.attempts.push(AttemptCost {
            attempt_number: attempt.attempt_number,
            status: attempt.status,
            gpu_type: attempt.gpu_type,
            hourly_rate: attempt.hourly_rate,
            hours,
            cost,
        });
    }
    total.compute_cost = round_cents(total.compute_cost);
    total.spot_savings = round_cents(total.spot_savings);
    total.total_cost = round_cents(total.compute_cost + total.storage_cost + total.network_cost);
    Ok(total)
}

/// Writes (or rewrites) the job's `cost_tracking` row from its attempts, then lets the
/// budgets it counts against alert.
pub async fn record(state: &AppState, job: &Job) -> ServiceResult<()> {
    let at = now();
    let cost = job_cost(state, job, at).await?;
    let record = CostRecord {
        compute: cost.compute_cost,
        gpu_hours: cost.gpu_hours,
        spot_savings: cost.spot_savings,
    };
    cost_tracking::replace(&state.db, job, &record, at).await?;
    cost_tracking::refresh_artifact_costs(&state.db, Some(job.id), &state.catalog.pricing, at)
        .await?;
    super::budget::alert_if_crossed(state, job).await
}

/// A running job's live cost, its attempts' time so far × their rates, written on each of
/// its agent's heartbeats (report batches write it too) so it moves while nothing else
/// does (a long model download), and sent to the job's live subscribers.
pub async fn refresh_live_cost(state: &AppState, job: Job) -> ServiceResult<Job> {
    let cost = round_cents(attempts::job_cost(&state.db, job.id, now()).await?);
    if cost == job.current_cost {
        return Ok(job);
    }
    let Some(updated) = crate::db::jobs::set_live_cost(&state.db, job.id, cost).await? else {
        return Ok(job);
    };
    state
        .live
        .publish(crate::live::JobUpdate::Status {
            job: Box::new(updated.clone()),
        })
        .await;
    Ok(updated)
}

/// Keeps the storage cost of every record current: artifacts cost while they are kept.
/// Every replica runs it; the statement is idempotent, so overlapping runs are harmless.
pub fn spawn_storage_sweeper(state: AppState) {
    let period = std::time::Duration::from_secs(
        state.settings.estimates.storage_refresh_minutes.max(1) * 60,
    );
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            let refreshed = cost_tracking::refresh_artifact_costs(
                &state.db,
                None,
                &state.catalog.pricing,
                now(),
            )
            .await;
            match refreshed {
                Ok(records) => tracing::debug!(records, "storage costs refreshed"),
                Err(error) => tracing::warn!(%error, "could not refresh storage costs"),
            }
        }
    });
}

/// After an artifact of `job_id` was downloaded: its network cost counts at once.
pub async fn after_download(state: &AppState, job_id: uuid::Uuid) {
    let refreshed = cost_tracking::refresh_artifact_costs(
        &state.db,
        Some(job_id),
        &state.catalog.pricing,
        now(),
    )
    .await;
    if let Err(error) = refreshed {
        tracing::warn!(%job_id, %error, "could not record a download's network cost");
    }
}

/// What a cost report covers: its dates (a period ending now, or start and end dates,
/// inclusive) and attribution filters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CostQuery {
    /// day, week, month, quarter or year: the calendar period (UTC) holding today.
    /// Default: month, unless start_date or end_date is given.
    pub period: Option<String>,
    /// First day counted, YYYY-MM-DD.
    pub start_date: Option<String>,
    /// Last day counted, YYYY-MM-DD.
    pub end_date: Option<String>,
    pub team: Option<String>,
    pub project: Option<String>,
    pub cost_center: Option<String>,
}

/// Spend over the query's range (spec §5.8 `GET /cost-tracking/summary`).
#[derive(Debug, Serialize, ToSchema)]
pub struct CostSummary {
    #[serde(flatten)]
    pub totals: Totals,
    /// The range covered: its first instant (none: from the first record), and the first
    /// instant after it.
    pub from: Option<DateTime<Utc>>,
    pub until: DateTime<Utc>,
    /// The costliest jobs, at most 100.
    pub breakdown_by_job: Vec<JobSpend>,
    pub by_team: Vec<GroupSpend>,
    pub by_project: Vec<GroupSpend>,
    pub by_cost_center: Vec<GroupSpend>,
}

/// Most jobs a summary lists.
const BREAKDOWN_JOBS: i64 = 100;

pub async fn summary(
    state: &AppState,
    user: &CurrentUser,
    query: &CostQuery,
) -> ServiceResult<CostSummary> {
    let filter = spend_filter(user, query, "month")?;
    let (totals, breakdown_by_job, by_team, by_project, by_cost_center) = futures::try_join!(
        cost_tracking::totals(&state.db, &filter),
        cost_tracking::by_job(&state.db, &filter, BREAKDOWN_JOBS),
        cost_tracking::by_dimension(&state.db, &filter, Dimension::Team),
        cost_tracking::by_dimension(&state.db, &filter, Dimension::Project),
        cost_tracking::by_dimension(&state.db, &filter, Dimension::CostCenter),
    )?;
    Ok(CostSummary {
        totals: Totals {
            total_cost: round_cents(totals.total_cost),
            compute_cost: round_cents(totals.compute_cost),
            storage_cost: round_cents(totals.storage_cost),
            network_cost: round_cents(totals.network_cost),
            total_spot_savings: round_cents(totals.total_spot_savings),
            ..totals
        },
        from: filter.from,
        until: filter.until.unwrap_or_else(now),
        breakdown_by_job,
        by_team,
        by_project,
        by_cost_center,
    })
}

/// One bucket of a trend.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct TrendPoint {
    /// The bucket's first day: the day, the Monday of the week, or the first of the month.
    pub date: NaiveDate,
    pub total_cost: f64,
    pub compute_cost: f64,
    pub job_count: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CostTrends {
    /// day, week or month.
    pub period: String,
    /// Every bucket of the range, oldest first, empty ones at zero.
    pub data: Vec<TrendPoint>,
}

/// Most buckets a trend returns.
const MAX_TREND_POINTS: i64 = 1_000;

/// Spend per day, week or month over the range (spec §5.8 `GET /cost-tracking/trends`);
/// default the last 30 days by day.
pub async fn trends(
    state: &AppState,
    user: &CurrentUser,
    query: &CostQuery,
) -> ServiceResult<CostTrends> {
    let bucket = query.period.as_deref().unwrap_or("day");
    if !matches!(bucket, "day" | "week" | "month") {
        return Err(ServiceError::Validation(vec![FieldError::new(
            "period",
            "must be day, week or month",
        )]));
    }
    let defaults = CostQuery {
        period: None,
        start_date: query
            .start_date
            .clone()
            .or_else(|| Some((now().date_naive() - chrono::Duration::days(29)).to_string())),
        end_date: query.end_date.clone(),
        team: query.team.clone(),
        project: query.project.clone(),
        cost_center: query.cost_center.clone(),
    };
    let filter = spend_filter(user, &defaults, "day")?;
    let (Some(from), Some(until)) = (filter.from, filter.until) else {
        return Err(ServiceError::Internal("a trend without a range".into()));
    };
    let start_of = |day: NaiveDate| match bucket {
        "week" => day - chrono::Duration::days(i64::from(day.weekday().num_days_from_monday())),
        "month" => day.with_day(1).unwrap_or(day),
        _ => day,
    };
    let next = |day: NaiveDate| match bucket {
        "week" => day + chrono::Duration::days(7),
        "month" => day
            .checked_add_months(chrono::Months::new(1))
            .unwrap_or(NaiveDate::MAX),
        _ => day + chrono::Duration::days(1),
    };
    let mut data = Vec::new();
    let mut day = start_of(from.date_naive());
    let last = until.date_naive();
    while day < last {
        if data.len() as i64 >= MAX_TREND_POINTS {
            return Err(ServiceError::Validation(vec![FieldError::new(
                "start_date",
                format!("the range holds more than {MAX_TREND_POINTS} {bucket}s"),
            )]));
        }
        data.push(TrendPoint {
            date: day,
            total_cost: 0.0,
            compute_cost: 0.0,
            job_count: 0,
        });
        day = next(day);
    }
    // Days come summed from the database; weeks and months are folded from them.
    for spent in cost_tracking::by_day(&state.db, &filter).await? {
        let bucket_day = start_of(spent.day);
        if let Some(point) = data.iter_mut().find(|p| p.date == bucket_day) {
            point.total_cost += spent.total_cost;
            point.compute_cost += spent.compute_cost;
            point.job_count += spent.job_count;
        }
    }
    for point in &mut data {
        point.total_cost = round_cents(point.total_cost);
        point.compute_cost = round_cents(point.compute_cost);
    }
    Ok(CostTrends {
        period: bucket.to_owned(),
        data,
    })
}

/// The spend a report covers: what the user may see, over the query's range and filters.
/// Every bad field is named.
fn spend_filter(
    user: &CurrentUser,
    query: &CostQuery,
    default_period: &str,
) -> ServiceResult<SpendFilter> {
    let mut errors = Vec::new();
    let mut date = |field: &str, text: Option<&str>| {
        text.and_then(
            |text| match NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d") {
                Ok(day) if (1970..=9999).contains(&day.year()) => Some(day),
                _ => {
                    errors.push(FieldError::new(
                        field,
                        "must be a date from 1970 to 9999, YYYY-MM-DD",
                    ));
                    None
                }
            },
        )
    };
    let start = date("start_date", query.start_date.as_deref());
    let end = date("end_date", query.end_date.as_deref());
    let midnight = |day: NaiveDate| Utc.from_utc_datetime(&day.and_time(chrono::NaiveTime::MIN));
    let today = now();
    let (from, until) = match (start, end, query.period.as_deref()) {
        (None, None, period) => {
            let period = match period.unwrap_or(default_period) {
                "day" => Some(BudgetPeriod::Daily),
                "week" => Some(BudgetPeriod::Weekly),
                "month" => Some(BudgetPeriod::Monthly),
                "quarter" => Some(BudgetPeriod::Quarterly),
                "year" => Some(BudgetPeriod::Annual),
                _ => None,
            };
            match period {
                Some(period) => {
                    let (from, until) = period.window(today);
                    (Some(from), until)
                }
                None => {
                    errors.push(FieldError::new(
                        "period",
                        "must be day, week, month, quarter or year",
                    ));
                    (None, today)
                }
            }
        }
        // Dates are inclusive: the range ends at midnight after its last day (today's by
        // default); without a start date it reaches back to the first record.
        (start, end, _) => (
            start.map(midnight),
            midnight(end.unwrap_or(today.date_naive()) + chrono::Duration::days(1)),
        ),
    };
    if from.is_some_and(|from| from > until) {
        errors.push(FieldError::new("end_date", "must not be before start_date"));
    }
    let mut name = |field: &str, value: &Option<String>| match value.as_deref().map(str::trim) {
        Some(text) if text.is_empty() || text.chars().any(char::is_control) => {
            errors.push(FieldError::new(
                field,
                "must name something, in printable characters, when given",
            ));
            None
        }
        other => other.map(str::to_owned),
    };
    let team = name("team", &query.team);
    let project = name("project", &query.project);
    let cost_center = name("cost_center", &query.cost_center);
    if !errors.is_empty() {
        return Err(ServiceError::Validation(errors));
    }
    Ok(SpendFilter {
        from,
        until: Some(until),
        team,
        project,
        cost_center,
        ..SpendFilter::visible_to(user.viewer())
    })
}
