//! Finished jobs and side-by-side comparison (spec stage 5): hyperparameter differences,
//! overlaid loss curves, cost against final loss.

use askama::Template;
use axum::extract::{RawQuery, State};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use uuid::Uuid;

use super::charts::{line_chart, Series};
use super::frame::Frame;
use super::{render, PageError, PageUser};
use crate::db::jobs::{self, Job};
use crate::db::metrics;
use crate::domain::JobStatus;
use crate::service::job::visible_job;
use crate::service::metric_history;
use crate::service::AppState;
use crate::service::ServiceError;

type PageResult = Result<Response, PageError>;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/training/history", get(history))
        .route("/training/compare", get(compare))
}

pub struct FinishedRow {
    pub id: Uuid,
    pub name: String,
    pub status: String,
    pub final_loss: String,
    pub validation_loss: String,
    pub cost: String,
    pub duration: String,
    pub finished: String,
}

fn loss(value: Option<f64>) -> String {
    value.map_or_else(|| "—".into(), |v| format!("{v:.4}"))
}

fn hours(job: &Job) -> String {
    match (job.started_at, job.completed_at) {
        (Some(start), Some(end)) => {
            let minutes = (end - start).num_minutes();
            format!("{} h {} min", minutes / 60, minutes % 60)
        }
        _ => "—".into(),
    }
}

#[derive(Template)]
#[template(path = "history.html")]
struct HistoryPage {
    frame: Frame,
    rows: Vec<FinishedRow>,
}

async fn history(State(state): State<AppState>, user: PageUser) -> PageResult {
    let (list, _) = jobs::list(&state.db, user.0.viewer(), None, 500, 0).await?;
    let finished: Vec<Job> = list
        .into_iter()
        .filter(|j| {
            matches!(
                j.status,
                JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
            )
        })
        .collect();
    let ids: Vec<Uuid> = finished.iter().map(|j| j.id).collect();
    let mut latest = metrics::latest_for(&state.db, &ids).await?;
    let rows = finished
        .into_iter()
        .map(|job| {
            let point = latest.remove(&job.id);
            FinishedRow {
                id: job.id,
                status: job.status.to_string(),
                final_loss: loss(point.as_ref().and_then(|p| p.training_loss)),
                validation_loss: loss(point.as_ref().and_then(|p| p.validation_loss)),
                cost: format!("${:.2}", job.final_cost.unwrap_or(job.current_cost)),
                duration: hours(&job),
                finished: job
                    .completed_at
                    .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
                    .unwrap_or_default(),
                name: job.name,
            }
        })
        .collect();
    let page = HistoryPage {
        frame: Frame::new(&user, "history", &[("History", "/training/history")]),
        rows,
    };
    Ok(render(&page))
}

pub struct ParameterRow {
    pub name: String,
    pub values: Vec<String>,
    pub differs: bool,
}

#[derive(Template)]
#[template(path = "compare.html")]
struct ComparePage {
    frame: Frame,
    jobs: Vec<FinishedRow>,
    parameters: Vec<ParameterRow>,
    loss_chart: String,
    cost_chart: String,
}

/// The `jobId` values of the query string, as the spec's route spells them.
fn job_ids(query: Option<&str>) -> Result<Vec<Uuid>, ServiceError> {
    let ids: Result<Vec<Uuid>, _> = query
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.strip_prefix("jobId="))
        .map(str::parse)
        .collect();
    let ids = ids.map_err(|_| ServiceError::BadRequest("jobId must be a job id".into()))?;
    if !(2..=4).contains(&ids.len()) {
        return Err(ServiceError::Unprocessable {
            message: format!("compare 2 to 4 jobs; {} given", ids.len()),
            rules: vec!["compare_two_to_four".into()],
        });
    }
    Ok(ids)
}

async fn compare(
    State(state): State<AppState>,
    user: PageUser,
    RawQuery(query): RawQuery,
) -> PageResult {
    let mut chosen = Vec::new();
    for id in job_ids(query.as_deref())? {
        chosen.push(visible_job(&state, &user.0, id).await?);
    }
    let ids: Vec<Uuid> = chosen.iter().map(|j| j.id).collect();
    let mut latest = metrics::latest_for(&state.db, &ids).await?;
    let settings: Vec<serde_json::Map<String, serde_json::Value>> = chosen
        .iter()
        .map(|j| {
            j.hyperparameters
                .as_ref()
                .and_then(|h| serde_json::to_value(&h.0).ok())
                .and_then(|v| v.as_object().cloned())
                .unwrap_or_default()
        })
        .collect();
    let mut names: Vec<String> = settings.iter().flat_map(|o| o.keys().cloned()).collect();
    names.sort();
    names.dedup();
    let parameters = names
        .into_iter()
        .map(|name| {
            let values: Vec<String> = settings
                .iter()
                .map(|o| o.get(&name).map_or_else(|| "—".into(), |v| v.to_string()))
                .collect();
            ParameterRow {
                differs: values.iter().any(|v| *v != values[0]),
                name: name.replace('_', " "),
                values,
            }
        })
        .collect();
    let mut series = Vec::new();
    for job in &chosen {
        let points = metric_history::chart_points(&state, job.id).await?;
        series.push(Series {
            name: &job.name,
            points: points
                .iter()
                .filter_map(|p| p.training_loss.map(|l| (p.step as f64, l)))
                .collect(),
        });
    }
    let loss_chart = line_chart("Training loss", "step", &series);
    let outcomes: Vec<Series<'_>> = chosen
        .iter()
        .filter_map(|job| {
            let loss = latest.get(&job.id)?.training_loss?;
            Some(Series {
                name: &job.name,
                points: vec![(job.final_cost.unwrap_or(job.current_cost), loss)],
            })
        })
        .collect();
    let cost_chart = line_chart("Cost against final loss", "cost ($)", &outcomes);
    let rows = chosen
        .iter()
        .map(|job| {
            let point = latest.remove(&job.id);
            FinishedRow {
                id: job.id,
                name: job.name.clone(),
                status: job.status.to_string(),
                final_loss: loss(point.as_ref().and_then(|p| p.training_loss)),
                validation_loss: loss(point.as_ref().and_then(|p| p.validation_loss)),
                cost: format!("${:.2}", job.final_cost.unwrap_or(job.current_cost)),
                duration: hours(job),
                finished: String::new(),
            }
        })
        .collect();
    let page = ComparePage {
        frame: Frame::new(
            &user,
            "history",
            &[("History", "/training/history"), ("Compare", "")],
        ),
        jobs: rows,
        parameters,
        loss_chart,
        cost_chart,
    };
    Ok(render(&page))
}
