//! Artifacts of a job (spec §5.6): adapters, checkpoints, reports. The bytes live in the
//! artifact store under `file_path`; the row keeps size, checksum and downloads.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use protocol::agent::ArtifactKind;

use super::{on_pool, BeginWrite, Db, DbError};

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Artifact {
    pub id: Uuid,
    pub job_id: Uuid,
    pub attempt_id: Option<Uuid>,
    #[sqlx(try_from = "String")]
    #[schema(value_type = String)]
    pub artifact_type: ArtifactKind,
    pub name: String,
    #[serde(skip)]
    pub file_path: String,
    pub file_size: i64,
    pub mime_type: Option<String>,
    /// SHA-256 of the bytes, hex.
    pub checksum: Option<String>,
    pub epoch: Option<i64>,
    pub step: Option<i64>,
    pub download_count: i64,
    pub last_downloaded_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

const COLUMNS: &str =
    "id, job_id, attempt_id, artifact_type, name, file_path, file_size, mime_type, checksum, \
                       epoch, step, download_count, last_downloaded_at, created_at";

pub enum Stored {
    New(Artifact),
    /// The same bytes were stored before (an upload retried after a lost reply).
    Existing(Artifact),
    /// Replaced an artifact of the same name; its old object should be deleted.
    Replaced {
        artifact: Artifact,
        old_path: String,
    },
}

/// Records an artifact, keyed by (job, type, name). The transaction writes first, so on
/// SQLite it holds the write lock from its first statement (a read-then-write
/// transaction could not upgrade while another connection writes).
pub async fn upsert(db: &Db, artifact: &Artifact) -> Result<Stored, DbError> {
    let insert = format!(
        "INSERT INTO model_artifacts ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 0, NULL, $12)
         ON CONFLICT (job_id, artifact_type, name) DO NOTHING RETURNING {COLUMNS}"
    );
    let select = format!(
        "SELECT {COLUMNS} FROM model_artifacts WHERE job_id = $1 AND artifact_type = $2 AND name = $3"
    );
    let update = format!(
        "UPDATE model_artifacts SET attempt_id = $2, file_path = $3, file_size = $4, checksum = $5, epoch = $6,
             step = $7, created_at = $8 WHERE id = $1 RETURNING {COLUMNS}"
    );
    Ok(on_pool!(db, pool => {
        let mut tx = pool.begin_write().await?;
        let inserted = sqlx::query_as::<_, Artifact>(&insert)
            .bind(artifact.id)
            .bind(artifact.job_id)
            .bind(artifact.attempt_id)
            .bind(artifact.artifact_type.as_str())
            .bind(&artifact.name)
            .bind(&artifact.file_path)
            .bind(artifact.file_size)
            .bind(&artifact.mime_type)
            .bind(&artifact.checksum)
            .bind(artifact.epoch)
            .bind(artifact.step)
            .bind(artifact.created_at)
            .fetch_optional(&mut *tx)
            .await?;
        let stored = match inserted {
            Some(new) => Stored::New(new),
            None => {
                let old = sqlx::query_as::<_, Artifact>(&select)
                    .bind(artifact.job_id)
                    .bind(artifact.artifact_type.as_str())
                    .bind(&artifact.name)
                    .fetch_one(&mut *tx)
                    .await?;
                if old.checksum == artifact.checksum {
                    Stored::Existing(old)
                } else {
                    let new = sqlx::query_as::<_, Artifact>(&update)
                        .bind(old.id)
                        .bind(artifact.attempt_id)
                        .bind(&artifact.file_path)
                        .bind(artifact.file_size)
                        .bind(&artifact.checksum)
                        .bind(artifact.epoch)
                        .bind(artifact.step)
                        .bind(artifact.created_at)
                        .fetch_one(&mut *tx)
                        .await?;
                    Stored::Replaced { artifact: new, old_path: old.file_path }
                }
            }
        };
        tx.commit().await?;
        stored
    }))
}

pub async fn for_job(db: &Db, job_id: Uuid) -> Result<Vec<Artifact>, DbError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM model_artifacts WHERE job_id = $1 ORDER BY created_at, name"
    );
    Ok(
        on_pool!(db, pool => sqlx::query_as::<_, Artifact>(&sql).bind(job_id).fetch_all(pool).await)?,
    )
}

pub async fn get(db: &Db, id: Uuid) -> Result<Option<Artifact>, DbError> {
    let sql = format!("SELECT {COLUMNS} FROM model_artifacts WHERE id = $1");
    Ok(
        on_pool!(db, pool => sqlx::query_as::<_, Artifact>(&sql).bind(id).fetch_optional(pool).await)?,
    )
}

/// Counts a download of the artifact's bytes.
pub async fn count_download(db: &Db, id: Uuid, at: DateTime<Utc>) -> Result<(), DbError> {
    on_pool!(db, pool => sqlx::query(
        "UPDATE model_artifacts SET download_count = download_count + 1, last_downloaded_at = $2 WHERE id = $1",
    )
    .bind(id)
    .bind(at)
    .execute(pool)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
}

/// A named secret shared by every replica (created by the first to ask).
pub async fn server_key(db: &Db, name: &str, candidate: &str) -> Result<String, DbError> {
    Ok(on_pool!(db, pool => {
        sqlx::query("INSERT INTO server_keys (name, value, created_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(candidate)
            .bind(super::now())
            .execute(pool)
            .await?;
        let (value,): (String,) = sqlx::query_as("SELECT value FROM server_keys WHERE name = $1")
            .bind(name)
            .fetch_one(pool)
            .await?;
        value
    }))
}
