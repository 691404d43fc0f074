//! Hyperparameter presets: the three system presets of spec §4.4 and users' own.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use uuid::Uuid;

use super::{now, on_pool, Db, DbError};
use crate::domain::RecoveryPolicy;

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Preset {
    pub id: Uuid,
    pub name: String,
    pub description: Option<String>,
    pub icon: Option<String>,
    pub is_system: bool,
    #[schema(value_type = Object)]
    pub parameters: Json<serde_json::Map<String, serde_json::Value>>,
    #[schema(value_type = Estimates)]
    pub estimates: Json<Estimates>,
    pub risk_level: String,
    pub success_rate: Option<f64>,
    pub completed_jobs: i64,
    pub requires_completed_jobs: i64,
    #[schema(value_type = Vec<String>)]
    pub recommended_for: Json<Vec<String>>,
    /// The recovery policy jobs on this preset start with (none: the defaults).
    #[schema(value_type = Option<RecoveryPolicy>)]
    pub recovery: Option<Json<RecoveryPolicy>>,
    pub created_by: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A preset's duration and cost ranges for a 200-conversation dataset (spec §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Estimates {
    pub duration_hours_min: f64,
    pub duration_hours_max: f64,
    pub cost_spot_min: f64,
    pub cost_spot_max: f64,
    pub cost_ondemand_min: f64,
    pub cost_ondemand_max: f64,
}

/// The preset the estimates fall back on when a job names none.
pub const BALANCED_PRESET_ID: Uuid = Uuid::from_u128(0x00000000_0000_4000_8000_000000000002);

/// System presets and the user's own.
pub async fn visible_to(db: &Db, user_id: Uuid) -> Result<Vec<Preset>, DbError> {
    Ok(on_pool!(db, pool => sqlx::query_as::<_, Preset>(
        "SELECT * FROM hyperparameter_presets WHERE is_system OR created_by = $1
         ORDER BY is_system DESC, CASE risk_level WHEN 'low' THEN 0 WHEN 'medium' THEN 1 ELSE 2 END, created_at, name",
    )
    .bind(user_id)
    .fetch_all(pool)
    .await)?)
}

pub async fn get_visible(db: &Db, id: Uuid, user_id: Uuid) -> Result<Option<Preset>, DbError> {
    Ok(on_pool!(db, pool => sqlx::query_as::<_, Preset>(
        "SELECT * FROM hyperparameter_presets WHERE id = $1 AND (is_system OR created_by = $2)",
    )
    .bind(id)
    .bind(user_id)
    .fetch_optional(pool)
    .await)?)
}

pub struct NewPreset<'a> {
    pub name: &'a str,
    pub description: Option<&'a str>,
    pub icon: Option<&'a str>,
    pub parameters: &'a serde_json::Value,
    pub estimates: &'a Estimates,
    pub risk_level: &'a str,
    pub recommended_for: &'a [String],
    pub recovery: Option<RecoveryPolicy>,
}

pub async fn create(db: &Db, user_id: Uuid, preset: NewPreset<'_>) -> Result<Preset, DbError> {
    Ok(on_pool!(db, pool => sqlx::query_as::<_, Preset>(
        "INSERT INTO hyperparameter_presets (id, name, description, icon, is_system, parameters, estimates,
             risk_level, recommended_for, created_by, created_at, updated_at, recovery)
         VALUES ($1, $2, $3, $4, false, $5, $6, $7, $8, $9, $10, $10, $11)
         RETURNING *",
    )
    .bind(Uuid::new_v4())
    .bind(preset.name)
    .bind(preset.description)
    .bind(preset.icon)
    .bind(Json(preset.parameters))
    .bind(Json(preset.estimates))
    .bind(preset.risk_level)
    .bind(Json(preset.recommended_for))
    .bind(user_id)
    .bind(now())
    .bind(preset.recovery.map(Json))
    .fetch_one(pool)
    .await)?)
}

/// Jobs the user has completed, for presets' `requires_completed_jobs` rule.
pub async fn completed_jobs_of(db: &Db, user_id: Uuid) -> Result<i64, DbError> {
    let (count,): (i64,) = on_pool!(db, pool => sqlx::query_as(
        "SELECT COUNT(*) FROM training_jobs WHERE user_id = $1 AND status = $2",
    )
    .bind(user_id)
    .bind(crate::domain::JobStatus::Completed)
    .fetch_one(pool)
    .await)?;
    Ok(count)
}
