//! Reusable job configurations (spec §5.9).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use uuid::Uuid;

use super::{now, on_pool, Db, DbError};
use crate::domain::{Attribution, GpuType, RecoveryPolicy};

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Template {
    pub id: Uuid,
    pub user_id: Uuid,
    pub name: String,
    pub description: Option<String>,
    pub icon: Option<String>,
    pub preset_id: Option<Uuid>,
    #[schema(value_type = Option<Object>)]
    pub hyperparameters: Option<Json<serde_json::Map<String, serde_json::Value>>>,
    pub gpu_type: Option<GpuType>,
    pub gpu_model: Option<String>,
    pub base_model: Option<String>,
    pub source_job_id: Option<Uuid>,
    pub use_count: i64,
    pub success_rate: Option<f64>,
    pub avg_cost: Option<f64>,
    pub avg_duration_hours: Option<f64>,
    pub is_public: bool,
    /// The recovery policy jobs from this template get (none: the preset's or the defaults).
    #[schema(value_type = Option<RecoveryPolicy>)]
    pub recovery: Option<Json<RecoveryPolicy>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The attribution jobs from this template get.
    pub team: Option<String>,
    pub project: Option<String>,
    pub cost_center: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub tags: Option<Json<serde_json::Map<String, serde_json::Value>>>,
}

pub struct NewTemplate<'a> {
    pub name: &'a str,
    pub description: Option<&'a str>,
    pub icon: Option<&'a str>,
    pub preset_id: Option<Uuid>,
    pub hyperparameters: Option<&'a serde_json::Map<String, serde_json::Value>>,
    pub gpu_type: Option<GpuType>,
    pub gpu_model: Option<&'a str>,
    pub base_model: Option<&'a str>,
    pub source_job_id: Option<Uuid>,
    pub is_public: bool,
    pub recovery: Option<RecoveryPolicy>,
    pub attribution: &'a Attribution,
}

pub async fn create(
    db: &Db,
    user_id: Uuid,
    template: NewTemplate<'_>,
) -> Result<Template, DbError> {
    Ok(on_pool!(db, pool => sqlx::query_as::<_, Template>(
        "INSERT INTO job_templates (id, user_id, name, description, icon, preset_id, hyperparameters, gpu_type,
             gpu_model, base_model, source_job_id, is_public, created_at, updated_at, recovery, team, project,
             cost_center, tags)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $13, $14, $15, $16, $17, $18)
         RETURNING *",
    )
    .bind(Uuid::new_v4())
    .bind(user_id)
    .bind(template.name)
    .bind(template.description)
    .bind(template.icon)
    .bind(template.preset_id)
    .bind(template.hyperparameters.map(Json))
    .bind(template.gpu_type)
    .bind(template.gpu_model)
    .bind(template.base_model)
    .bind(template.source_job_id)
    .bind(template.is_public)
    .bind(now())
    .bind(template.recovery.map(Json))
    .bind(template.attribution.team.as_deref())
    .bind(template.attribution.project.as_deref())
    .bind(template.attribution.cost_center.as_deref())
    .bind(template.attribution.tags.as_ref().map(Json))
    .fetch_one(pool)
    .await)?)
}

/// The user's own templates and everyone's public ones.
pub async fn visible_to(
    db: &Db,
    user_id: Uuid,
    is_public: Option<bool>,
    search: Option<&str>,
) -> Result<Vec<Template>, DbError> {
    let pattern = search.map(super::contains_pattern);
    Ok(on_pool!(db, pool => sqlx::query_as::<_, Template>(
        "SELECT * FROM job_templates
         WHERE (user_id = $1 OR is_public) AND ($2 IS NULL OR is_public = $2) AND ($3 IS NULL OR LOWER(name) LIKE $3 ESCAPE '\\')
         ORDER BY use_count DESC, created_at DESC",
    )
    .bind(user_id)
    .bind(is_public)
    .bind(pattern)
    .fetch_all(pool)
    .await)?)
}

pub async fn get_visible(db: &Db, id: Uuid, user_id: Uuid) -> Result<Option<Template>, DbError> {
    Ok(on_pool!(db, pool => sqlx::query_as::<_, Template>(
        "SELECT * FROM job_templates WHERE id = $1 AND (user_id = $2 OR is_public)",
    )
    .bind(id)
    .bind(user_id)
    .fetch_optional(pool)
    .await)?)
}

pub async fn count_use(db: &Db, id: Uuid) -> Result<(), DbError> {
    on_pool!(db, pool => sqlx::query("UPDATE job_templates SET use_count = use_count + 1 WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
    Ok(())
}
