//! A job's cost record (spec §7): every attempt's GPU hours and cost, and what spot
//! capacity saved against the on-demand price of the same GPU.

use uuid::Uuid;

use crate::db::attempts;
use crate::db::jobs::{round_cents, Job};
use crate::db::{now, on_pool, DbError};
use crate::http::AppState;

/// Writes (or rewrites) the job's `cost_tracking` row from its attempts.
pub async fn record(state: &AppState, job: &Job) -> Result<(), DbError> {
    let at = now();
    let ondemand = crate::recovery::ondemand_rate(state, job);
    let (mut compute, mut hours, mut savings) = (0.0, 0.0, 0.0);
    for attempt in attempts::for_job(&state.db, job.id).await? {
        let attempt_hours = attempt.hours(at);
        compute += attempt.cost_at(at);
        hours += attempt_hours;
        if let (Some("spot"), Some(full), Some(paid)) =
            (attempt.gpu_type.as_deref(), ondemand, attempt.hourly_rate)
        {
            savings += attempt_hours * (full - paid).max(0.0);
        }
    }
    let (compute, savings) = (round_cents(compute), round_cents(savings));
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
