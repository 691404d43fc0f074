//! A job's cost record (spec §4.2.10), rewritten whenever the job stops running.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{on_pool, BeginWrite, Db, DbError};

/// Replaces the job's `cost_tracking` row.
pub async fn replace(
    db: &Db,
    job_id: Uuid,
    compute: f64,
    hours: f64,
    savings: f64,
    at: DateTime<Utc>,
) -> Result<(), DbError> {
    on_pool!(db, pool => {
        let mut tx = pool.begin_write().await?;
        sqlx::query("DELETE FROM cost_tracking WHERE job_id = $1")
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO cost_tracking (id, job_id, compute_cost, storage_cost, network_cost, total_cost, gpu_hours,
                                        spot_savings, created_at, updated_at)
             VALUES ($1, $2, $3, 0, 0, $3, $4, $5, $6, $6)",
        )
        .bind(Uuid::new_v4())
        .bind(job_id)
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
