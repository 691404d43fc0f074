//! Users, their login sessions and API tokens, and agent enrollment tokens.
//! Every token is stored as its SHA-256 hash; the plain value exists only in the response
//! that hands it out.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use uuid::Uuid;

use super::{now, on_pool, Db, DbError};
use crate::domain::{Email, Role};

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct User {
    pub id: Uuid,
    pub email: String,
    #[serde(skip)]
    pub password_hash: String,
    pub display_name: Option<String>,
    pub avatar_url: Option<String>,
    #[sqlx(try_from = "String")]
    #[schema(value_type = Role)]
    pub role: RoleColumn,
    pub organization_id: Option<Uuid>,
    #[schema(value_type = Object)]
    pub preferences: Json<serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `role` as stored; the CHECK constraint guarantees it parses.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(transparent)]
pub struct RoleColumn(pub Role);

impl TryFrom<String> for RoleColumn {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse().map(RoleColumn)
    }
}

impl User {
    pub fn role(&self) -> Role {
        self.role.0
    }
}

/// Replaces a user's preferences (the profile settings object).
pub async fn replace_preferences(
    db: &Db,
    id: Uuid,
    preferences: &serde_json::Value,
) -> Result<Option<User>, DbError> {
    Ok(on_pool!(db, pool => sqlx::query_as::<_, User>(
        "UPDATE users SET preferences = $2, updated_at = $3 WHERE id = $1 RETURNING *",
    )
    .bind(id)
    .bind(Json(preferences))
    .bind(now())
    .fetch_optional(pool)
    .await)?)
}

pub enum TokenKind {
    Session,
    Api,
}

pub async fn create_user(
    db: &Db,
    email: &Email,
    password_hash: &str,
    role: Role,
) -> Result<Option<User>, DbError> {
    let now = now();
    let result = on_pool!(db, pool => sqlx::query_as::<_, User>(
        "INSERT INTO users (id, email, password_hash, display_name, role, preferences, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, '{}', $6, $6)
         ON CONFLICT (email) DO NOTHING
         RETURNING *",
    )
    .bind(Uuid::new_v4())
    .bind(email.as_str())
    .bind(password_hash)
    .bind(email.as_str())
    .bind(role.as_str())
    .bind(now)
    .fetch_optional(pool)
    .await)?;
    Ok(result)
}

pub async fn find_by_email(db: &Db, email: &Email) -> Result<Option<User>, DbError> {
    Ok(
        on_pool!(db, pool => sqlx::query_as::<_, User>("SELECT * FROM users WHERE email = $1")
        .bind(email.as_str())
        .fetch_optional(pool)
        .await)?,
    )
}

pub async fn store_token(
    db: &Db,
    kind: TokenKind,
    user_id: Uuid,
    token_hash: &str,
    expires_at: DateTime<Utc>,
) -> Result<(), DbError> {
    let sql = match kind {
        TokenKind::Session => {
            "INSERT INTO sessions (id, user_id, token_hash, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)"
        }
        TokenKind::Api => {
            "INSERT INTO api_tokens (id, user_id, name, token_hash, created_at, expires_at)
             VALUES ($1, $2, 'login', $3, $4, $5)"
        }
    };
    on_pool!(db, pool => sqlx::query(sql)
        .bind(Uuid::new_v4())
        .bind(user_id)
        .bind(token_hash)
        .bind(now())
        .bind(expires_at)
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
    Ok(())
}

/// The user a live token belongs to.
pub async fn user_for_token(
    db: &Db,
    kind: TokenKind,
    token_hash: &str,
) -> Result<Option<User>, DbError> {
    let sql = match kind {
        TokenKind::Session => {
            "SELECT users.* FROM sessions JOIN users ON users.id = sessions.user_id
             WHERE sessions.token_hash = $1 AND sessions.expires_at > $2"
        }
        TokenKind::Api => {
            "SELECT users.* FROM api_tokens JOIN users ON users.id = api_tokens.user_id
             WHERE api_tokens.token_hash = $1 AND api_tokens.expires_at > $2
               AND api_tokens.revoked_at IS NULL"
        }
    };
    Ok(on_pool!(db, pool => sqlx::query_as::<_, User>(sql)
        .bind(token_hash)
        .bind(now())
        .fetch_optional(pool)
        .await)?)
}

pub async fn revoke_token(db: &Db, kind: TokenKind, token_hash: &str) -> Result<(), DbError> {
    let sql = match kind {
        TokenKind::Session => "DELETE FROM sessions WHERE token_hash = $1",
        TokenKind::Api => {
            "UPDATE api_tokens SET revoked_at = $2 WHERE token_hash = $1 AND revoked_at IS NULL"
        }
    };
    on_pool!(db, pool => sqlx::query(sql).bind(token_hash).bind(now()).execute(pool).await.map(|r| r.rows_affected()))?;
    Ok(())
}

pub async fn create_enrollment_token(
    db: &Db,
    token_hash: &str,
    expires_at: DateTime<Utc>,
) -> Result<Uuid, DbError> {
    let id = Uuid::new_v4();
    on_pool!(db, pool => sqlx::query(
        "INSERT INTO enrollment_tokens (id, token_hash, created_at, expires_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(id)
    .bind(token_hash)
    .bind(now())
    .bind(expires_at)
    .execute(pool)
    .await.map(|r| r.rows_affected()))?;
    Ok(id)
}
