//! The jobs list and a job's page: live header, stage indicator, charts, events,
//! checkpoints, artifacts, and the cancel and resume actions.
use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;
use uuid::Uuid;

use super::charts::{line_chart, marked_line_chart, Marker, Series};
use super::frame::{ago, duration, money, viewer, Frame, PageResult};
use super::{render, PageError, PageUser};
use crate::db::artifacts::Artifact;
use crate::db::attempts::{self, Checkpoint};
use crate::db::events::{self, Event};
use crate::db::jobs::{self, Job};
use crate::db::metrics::MetricPoint;
use crate::db::now;
use crate::domain::budget::describe_attribution;
use crate::domain::JobStatus;
use crate::service::budget::standing_for_job;
use crate::service::job::resume_job;
use crate::service::job::{cancel_job, visible_job};
use crate::service::metric_history;
use crate::service::AppState;
use crate::service::ServiceError;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/training/jobs", get(job_list))
        .route("/training/job/{id}", get(job_detail))
        .route("/training/job/{id}/live", get(job_live))
        .route("/training/job/{id}/cancel", post(cancel))
        .route("/training/job/{id}/resume", post(resume))
        .route("/training/artifact/{id}", get(download))
}

/// A job as the jobs tables show it.
pub struct JobRow {
    pub id: Uuid,
    pub name: String,
    pub status: String,
    pub progress: i64,
    pub step: i64,
    pub total_steps: Option<i64>,
    pub queue_position: Option<usize>,
    pub created: String,
    pub cost: String,
}

/// Table rows for jobs, with queue positions from `queue` (the queue's order).
pub fn job_rows(list: Vec<Job>, queue: &[Uuid]) -> Vec<JobRow> {
    list.into_iter()
        .map(|job| JobRow {
            queue_position: queue.iter().position(|id| *id == job.id).map(|i| i + 1),
            id: job.id,
            status: job.status.to_string(),
            progress: job.progress_percentage,
            step: job.current_step,
            total_steps: job.total_steps,
            created: ago(&job.created_at),
            cost: money(job.final_cost.unwrap_or(job.current_cost)),
            name: job.name,
        })
        .collect()
}

#[derive(Deserialize)]
struct JobFilter {
    status: Option<String>,
}

#[derive(Template)]
#[template(path = "jobs.html")]
struct JobsPage {
    frame: Frame,
    rows: Vec<JobRow>,
    total: i64,
    status: String,
    statuses: Vec<&'static str>,
}

async fn job_list(
    State(state): State<AppState>,
    user: PageUser,
    Query(filter): Query<JobFilter>,
) -> PageResult {
    let status = filter
        .status
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(str::parse::<JobStatus>)
        .transpose()
        .map_err(ServiceError::BadRequest)?;
    let (list, total) = jobs::list(&state.db, viewer(&user), status, 200, 0).await?;
    let queue = jobs::queue_order(&state.db).await?;
    let page = JobsPage {
        frame: Frame::new(&user, "jobs", &[("Jobs", "/training/jobs")]),
        rows: job_rows(list, &queue),
        total,
        status: status.map(|s| s.to_string()).unwrap_or_default(),
        statuses: JobStatus::ALL.iter().map(|s| s.as_str()).collect(),
    };
    Ok(render(&page))
}

/// The parts of the job page that change while it trains.
#[derive(Template)]
#[template(path = "job_live.html")]
struct JobLive {
    job: Job,
    stage: String,
    elapsed: String,
    remaining: String,
    cost_so_far: String,
    estimate: String,
    loss_chart: String,
    learning_rate_chart: String,
    gpu_chart: String,
    memory_chart: String,
    stages: Vec<StageChip>,
    latest: Option<MetricPoint>,
    /// "team research, project tone", or empty.
    charged_to: String,
    /// The budgets the job counts against: "tone: $11.00 of $10.00 monthly (110.0%)".
    budgets: Vec<String>,
}

const STAGES: [&str; 5] = [
    "queued",
    "preprocessing",
    "model_loading",
    "training",
    "finalization",
];

/// One stage of the stage indicator: `done`, `current`, `failed` or `pending`.
pub struct StageChip {
    pub name: &'static str,
    pub state: &'static str,
}

/// Which stages a job has been through: all of them once it completed; up to the stage
/// it stopped in when it failed or was interrupted.
fn stage_chips(job: &Job) -> Vec<StageChip> {
    let stage = job
        .failed_stage
        .as_deref()
        .filter(|_| job.status == JobStatus::Failed)
        .or(job.current_stage.as_deref())
        .unwrap_or("queued");
    let reached = match job.status {
        JobStatus::Completed => Some(STAGES.len()),
        JobStatus::Draft | JobStatus::Configured => None,
        _ => STAGES
            .iter()
            .position(|s| *s == stage)
            // Between the queue and the first report the agent is provisioning.
            .or((stage == "provisioning").then_some(1)),
    };
    let stopped = matches!(
        job.status,
        JobStatus::Failed | JobStatus::Interrupted | JobStatus::Cancelled
    );
    STAGES
        .iter()
        .enumerate()
        .map(|(index, name)| StageChip {
            name,
            state: match reached {
                Some(at) if index < at => "done",
                Some(at) if index == at && stopped => "failed",
                Some(at) if index == at => "current",
                _ => "pending",
            },
        })
        .collect()
}

async fn job_live_view(state: &AppState, job: Job) -> Result<JobLive, PageError> {
    // Charts keep about 400 points whatever the run's length.
    let points = metric_history::chart_points(state, job.id).await?;
    let series = |name: &'static str, value: fn(&MetricPoint) -> Option<f64>| Series {
        name,
        points: points
            .iter()
            .filter_map(|p| value(p).map(|v| (p.step as f64, v)))
            .collect(),
    };
    // The best evaluation is called out: a keep-best run's adapter comes from it.
    let best = metric_history::best_evaluation(state, job.id).await?;
    let best = best.and_then(|p| {
        Some(Marker {
            x: p.step as f64,
            y: p.validation_loss?,
            label: format!("best · step {}", p.step),
        })
    });
    let loss_chart = marked_line_chart(
        "Loss",
        "step",
        &[
            series("training loss", |p| p.training_loss),
            series("validation loss", |p| p.validation_loss),
        ],
        best.as_ref(),
    );
    let learning_rate_chart = line_chart(
        "Learning rate",
        "step",
        &[series("learning rate", |p| p.learning_rate)],
    );
    let gpu_chart = line_chart(
        "GPU utilization",
        "step",
        &[series("GPU utilization %", |p| {
            p.gpu_utilization.map(|u| u as f64)
        })],
    );
    // Memory in the unit that suits its size: MB below a gigabyte, else GB.
    let peak_gb = points
        .iter()
        .filter_map(|p| p.memory_used_gb)
        .fold(0.0, f64::max);
    let memory_chart = if peak_gb < 1.0 {
        line_chart(
            "Memory",
            "step",
            &[series("memory MB", |p| {
                p.memory_used_gb.map(|gb| gb * 1024.0)
            })],
        )
    } else {
        line_chart(
            "Memory",
            "step",
            &[series("memory GB", |p| p.memory_used_gb)],
        )
    };
    let cost = attempts::job_cost(&state.db, job.id, now()).await?;
    let budgets = standing_for_job(state, &job)
        .await?
        .into_iter()
        .map(|view| {
            format!(
                "{}: {} of {} {} ({:.1}%)",
                view.budget.name,
                money(view.current_spend),
                money(view.budget.amount),
                view.budget.period,
                view.percent_used
            )
        })
        .collect();
    let charged_to = describe_attribution(
        job.team.as_deref(),
        job.project.as_deref(),
        job.cost_center.as_deref(),
    );
    let estimate = match (job.estimated_cost_min, job.estimated_cost_max) {
        (Some(low), Some(high)) => match &job.estimate_basis {
            Some(basis) => format!(
                "{}–{} over {}–{} ({}; {} tokens × {} epochs, {})",
                money(low),
                money(high),
                duration((basis.duration_hours_min * 3600.0) as i64),
                duration((basis.duration_hours_max * 3600.0) as i64),
                basis.throughput.describe(),
                basis.tokens_per_epoch,
                basis.epochs,
                basis.token_method,
            ),
            None => format!("{}–{}", money(low), money(high)),
        },
        _ => "not configured".into(),
    };
    let spent = job.final_cost.unwrap_or(cost);
    let cost_so_far = match job.estimated_cost_max.filter(|high| *high > 0.0) {
        Some(high) => format!(
            "{} ({:.0}% of the estimate's top)",
            money(spent),
            spent / high * 100.0
        ),
        None => money(spent),
    };
    Ok(JobLive {
        stage: job
            .current_stage
            .clone()
            .unwrap_or_else(|| job.status.to_string()),
        elapsed: duration(job.elapsed_seconds),
        remaining: job
            .estimated_remaining_seconds
            .filter(|_| !job.status.is_terminal())
            .map(duration)
            .unwrap_or_else(|| "—".into()),
        cost_so_far,
        estimate,
        loss_chart,
        learning_rate_chart,
        gpu_chart,
        memory_chart,
        stages: stage_chips(&job),
        latest: points.last().cloned(),
        charged_to,
        budgets,
        job,
    })
}

#[derive(Template)]
#[template(path = "job.html")]
struct JobPage {
    frame: Frame,
    // The actions sit outside the live region, so a refresh never wipes a half-typed
    // reason; the page reloads when the job ends.
    can_cancel: bool,
    can_resume: bool,
    can_configure: bool,
    can_start: bool,
    job: Job,
    /// The rendered live region ([`JobLive`]), also served alone for refreshes.
    live_html: String,
    events: Vec<Event>,
    checkpoints: Vec<Checkpoint>,
    artifacts: Vec<Artifact>,
    notice: Option<String>,
    /// The latest validation's verdict and overall score, shown by the adapter.
    quality: Option<(String, String)>,
    /// How training batches conversations: padded, or packed and how well.
    batching: Option<String>,
    /// How the frozen base is held, when the job quantizes it.
    base_weights: Option<String>,
    /// Whether training computes each layer's activations again in the backward.
    checkpointing: bool,
}

#[derive(Deserialize)]
struct Notice {
    notice: Option<String>,
}

async fn job_detail(
    State(state): State<AppState>,
    user: PageUser,
    Path(id): Path<Uuid>,
    Query(notice): Query<Notice>,
) -> PageResult {
    let job = visible_job(&state, &user.0, id).await?;
    let frame = Frame::new(
        &user,
        "jobs",
        &[("Jobs", "/training/jobs"), (&job.name, "")],
    );
    // The page's reads are independent once the job is known: on PostgreSQL they overlap.
    let (recent, (checkpoints, artifacts), validations) = futures::try_join!(
        async { Ok::<_, ServiceError>(events::latest(&state.db, job.id, 200).await?) },
        crate::service::artifact::outputs_of(&state, &job),
        async {
            Ok::<_, ServiceError>(crate::db::validations::for_job(&state.db, job.id, 1).await?)
        },
    )?;
    let quality = validations.first().and_then(|run| {
        run.overall_status.0.map(|verdict| {
            let score = run.overall_score.map_or("—".into(), |s| format!("{s:.1}"));
            (verdict.label().to_owned(), score)
        })
    });
    let batching = batching(&job, &recent);
    let base_weights = base_weights(&job, &recent);
    let checkpointing = job
        .hyperparameters
        .as_ref()
        .is_some_and(|h| h.gradient_checkpointing);
    let live = job_live_view(&state, job).await?;
    let status = live.job.status;
    let page = JobPage {
        frame,
        can_cancel: status.check(JobStatus::Cancelled).is_ok(),
        can_resume: matches!(status, JobStatus::Interrupted | JobStatus::Failed),
        can_configure: status.check(JobStatus::Configured).is_ok(),
        can_start: status == JobStatus::Configured,
        events: recent,
        checkpoints,
        artifacts,
        notice: notice.notice,
        quality,
        batching,
        base_weights,
        checkpointing,
        live_html: live
            .render()
            .map_err(|e| ServiceError::Internal(e.to_string()))?,
        job: live.job,
    };
    Ok(render(&page))
}

/// How the job batches its conversations, from its hyperparameters and the packing plan its
/// agent reported (an event whose details hold the plan's figures).
fn batching(job: &Job, events: &[Event]) -> Option<String> {
    let hyperparameters = job.hyperparameters.as_ref()?;
    if !hyperparameters.packing {
        return Some("padded: one conversation per row".into());
    }
    let plan = events.iter().find_map(|event| {
        let details = event.details.as_ref()?;
        let figure = |key: &str| details.get(key).and_then(serde_json::Value::as_f64);
        Some((
            figure("conversations")?,
            figure("rows")?,
            figure("packing_efficiency")?,
            figure("unpacked_efficiency")?,
        ))
    });
    let max_seq_len = hyperparameters.max_seq_len;
    Some(match plan {
        Some((conversations, rows, packed, padded)) => format!(
            "packed: {conversations:.0} conversations in {rows:.0} rows of up to {max_seq_len} tokens; {:.1}% of token slots hold real tokens ({:.1}% padded)",
            100.0 * packed,
            100.0 * padded
        ),
        None => format!("packed into rows of up to {max_seq_len} tokens"),
    })
}

/// How a quantized job holds its frozen base, from its hyperparameters and the
/// quantization report its agent sent (an event whose details hold the sizes).
fn base_weights(job: &Job, events: &[Event]) -> Option<String> {
    let quant = job.hyperparameters.as_ref()?.base_quant;
    if quant.is_none() {
        return None;
    }
    let sizes = events.iter().find_map(|event| {
        let details = event.details.as_ref()?;
        let bytes = |key: &str| details.get(key).and_then(serde_json::Value::as_f64);
        Some((bytes("held_bytes")?, bytes("dense_bytes")?))
    });
    let name = quant.name();
    Some(match sizes {
        Some((held, dense)) => format!(
            "decoder projections quantized to {name}: {:.1} MiB instead of {:.1} MiB ({:.0}%); the adapter was trained against this quantized base, as with QLoRA",
            held / MIB,
            dense / MIB,
            100.0 * held / dense.max(1.0)
        ),
        None => format!("decoder projections quantized to {name} (sizes once training starts)"),
    })
}

const MIB: f64 = 1024.0 * 1024.0;

/// The live region alone, fetched by the page's script when the stream says it changed.
async fn job_live(
    State(state): State<AppState>,
    user: PageUser,
    Path(id): Path<Uuid>,
) -> PageResult {
    let job = visible_job(&state, &user.0, id).await?;
    Ok(render(&job_live_view(&state, job).await?))
}

#[derive(Deserialize)]
struct CancelForm {
    #[serde(default)]
    reason: String,
}

async fn cancel(
    State(state): State<AppState>,
    user: PageUser,
    Path(id): Path<Uuid>,
    Form(form): Form<CancelForm>,
) -> PageResult {
    let job = visible_job(&state, &user.0, id).await?;
    cancel_job(&state, &job, &form.reason).await?;
    Ok(Redirect::to(&format!("/training/job/{id}?notice=Job+cancelled")).into_response())
}

async fn resume(State(state): State<AppState>, user: PageUser, Path(id): Path<Uuid>) -> PageResult {
    let job = visible_job(&state, &user.0, id).await?;
    resume_job(&state, &user.0, &job, None).await?;
    Ok(Redirect::to(&format!("/training/job/{id}?notice=Job+queued+again")).into_response())
}

/// Sends the browser to a fresh signed link of the artifact.
async fn download(
    State(state): State<AppState>,
    user: PageUser,
    headers: HeaderMap,
    Path(id): Path<Uuid>,
) -> PageResult {
    let link = crate::service::artifact::signed_download(
        &state,
        &user.0,
        &crate::request::base_url(&state, &headers),
        id,
    )
    .await?;
    Ok(Redirect::to(&link.download_url).into_response())
}
