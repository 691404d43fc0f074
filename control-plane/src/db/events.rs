//! The job event log: every status change and everything agents report.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::QueryBuilder;
use uuid::Uuid;

use super::{on_pool, Db, DbError};
use crate::domain::{EventType, Severity};

#[derive(Debug, Clone, Serialize, serde::Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Event {
    pub id: Uuid,
    pub job_id: Uuid,
    pub attempt_id: Option<Uuid>,
    pub event_type: EventType,
    #[sqlx(try_from = "String")]
    #[schema(value_type = String)]
    pub severity: Severity,
    pub message: String,
    #[schema(value_type = Option<Object>)]
    pub details: Option<Json<serde_json::Value>>,
    pub source: Option<String>,
    #[serde(skip_serializing)]
    #[serde(default)]
    pub idempotency_key: Option<String>,
    pub created_at: DateTime<Utc>,
    /// The order it was stored in (`None` until stored).
    #[serde(skip)]
    #[sqlx(default)]
    pub seq: Option<i64>,
}

impl Event {
    pub fn new(
        job_id: Uuid,
        event_type: EventType,
        severity: Severity,
        message: impl Into<String>,
    ) -> Event {
        Event {
            id: Uuid::new_v4(),
            job_id,
            attempt_id: None,
            event_type,
            severity,
            message: message.into(),
            details: None,
            source: Some("control_plane".to_owned()),
            idempotency_key: None,
            created_at: super::now(),
            seq: None,
        }
    }

    pub fn with_details(mut self, details: serde_json::Value) -> Event {
        self.details = Some(Json(details));
        self
    }
}

/// An `INSERT` of `$event` ready to run on any executor of either backend. An event
/// whose idempotency key the job already has is skipped (zero rows affected).
macro_rules! insert_event {
    ($event:expr) => {{
        let event: &$crate::db::events::Event = $event;
        sqlx::query(
            "INSERT INTO event_logs (id, job_id, attempt_id, event_type, severity, message, details, source,
                                     idempotency_key, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (job_id, idempotency_key) DO NOTHING",
        )
        .bind(event.id)
        .bind(event.job_id)
        .bind(event.attempt_id)
        .bind(event.event_type)
        .bind(event.severity.as_str())
        .bind(&event.message)
        .bind(&event.details)
        .bind(&event.source)
        .bind(&event.idempotency_key)
        .bind(event.created_at)
    }};
}
pub(crate) use insert_event;

pub async fn insert(db: &Db, event: &Event) -> Result<(), DbError> {
    on_pool!(db, pool => insert_event!(event).execute(pool).await.map(|r| r.rows_affected()))?;
    Ok(())
}

#[derive(Debug, Default)]
pub struct EventFilter {
    pub event_type: Option<EventType>,
    pub severity: Option<Severity>,
    pub limit: i64,
    pub offset: i64,
}

/// A job's events, oldest first, and how many match in all.
pub async fn list(
    db: &Db,
    job_id: Uuid,
    filter: &EventFilter,
) -> Result<(Vec<Event>, i64), DbError> {
    fn conditions<'a, DB: sqlx::Database>(
        query: &mut QueryBuilder<'a, DB>,
        job_id: Uuid,
        filter: &EventFilter,
    ) where
        Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
        EventType: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
        &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    {
        query
            .push(" FROM event_logs WHERE job_id = ")
            .push_bind(job_id);
        if let Some(event_type) = filter.event_type {
            query.push(" AND event_type = ").push_bind(event_type);
        }
        if let Some(severity) = filter.severity {
            query.push(" AND severity = ").push_bind(severity.as_str());
        }
    }
    Ok(on_pool!(db, pool => {
        let mut count = QueryBuilder::new("SELECT COUNT(*)");
        conditions(&mut count, job_id, filter);
        let (total,): (i64,) = count.build_query_as().fetch_one(pool).await?;
        let mut select = QueryBuilder::new("SELECT *");
        conditions(&mut select, job_id, filter);
        select
            .push(" ORDER BY created_at, id LIMIT ")
            .push_bind(filter.limit)
            .push(" OFFSET ")
            .push_bind(filter.offset);
        (select.build_query_as::<Event>().fetch_all(pool).await?, total)
    }))
}

/// A job's latest `limit` events, newest first: one read of the rows shown, however long
/// the log.
pub async fn latest(db: &Db, job_id: Uuid, limit: i64) -> Result<Vec<Event>, DbError> {
    Ok(on_pool!(db, pool => sqlx::query_as::<_, Event>(
        "SELECT * FROM event_logs WHERE job_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2",
    )
    .bind(job_id)
    .bind(limit)
    .fetch_all(pool)
    .await)?)
}

/// Up to `limit` of a job's events stored after sequence number `after` (from the start
/// when `None`), in the order they were stored.
pub async fn stored_after(
    db: &Db,
    job_id: Uuid,
    after: Option<i64>,
    limit: i64,
) -> Result<Vec<Event>, DbError> {
    let sql = "SELECT * FROM event_logs WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";
    Ok(on_pool!(db, pool => sqlx::query_as::<_, Event>(sql)
        .bind(job_id)
        .bind(after.unwrap_or(i64::MIN))
        .bind(limit)
        .fetch_all(pool)
        .await)?)
}

/// The sequence number of the job's latest stored event.
pub async fn last_seq(db: &Db, job_id: Uuid) -> Result<Option<i64>, DbError> {
    let sql = "SELECT MAX(seq) FROM event_logs WHERE job_id = $1";
    let (seq,): (Option<i64>,) =
        on_pool!(db, pool => sqlx::query_as(sql).bind(job_id).fetch_one(pool).await)?;
    Ok(seq)
}

/// The sequence number an event was stored with.
pub async fn seq_of(db: &Db, id: Uuid) -> Result<Option<i64>, DbError> {
    let sql = "SELECT seq FROM event_logs WHERE id = $1";
    let row: Option<(Option<i64>,)> =
        on_pool!(db, pool => sqlx::query_as(sql).bind(id).fetch_optional(pool).await)?;
    Ok(row.and_then(|(seq,)| seq))
}
