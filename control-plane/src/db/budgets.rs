//! Budgets (spec §4.2.11) and the alerts they sent. Spend is never stored here: it is
//! summed from the cost records (`db::cost_tracking`) for the period asked.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::{now, on_pool, Db, DbError};
use crate::domain::{BudgetPeriod, BudgetScope, Enforcement};

const COLUMNS: &str =
    "id, user_id, name, amount, period, alert_threshold, alert_enabled, team, project, \
                       cost_center, is_active, scope, enforcement, created_at, updated_at";

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Budget {
    pub id: Uuid,
    /// Its owner; a shared budget's is the admin who keeps it.
    pub user_id: Uuid,
    pub name: String,
    /// Dollars per period.
    pub amount: f64,
    pub period: BudgetPeriod,
    /// Percent of the amount (1–100) at which an alert goes out.
    pub alert_threshold: f64,
    pub alert_enabled: bool,
    pub team: Option<String>,
    pub project: Option<String>,
    pub cost_center: Option<String>,
    pub is_active: bool,
    pub scope: BudgetScope,
    pub enforcement: Enforcement,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A budget's settings, as created or replaced.
pub struct BudgetFields<'a> {
    pub name: &'a str,
    pub amount: f64,
    pub period: BudgetPeriod,
    pub alert_threshold: f64,
    pub alert_enabled: bool,
    pub team: Option<&'a str>,
    pub project: Option<&'a str>,
    pub cost_center: Option<&'a str>,
    pub is_active: bool,
    pub scope: BudgetScope,
    pub enforcement: Enforcement,
}

/// Binds a budget's settings, name to enforcement, in the order both statements list them.
macro_rules! bind_fields {
    ($query:expr, $fields:expr) => {{
        let fields: &BudgetFields<'_> = $fields;
        $query
            .bind(fields.name)
            .bind(fields.amount)
            .bind(fields.period)
            .bind(fields.alert_threshold)
            .bind(fields.alert_enabled)
            .bind(fields.team)
            .bind(fields.project)
            .bind(fields.cost_center)
            .bind(fields.is_active)
            .bind(fields.scope)
            .bind(fields.enforcement)
    }};
}

pub async fn insert(db: &Db, user_id: Uuid, fields: &BudgetFields<'_>) -> Result<Budget, DbError> {
    let sql = format!(
        "INSERT INTO budgets (id, user_id, name, amount, period, alert_threshold, alert_enabled, team, project,
                              cost_center, is_active, scope, enforcement, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $14)
         RETURNING {COLUMNS}"
    );
    Ok(on_pool!(db, pool => {
        let query = sqlx::query_as::<_, Budget>(&sql).bind(Uuid::new_v4()).bind(user_id);
        bind_fields!(query, fields).bind(now()).fetch_one(pool).await
    })?)
}

/// Replaces a budget's settings; `None` when it does not exist.
pub async fn update(
    db: &Db,
    id: Uuid,
    fields: &BudgetFields<'_>,
) -> Result<Option<Budget>, DbError> {
    let sql = format!(
        "UPDATE budgets SET name = $2, amount = $3, period = $4, alert_threshold = $5, alert_enabled = $6,
                team = $7, project = $8, cost_center = $9, is_active = $10, scope = $11, enforcement = $12,
                updated_at = $13
         WHERE id = $1 RETURNING {COLUMNS}"
    );
    Ok(on_pool!(db, pool => {
        let query = sqlx::query_as::<_, Budget>(&sql).bind(id);
        bind_fields!(query, fields).bind(now()).fetch_optional(pool).await
    })?)
}

pub async fn delete(db: &Db, id: Uuid) -> Result<bool, DbError> {
    let deleted = on_pool!(db, pool => sqlx::query("DELETE FROM budgets WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(deleted == 1)
}

/// A budget `user_id` may see: their own, or a shared one.
pub async fn get_visible(db: &Db, id: Uuid, user_id: Uuid) -> Result<Option<Budget>, DbError> {
    let sql =
        format!("SELECT {COLUMNS} FROM budgets WHERE id = $1 AND (user_id = $2 OR scope = $3)");
    Ok(on_pool!(db, pool => sqlx::query_as::<_, Budget>(&sql)
        .bind(id)
        .bind(user_id)
        .bind(BudgetScope::Shared)
        .fetch_optional(pool)
        .await)?)
}

/// Every active budget, everyone's.
pub async fn active(db: &Db) -> Result<Vec<Budget>, DbError> {
    let sql = format!("SELECT {COLUMNS} FROM budgets WHERE is_active ORDER BY created_at");
    Ok(on_pool!(db, pool => sqlx::query_as::<_, Budget>(&sql)
        .fetch_all(pool)
        .await)?)
}

/// The budgets `user_id` sees: their own and the shared ones, by name.
pub async fn list_visible(db: &Db, user_id: Uuid) -> Result<Vec<Budget>, DbError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM budgets WHERE user_id = $1 OR scope = $2 ORDER BY name, created_at"
    );
    Ok(on_pool!(db, pool => sqlx::query_as::<_, Budget>(&sql)
        .bind(user_id)
        .bind(BudgetScope::Shared)
        .fetch_all(pool)
        .await)?)
}

/// The active budgets a job of `owner` with this attribution counts against: the owner's
/// personal budgets and every shared one, whose filters (where set) all match.
pub async fn matching(
    db: &Db,
    owner: Uuid,
    team: Option<&str>,
    project: Option<&str>,
    cost_center: Option<&str>,
) -> Result<Vec<Budget>, DbError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM budgets
         WHERE is_active AND ((scope = $2 AND user_id = $1) OR scope = $3)
           AND (team IS NULL OR team = $4) AND (project IS NULL OR project = $5)
           AND (cost_center IS NULL OR cost_center = $6)
         ORDER BY name"
    );
    Ok(on_pool!(db, pool => sqlx::query_as::<_, Budget>(&sql)
        .bind(owner)
        .bind(BudgetScope::Personal)
        .bind(BudgetScope::Shared)
        .bind(team)
        .bind(project)
        .bind(cost_center)
        .fetch_all(pool)
        .await)?)
}

/// An alert a budget sent: the threshold (percent) its period's spend crossed.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct BudgetAlert {
    pub id: Uuid,
    pub budget_id: Uuid,
    pub period_start: DateTime<Utc>,
    pub threshold: f64,
    pub spend: f64,
    pub amount: f64,
    /// The job whose spend crossed it.
    pub job_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    /// pending, sent or failed; none without a webhook configured.
    pub webhook_status: Option<String>,
    pub webhook_attempts: i64,
    /// The last failed try's reason.
    pub webhook_error: Option<String>,
}

/// Records the alert unless this budget already sent one for this period and threshold;
/// `true` when it is new (and so is to be sent).
pub async fn record_alert(db: &Db, alert: &BudgetAlert) -> Result<bool, DbError> {
    let inserted = on_pool!(db, pool => sqlx::query(
        "INSERT INTO budget_alerts (id, budget_id, period_start, threshold, spend, amount, job_id, created_at,
                                    webhook_status, webhook_attempts)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0)
         ON CONFLICT (budget_id, period_start, threshold) DO NOTHING",
    )
    .bind(alert.id)
    .bind(alert.budget_id)
    .bind(alert.period_start)
    .bind(alert.threshold)
    .bind(alert.spend)
    .bind(alert.amount)
    .bind(alert.job_id)
    .bind(alert.created_at)
    .bind(alert.webhook_status.as_deref())
    .execute(pool)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(inserted == 1)
}

/// What became of an alert's webhook after `attempts` tries.
pub async fn record_webhook_outcome(
    db: &Db,
    alert_id: Uuid,
    status: &str,
    attempts: i64,
    error: Option<&str>,
) -> Result<(), DbError> {
    on_pool!(db, pool => sqlx::query(
        "UPDATE budget_alerts SET webhook_status = $2, webhook_attempts = $3, webhook_error = $4 WHERE id = $1",
    )
    .bind(alert_id)
    .bind(status)
    .bind(attempts)
    .bind(error)
    .execute(pool)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
}

/// The alerts of the given budgets in periods starting at or after `since`, newest first.
pub async fn alerts_since(
    db: &Db,
    budget_ids: &[Uuid],
    since: DateTime<Utc>,
) -> Result<Vec<BudgetAlert>, DbError> {
    if budget_ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(on_pool!(db, pool => {
        let mut query =
            sqlx::QueryBuilder::new("SELECT * FROM budget_alerts WHERE period_start >= ");
        query.push_bind(since).push(" AND budget_id IN (");
        let mut ids = query.separated(", ");
        for id in budget_ids {
            ids.push_bind(*id);
        }
        query.push(") ORDER BY created_at DESC");
        query.build_query_as::<BudgetAlert>().fetch_all(pool).await
    })?)
}
