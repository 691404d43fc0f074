//! Live job updates for SSE subscribers.
//!
//! Writers publish after their transaction commits. On SQLite (one server) an update goes
//! straight to this process's subscribers. On PostgreSQL it goes out with `pg_notify`, and
//! every replica, this one included, forwards what it hears on `LISTEN` to its subscribers,
//! so a client connected to any replica sees every replica's writes. The notifications
//! are sent by one task per process, in the order they were published: a writer hands
//! its updates over and answers its caller without waiting for their round trip, and
//! updates published together while that task was busy go out in one statement, packed
//! as JSON arrays into as few notifications as PostgreSQL's payload limit allows.

use serde::{Deserialize, Serialize};
use sqlx::postgres::PgListener;
use tokio::sync::{broadcast, mpsc};
use uuid::Uuid;

use crate::db::events::Event;
use crate::db::jobs::Job;
use crate::db::metrics::MetricPoint;
use crate::db::Db;

const CHANNEL: &str = "lora_job_updates";
/// PostgreSQL refuses NOTIFY payloads of 8000 bytes or more.
const MAX_NOTIFY_BYTES: usize = 7900;
/// Publications waiting for the notifying task before publishers wait for it in turn.
const NOTIFY_QUEUE: usize = 4096;
/// Publications one notifying statement takes at most.
const PUBLICATIONS_PER_NOTIFY: usize = 256;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobUpdate {
    Status {
        job: Box<Job>,
    },
    Event {
        event: Box<Event>,
    },
    Metrics {
        job_id: Uuid,
        point: Box<MetricPoint>,
    },
    /// A validation run of the job changed: queued, progress, completed or failed.
    Validation {
        job_id: Uuid,
        validation: Box<serde_json::Value>,
    },
}

impl JobUpdate {
    pub fn job_id(&self) -> Uuid {
        match self {
            JobUpdate::Status { job } => job.id,
            JobUpdate::Event { event, .. } => event.job_id,
            JobUpdate::Metrics { job_id, .. } | JobUpdate::Validation { job_id, .. } => *job_id,
        }
    }

    /// The SSE event name.
    pub fn name(&self) -> &'static str {
        match self {
            JobUpdate::Status { .. } => "status",
            JobUpdate::Event { .. } => "event",
            JobUpdate::Metrics { .. } => "metrics",
            JobUpdate::Validation { .. } => "validation",
        }
    }

    /// Keeps a notification under PostgreSQL's payload limit by dropping bulky detail.
    fn slimmed(mut self) -> JobUpdate {
        match &mut self {
            JobUpdate::Status { job } => job.hyperparameters = None,
            JobUpdate::Event { event, .. } => {
                event.details = None;
                event.message.truncate(1000);
            }
            JobUpdate::Metrics { .. } | JobUpdate::Validation { .. } => {}
        }
        self
    }
}

#[derive(Clone)]
pub struct LiveUpdates {
    sender: broadcast::Sender<JobUpdate>,
    db: Db,
    /// On PostgreSQL, the notifying task's queue.
    notifier: Option<mpsc::Sender<Vec<JobUpdate>>>,
}

impl LiveUpdates {
    /// On PostgreSQL it spawns the notifying task, which ends with the last clone.
    pub fn new(db: Db) -> LiveUpdates {
        let (sender, _) = broadcast::channel(1024);
        let notifier = match &db {
            Db::Sqlite(_) => None,
            Db::Postgres(pool) => {
                let (notifier, queue) = mpsc::channel(NOTIFY_QUEUE);
                tokio::spawn(notify_in_order(pool.clone(), queue));
                Some(notifier)
            }
        };
        LiveUpdates {
            sender,
            db,
            notifier,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<JobUpdate> {
        self.sender.subscribe()
    }

    pub async fn publish(&self, update: JobUpdate) {
        self.publish_all(vec![update]).await;
    }

    /// Publishes `updates` in order.
    pub async fn publish_all(&self, updates: Vec<JobUpdate>) {
        if updates.is_empty() {
            return;
        }
        match &self.notifier {
            None => {
                for update in updates {
                    // No subscriber is not an error.
                    let _ = self.sender.send(update);
                }
            }
            Some(notifier) => {
                if notifier.send(updates).await.is_err() {
                    tracing::warn!("the live update notifier has stopped");
                }
            }
        }
    }

    /// On PostgreSQL, forwards notifications to local subscribers until the process ends.
    /// Returns once listening has started, so nothing published afterwards is missed.
    pub async fn start_listener(&self) -> Result<(), sqlx::Error> {
        let crate::db::Db::Postgres(pool) = &self.db else {
            return Ok(());
        };
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(CHANNEL).await?;
        let sender = self.sender.clone();
        tokio::spawn(async move {
            loop {
                match listener.recv().await {
                    // With no one here subscribed there is nothing to forward, nor to
                    // parse. A subscriber reads what it shows after subscribing, so an
                    // update that passed before it did is in that read.
                    Ok(_) if sender.receiver_count() == 0 => {}
                    Ok(notification) => {
                        match serde_json::from_str::<Vec<JobUpdate>>(notification.payload()) {
                            Ok(updates) => {
                                for update in updates {
                                    let _ = sender.send(update);
                                }
                            }
                            Err(error) => {
                                tracing::warn!(%error, "ignoring a malformed live update")
                            }
                        }
                    }
                    // PgListener reconnects by itself on the next recv.
                    Err(error) => {
                        tracing::warn!(%error, "live update listener lost its connection");
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    }
                }
            }
        });
        Ok(())
    }
}

/// Updates (as JSON) packed in order into JSON arrays, each under PostgreSQL's payload
/// limit: a report batch's points go out as a few notifications, not one per point. An
/// update is at most [`MAX_NOTIFY_BYTES`], so an array of one stays under 8000 bytes.
fn packed(updates: impl Iterator<Item = String>) -> Vec<String> {
    let mut packs = Vec::new();
    let mut pack = String::from("[");
    for update in updates {
        if pack.len() > 1 && pack.len() + update.len() + 2 > MAX_NOTIFY_BYTES {
            pack.push(']');
            packs.push(std::mem::replace(&mut pack, String::from("[")));
        }
        if pack.len() > 1 {
            pack.push(',');
        }
        pack.push_str(&update);
    }
    if pack.len() > 1 {
        pack.push(']');
        packs.push(pack);
    }
    packs
}

/// An update as a notification's JSON, slimmed when it is too large; `None` (and a
/// warning) when even that is: one update over PostgreSQL's limit would fail the
/// statement, and with it every update sent alongside.
fn notification_text(update: JobUpdate) -> Option<String> {
    let fits = |text: &String| text.len() <= MAX_NOTIFY_BYTES;
    if let Some(text) = serde_json::to_string(&update).ok().filter(fits) {
        return Some(text);
    }
    let job_id = update.job_id();
    let text = serde_json::to_string(&update.slimmed()).ok().filter(fits);
    if text.is_none() {
        tracing::warn!(%job_id, "a live update too large to send even slimmed was dropped");
    }
    text
}

/// Sends what is published as PostgreSQL notifications, in order, taking together the
/// publications that wait: one statement, one transaction, for each such group.
async fn notify_in_order(pool: sqlx::PgPool, mut queue: mpsc::Receiver<Vec<JobUpdate>>) {
    let mut waiting = Vec::with_capacity(PUBLICATIONS_PER_NOTIFY);
    while queue.recv_many(&mut waiting, PUBLICATIONS_PER_NOTIFY).await > 0 {
        let payloads = packed(waiting.drain(..).flatten().filter_map(notification_text));
        // `WITH ORDINALITY … ORDER BY` keeps the notifications in the given order. Sending
        // a notification gives the transaction an id, so its commit would wait for a WAL
        // flush (a second fsync for every report): a notification is not durable anyway,
        // so this transaction commits without waiting (`set_config(…, true)`: for this
        // transaction only). Listeners hear it at commit all the same.
        if let Err(error) = sqlx::query(
            "SELECT pg_notify($1, payload), set_config('synchronous_commit', 'off', true)
             FROM unnest($2::text[]) WITH ORDINALITY AS batch(payload, position)
             ORDER BY position",
        )
        .bind(CHANNEL)
        .bind(payloads)
        .execute(&pool)
        .await
        {
            tracing::warn!(%error, "could not publish live updates");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(step: i64) -> JobUpdate {
        JobUpdate::Metrics {
            job_id: Uuid::nil(),
            point: Box::new(MetricPoint {
                step,
                epoch: Some(0),
                training_loss: Some(1.0),
                validation_loss: None,
                learning_rate: Some(2e-4),
                grad_norm: Some(0.5),
                tokens_per_second: Some(3000.0),
                gpu_utilization: Some(95),
                memory_used_gb: Some(40.0),
                recorded_at: chrono::Utc::now(),
            }),
        }
    }

    #[test]
    fn packs_keep_every_update_in_order_under_the_payload_limit() {
        let updates: Vec<JobUpdate> = (1..=200).map(point).collect();
        let texts = updates
            .iter()
            .map(|u| serde_json::to_string(u).expect("an update serializes"));
        let packs = packed(texts);
        assert!(packs.len() > 1 && packs.len() < 20, "{} packs", packs.len());
        let mut steps = Vec::new();
        for pack in &packs {
            assert!(pack.len() <= MAX_NOTIFY_BYTES, "{} bytes", pack.len());
            for update in serde_json::from_str::<Vec<JobUpdate>>(pack).expect("a pack parses") {
                let JobUpdate::Metrics { point, .. } = update else {
                    panic!("not a point")
                };
                steps.push(point.step);
            }
        }
        assert_eq!(steps, (1..=200).collect::<Vec<_>>());
        assert!(packed(std::iter::empty()).is_empty());
    }
}
