//! The dashboard's pages: one view struct per page, filled from the same storage
//! functions the API uses, with the same ownership rules (another user's job is a 404).

use askama::Template;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use chrono::{DateTime, Datelike, Utc};
use serde::Deserialize;
use uuid::Uuid;

use super::charts::{line_chart, Series};
use super::{render, PageError, PageUser};
use crate::db::artifacts::{self, Artifact};
use crate::db::attempts::{self, Checkpoint};
use crate::db::events::{self, Event, EventFilter};
use crate::db::files::{self, FileFilter, StoredConversation, TrainingFile};
use crate::db::jobs::{self, Job, Viewer};
use crate::db::metrics::{self, MetricPoint};
use crate::db::{agents, now};
use crate::domain::JobStatus;
use crate::request::{end_session, session_cookie_for};
use crate::service::account::verify_credentials;
use crate::service::job::resume_job;
use crate::service::job::{cancel_job, unmet_eligibility, visible_job};
use crate::service::AppState;
use crate::service::ServiceError;

type PageResult = Result<Response, PageError>;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/", get(home))
        .route(
            "/training/files",
            get(file_list)
                .post(upload)
                // Uploads enforce their own, configurable limit while streaming.
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/training/files/{id}", get(file_detail))
        .route("/training/jobs", get(job_list))
        .route("/training/job/{id}", get(job_detail))
        .route("/training/job/{id}/live", get(job_live))
        .route("/training/job/{id}/cancel", post(cancel))
        .route("/training/job/{id}/resume", post(resume))
        .route("/training/artifact/{id}", get(download))
        .route("/fleet", get(fleet))
}

/// What every page's frame shows: who is signed in and where they are.
pub struct Frame {
    pub email: String,
    pub sees_fleet: bool,
    pub section: &'static str,
    /// (label, link) from Home to the page.
    pub breadcrumbs: Vec<(String, String)>,
}

impl Frame {
    pub fn new(user: &PageUser, section: &'static str, breadcrumbs: &[(&str, &str)]) -> Frame {
        Frame {
            email: user.0 .0.email.clone(),
            sees_fleet: user.0 .0.role().sees_everything(),
            section,
            breadcrumbs: breadcrumbs
                .iter()
                .map(|(label, link)| (label.to_string(), link.to_string()))
                .collect(),
        }
    }
}

fn viewer(user: &PageUser) -> Viewer {
    user.0.viewer()
}

/// "3 min ago", "2 h ago", or the date.
fn ago(at: &DateTime<Utc>) -> String {
    let seconds = (now() - *at).num_seconds().max(0);
    match seconds {
        0..60 => format!("{seconds} s ago"),
        60..3600 => format!("{} min ago", seconds / 60),
        3600..86_400 => format!("{} h ago", seconds / 3600),
        _ => at.format("%Y-%m-%d").to_string(),
    }
}

/// Dollars with cents; an empty sum (-0.0 in Rust) shows as $0.00.
fn money(amount: f64) -> String {
    format!("${:.2}", amount + 0.0)
}

fn duration(seconds: i64) -> String {
    match seconds {
        ..60 => format!("{} s", seconds.max(0)),
        60..3600 => format!("{} min {} s", seconds / 60, seconds % 60),
        _ => format!("{} h {} min", seconds / 3600, seconds % 3600 / 60),
    }
}

// ---- login ----

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    email: String,
    error: Option<String>,
}

async fn login_form() -> Response {
    render(&LoginPage {
        email: String::new(),
        error: None,
    })
}

#[derive(Deserialize)]
struct LoginForm {
    email: String,
    password: String,
}

async fn login(
    State(state): State<AppState>,
    ConnectInfo(client): ConnectInfo<std::net::SocketAddr>,
    Form(form): Form<LoginForm>,
) -> PageResult {
    match verify_credentials(&state, client.ip(), &form.email, form.password).await {
        Ok(user) => {
            let cookie = session_cookie_for(&state, &user).await?;
            Ok(([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response())
        }
        Err(error @ (ServiceError::Unauthorized | ServiceError::TooManyRequests { .. })) => {
            let (status, message) = match error {
                ServiceError::Unauthorized => (
                    StatusCode::UNAUTHORIZED,
                    "That email and password do not match an account.".to_owned(),
                ),
                other => (StatusCode::TOO_MANY_REQUESTS, other.to_string()),
            };
            let page = LoginPage {
                email: form.email,
                error: Some(message),
            };
            Ok((status, render(&page)).into_response())
        }
        Err(other) => Err(PageError(other)),
    }
}

async fn logout(State(state): State<AppState>, headers: HeaderMap) -> PageResult {
    let clear = end_session(&state, &headers).await?;
    Ok(([(header::SET_COOKIE, clear)], Redirect::to("/login")).into_response())
}

// ---- home ----

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

fn job_rows(list: Vec<Job>, queue: &[Uuid]) -> Vec<JobRow> {
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

#[derive(Template)]
#[template(path = "home.html")]
struct HomePage {
    frame: Frame,
    /// Active and queued jobs.
    rows: Vec<JobRow>,
    queued: usize,
    completed_today: usize,
    spend_this_month: String,
    agents_online: usize,
    agents_total: usize,
}

async fn home(State(state): State<AppState>, user: PageUser) -> PageResult {
    let (list, _) = jobs::list(&state.db, viewer(&user), None, 500, 0).await?;
    let today = now().date_naive();
    let month = (today.year(), today.month());
    let completed_today = list
        .iter()
        .filter(|j| j.status == JobStatus::Completed)
        .filter(|j| j.completed_at.is_some_and(|t| t.date_naive() == today))
        .count();
    let spend: f64 = list
        .iter()
        .filter(|j| {
            let started = j.started_at.unwrap_or(j.created_at).date_naive();
            (started.year(), started.month()) == month
        })
        .map(|j| j.final_cost.unwrap_or(j.current_cost))
        .sum();
    let queued = list
        .iter()
        .filter(|j| j.status == JobStatus::Queued)
        .count();
    let queue = jobs::queue_order(&state.db).await?;
    let active: Vec<Job> = list.into_iter().filter(|j| j.status.is_live()).collect();
    let fleet = agents::list(&state.db).await?;
    let page = HomePage {
        frame: Frame::new(&user, "home", &[]),
        rows: job_rows(active, &queue),
        queued,
        completed_today,
        spend_this_month: money(spend),
        agents_online: fleet
            .iter()
            .filter(|a| a.status == crate::domain::AgentStatus::Online)
            .count(),
        agents_total: fleet.len(),
    };
    Ok(render(&page))
}

// ---- jobs ----

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
    latest: Option<MetricPoint>,
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
    // Charts keep about 400 points whatever the run's length; the last stored step says
    // how long it is (the job's own step may lag its metrics).
    let last_step = metrics::latest(&state.db, job.id)
        .await?
        .map_or(job.current_step, |p| p.step);
    let interval = (last_step / 400).max(1);
    let points = metrics::history(&state.db, job.id, interval, 100_000).await?;
    let series = |name: &'static str, value: fn(&MetricPoint) -> Option<f64>| Series {
        name,
        points: points
            .iter()
            .filter_map(|p| value(p).map(|v| (p.step as f64, v)))
            .collect(),
    };
    let loss_chart = line_chart(
        "Loss",
        "step",
        &[
            series("training loss", |p| p.training_loss),
            series("validation loss", |p| p.validation_loss),
        ],
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
    let estimate = match (job.estimated_cost_min, job.estimated_cost_max) {
        (Some(low), Some(high)) => format!("{}–{}", money(low), money(high)),
        _ => "not configured".into(),
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
        cost_so_far: money(job.final_cost.unwrap_or(cost)),
        estimate,
        loss_chart,
        learning_rate_chart,
        gpu_chart,
        memory_chart,
        latest: points.last().cloned(),
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
    stages: Vec<StageChip>,
    events: Vec<Event>,
    checkpoints: Vec<Checkpoint>,
    artifacts: Vec<Artifact>,
    notice: Option<String>,
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
    // The last 200 events; a second read only when the log is longer than that.
    let recent_events = |offset: i64| EventFilter {
        limit: 200,
        offset,
        ..EventFilter::default()
    };
    let (mut recent, total) = events::list(&state.db, job.id, &recent_events(0)).await?;
    if total > 200 {
        recent = events::list(&state.db, job.id, &recent_events(total - 200))
            .await?
            .0;
    }
    let frame = Frame::new(
        &user,
        "jobs",
        &[("Jobs", "/training/jobs"), (&job.name, "")],
    );
    let checkpoints = attempts::checkpoints(&state.db, job.id).await?;
    let artifacts = artifacts::for_job(&state.db, job.id)
        .await?
        .into_iter()
        .filter(|a| a.artifact_type != protocol::agent::ArtifactKind::Checkpoint)
        .collect();
    let live = job_live_view(&state, job).await?;
    let status = live.job.status;
    let page = JobPage {
        frame,
        can_cancel: status.check(JobStatus::Cancelled).is_ok(),
        can_resume: matches!(status, JobStatus::Interrupted | JobStatus::Failed),
        can_configure: status.check(JobStatus::Configured).is_ok(),
        can_start: status == JobStatus::Configured,
        stages: stage_chips(&live.job),
        events: recent.into_iter().rev().collect(),
        checkpoints,
        artifacts,
        notice: notice.notice,
        live_html: live
            .render()
            .map_err(|e| ServiceError::Internal(e.to_string()))?,
        job: live.job,
    };
    Ok(render(&page))
}

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

// ---- training files ----

#[derive(Deserialize)]
struct FileSearch {
    search: Option<String>,
    enrichment_status: Option<String>,
}

#[derive(Template)]
#[template(path = "files.html")]
struct FilesPage {
    frame: Frame,
    files: Vec<TrainingFile>,
    search: String,
    enrichment_status: String,
    statuses: [&'static str; 4],
}

async fn file_list(
    State(state): State<AppState>,
    user: PageUser,
    Query(query): Query<FileSearch>,
) -> PageResult {
    let search = query.search.unwrap_or_default();
    let statuses = ["pending", "processing", "completed", "failed"];
    let enrichment_status = query
        .enrichment_status
        .filter(|s| statuses.contains(&s.as_str()))
        .unwrap_or_default();
    let (list, _) = files::list(
        &state.db,
        user.0 .0.id,
        &FileFilter {
            status: None,
            enrichment_status: Some(enrichment_status.clone()).filter(|s| !s.is_empty()),
            search: Some(search.clone()).filter(|s| !s.trim().is_empty()),
            limit: 200,
            offset: 0,
        },
    )
    .await?;
    let page = FilesPage {
        frame: Frame::new(&user, "files", &[("Training files", "/training/files")]),
        files: list,
        search,
        enrichment_status,
        statuses,
    };
    Ok(render(&page))
}

/// The upload form without JavaScript: store the file, then show its page.
async fn upload(
    State(state): State<AppState>,
    user: PageUser,
    headers: HeaderMap,
    multipart: axum::extract::Multipart,
) -> PageResult {
    let file = crate::request::upload::receive_upload(&state, &user.0, &headers, multipart).await?;
    Ok(Redirect::to(&format!("/training/files/{}", file.id)).into_response())
}

#[derive(Template)]
#[template(path = "file.html")]
struct FilePage {
    frame: Frame,
    file: TrainingFile,
    unmet: Vec<String>,
    errors: Vec<String>,
    conversations: Vec<(StoredConversation, Vec<PreviewMessage>)>,
    quality: Vec<(String, String)>,
    scaffolding: Vec<(String, String)>,
    review: Vec<(String, String)>,
}

/// A metadata value as a person reads it: numbers with two decimals unless whole, "—" for
/// nothing, distributions as "name 12 (30%)" lists.
fn shown(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Null => "—".into(),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.to_string(),
            (None, Some(f)) if f.fract() == 0.0 => format!("{f:.0}"),
            (None, Some(f)) => format!("{f:.2}"),
            _ => n.to_string(),
        },
        Value::String(s) => s.clone(),
        Value::Array(items) if items.is_empty() => "none".into(),
        Value::Array(items) => items
            .iter()
            .map(|item| match item.as_object() {
                Some(entry) => {
                    let name = entry
                        .iter()
                        .find(|(k, _)| !matches!(k.as_str(), "count" | "percentage"))
                        .map(|(_, v)| shown(v))
                        .unwrap_or_default();
                    let count = entry.get("count").map(shown).unwrap_or_default();
                    let share = entry.get("percentage").map(shown).unwrap_or_default();
                    format!("{name} {count} ({share}%)")
                }
                None => shown(item),
            })
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    }
}

fn pairs(value: &serde_json::Value) -> Vec<(String, String)> {
    value
        .as_object()
        .map(|map| {
            map.iter()
                .map(|(k, v)| (k.replace('_', " "), shown(v)))
                .collect()
        })
        .unwrap_or_default()
}

/// A stored conversation's messages as (role, content) for the preview.
pub struct PreviewMessage {
    pub role: String,
    pub content: String,
}

fn preview(conversation: &StoredConversation) -> Vec<PreviewMessage> {
    conversation
        .messages
        .0
        .as_array()
        .map(|messages| {
            messages
                .iter()
                .map(|m| PreviewMessage {
                    role: m["role"].as_str().unwrap_or("?").to_owned(),
                    content: m["content"].as_str().unwrap_or_default().to_owned(),
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn file_detail(
    State(state): State<AppState>,
    user: PageUser,
    Path(id): Path<Uuid>,
) -> PageResult {
    let file = files::get_owned(&state.db, id, user.0 .0.id)
        .await?
        .ok_or(ServiceError::NotFound("training file"))?;
    let conversations = files::conversations(&state.db, file.id, None, 5)
        .await?
        .into_iter()
        .map(|c| {
            let messages = preview(&c);
            (c, messages)
        })
        .collect();
    let page = FilePage {
        frame: Frame::new(
            &user,
            "files",
            &[("Training files", "/training/files"), (&file.name, "")],
        ),
        unmet: unmet_eligibility(&state, &file),
        errors: file
            .enrichment_error
            .as_deref()
            .map(|e| e.lines().map(str::to_owned).collect())
            .unwrap_or_default(),
        quality: pairs(&file.quality_scores.0),
        scaffolding: pairs(&file.scaffolding_distribution.0),
        review: pairs(&file.human_review.0),
        conversations,
        file,
    };
    Ok(render(&page))
}

// ---- fleet ----

pub struct AgentRow {
    pub name: String,
    pub status: String,
    pub capacity: String,
    pub last_seen: String,
    /// The job the agent is running, as (id, name).
    pub current_job: Option<(Uuid, String)>,
    pub host: String,
    pub gpus: Vec<GpuRow>,
}

pub struct GpuRow {
    pub name: String,
    pub utilization: String,
    pub memory: String,
    pub temperature: String,
}

#[derive(Template)]
#[template(path = "fleet.html")]
struct FleetPage {
    frame: Frame,
    agents: Vec<AgentRow>,
}

async fn fleet(State(state): State<AppState>, user: PageUser) -> PageResult {
    if !user.0 .0.role().sees_everything() {
        return Err(PageError(ServiceError::Forbidden(
            "the fleet is visible to operators and admins only".into(),
        )));
    }
    let fleet = agents::list(&state.db).await?;
    let mut running = std::collections::HashMap::new();
    for attempt_id in fleet.iter().filter_map(|a| a.current_attempt_id) {
        if let Some(attempt) = attempts::get(&state.db, attempt_id).await? {
            if let Some(job) = jobs::get_any(&state.db, attempt.job_id).await? {
                running.insert(attempt_id, (job.id, job.name));
            }
        }
    }
    let agents = fleet
        .into_iter()
        .map(|agent| {
            let gpus: Vec<protocol::agent::GpuTelemetry> =
                serde_json::from_value(agent.gpus.0.clone()).unwrap_or_default();
            let host: protocol::agent::HostTelemetry =
                serde_json::from_value(agent.host.0.clone()).unwrap_or_default();
            AgentRow {
                name: agent.name,
                status: agent.status.to_string(),
                capacity: agent.capacity,
                last_seen: agent
                    .last_heartbeat_at
                    .as_ref()
                    .map(ago)
                    .unwrap_or_else(|| "never".into()),
                current_job: agent
                    .current_attempt_id
                    .and_then(|a| running.get(&a).cloned()),
                host: format!(
                    "{} CPUs at {:.0}%, {:.1} of {:.1} GB RAM, {:.0} GB free disk",
                    host.cpu_count,
                    host.cpu_percent,
                    host.memory_used_mb as f64 / 1024.0,
                    host.memory_total_mb as f64 / 1024.0,
                    host.disk_free_mb as f64 / 1024.0
                ),
                gpus: gpus
                    .into_iter()
                    .map(|g| GpuRow {
                        utilization: g
                            .utilization_percent
                            .map(|u| format!("{u}%"))
                            .unwrap_or_else(|| "—".into()),
                        memory: format!(
                            "{:.1} / {:.1} GB",
                            g.memory_used_mb as f64 / 1024.0,
                            g.memory_total_mb as f64 / 1024.0
                        ),
                        temperature: g
                            .temperature_c
                            .map(|t| format!("{t} °C"))
                            .unwrap_or_else(|| "—".into()),
                        name: g.name,
                    })
                    .collect(),
            }
        })
        .collect();
    let page = FleetPage {
        frame: Frame::new(&user, "fleet", &[("Fleet", "/fleet")]),
        agents,
    };
    Ok(render(&page))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_reads_as_text() {
        use serde_json::json;
        assert_eq!(shown(&json!(null)), "—");
        assert_eq!(shown(&json!(40.0)), "40");
        assert_eq!(shown(&json!(4.256)), "4.26");
        assert_eq!(shown(&json!([])), "none");
        assert_eq!(
            shown(&json!([{"type": "anxious", "count": 3, "percentage": 60.0}])),
            "anxious 3 (60%)"
        );
    }

    #[test]
    fn an_empty_sum_of_money_is_zero_not_negative() {
        let nothing: f64 = std::iter::empty::<f64>().sum();
        assert_eq!(money(nothing), "$0.00");
        assert_eq!(money(12.345), "$12.35");
    }
}
