//! Home: active and queued jobs (interrupted ones with a Resume action), completed
//! today, spend this month, agents online.
use askama::Template;
use axum::extract::State;
use axum::routing::get;
use axum::Router;

use super::costs::live_alerts;
use super::frame::{money, viewer, Frame, PageResult};
use super::jobs::{job_rows, JobRow};
use super::{render, PageUser};
use crate::db::cost_tracking::{self, SpendFilter};
use crate::db::jobs::{self, Job};
use crate::db::{agents, now};
use crate::domain::{BudgetPeriod, JobStatus};
use crate::service::budget::list_budgets;
use crate::service::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/", get(home))
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
    let completed_today = list
        .iter()
        .filter(|j| j.status == JobStatus::Completed)
        .filter(|j| j.completed_at.is_some_and(|t| t.date_naive() == today))
        .count();
    // Summed by the database over the cost records, as the cost reports and budgets are.
    let (month_start, month_end) = BudgetPeriod::Monthly.window(now());
    let spend = cost_tracking::totals(
        &state.db,
        &SpendFilter {
            from: Some(month_start),
            until: Some(month_end),
            ..SpendFilter::visible_to(viewer(&user))
        },
    )
    .await?
    .total_cost;
    let queued = list
        .iter()
        .filter(|j| j.status == JobStatus::Queued)
        .count();
    let queue = jobs::queue_order(&state.db).await?;
    let active: Vec<Job> = list.into_iter().filter(|j| j.status.is_live()).collect();
    let fleet = agents::list(&state.db).await?;
    let mut frame = Frame::new(&user, "home", &[]);
    frame.budget_alerts = live_alerts(&list_budgets(&state, &user.0).await?);
    let page = HomePage {
        frame,
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
