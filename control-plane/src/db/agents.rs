//! GPU hosts enrolled with the control plane.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use uuid::Uuid;

use super::{now, on_pool, Db, DbError};

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Agent {
    pub id: Uuid,
    pub name: String,
    #[schema(value_type = Object)]
    pub labels: Json<serde_json::Value>,
    #[schema(value_type = Vec<Object>)]
    pub gpus: Json<serde_json::Value>,
    #[serde(skip)]
    pub secret_hash: String,
    pub status: String,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub struct NewAgent<'a> {
    pub name: &'a str,
    pub labels: &'a serde_json::Value,
    pub gpus: &'a serde_json::Value,
    pub secret_hash: &'a str,
}

/// Registers an agent if `enrollment_token_hash` names a live enrollment token.
/// Returns `None` when the token is unknown, expired or revoked.
pub async fn register(
    db: &Db,
    enrollment_token_hash: &str,
    agent: NewAgent<'_>,
) -> Result<Option<Agent>, DbError> {
    let now = now();
    let registered = on_pool!(db, pool => {
        let mut tx = pool.begin().await?;
        let token: Option<(Uuid,)> = sqlx::query_as(
            "UPDATE enrollment_tokens SET use_count = use_count + 1
             WHERE token_hash = $1 AND expires_at > $2 AND revoked_at IS NULL
             RETURNING id",
        )
        .bind(enrollment_token_hash)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((token_id,)) = token else { return Ok(None) };
        let agent = sqlx::query_as::<_, Agent>(
            "INSERT INTO agents (id, name, labels, gpus, secret_hash, enrollment_token_id, status,
                                 last_heartbeat_at, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, 'online', $7, $7, $7)
             RETURNING id, name, labels, gpus, secret_hash, status, last_heartbeat_at, created_at, updated_at",
        )
        .bind(Uuid::new_v4())
        .bind(agent.name)
        .bind(Json(agent.labels))
        .bind(Json(agent.gpus))
        .bind(agent.secret_hash)
        .bind(token_id)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        agent
    });
    Ok(Some(registered))
}

pub async fn list(db: &Db) -> Result<Vec<Agent>, DbError> {
    Ok(on_pool!(db, pool => sqlx::query_as::<_, Agent>(
        "SELECT id, name, labels, gpus, secret_hash, status, last_heartbeat_at, created_at, updated_at
         FROM agents ORDER BY name, created_at",
    )
    .fetch_all(pool)
    .await)?)
}
