//! Schema changes SQLite can only make by rebuilding a table: its documented procedure
//! (create the new table, copy, drop the old, rename) with foreign keys off, or dropping
//! the old table would cascade to the rows that reference it. Foreign keys cannot be
//! turned off inside a transaction, and sqlx runs each migration in one, so these run
//! after the migrations, on their own connection, once (they check the schema first).

use sqlx::{Connection, SqlitePool};

use super::DbError;

/// `model_artifacts` with the `gguf_adapter` artifact type (PostgreSQL: migration 0017).
const MODEL_ARTIFACTS: &str = "
CREATE TABLE model_artifacts_rebuilt (
  id BLOB PRIMARY KEY,
  job_id BLOB NOT NULL REFERENCES training_jobs(id) ON DELETE CASCADE,
  artifact_type TEXT NOT NULL CHECK (artifact_type IN ('final_model', 'checkpoint', 'adapter_weights', 'training_report', 'metrics_export', 'validation_report', 'gguf_adapter')),
  name TEXT NOT NULL,
  description TEXT,
  file_path TEXT NOT NULL,
  file_size INTEGER NOT NULL,
  mime_type TEXT,
  checksum TEXT,
  version TEXT,
  epoch INTEGER,
  step INTEGER,
  metrics TEXT,
  download_count INTEGER NOT NULL DEFAULT 0,
  last_downloaded_at TEXT,
  created_at TEXT NOT NULL,
  attempt_id BLOB REFERENCES job_attempts(id) ON DELETE SET NULL
);
INSERT INTO model_artifacts_rebuilt (id, job_id, artifact_type, name, description, file_path,
  file_size, mime_type, checksum, version, epoch, step, metrics, download_count,
  last_downloaded_at, created_at, attempt_id)
SELECT id, job_id, artifact_type, name, description, file_path, file_size, mime_type,
  checksum, version, epoch, step, metrics, download_count, last_downloaded_at, created_at,
  attempt_id
FROM model_artifacts;
DROP TABLE model_artifacts;
ALTER TABLE model_artifacts_rebuilt RENAME TO model_artifacts;
CREATE INDEX idx_model_artifacts_job_id ON model_artifacts(job_id, created_at);
CREATE INDEX idx_model_artifacts_type ON model_artifacts(artifact_type);
CREATE UNIQUE INDEX idx_model_artifacts_job_name ON model_artifacts(job_id, artifact_type, name);
";

/// Rebuilds the tables whose schema is behind.
pub async fn run(pool: &SqlitePool) -> Result<(), DbError> {
    let (schema,): (String,) = sqlx::query_as(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'model_artifacts'",
    )
    .fetch_one(pool)
    .await?;
    if schema.contains("'gguf_adapter'") {
        return Ok(());
    }
    let mut connection = pool.acquire().await?;
    sqlx::query("PRAGMA foreign_keys = OFF")
        .execute(&mut *connection)
        .await?;
    let rebuilt = async {
        let mut transaction = connection.begin().await?;
        sqlx::raw_sql(MODEL_ARTIFACTS)
            .execute(&mut *transaction)
            .await?;
        // The copy must leave every reference intact, as the procedure asks.
        let broken: Vec<(String,)> = sqlx::query_as(
            "SELECT \"table\" FROM pragma_foreign_key_check('model_artifacts')
             UNION ALL SELECT \"table\" FROM pragma_foreign_key_check('checkpoints')",
        )
        .fetch_all(&mut *transaction)
        .await?;
        if !broken.is_empty() {
            return Err(DbError::Rebuild(format!(
                "model_artifacts: foreign keys broken in {broken:?}"
            )));
        }
        transaction.commit().await?;
        Ok(())
    }
    .await;
    sqlx::query("PRAGMA foreign_keys = ON")
        .execute(&mut *connection)
        .await?;
    rebuilt
}
