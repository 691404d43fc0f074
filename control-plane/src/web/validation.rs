//! Quality validation pages (spec stage 6): a job's scorecard with one section per suite
//! and its samples, the gates and recommendations, the before/after view against a
//! baseline, the run form and the export buttons. Progress arrives live over the job's
//! SSE stream.

use askama::Template;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use protocol::validation::{Suite, SuiteReport};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::frame::Frame;
use super::{render, PageError, PageUser};
use crate::db::jobs;
use crate::db::validations::{RunStatus, ValidationRun};
use crate::domain::validation::GATES;
use crate::domain::JobStatus;
use crate::request::base_url;
use crate::service::validation::{self, RunRequest};
use crate::service::validation_report;
use crate::service::{AppState, ServiceError};

type PageResult = Result<Response, PageError>;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/validation/{job_id}", get(page))
        .route("/validation/{job_id}/run", post(run))
        .route("/validation/runs/{id}/export", post(export))
}

pub struct FigureView {
    pub name: String,
    pub value: String,
}

pub struct SampleView {
    pub prompt: String,
    pub response: String,
    pub reference: String,
    pub figures: String,
    pub judge_answer: String,
}

pub struct SuiteView {
    pub id: &'static str,
    pub title: &'static str,
    pub status: &'static str,
    pub score: String,
    pub reason: String,
    pub figures: Vec<FigureView>,
    pub samples: Vec<SampleView>,
}

pub struct GateView {
    pub gate: String,
    pub value: String,
    pub pass: String,
    pub warn: String,
    pub outcome: String,
    pub note: String,
}

pub struct PairView {
    pub prompt: String,
    pub before: String,
    pub after: String,
}

pub struct ComparisonView {
    pub suite: String,
    pub baseline: String,
    pub adapter: String,
    pub delta: String,
    pub pairs: Vec<PairView>,
}

pub struct RunRow {
    pub id: Uuid,
    pub status: &'static str,
    pub verdict: String,
    pub score: String,
    pub suites: String,
    pub created: String,
    pub selected: bool,
}

pub struct BaselineOption {
    pub id: Uuid,
    pub name: String,
}

pub struct SuiteOption {
    pub id: &'static str,
    pub title: &'static str,
}

pub struct GateOption {
    pub name: &'static str,
    pub help: &'static str,
    pub pass: String,
}

#[derive(Template)]
#[template(path = "validation.html")]
struct ValidationPage {
    frame: Frame,
    job_id: Uuid,
    job_name: String,
    completed: bool,
    run: Option<RunView>,
    runs: Vec<RunRow>,
    suites: Vec<SuiteOption>,
    gates: Vec<GateOption>,
    baselines: Vec<BaselineOption>,
    error: Option<String>,
}

pub struct RunView {
    pub id: Uuid,
    pub status: &'static str,
    pub pending: bool,
    pub progress: String,
    pub verdict: String,
    pub verdict_class: &'static str,
    pub score: String,
    pub error: String,
    pub examples: String,
    pub suites: Vec<SuiteView>,
    pub gates: Vec<GateView>,
    pub recommendations: Vec<FigureView>,
    pub comparison: Vec<ComparisonView>,
    pub baseline_name: String,
}

fn number(value: Option<f64>) -> String {
    value.map_or_else(|| "—".into(), |v| format!("{v:.2}"))
}

fn suite_view(report: &SuiteReport) -> SuiteView {
    let mut numbers = Vec::new();
    validation_report::flatten("", &report.figures, &mut numbers);
    let figures = numbers
        .into_iter()
        .map(|(name, value)| FigureView {
            name,
            value: number(Some(value)),
        })
        .collect();
    SuiteView {
        id: report.suite.as_str(),
        title: report.suite.title(),
        status: report.status.as_str(),
        score: number(report.score),
        reason: report.reason.clone().unwrap_or_default(),
        figures,
        samples: report
            .samples
            .iter()
            .map(|s| SampleView {
                prompt: s.prompt.clone(),
                response: s.response.clone(),
                reference: s.reference.clone().unwrap_or_default(),
                figures: s
                    .figures
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.3}"))
                    .collect::<Vec<_>>()
                    .join(" · "),
                judge_answer: s.judge_answer.clone().unwrap_or_default(),
            })
            .collect(),
    }
}

fn run_view(run: &ValidationRun, baseline_name: String) -> RunView {
    let verdict = run.overall_status.0;
    let progress = run
        .progress
        .as_ref()
        .map(|p| {
            format!(
                "{} ({}/{})",
                p.0["message"].as_str().unwrap_or(""),
                p.0["done"],
                p.0["total"]
            )
        })
        .unwrap_or_default();
    let examples = run
        .examples
        .as_ref()
        .map(|e| {
            format!(
                "{} examples from the {} (SHA-256 {}…); replies generated for lines {}",
                e.0["lines"].as_array().map_or(0, Vec::len),
                e.0["source"].as_str().unwrap_or("").replace('_', " "),
                e.0["file_sha256"]
                    .as_str()
                    .unwrap_or("")
                    .get(..12)
                    .unwrap_or(""),
                e.0["generated_lines"]
                    .as_array()
                    .map(|l| l
                        .iter()
                        .map(Value::to_string)
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_default()
            )
        })
        .unwrap_or_default();
    let comparison = run
        .comparison
        .as_ref()
        .and_then(|c| c.0.as_object())
        .map(|suites| {
            suites
                .iter()
                .map(|(suite, c)| ComparisonView {
                    suite: suite.replace('_', " "),
                    baseline: number(c["baseline_score"].as_f64()),
                    adapter: number(c["adapter_score"].as_f64()),
                    delta: c["score_delta"]
                        .as_f64()
                        .map_or("—".into(), |d| format!("{d:+.2}")),
                    pairs: c["samples"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| PairView {
                            prompt: p["prompt"].as_str().unwrap_or("").to_owned(),
                            before: p["before"].as_str().unwrap_or("").to_owned(),
                            after: p["after"].as_str().unwrap_or("").to_owned(),
                        })
                        .collect(),
                })
                .collect()
        })
        .unwrap_or_default();
    RunView {
        id: run.id,
        status: run.status.as_str(),
        pending: matches!(run.status, RunStatus::Queued | RunStatus::Running),
        progress,
        verdict: verdict.map_or("—".into(), |v| v.label().to_owned()),
        verdict_class: verdict.map_or("", |v| v.as_str()),
        score: number(run.overall_score),
        error: run.error_message.clone().unwrap_or_default(),
        examples,
        suites: run.reports().into_iter().map(suite_view).collect(),
        gates: run
            .gate_results
            .iter()
            .flat_map(|g| g.0.iter())
            .map(|g| GateView {
                gate: g.gate.clone(),
                value: number(g.value),
                pass: g.threshold.pass.to_string(),
                warn: g.threshold.warn.to_string(),
                outcome: format!("{:?}", g.outcome).to_lowercase(),
                note: g.note.clone().unwrap_or_default(),
            })
            .collect(),
        recommendations: run
            .recommendations
            .iter()
            .flat_map(|r| r.0.iter())
            .map(|r| FigureView {
                name: r.figure.clone(),
                value: r.message.clone(),
            })
            .collect(),
        comparison,
        baseline_name,
    }
}

async fn page_for(
    state: &AppState,
    user: &PageUser,
    job_id: Uuid,
    selected: Option<Uuid>,
    error: Option<String>,
) -> Result<ValidationPage, PageError> {
    let (job, runs) = validation::job_runs(state, &user.0, job_id).await?;
    let chosen = selected
        .and_then(|id| runs.iter().find(|r| r.id == id))
        .or(runs.first());
    let baseline_name = match chosen.and_then(|r| r.comparison_baseline_id) {
        Some(id) => jobs::get_any(&state.db, id)
            .await?
            .map(|j| j.name)
            .unwrap_or_default(),
        None => String::new(),
    };
    let run = chosen.map(|r| run_view(r, baseline_name));
    let (mine, _) = jobs::list(
        &state.db,
        user.0.viewer(),
        Some(JobStatus::Completed),
        200,
        0,
    )
    .await?;
    let baselines = mine
        .into_iter()
        .filter(|j| j.id != job.id && j.base_model == job.base_model)
        .map(|j| BaselineOption {
            id: j.id,
            name: j.name,
        })
        .collect();
    let gates = GATES
        .iter()
        .map(|(name, _, help)| GateOption {
            name,
            help,
            pass: state
                .settings
                .validation
                .gates
                .get(*name)
                .map(|t| t.pass.to_string())
                .unwrap_or_default(),
        })
        .collect();
    let job_link = format!("/training/job/{}", job.id);
    let page_link = format!("/validation/{}", job.id);
    Ok(ValidationPage {
        frame: Frame::new(
            user,
            "history",
            &[
                ("History", "/training/history"),
                (&job.name, &job_link),
                ("Validation", &page_link),
            ],
        ),
        job_id: job.id,
        job_name: job.name.clone(),
        completed: job.status == JobStatus::Completed,
        runs: runs
            .iter()
            .map(|r| RunRow {
                id: r.id,
                status: r.status.as_str(),
                verdict: r
                    .overall_status
                    .0
                    .map_or("—".into(), |v| v.label().to_owned()),
                score: number(r.overall_score),
                suites: r
                    .test_suites
                    .0
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                created: r.created_at.format("%Y-%m-%d %H:%M").to_string(),
                selected: Some(r.id) == chosen.map(|c| c.id),
            })
            .collect(),
        run,
        suites: Suite::ALL
            .iter()
            .map(|s| SuiteOption {
                id: s.as_str(),
                title: s.title(),
            })
            .collect(),
        gates,
        baselines,
        error,
    })
}

fn query_value(query: Option<&str>, key: &str) -> Option<String> {
    url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

async fn page(
    State(state): State<AppState>,
    user: PageUser,
    Path(job_id): Path<Uuid>,
    RawQuery(query): RawQuery,
) -> PageResult {
    let selected = query_value(query.as_deref(), "run").and_then(|v| v.parse().ok());
    let error = query_value(query.as_deref(), "error");
    Ok(render(
        &page_for(&state, &user, job_id, selected, error).await?,
    ))
}

/// The run form: suites as repeated `test_suites`, a baseline, gate pass thresholds
/// (`gate.<name>`), samples and new tokens.
fn run_request(body: &str) -> Result<RunRequest, String> {
    let mut request = RunRequest::default();
    let mut gates = Map::new();
    for (key, value) in url::form_urlencoded::parse(body.as_bytes()) {
        let value = value.trim().to_owned();
        if value.is_empty() {
            continue;
        }
        match key.as_ref() {
            "test_suites" => request.test_suites.push(value),
            "comparison_baseline" => {
                request.comparison_baseline =
                    Some(value.parse().map_err(|_| "bad baseline".to_owned())?)
            }
            "max_samples" => {
                request.max_samples = Some(
                    value
                        .parse()
                        .map_err(|_| "max_samples must be a whole number".to_owned())?,
                )
            }
            "max_new_tokens" => {
                request.max_new_tokens = Some(
                    value
                        .parse()
                        .map_err(|_| "max_new_tokens must be a whole number".to_owned())?,
                )
            }
            gate if gate.starts_with("gate.") => {
                let number: f64 = value
                    .parse()
                    .map_err(|_| format!("{gate} must be a number"))?;
                gates.insert(gate["gate.".len()..].to_owned(), Value::from(number));
            }
            _ => {}
        }
    }
    if !gates.is_empty() {
        request.gates = Some(gates);
    }
    Ok(request)
}

fn describe(error: &ServiceError) -> String {
    match error {
        ServiceError::Validation(errors) => errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    }
}

async fn run(
    State(state): State<AppState>,
    user: PageUser,
    Path(job_id): Path<Uuid>,
    body: String,
) -> PageResult {
    let outcome = match run_request(&body) {
        Ok(request) => validation::request_run(&state, &user.0, job_id, &request)
            .await
            .map_err(|e| match e {
                ServiceError::NotFound(_) => Err(e),
                other => Ok(describe(&other)),
            }),
        Err(message) => Err(Ok(message)),
    };
    let target = match outcome {
        Ok(accepted) => format!("/validation/{job_id}?run={}", accepted.validation_id),
        Err(Ok(message)) => format!(
            "/validation/{job_id}?error={}",
            url::form_urlencoded::byte_serialize(message.as_bytes()).collect::<String>()
        ),
        Err(Err(error)) => return Err(error.into()),
    };
    Ok(Redirect::to(&target).into_response())
}

async fn export(
    State(state): State<AppState>,
    user: PageUser,
    headers: HeaderMap,
    Path(id): Path<Uuid>,
    body: String,
) -> PageResult {
    let format = url::form_urlencoded::parse(body.as_bytes())
        .find(|(k, _)| k == "format")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let base = base_url(&state, &headers);
    let link = validation::export(&state, &user.0, &base, id, &format).await?;
    Ok(Redirect::to(&link.download_url).into_response())
}
