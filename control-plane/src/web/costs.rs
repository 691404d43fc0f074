//! Costs (spec stage 7): budgets with their spend, forecast and alerts this period, a
//! banner for each budget past its threshold, daily spend over 30 days, this month's
//! totals, the costliest jobs, and spend by team, project and cost center; budgets kept
//! and increase requests asked for and decided on `/cost/budgets`. It calls the same
//! operations as `/api/v1/budgets`, `/api/v1/budget-increase-requests` and
//! `/api/v1/cost-tracking`.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;
use uuid::Uuid;

use super::charts::{line_chart, Series};
use super::create::problems;
use super::frame::{money, Frame, PageResult};
use super::{render, PageError, PageUser};
use crate::db::budget_requests::IncreaseRequest;
use crate::db::budgets::Budget;
use crate::db::cost_tracking::GroupSpend;
use crate::domain::budget::describe_attribution;
use crate::domain::{BudgetPeriod, RequestStatus, Role};
use crate::service::budget::{
    create_budget, delete_budget, get_budget, list_budgets, replace_budget, BudgetRequest,
    BudgetView,
};
use crate::service::budget_request::{self, AskForIncrease, Decision};
use crate::service::cost::{summary, trends, CostQuery};
use crate::service::{AppState, ServiceError};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/cost", get(costs))
        .route("/cost/budgets", get(budgets_page).post(create))
        .route("/cost/budgets/{id}", post(replace))
        .route("/cost/budgets/{id}/delete", post(remove))
        .route("/cost/budgets/{id}/increase", post(ask_for_increase))
        .route(
            "/cost/budgets/requests/{id}/{decision}",
            post(decide_request),
        )
}

pub struct BudgetCard {
    pub id: Uuid,
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
    /// Artifacts kept and downloaded.
    storage: String,
    network: String,
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
        id: budget.id,
        name: budget.name.clone(),
    }
}

/// The frame's banner lines for budgets past their alert threshold, from live figures:
/// what the home and cost pages show in place of the alerts recorded this period.
pub fn live_alerts(views: &[BudgetView]) -> Vec<String> {
    views
        .iter()
        .filter(|view| view.budget.is_active && view.percent_used >= view.budget.alert_threshold)
        .map(|view| {
            format!(
                "“{}” has used {:.1}% of {} this period ({} spent)",
                view.budget.name,
                view.percent_used,
                money(view.budget.amount),
                money(view.current_spend)
            )
        })
        .collect()
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
    let query = CostQuery::default();
    let (budgets, month, days) = futures::try_join!(
        list_budgets(&state, &user.0),
        summary(&state, &user.0, &query),
        trends(&state, &user.0, &query),
    )?;
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
    let mut frame = Frame::new(&user, "cost", &[("Costs", "/cost")]);
    frame.budget_alerts = live_alerts(&budgets);
    let page = CostPage {
        frame,
        budgets: budgets.into_iter().map(card).collect(),
        total: money(month.totals.total_cost),
        compute: money(month.totals.compute_cost),
        storage: money(month.totals.storage_cost),
        network: money(month.totals.network_cost),
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

/// The budget form's fields as the browser sends them (text, checkboxes present or not).
#[derive(Deserialize, Default)]
pub struct BudgetForm {
    pub name: String,
    pub amount: String,
    pub period: String,
    pub alert_threshold: String,
    pub alert_enabled: Option<String>,
    pub team: String,
    pub project: String,
    pub cost_center: String,
    pub is_active: Option<String>,
    pub scope: String,
    pub enforcement: String,
}

impl BudgetForm {
    fn filled_from(budget: &Budget) -> BudgetForm {
        let checked = |on: bool| on.then(|| "on".to_owned());
        BudgetForm {
            name: budget.name.clone(),
            amount: format!("{:.2}", budget.amount),
            period: budget.period.to_string(),
            alert_threshold: budget.alert_threshold.to_string(),
            alert_enabled: checked(budget.alert_enabled),
            team: budget.team.clone().unwrap_or_default(),
            project: budget.project.clone().unwrap_or_default(),
            cost_center: budget.cost_center.clone().unwrap_or_default(),
            is_active: checked(budget.is_active),
            scope: budget.scope.to_string(),
            enforcement: budget.enforcement.to_string(),
        }
    }

    /// The API's request: empty filters are absent; a number that does not parse is
    /// left for the service to name (NaN fails its range check).
    fn request(&self) -> BudgetRequest {
        let text = |value: &str| Some(value.trim().to_owned()).filter(|v| !v.is_empty());
        let number = |value: &str| value.trim().parse::<f64>().unwrap_or(f64::NAN);
        BudgetRequest {
            name: self.name.clone(),
            amount: number(&self.amount),
            period: self.period.clone(),
            alert_threshold: Some(number(&self.alert_threshold)),
            alert_enabled: Some(self.alert_enabled.is_some()),
            team: text(&self.team),
            project: text(&self.project),
            cost_center: text(&self.cost_center),
            is_active: Some(self.is_active.is_some()),
            scope: text(&self.scope),
            enforcement: text(&self.enforcement),
        }
    }
}

/// A budget increase request as the budgets page lists it.
pub struct RequestLine {
    pub id: Uuid,
    pub budget: String,
    pub asked_by: String,
    pub asked_on: String,
    pub from: String,
    pub to: String,
    pub reason: String,
    pub status: String,
    /// "by admin@… on 2026-12-05: note", once decided.
    pub decision: String,
    pub pending: bool,
}

fn request_line(request: IncreaseRequest) -> RequestLine {
    let decision = match request.decided_at {
        Some(at) => format!(
            "on {}{}",
            at.format("%Y-%m-%d %H:%M UTC"),
            request
                .decision_note
                .map(|note| format!(": {note}"))
                .unwrap_or_default()
        ),
        None => String::new(),
    };
    RequestLine {
        id: request.id,
        budget: request.budget_name,
        asked_by: request.requested_by_email,
        asked_on: request.created_at.format("%Y-%m-%d %H:%M UTC").to_string(),
        from: money(request.current_amount),
        to: money(request.requested_amount),
        reason: request.reason,
        pending: request.status == RequestStatus::Pending,
        status: request.status.to_string(),
        decision,
    }
}

/// The form for a new budget, with its defaults.
fn new_budget_form() -> BudgetForm {
    BudgetForm {
        period: "monthly".into(),
        alert_threshold: "80".into(),
        alert_enabled: Some("on".into()),
        is_active: Some("on".into()),
        ..BudgetForm::default()
    }
}

#[derive(Template)]
#[template(path = "budgets.html")]
struct BudgetsPage {
    frame: Frame,
    budgets: Vec<BudgetCard>,
    /// Increase requests: the user's own, or everyone's for admins.
    requests: Vec<RequestLine>,
    /// The budget the form edits; none: a new one.
    editing: Option<Uuid>,
    form: BudgetForm,
    problems: Vec<String>,
    periods: Vec<&'static str>,
    is_admin: bool,
}

#[derive(Deserialize)]
struct EditQuery {
    edit: Option<Uuid>,
}

async fn budgets_page(
    State(state): State<AppState>,
    user: PageUser,
    Query(query): Query<EditQuery>,
) -> PageResult {
    let form = match query.edit {
        Some(id) => BudgetForm::filled_from(&get_budget(&state, &user.0, id).await?.budget),
        None => new_budget_form(),
    };
    budgets_form(&state, &user, query.edit, form, Vec::new(), StatusCode::OK).await
}

async fn budgets_form(
    state: &AppState,
    user: &PageUser,
    editing: Option<Uuid>,
    form: BudgetForm,
    problems: Vec<String>,
    status: StatusCode,
) -> PageResult {
    let page = BudgetsPage {
        frame: Frame::new(user, "cost", &[("Costs", "/cost"), ("Budgets", "")]),
        budgets: list_budgets(state, &user.0)
            .await?
            .into_iter()
            .map(card)
            .collect(),
        requests: budget_request::list(state, &user.0, None)
            .await?
            .into_iter()
            .map(request_line)
            .collect(),
        editing,
        form,
        problems,
        periods: BudgetPeriod::ALL.iter().map(|p| p.as_str()).collect(),
        is_admin: user.0 .0.role() == Role::Admin,
    };
    Ok((status, render(&page)).into_response())
}

/// Back to the list after a change, or the form again with what was wrong.
async fn after_change<T>(
    state: &AppState,
    user: &PageUser,
    editing: Option<Uuid>,
    form: BudgetForm,
    outcome: Result<T, ServiceError>,
) -> PageResult {
    match outcome {
        Ok(_) => Ok(Redirect::to("/cost/budgets").into_response()),
        Err(
            error @ (ServiceError::Forbidden(_)
            | ServiceError::Validation(_)
            | ServiceError::Conflict(_)),
        ) => {
            let status = match error {
                ServiceError::Forbidden(_) => StatusCode::FORBIDDEN,
                ServiceError::Conflict(_) => StatusCode::CONFLICT,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            };
            budgets_form(state, user, editing, form, problems(&error), status).await
        }
        Err(error) => Err(PageError(error)),
    }
}

async fn create(
    State(state): State<AppState>,
    user: PageUser,
    Form(form): Form<BudgetForm>,
) -> PageResult {
    let outcome = create_budget(&state, &user.0, &form.request()).await;
    after_change(&state, &user, None, form, outcome).await
}

async fn replace(
    State(state): State<AppState>,
    user: PageUser,
    Path(id): Path<Uuid>,
    Form(form): Form<BudgetForm>,
) -> PageResult {
    let outcome = replace_budget(&state, &user.0, id, &form.request()).await;
    after_change(&state, &user, Some(id), form, outcome).await
}

#[derive(Deserialize)]
struct IncreaseForm {
    amount: String,
    reason: String,
}

async fn ask_for_increase(
    State(state): State<AppState>,
    user: PageUser,
    Path(id): Path<Uuid>,
    Form(form): Form<IncreaseForm>,
) -> PageResult {
    let request = AskForIncrease {
        amount: form.amount.trim().parse().unwrap_or(f64::NAN),
        reason: form.reason,
    };
    let outcome = budget_request::ask(&state, &user.0, id, &request).await;
    after_change(&state, &user, None, new_budget_form(), outcome).await
}

#[derive(Deserialize)]
struct DecisionForm {
    #[serde(default)]
    note: String,
}

async fn decide_request(
    State(state): State<AppState>,
    user: PageUser,
    Path((id, decision)): Path<(Uuid, String)>,
    Form(form): Form<DecisionForm>,
) -> PageResult {
    let approve = match decision.as_str() {
        "approve" => true,
        "deny" => false,
        _ => return Err(PageError(ServiceError::NotFound("page"))),
    };
    let decision = Decision {
        note: Some(form.note),
    };
    let outcome = budget_request::decide(&state, &user.0, id, approve, &decision).await;
    after_change(&state, &user, None, new_budget_form(), outcome).await
}

async fn remove(State(state): State<AppState>, user: PageUser, Path(id): Path<Uuid>) -> PageResult {
    delete_budget(&state, &user.0, id).await?;
    Ok(Redirect::to("/cost/budgets").into_response())
}
