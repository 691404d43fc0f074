//! Where agents' report batches are committed.
//!
//! SQLite has one write lock: when every batch is its own transaction, concurrent agents
//! queue behind it and each pays its own fsync. On SQLite one writer task therefore takes
//! the batches that are waiting when it is free and commits them together (group commit):
//! each batch in its own savepoint, so a batch that fails leaves the others standing, and
//! each agent is answered only after the commit that holds its batch, so a batch that was
//! acknowledged is stored (the agent's outbox resends anything else). PostgreSQL has no
//! such lock: each batch is one statement, its own transaction.

use std::sync::Arc;

use sqlx::sqlite::SqlitePool;
use tokio::sync::{mpsc, oneshot};

use super::attempts::{
    store_reports_postgres, store_reports_sqlite, AttemptReports, ReportOutcome,
};
use super::{BeginWrite, Db, DbError};
use crate::configuration::DatabaseSettings;

type Reply = oneshot::Sender<Result<ReportOutcome, DbError>>;

#[derive(Clone, Debug)]
pub enum ReportWriter {
    /// Batches go to the writer task.
    Sqlite(mpsc::Sender<(AttemptReports, Reply)>),
    Postgres(sqlx::PgPool),
}

impl ReportWriter {
    /// The writer for `db`; on SQLite it spawns the writer task, which ends when the last
    /// clone of the returned writer is dropped.
    pub fn new(db: &Db, settings: &DatabaseSettings) -> ReportWriter {
        match db {
            Db::Sqlite(pool) => {
                let max = settings.max_batches_per_commit.max(1);
                let (sender, receiver) = mpsc::channel(max * 4);
                tokio::spawn(write_groups(pool.clone(), receiver, max));
                ReportWriter::Sqlite(sender)
            }
            Db::Postgres(pool) => ReportWriter::Postgres(pool.clone()),
        }
    }

    /// Stores the batch; returns once it is committed.
    pub async fn record(&self, batch: AttemptReports) -> Result<ReportOutcome, DbError> {
        match self {
            ReportWriter::Sqlite(sender) => {
                let (reply, answer) = oneshot::channel();
                sender
                    .send((batch, reply))
                    .await
                    .map_err(|_| DbError::WriterGone)?;
                answer.await.map_err(|_| DbError::WriterGone)?
            }
            ReportWriter::Postgres(pool) => Ok(store_reports_postgres(pool, &batch).await?),
        }
    }
}

async fn write_groups(
    pool: SqlitePool,
    mut receiver: mpsc::Receiver<(AttemptReports, Reply)>,
    max_batches: usize,
) {
    let mut group = Vec::with_capacity(max_batches);
    while receiver.recv_many(&mut group, max_batches).await > 0 {
        commit_group(&pool, std::mem::take(&mut group)).await;
    }
}

/// Commits the batches in one transaction and answers each of them.
async fn commit_group(pool: &SqlitePool, group: Vec<(AttemptReports, Reply)>) {
    let mut tx = match pool.begin_write().await {
        Ok(tx) => tx,
        Err(error) => return answer_all(group, error),
    };
    let mut outcomes = Vec::with_capacity(group.len());
    if let [(batch, _)] = group.as_slice() {
        // Alone, a batch needs no savepoint: its failure rolls the transaction back, and
        // its agent hears its own error, as with one.
        outcomes.push(store_reports_sqlite(&mut tx, batch).await);
        if outcomes[0].is_err() {
            drop(tx);
            return answer_each(group, outcomes);
        }
    } else {
        for (batch, _) in &group {
            let stored = async {
                let mut savepoint = sqlx::Acquire::begin(&mut *tx).await?;
                let outcome = store_reports_sqlite(&mut savepoint, batch).await?;
                savepoint.commit().await?;
                Ok::<_, sqlx::Error>(outcome)
            }
            .await;
            outcomes.push(stored);
        }
    }
    if let Err(error) = tx.commit().await {
        return answer_all(group, error);
    }
    answer_each(group, outcomes);
}

fn answer_each(
    group: Vec<(AttemptReports, Reply)>,
    outcomes: Vec<Result<ReportOutcome, sqlx::Error>>,
) {
    for ((_, reply), outcome) in group.into_iter().zip(outcomes) {
        // An agent that hung up resends; its batch is stored either way.
        let _ = reply.send(outcome.map_err(DbError::from));
    }
}

/// The transaction as a whole failed: nothing of the group is stored, and every batch's
/// agent hears so (and resends from its outbox).
fn answer_all(group: Vec<(AttemptReports, Reply)>, error: sqlx::Error) {
    tracing::warn!(%error, batches = group.len(), "a group commit of report batches failed");
    let error = Arc::new(error);
    for (_, reply) in group {
        let _ = reply.send(Err(DbError::GroupCommit(error.clone())));
    }
}
