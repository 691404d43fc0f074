//! Counts by status for the Prometheus gauges.

use super::{on_pool, Db, DbError};

#[derive(Debug, Clone, Copy)]
pub enum Gauge {
    JobsByStatus,
    FilesByEnrichmentStatus,
    AgentsByStatus,
}

/// (status, count) rows for one gauge.
pub async fn counts(db: &Db, gauge: Gauge) -> Result<Vec<(String, i64)>, DbError> {
    let sql = match gauge {
        Gauge::JobsByStatus => "SELECT status, COUNT(*) FROM training_jobs GROUP BY status",
        Gauge::FilesByEnrichmentStatus => {
            "SELECT enrichment_status, COUNT(*) FROM training_files WHERE deleted_at IS NULL GROUP BY enrichment_status"
        }
        Gauge::AgentsByStatus => "SELECT status, COUNT(*) FROM agents GROUP BY status",
    };
    Ok(on_pool!(db, pool => sqlx::query_as(sql).fetch_all(pool).await)?)
}
