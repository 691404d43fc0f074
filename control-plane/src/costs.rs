//! A job's cost record (spec §7): every attempt's GPU hours and cost, and what spot
//! capacity saved against the on-demand price of the same GPU.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::db::attempts;
use crate::db::jobs::{round_cents, Job};
use crate::db::{now, on_pool, DbError};
use crate::http::AppState;

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
    pub status: String,
    pub gpu_type: Option<String>,
    pub hourly_rate: Option<f64>,
    pub hours: f64,
    pub cost: f64,
}

/// The on-demand hourly price of the job's GPU, what spot savings are measured against.
fn ondemand_rate(state: &AppState, job: &Job) -> Option<f64> {
    let offer = state.catalog.find(job.gpu_model.as_deref()?)?;
    Some(offer.hourly(crate::domain::GpuType::Ondemand))
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
        if let (Some("spot"), Some(full), Some(paid)) =
            (attempt.gpu_type.as_deref(), ondemand, attempt.hourly_rate)
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
    on_pool!(&state.db, pool => {
        let mut tx = pool.begin().await?;
        sqlx::query("DELETE FROM cost_tracking WHERE job_id = $1")
            .bind(job.id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO cost_tracking (id, job_id, compute_cost, storage_cost, network_cost, total_cost, gpu_hours,
                                        spot_savings, created_at, updated_at)
             VALUES ($1, $2, $3, 0, 0, $3, $4, $5, $6, $6)",
        )
        .bind(Uuid::new_v4())
        .bind(job.id)
        .bind(compute)
        .bind(hours)
        .bind(savings)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    });
    Ok(())
}
