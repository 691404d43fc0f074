//! Budget increase requests (spec §4.2.11): asked for by someone who counts against a
//! budget, decided by an admin. Each row records who asked, for what and why, and who
//! decided, when and with what note.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::{now, on_pool, BeginWrite, Db, DbError};
use crate::domain::RequestStatus;

const COLUMNS: &str = "r.id, r.budget_id, b.name AS budget_name, r.requested_by, \
     u.email AS requested_by_email, r.current_amount, r.requested_amount, r.reason, r.status, \
     r.decided_by, r.decided_at, r.decision_note, r.created_at";
const FROM: &str = "FROM budget_increase_requests r JOIN budgets b ON b.id = r.budget_id \
     JOIN users u ON u.id = r.requested_by";

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct IncreaseRequest {
    pub id: Uuid,
    pub budget_id: Uuid,
    pub budget_name: String,
    pub requested_by: Uuid,
    pub requested_by_email: String,
    /// The budget's amount when it was asked.
    pub current_amount: f64,
    pub requested_amount: f64,
    pub reason: String,
    pub status: RequestStatus,
    pub decided_by: Option<Uuid>,
    pub decided_at: Option<DateTime<Utc>>,
    pub decision_note: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// What a new request asks.
pub struct NewRequest<'a> {
    pub budget_id: Uuid,
    pub requested_by: Uuid,
    pub current_amount: f64,
    pub requested_amount: f64,
    pub reason: &'a str,
}

pub async fn insert(db: &Db, request: &NewRequest<'_>) -> Result<IncreaseRequest, DbError> {
    let id = Uuid::new_v4();
    on_pool!(db, pool => sqlx::query(
        "INSERT INTO budget_increase_requests (id, budget_id, requested_by, current_amount,
                                               requested_amount, reason, status, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(id)
    .bind(request.budget_id)
    .bind(request.requested_by)
    .bind(request.current_amount)
    .bind(request.requested_amount)
    .bind(request.reason)
    .bind(RequestStatus::Pending)
    .bind(now())
    .execute(pool)
    .await
    .map(|_| ()))?;
    get(db, id)
        .await?
        .ok_or(DbError::Sqlx(sqlx::Error::RowNotFound))
}

pub async fn get(db: &Db, id: Uuid) -> Result<Option<IncreaseRequest>, DbError> {
    let sql = format!("SELECT {COLUMNS} {FROM} WHERE r.id = $1");
    Ok(
        on_pool!(db, pool => sqlx::query_as::<_, IncreaseRequest>(&sql)
        .bind(id)
        .fetch_optional(pool)
        .await)?,
    )
}

/// Requests newest first: those `requested_by` made (everyone's when `None`), with
/// `status` when given; at most `limit`.
pub async fn list(
    db: &Db,
    requested_by: Option<Uuid>,
    status: Option<RequestStatus>,
    limit: i64,
) -> Result<Vec<IncreaseRequest>, DbError> {
    let sql = format!(
        "SELECT {COLUMNS} {FROM}
         WHERE ($1 IS NULL OR r.requested_by = $1) AND ($2 IS NULL OR r.status = $2)
         ORDER BY r.created_at DESC LIMIT $3"
    );
    Ok(
        on_pool!(db, pool => sqlx::query_as::<_, IncreaseRequest>(&sql)
        .bind(requested_by)
        .bind(status)
        .bind(limit)
        .fetch_all(pool)
        .await)?,
    )
}

/// Decides a pending request; an approval sets the budget's amount to the one asked, in
/// the same transaction. `false` when it was no longer pending (decided by someone else).
pub async fn decide(
    db: &Db,
    id: Uuid,
    status: RequestStatus,
    decided_by: Uuid,
    note: Option<&str>,
) -> Result<bool, DbError> {
    let at = now();
    Ok(on_pool!(db, pool => {
        let mut tx = pool.begin_write().await?;
        let decided: Option<(Uuid, f64)> = sqlx::query_as(
            "UPDATE budget_increase_requests SET status = $2, decided_by = $3, decided_at = $4,
                 decision_note = $5
             WHERE id = $1 AND status = $6 RETURNING budget_id, requested_amount",
        )
        .bind(id)
        .bind(status)
        .bind(decided_by)
        .bind(at)
        .bind(note)
        .bind(RequestStatus::Pending)
        .fetch_optional(&mut *tx)
        .await?;
        if let (Some((budget_id, amount)), RequestStatus::Approved) = (decided, status) {
            sqlx::query("UPDATE budgets SET amount = $2, updated_at = $3 WHERE id = $1")
                .bind(budget_id)
                .bind(amount)
                .bind(at)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        decided.is_some()
    }))
}
