//! GPU hosts enrolled with the control plane.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use uuid::Uuid;

use super::{now, on_pool, BeginWrite, Db, DbError};
use crate::domain::AgentStatus;

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
    pub status: AgentStatus,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// `spot` or `ondemand`.
    pub capacity: String,
    /// Host telemetry from the latest heartbeat.
    #[schema(value_type = Object)]
    pub host: Json<serde_json::Value>,
    pub current_attempt_id: Option<Uuid>,
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
        let mut tx = pool.begin_write().await?;
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
             VALUES ($1, $2, $3, $4, $5, $6, $8, $7, $7, $7)
             RETURNING id, name, labels, gpus, secret_hash, status, last_heartbeat_at, created_at, updated_at,
                       capacity, host, current_attempt_id",
        )
        .bind(Uuid::new_v4())
        .bind(agent.name)
        .bind(Json(agent.labels))
        .bind(Json(agent.gpus))
        .bind(agent.secret_hash)
        .bind(token_id)
        .bind(now)
        .bind(AgentStatus::Online)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        agent
    });
    Ok(Some(registered))
}

pub async fn list(db: &Db) -> Result<Vec<Agent>, DbError> {
    let sql = format!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY name, created_at");
    Ok(on_pool!(db, pool => sqlx::query_as::<_, Agent>(&sql).fetch_all(pool).await)?)
}

const AGENT_COLUMNS: &str =
    "id, name, labels, gpus, secret_hash, status, last_heartbeat_at, created_at, updated_at, capacity, host, current_attempt_id";

/// The agent holding this secret.
pub async fn authenticate(db: &Db, secret_hash: &str) -> Result<Option<Agent>, DbError> {
    let sql = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE secret_hash = $1");
    Ok(on_pool!(db, pool => sqlx::query_as::<_, Agent>(&sql)
        .bind(secret_hash)
        .fetch_optional(pool)
        .await)?)
}

/// Stores a heartbeat: the agent's latest state (back online unless draining) and one
/// row of history; history older than `retain_since` is dropped.
pub async fn heartbeat(
    db: &Db,
    agent_id: Uuid,
    beat: &protocol::agent::Heartbeat,
    retain_since: DateTime<Utc>,
) -> Result<Agent, DbError> {
    let now = now();
    let gpus = serde_json::to_value(&beat.gpus).unwrap_or_default();
    let host = serde_json::to_value(&beat.host).unwrap_or_default();
    let labels = serde_json::to_value(&beat.labels).unwrap_or_default();
    let capacity = match beat.capacity {
        protocol::agent::Capacity::Spot => "spot",
        protocol::agent::Capacity::Ondemand => "ondemand",
    };
    let sql = format!(
        "UPDATE agents SET gpus = $2, host = $3, labels = $4, capacity = $5, last_heartbeat_at = $6, updated_at = $6,
             status = CASE WHEN status = $7 THEN status ELSE $8 END
         WHERE id = $1 RETURNING {AGENT_COLUMNS}"
    );
    Ok(on_pool!(db, pool => {
        let mut tx = pool.begin_write().await?;
        let agent = sqlx::query_as::<_, Agent>(&sql)
            .bind(agent_id)
            .bind(Json(&gpus))
            .bind(Json(&host))
            .bind(Json(&labels))
            .bind(capacity)
            .bind(now)
            .bind(AgentStatus::Draining)
            .bind(AgentStatus::Online)
            .fetch_one(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO agent_telemetry (id, agent_id, gpus, host, recorded_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(Uuid::new_v4())
            .bind(agent_id)
            .bind(Json(&gpus))
            .bind(Json(&host))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM agent_telemetry WHERE agent_id = $1 AND recorded_at < $2")
            .bind(agent_id)
            .bind(retain_since)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        agent
    }))
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct TelemetryPoint {
    #[schema(value_type = Vec<Object>)]
    pub gpus: Json<serde_json::Value>,
    #[schema(value_type = Object)]
    pub host: Json<serde_json::Value>,
    pub recorded_at: DateTime<Utc>,
}

/// An agent's recent heartbeats, oldest first.
pub async fn telemetry(
    db: &Db,
    agent_id: Uuid,
    limit: i64,
) -> Result<Vec<TelemetryPoint>, DbError> {
    let mut points: Vec<TelemetryPoint> = on_pool!(db, pool => sqlx::query_as::<_, TelemetryPoint>(
        "SELECT gpus, host, recorded_at FROM agent_telemetry WHERE agent_id = $1 ORDER BY recorded_at DESC LIMIT $2",
    )
    .bind(agent_id)
    .bind(limit)
    .fetch_all(pool)
    .await)?;
    points.reverse();
    Ok(points)
}
