//! Validation runs of completed jobs (spec §4.2.9 `validation_results`): queued, claimed
//! by an agent with a compare-and-set, then completed with the suites' reports or failed.

use chrono::{DateTime, Utc};
use protocol::validation::{Suite, SuiteReport};
use serde::Serialize;
use sqlx::types::Json;
use uuid::Uuid;

use super::{on_pool, Db, DbError};
use crate::domain::validation::{GateResult, Gates, Recommendation, Verdict};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Queued,
    Running,
    Completed,
    Failed,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
        }
    }
}

impl TryFrom<String> for RunStatus {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        [
            RunStatus::Queued,
            RunStatus::Running,
            RunStatus::Completed,
            RunStatus::Failed,
        ]
        .into_iter()
        .find(|s| s.as_str() == value)
        .ok_or_else(|| format!("unknown validation status {value:?}"))
    }
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ValidationRun {
    pub id: Uuid,
    pub job_id: Uuid,
    pub user_id: Uuid,
    #[sqlx(try_from = "String")]
    pub status: RunStatus,
    #[schema(value_type = Vec<String>)]
    pub test_suites: Json<Vec<Suite>>,
    pub comparison_baseline_id: Option<Uuid>,
    /// The file whose first user turns are knowledge retention's prompts.
    pub retention_file_id: Option<Uuid>,
    /// The thresholds the gates used: defaults, then the job's, then the request's.
    #[schema(value_type = Object)]
    pub gates: Json<Gates>,
    pub max_samples: i64,
    pub max_new_tokens: i64,
    /// Started by the job's `validate_on_completion`.
    pub automatic: bool,
    pub agent_id: Option<Uuid>,
    /// Agents that claimed it (a lost agent's run is queued again).
    pub claim_count: i64,
    /// The agent's latest progress: {suite, message, done, total}.
    #[schema(value_type = Option<Object>)]
    pub progress: Option<Json<serde_json::Value>>,
    #[sqlx(try_from = "Option<String>")]
    #[schema(value_type = Option<Verdict>)]
    pub overall_status: OptionalVerdict,
    pub overall_score: Option<f64>,
    #[schema(value_type = Option<Object>)]
    pub perplexity_results: Option<Json<SuiteReport>>,
    #[schema(value_type = Option<Object>)]
    pub emotional_intelligence_results: Option<Json<SuiteReport>>,
    #[schema(value_type = Option<Object>)]
    pub knowledge_retention_results: Option<Json<SuiteReport>>,
    #[schema(value_type = Option<Object>)]
    pub voice_consistency_results: Option<Json<SuiteReport>>,
    #[schema(value_type = Option<Object>)]
    pub stop_behaviour_results: Option<Json<SuiteReport>>,
    /// The same suites on the baseline's adapter.
    #[schema(value_type = Option<Vec<Object>>)]
    pub baseline_results: Option<Json<Vec<SuiteReport>>>,
    /// Per-suite deltas (adapter − baseline) and before/after samples.
    #[schema(value_type = Option<Object>)]
    pub comparison: Option<Json<serde_json::Value>>,
    #[schema(value_type = Option<Vec<GateResult>>)]
    pub gate_results: Option<Json<Vec<GateResult>>>,
    #[schema(value_type = Option<Vec<String>>)]
    pub passed_gates: Option<Json<Vec<String>>>,
    #[schema(value_type = Option<Vec<String>>)]
    pub failed_gates: Option<Json<Vec<String>>>,
    #[schema(value_type = Option<Vec<String>>)]
    pub warning_gates: Option<Json<Vec<String>>>,
    #[schema(value_type = Option<Vec<Recommendation>>)]
    pub recommendations: Option<Json<Vec<Recommendation>>>,
    /// Which examples were used (source, file checksum, lines).
    #[schema(value_type = Option<Object>)]
    pub examples: Option<Json<serde_json::Value>>,
    pub error_message: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub validation_completed_at: Option<DateTime<Utc>>,
}

/// A verdict column that may be NULL (until the run completes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(transparent)]
pub struct OptionalVerdict(pub Option<Verdict>);

impl TryFrom<Option<String>> for OptionalVerdict {
    type Error = String;
    fn try_from(value: Option<String>) -> Result<Self, String> {
        value
            .map(Verdict::try_from)
            .transpose()
            .map(OptionalVerdict)
    }
}

impl ValidationRun {
    /// The adapter's reports, in suite order.
    pub fn reports(&self) -> Vec<&SuiteReport> {
        [
            &self.perplexity_results,
            &self.knowledge_retention_results,
            &self.voice_consistency_results,
            &self.emotional_intelligence_results,
            &self.stop_behaviour_results,
        ]
        .into_iter()
        .flatten()
        .map(|json| &json.0)
        .collect()
    }
}

pub struct NewRun<'a> {
    pub job_id: Uuid,
    pub user_id: Uuid,
    pub suites: &'a [Suite],
    pub baseline: Option<Uuid>,
    pub retention_file: Option<Uuid>,
    pub gates: &'a Gates,
    pub max_samples: u32,
    pub max_new_tokens: u32,
    pub automatic: bool,
}

pub async fn insert(db: &Db, run: NewRun<'_>) -> Result<ValidationRun, DbError> {
    Ok(on_pool!(db, pool => sqlx::query_as::<_, ValidationRun>(
        "INSERT INTO validation_results (id, job_id, user_id, status, test_suites, comparison_baseline_id, gates,
             max_samples, max_new_tokens, automatic, created_at, retention_file_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING *",
    )
    .bind(Uuid::new_v4())
    .bind(run.job_id)
    .bind(run.user_id)
    .bind(RunStatus::Queued.as_str())
    .bind(Json(run.suites))
    .bind(run.baseline)
    .bind(Json(run.gates))
    .bind(i64::from(run.max_samples))
    .bind(i64::from(run.max_new_tokens))
    .bind(run.automatic)
    .bind(super::now())
    .bind(run.retention_file)
    .fetch_one(pool)
    .await?))
}

pub async fn get(db: &Db, id: Uuid) -> Result<Option<ValidationRun>, DbError> {
    Ok(on_pool!(db, pool => sqlx::query_as::<_, ValidationRun>(
        "SELECT * FROM validation_results WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?))
}

/// A job's runs, newest first.
pub async fn for_job(db: &Db, job_id: Uuid, limit: i64) -> Result<Vec<ValidationRun>, DbError> {
    Ok(on_pool!(db, pool => sqlx::query_as::<_, ValidationRun>(
        "SELECT * FROM validation_results WHERE job_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2",
    )
    .bind(job_id)
    .bind(limit)
    .fetch_all(pool)
    .await?))
}

/// Whether the job has a run queued or running.
pub async fn has_pending(db: &Db, job_id: Uuid) -> Result<bool, DbError> {
    let count: i64 = on_pool!(db, pool => sqlx::query_scalar(
        "SELECT COUNT(*) FROM validation_results WHERE job_id = $1 AND status IN ($2, $3)",
    )
    .bind(job_id)
    .bind(RunStatus::Queued.as_str())
    .bind(RunStatus::Running.as_str())
    .fetch_one(pool)
    .await?);
    Ok(count > 0)
}

/// Gives the oldest queued run to `agent_id`: a compare-and-set, so each run goes to one
/// agent however many ask at once.
pub async fn claim_next(db: &Db, agent_id: Uuid) -> Result<Option<ValidationRun>, DbError> {
    let candidates: Vec<Uuid> = on_pool!(db, pool => sqlx::query_scalar(
        "SELECT id FROM validation_results WHERE status = $1 ORDER BY created_at, id LIMIT 20",
    )
    .bind(RunStatus::Queued.as_str())
    .fetch_all(pool)
    .await?);
    for id in candidates {
        let claimed = on_pool!(db, pool => sqlx::query_as::<_, ValidationRun>(
            "UPDATE validation_results SET status = $4, agent_id = $2, started_at = $3,
                 claim_count = claim_count + 1, progress = NULL
             WHERE id = $1 AND status = $5 RETURNING *",
        )
        .bind(id)
        .bind(agent_id)
        .bind(super::now())
        .bind(RunStatus::Running.as_str())
        .bind(RunStatus::Queued.as_str())
        .fetch_optional(pool)
        .await?);
        if claimed.is_some() {
            return Ok(claimed);
        }
    }
    Ok(None)
}

/// Records progress of a run the agent still holds; `None` when it no longer does.
pub async fn set_progress(
    db: &Db,
    id: Uuid,
    agent_id: Uuid,
    progress: &serde_json::Value,
) -> Result<Option<ValidationRun>, DbError> {
    Ok(on_pool!(db, pool => sqlx::query_as::<_, ValidationRun>(
        "UPDATE validation_results SET progress = $3 WHERE id = $1 AND agent_id = $2 AND status = $4
         RETURNING *",
    )
    .bind(id)
    .bind(agent_id)
    .bind(Json(progress))
    .bind(RunStatus::Running.as_str())
    .fetch_optional(pool)
    .await?))
}

/// What a completed run stores.
pub struct Completion<'a> {
    pub verdict: Verdict,
    pub overall_score: Option<f64>,
    pub reports: &'a [SuiteReport],
    pub baseline: Option<&'a [SuiteReport]>,
    pub comparison: Option<&'a serde_json::Value>,
    pub gates: &'a [GateResult],
    pub recommendations: &'a [Recommendation],
    pub examples: &'a serde_json::Value,
}

fn gate_names(
    gates: &[GateResult],
    outcome: crate::domain::validation::GateOutcome,
) -> Json<Vec<String>> {
    Json(
        gates
            .iter()
            .filter(|g| g.outcome == outcome)
            .map(|g| g.gate.clone())
            .collect(),
    )
}

/// Completes a run the agent holds; `None` when it no longer does (a repeated report).
pub async fn complete(
    db: &Db,
    id: Uuid,
    agent_id: Uuid,
    done: Completion<'_>,
) -> Result<Option<ValidationRun>, DbError> {
    use crate::domain::validation::GateOutcome;
    let report = |suite: Suite| done.reports.iter().find(|r| r.suite == suite).map(Json);
    Ok(on_pool!(db, pool => sqlx::query_as::<_, ValidationRun>(
        "UPDATE validation_results SET status = $19, overall_status = $3, overall_score = $4,
             perplexity_results = $5, knowledge_retention_results = $6, voice_consistency_results = $7,
             emotional_intelligence_results = $8, stop_behaviour_results = $9, baseline_results = $10,
             comparison = $11, gate_results = $12, passed_gates = $13, failed_gates = $14, warning_gates = $15,
             recommendations = $16, examples = $17, validation_completed_at = $18, progress = NULL
         WHERE id = $1 AND agent_id = $2 AND status = $20 RETURNING *",
    )
    .bind(id)
    .bind(agent_id)
    .bind(done.verdict.as_str())
    .bind(done.overall_score)
    .bind(report(Suite::Perplexity))
    .bind(report(Suite::KnowledgeRetention))
    .bind(report(Suite::VoiceConsistency))
    .bind(report(Suite::EmotionalIntelligence))
    .bind(report(Suite::StopBehaviour))
    .bind(done.baseline.map(Json))
    .bind(done.comparison.map(Json))
    .bind(Json(done.gates))
    .bind(gate_names(done.gates, GateOutcome::Pass))
    .bind(gate_names(done.gates, GateOutcome::Fail))
    .bind(gate_names(done.gates, GateOutcome::Warn))
    .bind(Json(done.recommendations))
    .bind(Json(done.examples))
    .bind(super::now())
    .bind(RunStatus::Completed.as_str())
    .bind(RunStatus::Running.as_str())
    .fetch_optional(pool)
    .await?))
}

/// Fails a run; with `agent_id`, only while that agent holds it.
pub async fn fail(
    db: &Db,
    id: Uuid,
    agent_id: Option<Uuid>,
    message: &str,
) -> Result<Option<ValidationRun>, DbError> {
    Ok(on_pool!(db, pool => sqlx::query_as::<_, ValidationRun>(
        "UPDATE validation_results SET status = $5, error_message = $3, validation_completed_at = $4,
             progress = NULL
         WHERE id = $1 AND status IN ($6, $7) AND ($2 IS NULL OR agent_id = $2) RETURNING *",
    )
    .bind(id)
    .bind(agent_id)
    .bind(message)
    .bind(super::now())
    .bind(RunStatus::Failed.as_str())
    .bind(RunStatus::Queued.as_str())
    .bind(RunStatus::Running.as_str())
    .fetch_optional(pool)
    .await?))
}

/// Running runs whose agent has been silent since `cutoff`.
pub async fn orphaned(db: &Db, cutoff: DateTime<Utc>) -> Result<Vec<ValidationRun>, DbError> {
    Ok(on_pool!(db, pool => sqlx::query_as::<_, ValidationRun>(
        "SELECT * FROM validation_results WHERE status = $2 AND agent_id IN
             (SELECT id FROM agents WHERE last_heartbeat_at < $1)",
    )
    .bind(cutoff)
    .bind(RunStatus::Running.as_str())
    .fetch_all(pool)
    .await?))
}

/// Puts a lost agent's run back in the queue (if that agent still holds it).
pub async fn requeue(db: &Db, id: Uuid, agent_id: Uuid) -> Result<Option<ValidationRun>, DbError> {
    Ok(on_pool!(db, pool => sqlx::query_as::<_, ValidationRun>(
        "UPDATE validation_results SET status = $3, agent_id = NULL, progress = NULL
         WHERE id = $1 AND agent_id = $2 AND status = $4 RETURNING *",
    )
    .bind(id)
    .bind(agent_id)
    .bind(RunStatus::Queued.as_str())
    .bind(RunStatus::Running.as_str())
    .fetch_optional(pool)
    .await?))
}
