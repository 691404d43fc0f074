//! A job's cost record (spec §7): every attempt's GPU hours and cost, and what spot
//! capacity saved against the on-demand price of the same GPU.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::AppState;
use crate::db::attempts;
use crate::db::jobs::{round_cents, Job};
use crate::db::{cost_tracking, now, DbError};
use crate::domain::{AttemptStatus, GpuType};

/// What a job has cost so far, attempt by attempt.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobCost {
    pub compute_cost: f64,
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
    let mut total = JobCost {
        compute_cost: 0.0,
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
    Ok(total)
}

/// Writes (or rewrites) the job's `cost_tracking` row from its attempts.
pub async fn record(state: &AppState, job: &Job) -> Result<(), DbError> {
    let at = now();
    let JobCost {
        compute_cost: compute,
        gpu_hours: hours,
        spot_savings: savings,
        ..
    } = job_cost(state, job, at).await?;
    cost_tracking::replace(&state.db, job.id, compute, hours, savings, at).await?;
    Ok(())
}
