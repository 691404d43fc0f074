//! Training files (uploaded chat datasets) and the conversations enrichment extracts.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::QueryBuilder;
use uuid::Uuid;

use super::{now, on_pool, BeginWrite, Db, DbError};
use crate::domain::{EnrichmentStatus, JobStatus};

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct TrainingFile {
    pub id: Uuid,
    pub user_id: Uuid,
    pub name: String,
    pub description: Option<String>,
    #[serde(skip)]
    pub file_path: String,
    pub file_size: i64,
    pub mime_type: Option<String>,
    pub file_format: Option<String>,
    pub sha256: String,
    pub conversation_count: i64,
    pub training_pairs_count: i64,
    pub average_quality_score: Option<f64>,
    #[schema(value_type = Object)]
    pub quality_scores: Json<serde_json::Value>,
    #[schema(value_type = Object)]
    pub scaffolding_distribution: Json<serde_json::Value>,
    #[schema(value_type = Object)]
    pub human_review: Json<serde_json::Value>,
    pub status: String,
    pub enrichment_status: EnrichmentStatus,
    pub enrichment_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_enriched_at: Option<DateTime<Utc>>,
    pub deleted_at: Option<DateTime<Utc>>,
    /// The file's tokens, estimated from characters (no tokenizer), in all and as a run at
    /// each usual `max_seq_len` sees them; what cost estimates count.
    #[sqlx(default)]
    #[schema(value_type = Option<crate::domain::estimate::TokenCounts>)]
    pub token_counts: Option<Json<crate::domain::estimate::TokenCounts>>,
}

pub struct NewFile<'a> {
    pub id: Uuid,
    pub user_id: Uuid,
    pub name: &'a str,
    pub description: Option<&'a str>,
    pub file_path: &'a str,
    pub file_size: i64,
    pub mime_type: Option<&'a str>,
    pub sha256: &'a str,
}

pub async fn insert(db: &Db, file: NewFile<'_>) -> Result<TrainingFile, DbError> {
    Ok(on_pool!(db, pool => sqlx::query_as::<_, TrainingFile>(
        "INSERT INTO training_files (id, user_id, name, description, file_path, file_size, mime_type, sha256,
                                     created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)
         RETURNING *",
    )
    .bind(file.id)
    .bind(file.user_id)
    .bind(file.name)
    .bind(file.description)
    .bind(file.file_path)
    .bind(file.file_size)
    .bind(file.mime_type)
    .bind(file.sha256)
    .bind(now())
    .fetch_one(pool)
    .await)?)
}

/// A file its owner can see (not deleted). `None` for anyone else's.
pub async fn get_owned(db: &Db, id: Uuid, user_id: Uuid) -> Result<Option<TrainingFile>, DbError> {
    Ok(on_pool!(db, pool => sqlx::query_as::<_, TrainingFile>(
        "SELECT * FROM training_files WHERE id = $1 AND user_id = $2 AND deleted_at IS NULL",
    )
    .bind(id)
    .bind(user_id)
    .fetch_optional(pool)
    .await)?)
}

pub async fn get(db: &Db, id: Uuid) -> Result<Option<TrainingFile>, DbError> {
    Ok(
        on_pool!(db, pool => sqlx::query_as::<_, TrainingFile>("SELECT * FROM training_files WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await)?,
    )
}

#[derive(Debug, Default)]
pub struct FileFilter {
    pub status: Option<String>,
    pub enrichment_status: Option<String>,
    pub search: Option<String>,
    pub limit: i64,
    pub offset: i64,
}

pub async fn list(
    db: &Db,
    user_id: Uuid,
    filter: &FileFilter,
) -> Result<(Vec<TrainingFile>, i64), DbError> {
    fn conditions<'a, DB: sqlx::Database>(
        query: &mut QueryBuilder<'a, DB>,
        user_id: Uuid,
        filter: &'a FileFilter,
    ) where
        Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
        String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    {
        query
            .push(" FROM training_files WHERE deleted_at IS NULL AND user_id = ")
            .push_bind(user_id);
        if let Some(status) = &filter.status {
            query.push(" AND status = ").push_bind(status.clone());
        }
        if let Some(status) = &filter.enrichment_status {
            query
                .push(" AND enrichment_status = ")
                .push_bind(status.clone());
        }
        if let Some(search) = &filter.search {
            query
                .push(" AND LOWER(name) LIKE ")
                .push_bind(super::contains_pattern(search))
                .push(" ESCAPE '\\'");
        }
    }
    let (rows, total) = on_pool!(db, pool => {
        let mut count = QueryBuilder::new("SELECT COUNT(*)");
        conditions(&mut count, user_id, filter);
        let (total,): (i64,) = count.build_query_as().fetch_one(pool).await?;
        let mut select = QueryBuilder::new("SELECT *");
        conditions(&mut select, user_id, filter);
        select
            .push(" ORDER BY created_at DESC, id LIMIT ")
            .push_bind(filter.limit)
            .push(" OFFSET ")
            .push_bind(filter.offset);
        let rows = select.build_query_as::<TrainingFile>().fetch_all(pool).await?;
        (rows, total)
    });
    Ok((rows, total))
}

/// Soft-deletes a file unless a live job uses it; `Err(job name)` names that job.
pub async fn soft_delete(
    db: &Db,
    id: Uuid,
    user_id: Uuid,
) -> Result<Result<bool, String>, DbError> {
    let live: Vec<JobStatus> = JobStatus::ALL.into_iter().filter(|s| s.is_live()).collect();
    let placeholders = (0..live.len())
        .map(|i| format!("${}", i + 2))
        .collect::<Vec<_>>()
        .join(", ");
    let blocking_sql = format!(
        "SELECT name FROM training_jobs WHERE training_file_id = $1 AND status IN ({placeholders}) LIMIT 1"
    );
    let outcome = on_pool!(db, pool => {
        let mut tx = pool.begin_write().await?;
        let mut blocking = sqlx::query_as::<_, (String,)>(&blocking_sql).bind(id);
        for status in &live {
            blocking = blocking.bind(*status);
        }
        let blocking = blocking.fetch_optional(&mut *tx).await?;
        if let Some((job,)) = blocking {
            return Ok(Err(job));
        }
        let now = now();
        let deleted = sqlx::query(
            "UPDATE training_files SET deleted_at = $3, status = 'deleted'
             WHERE id = $1 AND user_id = $2 AND deleted_at IS NULL",
        )
        .bind(id)
        .bind(user_id)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        deleted == 1
    });
    Ok(Ok(outcome))
}

/// Claims a file for enrichment: a pending one, or one whose enrichment stopped
/// heartbeating before `stale_before` (its server died). Returns the claim's token, `None`
/// if someone else has it. Conversations an earlier run left behind are removed.
pub async fn claim_for_enrichment(
    db: &Db,
    id: Uuid,
    stale_before: DateTime<Utc>,
) -> Result<Option<Uuid>, DbError> {
    let token = Uuid::new_v4();
    let claimed = on_pool!(db, pool => {
        let mut tx = pool.begin_write().await?;
        let claimed = sqlx::query(
            "UPDATE training_files SET enrichment_status = $5, updated_at = $3, enrichment_claim = $6
             WHERE id = $1 AND deleted_at IS NULL
               AND (enrichment_status = $4 OR (enrichment_status = $5 AND updated_at < $2))",
        )
        .bind(id)
        .bind(stale_before)
        .bind(now())
        .bind(EnrichmentStatus::Pending)
        .bind(EnrichmentStatus::Processing)
        .bind(token)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if claimed == 1 {
            sqlx::query("DELETE FROM conversations WHERE training_file_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        claimed
    });
    Ok((claimed == 1).then_some(token))
}

/// Tells other replicas this run's enrichment is alive; `false` once another run took
/// the file over (this one then stops).
pub async fn enrichment_heartbeat(db: &Db, id: Uuid, claim: Uuid) -> Result<bool, DbError> {
    let touched = on_pool!(db, pool => sqlx::query(
        "UPDATE training_files SET updated_at = $2 WHERE id = $1 AND enrichment_status = $3 AND enrichment_claim = $4",
    )
    .bind(id)
    .bind(now())
    .bind(EnrichmentStatus::Processing)
    .bind(claim)
    .execute(pool)
    .await.map(|r| r.rows_affected()))?;
    Ok(touched == 1)
}

/// Files waiting for enrichment, and those whose enrichment was abandoned.
pub async fn enrichment_backlog(
    db: &Db,
    stale_before: DateTime<Utc>,
) -> Result<Vec<Uuid>, DbError> {
    let rows: Vec<(Uuid,)> = on_pool!(db, pool => sqlx::query_as(
        "SELECT id FROM training_files
         WHERE deleted_at IS NULL
           AND (enrichment_status = $2 OR (enrichment_status = $3 AND updated_at < $1))
         ORDER BY created_at",
    )
    .bind(stale_before)
    .bind(EnrichmentStatus::Pending)
    .bind(EnrichmentStatus::Processing)
    .fetch_all(pool)
    .await)?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

pub struct EnrichmentResult {
    pub file_format: String,
    /// What the run read, for its log; the count stored is the rows the run kept.
    pub conversation_count: i64,
    pub training_pairs_count: i64,
    pub average_quality_score: Option<f64>,
    pub quality_scores: serde_json::Value,
    pub scaffolding_distribution: serde_json::Value,
    pub human_review: serde_json::Value,
    pub token_counts: crate::domain::estimate::TokenCounts,
}

/// Completes the file for the run holding `claim`: rows other runs stored are removed and
/// the count written is the rows this run stored, in one transaction. `false` (nothing
/// written) when another run holds the file now.
pub async fn finish_enrichment(
    db: &Db,
    id: Uuid,
    claim: Uuid,
    result: &EnrichmentResult,
) -> Result<bool, DbError> {
    Ok(on_pool!(db, pool => {
        let mut tx = pool.begin_write().await?;
        sqlx::query(
            "DELETE FROM conversations WHERE training_file_id = $1
               AND (enrichment_claim IS NULL OR enrichment_claim != $2)",
        )
        .bind(id)
        .bind(claim)
        .execute(&mut *tx)
        .await?;
        let finished = sqlx::query(
            "UPDATE training_files SET enrichment_status = $10, enrichment_error = NULL, file_format = $2,
                 conversation_count = (SELECT COUNT(*) FROM conversations WHERE training_file_id = $1),
                 training_pairs_count = $4, average_quality_score = $5,
                 quality_scores = $6, scaffolding_distribution = $7, human_review = $8, last_enriched_at = $9,
                 token_counts = $12
             WHERE id = $1 AND enrichment_status = $11 AND enrichment_claim = $3",
        )
        .bind(id)
        .bind(&result.file_format)
        .bind(claim)
        .bind(result.training_pairs_count)
        .bind(result.average_quality_score)
        .bind(Json(&result.quality_scores))
        .bind(Json(&result.scaffolding_distribution))
        .bind(Json(&result.human_review))
        .bind(now())
        .bind(EnrichmentStatus::Completed)
        .bind(EnrichmentStatus::Processing)
        .bind(Json(&result.token_counts))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if finished == 1 {
            tx.commit().await?;
        }
        finished == 1
    }))
}

/// Marks enrichment failed for the run holding `claim` and drops any conversations stored
/// before the failure was known. Nothing changes once another run holds the file.
pub async fn fail_enrichment(
    db: &Db,
    id: Uuid,
    claim: Uuid,
    format: Option<&str>,
    error: &str,
) -> Result<(), DbError> {
    on_pool!(db, pool => {
        let mut tx = pool.begin_write().await?;
        let failed = sqlx::query(
            "UPDATE training_files SET enrichment_status = $5, enrichment_error = $2, file_format = $3,
                 conversation_count = 0, training_pairs_count = 0, last_enriched_at = $4
             WHERE id = $1 AND enrichment_claim = $6",
        )
        .bind(id)
        .bind(error)
        .bind(format)
        .bind(now())
        .bind(EnrichmentStatus::Failed)
        .bind(claim)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if failed == 1 {
            sqlx::query("DELETE FROM conversations WHERE training_file_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
    });
    Ok(())
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct StoredConversation {
    pub id: Uuid,
    pub training_file_id: Uuid,
    pub line_number: i64,
    pub persona: Option<String>,
    pub emotional_arc: Option<String>,
    pub topic: Option<String>,
    pub quality_score: Option<f64>,
    pub human_reviewed: Option<bool>,
    /// The chat's messages; empty for a text record.
    #[schema(value_type = Vec<Object>)]
    pub messages: Json<serde_json::Value>,
    /// The tool definitions the chat may call.
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Json<serde_json::Value>>,
    /// A text record's text, trained on every token.
    pub text: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Json<serde_json::Value>>,
    pub created_at: DateTime<Utc>,
}

pub struct NewConversation {
    pub line_number: i64,
    pub persona: Option<String>,
    pub emotional_arc: Option<String>,
    pub topic: Option<String>,
    pub quality_score: Option<f64>,
    pub human_reviewed: Option<bool>,
    pub messages: Vec<protocol::dataset::Message>,
    pub tools: Option<Vec<serde_json::Value>>,
    pub text: Option<String>,
    pub metadata: Option<serde_json::Value>,
    /// Estimated (`domain::estimate::estimated_tokens`).
    pub token_count: i64,
}

/// Stores a batch of conversations for the enrichment run holding `claim`, in one
/// statement. Values are bound by reference: each message list is serialised once,
/// straight into the statement.
pub async fn insert_conversations(
    db: &Db,
    file_id: Uuid,
    claim: Uuid,
    batch: &[NewConversation],
) -> Result<(), DbError> {
    if batch.is_empty() {
        return Ok(());
    }
    let now = now();
    on_pool!(db, pool => {
        let mut query = QueryBuilder::new(
            "INSERT INTO conversations (id, training_file_id, line_number, persona, emotional_arc, topic,
                                        quality_score, human_reviewed, messages, tools, text, metadata,
                                        created_at, enrichment_claim, token_count) ",
        );
        query.push_values(batch, |mut row, c| {
            // Time-ordered ids: each batch appends to the primary key's B-tree instead of
            // touching pages all over it (random v4 ids cost SQLite a page read per row).
            row.push_bind(Uuid::now_v7())
                .push_bind(file_id)
                .push_bind(c.line_number)
                .push_bind(c.persona.as_deref())
                .push_bind(c.emotional_arc.as_deref())
                .push_bind(c.topic.as_deref())
                .push_bind(c.quality_score)
                .push_bind(c.human_reviewed)
                .push_bind(Json(&c.messages))
                .push_bind(c.tools.as_ref().map(Json))
                .push_bind(c.text.as_deref())
                .push_bind(c.metadata.as_ref().map(Json))
                .push_bind(now)
                .push_bind(claim)
                .push_bind(c.token_count);
        });
        query.build().execute(pool).await?;
    });
    Ok(())
}

pub async fn conversations(
    db: &Db,
    file_id: Uuid,
    quality_min: Option<f64>,
    limit: i64,
) -> Result<Vec<StoredConversation>, DbError> {
    Ok(
        on_pool!(db, pool => sqlx::query_as::<_, StoredConversation>(
        "SELECT * FROM conversations
         WHERE training_file_id = $1 AND ($2 IS NULL OR quality_score >= $2)
         ORDER BY quality_score IS NULL, quality_score DESC, line_number
         LIMIT $3",
    )
    .bind(file_id)
    .bind(quality_min)
    .bind(limit)
    .fetch_all(pool)
    .await)?,
    )
}
