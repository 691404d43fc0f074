//! The storage layer: one set of queries run on SQLite or PostgreSQL.
//!
//! Queries are written once in the dialect both accept (`$n` placeholders, values computed
//! in Rust rather than with backend functions) and run on either pool through [`on_pool!`].

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::configuration::{DatabaseSettings, SqliteSynchronous};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

pub mod agents;
pub mod artifacts;
pub mod attempts;
pub mod budget_requests;
pub mod budgets;
pub mod cost_tracking;
pub mod events;
pub mod files;
pub mod gauges;
pub mod job_templates;
pub mod jobs;
pub mod metrics;
pub mod presets;
pub mod report_writer;
mod sqlite_rebuild;
pub mod users;
pub mod validations;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The transaction of a group commit failed; every batch in it shares the error.
    #[error("the group commit failed: {0}")]
    GroupCommit(std::sync::Arc<sqlx::Error>),
    #[error("the report writer has stopped")]
    WriterGone,
    #[error("unsupported database URL {0:?}: expected postgres://… or sqlite://…")]
    UnsupportedUrl(String),
    /// A table rebuild after the migrations would have broken references.
    #[error("rebuilding {0}")]
    Rebuild(String),
}

impl DbError {
    /// PostgreSQL refuses text holding NUL (`\u0000`), in TEXT (SQLSTATE 22021) and JSONB
    /// (22P05) columns alike: the input's fault, whichever field carried it.
    pub fn is_unstorable_text(&self) -> bool {
        matches!(self, DbError::Sqlx(sqlx::Error::Database(error))
            if matches!(error.code().as_deref(), Some("22021" | "22P05")))
    }
}

#[derive(Clone, Debug)]
pub enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to whichever pool `$db` holds.
macro_rules! on_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::db::Db::Sqlite($pool) => $body,
            $crate::db::Db::Postgres($pool) => $body,
        }
    };
}
pub(crate) use on_pool;

/// Begins a transaction that writes. On SQLite it takes the write lock at its start
/// (`BEGIN IMMEDIATE`): a deferred transaction that reads and then writes cannot wait for
/// another writer (SQLite answers "database is locked" at once, `busy_timeout` or not),
/// while an immediate one waits up to `busy_timeout`. PostgreSQL needs no such hint.
pub(crate) trait BeginWrite {
    type Database: sqlx::Database;

    fn begin_write(
        &self,
    ) -> impl std::future::Future<
        Output = Result<sqlx::Transaction<'static, Self::Database>, sqlx::Error>,
    > + Send;
}

impl BeginWrite for SqlitePool {
    type Database = sqlx::Sqlite;

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.begin_with("BEGIN IMMEDIATE").await
    }
}

impl BeginWrite for PgPool {
    type Database = sqlx::Postgres;

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        self.begin().await
    }
}

/// A case-insensitive `LIKE … ESCAPE '\'` pattern matching names that contain `search`
/// literally: its `%`, `_` and `\` match themselves, not anything.
pub fn contains_pattern(search: &str) -> String {
    let mut pattern = String::from("%");
    for c in search.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

/// Timestamps are kept to the microsecond, the precision PostgreSQL stores, so a value
/// reads back equal on both backends.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// How long a PostgreSQL connection may sit idle before it is pinged when next used.
const IDLE_BEFORE_PING: Duration = Duration::from_secs(30);

impl Db {
    /// Connects with the default [`DatabaseSettings`].
    pub async fn connect(url: &str) -> Result<Db, DbError> {
        Db::connect_with(url, &DatabaseSettings::default()).await
    }

    pub async fn connect_with(url: &str, settings: &DatabaseSettings) -> Result<Db, DbError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(10))
                // sqlx pings every connection it hands out, a round trip per statement
                // run on the pool; only one idle long enough to have been dropped (a
                // server restart, a proxy's idle timeout) is worth asking.
                .test_before_acquire(false)
                .before_acquire(|connection, meta| {
                    Box::pin(async move {
                        if meta.idle_for >= IDLE_BEFORE_PING {
                            sqlx::Connection::ping(connection).await?;
                        }
                        Ok(true)
                    })
                })
                .connect(url)
                .await?;
            Ok(Db::Postgres(pool))
        } else if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(match settings.sqlite_synchronous {
                    SqliteSynchronous::Full => sqlx::sqlite::SqliteSynchronous::Full,
                    SqliteSynchronous::Normal => sqlx::sqlite::SqliteSynchronous::Normal,
                })
                .foreign_keys(true)
                .busy_timeout(Duration::from_secs(10))
                // Rows a query's worker thread reads ahead of its reader (default 50):
                // a long history streams with one thread switch per 1,000 rows, not per 50.
                .row_buffer_size(1_000)
                // Reads through a memory map and a 16 MiB page cache per connection
                // (default 2 MiB): reports over many records read their pages from memory
                // instead of a system call each (a 10,000-record report: 100 → 18 ms).
                .pragma("mmap_size", "268435456")
                .pragma("cache_size", "-16384");
            let pool = SqlitePoolOptions::new()
                .max_connections(8)
                // An in-process connection does not drop; sqlx's ping before each use
                // would only cost a trip to its worker thread.
                .test_before_acquire(false)
                .connect_with(options)
                .await?;
            Ok(Db::Sqlite(pool))
        } else {
            Err(DbError::UnsupportedUrl(url.to_owned()))
        }
    }

    pub async fn migrate(&self) -> Result<(), DbError> {
        match self {
            Db::Sqlite(pool) => {
                sqlx::migrate!("../migrations/sqlite").run(pool).await?;
                sqlite_rebuild::run(pool).await?;
            }
            Db::Postgres(pool) => sqlx::migrate!("../migrations/postgres").run(pool).await?,
        }
        Ok(())
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    pub async fn ping(&self) -> Result<(), DbError> {
        on_pool!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    pub async fn close(&self) {
        on_pool!(self, pool => pool.close().await)
    }
}
