//! Costs (spec stage 7): budgets with their spend, forecast and alerts this period, a
//! banner for each budget past its threshold, daily spend over 30 days, this month's
//! totals, the costliest jobs, and spend by team, project and cost center. It calls the
//! same operations as `/api/v1/budgets` and `/api/v1/cost-tracking`.

use askama::Template;
use axum::extract::State;
use axum::routing::get;
use axum::Router;
use uuid::Uuid;

use super::charts::{line_chart, Series};
use super::frame::{money, Frame, PageResult};
use super::{render, PageUser};
use crate::db::cost_tracking::GroupSpend;
use crate::domain::budget::describe_attribution;
use crate::service::budget::{list_budgets, BudgetView};
use crate::service::cost::{summary, trends, CostQuery};
use crate::service::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/cost", get(costs))
}

pub struct BudgetCard {
    pub name: String,
    /// "monthly, personal", "quarterly, shared: team research".
    pub describes: String,
    pub spend: String,
    pub amount: String,
    pub remaining: String,
    pub forecast: String,
    /// 0–100, for the meter.
    pub percent: f64,
    pub percent_text: String,
    pub enforcement: String,
    pub alerts: usize,
    /// Past its alert threshold this period.
    pub alerting: bool,
}

pub struct JobLine {
    pub id: Uuid,
    pub name: String,
    pub cost: String,
    pub gpu_hours: String,
    pub savings: String,
    pub attribution: String,
}

pub struct GroupLine {
    pub name: String,
    pub cost: String,
    pub jobs: i64,
}

#[derive(Template)]
#[template(path = "cost.html")]
struct CostPage {
    frame: Frame,
    budgets: Vec<BudgetCard>,
    total: String,
    compute: String,
    gpu_hours: String,
    savings: String,
    job_count: i64,
    trend_chart: String,
    jobs: Vec<JobLine>,
    /// (dimension, its lines): team, project, cost center.
    groupings: Vec<(&'static str, Vec<GroupLine>)>,
}

fn card(view: BudgetView) -> BudgetCard {
    let budget = &view.budget;
    let filters = describe_attribution(
        budget.team.as_deref(),
        budget.project.as_deref(),
        budget.cost_center.as_deref(),
    );
    let mut describes = format!("{}, {}", budget.period, budget.scope);
    if !filters.is_empty() {
        describes.push_str(": ");
        describes.push_str(&filters);
    }
    BudgetCard {
        describes,
        spend: money(view.current_spend),
        amount: money(budget.amount),
        remaining: money(view.remaining),
        forecast: money(view.forecast),
        percent: view.percent_used.min(100.0),
        percent_text: format!("{:.1}%", view.percent_used),
        enforcement: budget.enforcement.to_string(),
        alerts: view.alerts.len(),
        alerting: budget.is_active && view.percent_used >= budget.alert_threshold,
        name: budget.name.clone(),
    }
}

fn groups(spend: Vec<GroupSpend>) -> Vec<GroupLine> {
    spend
        .into_iter()
        .map(|group| GroupLine {
            name: group.name.unwrap_or_else(|| "(none)".into()),
            cost: money(group.total_cost),
            jobs: group.job_count,
        })
        .collect()
}

async fn costs(State(state): State<AppState>, user: PageUser) -> PageResult {
    let budgets = list_budgets(&state, &user.0).await?;
    let month = summary(&state, &user.0, &CostQuery::default()).await?;
    let days = trends(&state, &user.0, &CostQuery::default()).await?;
    let count = days.data.len() as f64;
    let trend_chart = line_chart(
        "Spend per day, last 30 days",
        "days from today",
        &[Series {
            name: "spend $",
            points: days
                .data
                .iter()
                .enumerate()
                .map(|(index, point)| (index as f64 + 1.0 - count, point.total_cost))
                .collect(),
        }],
    );
    let jobs = month
        .breakdown_by_job
        .into_iter()
        .map(|job| {
            let attribution: Vec<String> = [job.team, job.project, job.cost_center]
                .into_iter()
                .flatten()
                .collect();
            JobLine {
                id: job.job_id,
                name: job.job_name,
                cost: money(job.total_cost),
                gpu_hours: format!("{:.2}", job.gpu_hours),
                savings: money(job.spot_savings),
                attribution: attribution.join(" · "),
            }
        })
        .collect();
    let page = CostPage {
        frame: Frame::new(&user, "cost", &[("Costs", "/cost")]),
        budgets: budgets.into_iter().map(card).collect(),
        total: money(month.totals.total_cost),
        compute: money(month.totals.compute_cost),
        gpu_hours: format!("{:.2}", month.totals.total_gpu_hours),
        savings: money(month.totals.total_spot_savings),
        job_count: month.totals.job_count,
        trend_chart,
        jobs,
        groupings: vec![
            ("Team", groups(month.by_team)),
            ("Project", groups(month.by_project)),
            ("Cost center", groups(month.by_cost_center)),
        ],
    };
    Ok(render(&page))
}
