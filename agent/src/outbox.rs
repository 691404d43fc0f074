//! A durable outbox per attempt: every report is appended to `<attempt>.jsonl` (synced)
//! before it is sent, and `<attempt>.acked` records how many lines the control plane has
//! taken. An outage, or a restart of the agent, loses nothing; items sent twice carry the
//! same key and are stored once.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use protocol::agent::{Report, ReportBatch};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::client::{Backoff, ControlPlane};
use crate::error::{AgentError, Result};

const BATCH: usize = 200;

struct State {
    file: std::fs::File,
    pending: VecDeque<Report>,
    acked: usize,
    closed: bool,
}

#[derive(Clone)]
pub struct Outbox {
    attempt: Uuid,
    acked_path: PathBuf,
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
}

/// What the control plane said about the attempt while the outbox delivered.
#[derive(Debug, Default, Clone, Copy)]
pub struct Delivery {
    pub stop_attempt: bool,
    /// The stop is a budget's cap: checkpoint and publish the adapter.
    pub publish_adapter: bool,
}

impl Outbox {
    /// Opens (or reopens, after a restart) the outbox of `attempt` in `dir`.
    pub fn open(dir: &Path, attempt: Uuid) -> Result<Outbox> {
        std::fs::create_dir_all(dir).map_err(|e| AgentError::io(dir, e))?;
        let log_path = dir.join(format!("{attempt}.jsonl"));
        let acked_path = dir.join(format!("{attempt}.acked"));
        let acked: usize = std::fs::read_to_string(&acked_path)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        let existing = std::fs::read_to_string(&log_path).unwrap_or_default();
        // A torn last line (a crash mid-write) is dropped: it was never acknowledged.
        let pending: VecDeque<Report> = existing
            .lines()
            .skip(acked)
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| AgentError::io(&log_path, e))?;
        Ok(Outbox {
            attempt,
            acked_path,
            state: Arc::new(Mutex::new(State {
                file,
                pending,
                acked,
                closed: false,
            })),
            changed: Arc::new(Notify::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends a report durably; the sender picks it up.
    pub fn push(&self, report: Report) {
        {
            let mut state = self.lock();
            let line = serde_json::to_string(&report).unwrap_or_default();
            let written = writeln!(state.file, "{line}").and_then(|_| state.file.sync_data());
            if let Err(error) = written {
                tracing::error!(%error, "could not write the outbox; the report is kept in memory only");
            }
            state.pending.push_back(report);
        }
        self.changed.notify_one();
    }

    /// No more reports will be pushed: `drain` returns once everything is delivered.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_one();
    }

    fn pending_batch(&self) -> (Vec<Report>, bool) {
        let state = self.lock();
        (
            state.pending.iter().take(BATCH).cloned().collect(),
            state.closed,
        )
    }

    fn acknowledge(&self, count: usize) {
        let mut state = self.lock();
        for _ in 0..count.min(state.pending.len()) {
            state.pending.pop_front();
        }
        state.acked += count;
        let temp = self.acked_path.with_extension("acked.tmp");
        let saved = std::fs::write(&temp, state.acked.to_string())
            .and_then(|_| std::fs::rename(&temp, &self.acked_path));
        if let Err(error) = saved {
            tracing::warn!(%error, "could not record the outbox position");
        }
    }

    /// Delivers reports as they come until the outbox is closed and empty, retrying
    /// with backoff while the control plane is away. `on_delivery` hears each answer.
    pub async fn deliver(&self, client: &ControlPlane, mut on_delivery: impl FnMut(Delivery)) {
        let mut backoff = Backoff::new();
        loop {
            let wake = self.changed.notified();
            let (batch, closed) = self.pending_batch();
            if batch.is_empty() {
                if closed {
                    return;
                }
                wake.await;
                continue;
            }
            let count = batch.len();
            match client
                .send_reports(self.attempt, &ReportBatch { reports: batch })
                .await
            {
                Ok(reply) => {
                    backoff = Backoff::new();
                    self.acknowledge(count);
                    on_delivery(Delivery {
                        stop_attempt: reply.stop_attempt,
                        publish_adapter: reply.publish_adapter,
                    });
                }
                // The attempt is gone on the control plane's side: nothing will be taken.
                Err(AgentError::Rejected { status: 404, .. }) => {
                    tracing::warn!(attempt = %self.attempt, "control plane no longer knows this attempt; dropping its reports");
                    self.acknowledge(count);
                    on_delivery(Delivery {
                        stop_attempt: true,
                        publish_adapter: false,
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, pending = count, "reports not delivered yet; retrying");
                    backoff.wait().await;
                }
            }
        }
    }

    /// Removes the outbox files once the attempt is over and delivered.
    pub fn remove(dir: &Path, attempt: Uuid) {
        for extension in ["jsonl", "acked"] {
            let _ = std::fs::remove_file(dir.join(format!("{attempt}.{extension}")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::agent::Stage;

    fn stage(key: &str) -> Report {
        Report::Stage {
            key: key.into(),
            stage: Stage::Training,
            at: chrono::Utc::now(),
        }
    }

    #[test]
    fn unacknowledged_reports_survive_a_restart() {
        let dir = tempfile::tempdir().expect("temp dir");
        let attempt = Uuid::new_v4();
        let outbox = Outbox::open(dir.path(), attempt).expect("opens");
        for key in ["a", "b", "c"] {
            outbox.push(stage(key));
        }
        outbox.acknowledge(1);
        drop(outbox);
        let reopened = Outbox::open(dir.path(), attempt).expect("reopens");
        let (pending, _) = reopened.pending_batch();
        let keys: Vec<&str> = pending.iter().map(Report::key).collect();
        assert_eq!(keys, ["b", "c"]);
    }
}
