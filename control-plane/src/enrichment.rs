//! Background enrichment of uploaded training files: one streaming pass that validates
//! every record, stores the conversations for preview and computes the file's statistics.

use std::collections::HashMap;
use std::sync::Arc;

use protocol::dataset::{self, Conversation, DatasetError, Format, Limits, Record};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use uuid::Uuid;

use crate::db::files::{self, EnrichmentResult, NewConversation};
use crate::db::Db;
use crate::domain::estimate::{estimated_tokens, TokenCounts};

/// Most conversations stored per INSERT. A row binds 15 parameters, so 2,000 rows stay
/// under SQLite's limit of 32,766 (PostgreSQL's is 65,535). The reading thread holds one
/// batch in the making and the channel two more, so memory stays flat whatever the file's
/// size.
const BATCH: usize = 2_000;
/// The first batch's size; each batch doubles it up to `BATCH`, so storing starts while
/// the reading thread is still early in the file.
const FIRST_BATCH: usize = 250;

#[derive(Clone)]
pub struct Enricher {
    db: Db,
    limits: Limits,
    /// An enrichment that has not heartbeated (with every batch) for this long is
    /// taken as abandoned and may be claimed again.
    abandoned_after: chrono::Duration,
    max_reported_errors: usize,
    permits: Arc<Semaphore>,
}

impl Enricher {
    pub fn new(
        db: Db,
        max_record_bytes: usize,
        max_reported_errors: usize,
        abandoned_after: std::time::Duration,
    ) -> Enricher {
        Enricher {
            db,
            limits: Limits { max_record_bytes },
            abandoned_after: chrono::Duration::from_std(abandoned_after)
                .unwrap_or(chrono::Duration::minutes(2)),
            max_reported_errors,
            permits: Arc::new(Semaphore::new(2)),
        }
    }

    /// Enriches the file in the background; returns at once.
    pub fn enqueue(&self, file_id: Uuid) {
        let enricher = self.clone();
        tokio::spawn(async move {
            let Ok(_permit) = enricher.permits.clone().acquire_owned().await else {
                return;
            };
            if let Err(error) = enricher.run(file_id).await {
                tracing::error!(%file_id, %error, "enrichment failed");
            }
        });
    }

    fn abandoned_before(&self) -> chrono::DateTime<chrono::Utc> {
        crate::db::now() - self.abandoned_after
    }

    /// Picks up files left pending, or abandoned mid-enrichment by a server that died.
    pub async fn resume_backlog(&self) -> Result<(), crate::db::DbError> {
        for id in files::enrichment_backlog(&self.db, self.abandoned_before()).await? {
            self.enqueue(id);
        }
        Ok(())
    }

    /// Every `period`, resumes the backlog: a file a crashed replica left `processing` is
    /// started over within `abandoned_after` + `period`, by one replica only (claiming is
    /// a compare-and-set on its heartbeat).
    pub fn spawn_sweeper(&self, period: std::time::Duration) {
        let enricher = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                if let Err(error) = enricher.resume_backlog().await {
                    tracing::warn!(%error, "enrichment sweep failed");
                }
            }
        });
    }

    /// Claims the file and enriches it; a run that cannot finish (an I/O error, say) marks
    /// the file failed with the reason, while it still holds the claim.
    pub async fn run(&self, file_id: Uuid) -> Result<(), EnrichmentError> {
        let Some(claim) =
            files::claim_for_enrichment(&self.db, file_id, self.abandoned_before()).await?
        else {
            return Ok(());
        };
        let outcome = self.enrich(file_id, claim).await;
        if let Err(error) = &outcome {
            let message = format!("enrichment could not finish: {error}");
            files::fail_enrichment(&self.db, file_id, claim, None, &message).await?;
        }
        outcome
    }

    /// Reading, validating and counting run on a blocking thread, which hands finished
    /// batches of rows to this task; this task stores them while the thread reads on.
    async fn enrich(&self, file_id: Uuid, claim: Uuid) -> Result<(), EnrichmentError> {
        let Some(file) = files::get(&self.db, file_id).await? else {
            return Ok(());
        };
        tracing::info!(%file_id, size = file.file_size, "enriching training file");
        let started = std::time::Instant::now();
        let input = std::fs::File::open(&file.file_path)?;
        let (chunks_tx, mut chunks_rx) = mpsc::channel::<Chunk>(2);
        let limits = self.limits;
        let max_reported_errors = self.max_reported_errors;
        let reader = tokio::task::spawn_blocking(move || {
            scan(input, limits, max_reported_errors, &chunks_tx)
        });

        while let Some(chunk) = chunks_rx.recv().await {
            // Dropping the receiver on the way out stops the reading thread at its next send.
            if !files::enrichment_heartbeat(&self.db, file_id, claim).await? {
                tracing::warn!(%file_id, "another server took this enrichment over; stopping");
                return Ok(());
            }
            if let Chunk::Rows(rows) = chunk {
                files::insert_conversations(&self.db, file_id, claim, &rows).await?;
            }
        }
        let Scan {
            format,
            statistics,
            errors,
            rows,
        } = reader.await??;
        let format_name = format.map(Format::as_str);
        if let Some(message) = errors.summary() {
            files::fail_enrichment(&self.db, file_id, claim, format_name, &message).await?;
            tracing::info!(%file_id, bad_records = errors.total, "training file failed enrichment");
            return Ok(());
        }
        files::insert_conversations(&self.db, file_id, claim, &rows).await?;
        let result = statistics.finish(format_name.unwrap_or("unknown"));
        if !files::finish_enrichment(&self.db, file_id, claim, &result).await? {
            tracing::warn!(%file_id, "another server took this enrichment over; its result stands");
            return Ok(());
        }
        tracing::info!(
            %file_id,
            conversations = result.conversation_count,
            seconds = started.elapsed().as_secs_f64(),
            "training file enriched"
        );
        Ok(())
    }
}

/// What the reading thread hands the storing task.
enum Chunk {
    /// A full batch of rows to store.
    Rows(Vec<NewConversation>),
    /// Another `BATCH` records read with nothing to store (the file has a bad record and
    /// will fail; reading goes on to count the others): the claim is still heartbeated.
    Progress,
}

/// What the reading thread found, once the whole file is read.
struct Scan {
    format: Option<Format>,
    statistics: Statistics,
    errors: ErrorReport,
    /// The last, partial batch, stored only if the file has no bad record.
    rows: Vec<NewConversation>,
}

/// Reads every record of `input`, sending full batches of rows over `chunks`; stops early,
/// without an error, when the storing side has hung up.
fn scan(
    input: std::fs::File,
    limits: Limits,
    max_reported_errors: usize,
    chunks: &mpsc::Sender<Chunk>,
) -> Result<Scan, DatasetError> {
    let mut found = Scan {
        format: None,
        statistics: Statistics::default(),
        errors: ErrorReport::new(max_reported_errors),
        rows: Vec::with_capacity(FIRST_BATCH),
    };
    let mut batch_size = FIRST_BATCH;
    let records = match dataset::open(input, limits) {
        Ok((format, records)) => {
            found.format = Some(format);
            records
        }
        Err(DatasetError::Record(error)) => {
            found.errors.push(error.to_string());
            return Ok(found);
        }
        Err(error) => return Err(error),
    };
    for (index, record) in records.enumerate() {
        match record {
            Ok(record) => {
                let tokens = estimated_tokens(&record.conversation);
                found.statistics.add(&record.conversation, tokens);
                // After the first bad record nothing more is stored: the file will fail.
                if found.errors.is_empty() {
                    found.rows.push(to_row(record, tokens));
                }
            }
            Err(DatasetError::Record(error)) => {
                found.errors.push(error.to_string());
                found.rows = Vec::new();
            }
            Err(error) => return Err(error),
        }
        let chunk = if found.rows.len() == batch_size {
            batch_size = (batch_size * 2).min(BATCH);
            Chunk::Rows(std::mem::replace(
                &mut found.rows,
                Vec::with_capacity(batch_size),
            ))
        } else if (index + 1).is_multiple_of(BATCH) && !found.errors.is_empty() {
            Chunk::Progress
        } else {
            continue;
        };
        if chunks.blocking_send(chunk).is_err() {
            break;
        }
    }
    Ok(found)
}

/// Why enrichment itself could not finish (bad records in the file are not errors here).
#[derive(Debug, thiserror::Error)]
pub enum EnrichmentError {
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error("cannot read the stored file: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("the reader thread stopped: {0}")]
    Reader(#[from] tokio::task::JoinError),
}

fn to_row(record: Record, token_count: i64) -> NewConversation {
    let Conversation {
        messages,
        tools,
        text,
        metadata,
    } = record.conversation;
    NewConversation {
        line_number: record.line as i64,
        persona: metadata.persona,
        emotional_arc: metadata.emotional_arc,
        topic: metadata.topic,
        quality_score: metadata.quality_score,
        human_reviewed: metadata.human_reviewed,
        messages,
        tools,
        text,
        metadata: metadata.raw,
        token_count,
    }
}

/// The first few bad records by line, and how many there were in all.
struct ErrorReport {
    cap: usize,
    shown: Vec<String>,
    total: usize,
}

impl ErrorReport {
    fn new(cap: usize) -> ErrorReport {
        ErrorReport {
            cap,
            shown: Vec::new(),
            total: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.total == 0
    }

    fn push(&mut self, message: String) {
        self.total += 1;
        if self.shown.len() < self.cap {
            self.shown.push(message);
        }
    }

    fn summary(&self) -> Option<String> {
        if self.total == 0 {
            return None;
        }
        let mut text = self.shown.join("\n");
        let hidden = self.total - self.shown.len();
        if hidden > 0 {
            text.push_str(&format!("\n… and {hidden} more"));
        }
        text.push_str(&format!(
            "\n{} bad record{} in total",
            self.total,
            if self.total == 1 { "" } else { "s" }
        ));
        Some(text)
    }
}

#[derive(Default)]
struct Mean {
    sum: f64,
    count: u64,
}

impl Mean {
    fn add(&mut self, value: Option<f64>) {
        if let Some(value) = value {
            self.sum += value;
            self.count += 1;
        }
    }

    fn value(&self) -> Option<f64> {
        (self.count > 0).then(|| ((self.sum / self.count as f64) * 100.0).round() / 100.0)
    }
}

#[derive(Default)]
struct Statistics {
    conversations: i64,
    training_pairs: i64,
    quality: Mean,
    empathy: Mean,
    clarity: Mean,
    appropriateness: Mean,
    personas: HashMap<String, i64>,
    emotional_arcs: HashMap<String, i64>,
    topics: HashMap<String, i64>,
    human_reviewed: i64,
    ai_generated: i64,
    tokens: TokenCounts,
}

impl Statistics {
    fn add(&mut self, conversation: &Conversation, tokens: i64) {
        let metadata = &conversation.metadata;
        self.conversations += 1;
        self.tokens.add(tokens);
        self.training_pairs += conversation.training_pairs() as i64;
        self.quality.add(metadata.quality_score);
        self.empathy.add(metadata.quality_scores.empathy);
        self.clarity.add(metadata.quality_scores.clarity);
        self.appropriateness
            .add(metadata.quality_scores.appropriateness);
        for (counts, value) in [
            (&mut self.personas, &metadata.persona),
            (&mut self.emotional_arcs, &metadata.emotional_arc),
            (&mut self.topics, &metadata.topic),
        ] {
            if let Some(value) = value {
                // Most records repeat a value already counted: no key is allocated for them.
                match counts.get_mut(value) {
                    Some(count) => *count += 1,
                    None => {
                        counts.insert(value.clone(), 1);
                    }
                }
            }
        }
        match metadata.human_reviewed {
            Some(true) => self.human_reviewed += 1,
            Some(false) | None => self.ai_generated += 1,
        }
    }

    fn finish(self, format: &str) -> EnrichmentResult {
        let total = self.conversations.max(1) as f64;
        let percentage = |count: i64| ((count as f64 / total) * 1000.0).round() / 10.0;
        let distribution = |counts: HashMap<String, i64>, key: &str| -> Value {
            let mut entries: Vec<(String, i64)> = counts.into_iter().collect();
            entries.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            Value::Array(
                entries
                    .into_iter()
                    .map(|(name, count)| json!({key: name, "count": count, "percentage": percentage(count)}))
                    .collect(),
            )
        };
        EnrichmentResult {
            file_format: format.to_owned(),
            conversation_count: self.conversations,
            training_pairs_count: self.training_pairs,
            average_quality_score: self.quality.value(),
            quality_scores: json!({
                "empathy": self.empathy.value(),
                "clarity": self.clarity.value(),
                "appropriateness": self.appropriateness.value(),
            }),
            scaffolding_distribution: json!({
                "personas": distribution(self.personas, "type"),
                "emotional_arcs": distribution(self.emotional_arcs, "type"),
                "topics": distribution(self.topics, "category"),
            }),
            human_review: json!({
                "human_reviewed_count": self.human_reviewed,
                "ai_generated_count": self.ai_generated,
                "human_reviewed_percentage": percentage(self.human_reviewed),
                "ai_generated_percentage": percentage(self.ai_generated),
            }),
            token_counts: self.tokens,
        }
    }
}
