//! Budgets (spec §4.2.11) and cost reports (spec §5.8): parse, call `service::budget` and
//! `service::cost`, answer.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::error::ErrorBody;
use super::{ApiJson, ApiPath, ApiQuery};
use crate::db::budget_requests::IncreaseRequest;
use crate::service::budget::{self, BudgetRequest, BudgetView};
use crate::service::budget_request::{self, AskForIncrease, Decision};
use crate::service::cost::{self, CostQuery, CostSummary, CostTrends};
use crate::service::{AppState, CurrentUser, ServiceResult};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_budgets, create_budget))
        .routes(routes!(get_budget, replace_budget, delete_budget))
        .routes(routes!(ask_for_increase))
        .routes(routes!(list_increase_requests))
        .routes(routes!(approve_increase))
        .routes(routes!(deny_increase))
        .routes(routes!(cost_summary))
        .routes(routes!(cost_trends))
}

#[derive(Serialize, ToSchema)]
struct BudgetList {
    data: Vec<BudgetView>,
}

/// Your budgets and the shared ones, each with its spend this period.
#[utoipa::path(get, path = "/budgets", tag = "costs", responses((status = 200, body = BudgetList)))]
async fn list_budgets(
    State(state): State<AppState>,
    user: CurrentUser,
) -> ServiceResult<Json<BudgetList>> {
    let data = budget::list_budgets(&state, &user).await?;
    Ok(Json(BudgetList { data }))
}

/// Creates a budget. A shared budget (admins only) counts everyone's jobs of the team,
/// project or cost center it names.
#[utoipa::path(post, path = "/budgets", tag = "costs", request_body = BudgetRequest,
    responses((status = 201, body = BudgetView), (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn create_budget(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(request): ApiJson<BudgetRequest>,
) -> ServiceResult<(StatusCode, Json<BudgetView>)> {
    let created = budget::create_budget(&state, &user, &request).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// A budget with its spend, forecast and alerts this period.
#[utoipa::path(get, path = "/budgets/{id}", tag = "costs", params(("id" = Uuid, Path)),
    responses((status = 200, body = BudgetView), (status = 404, body = ErrorBody)))]
async fn get_budget(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiPath(id): ApiPath<Uuid>,
) -> ServiceResult<Json<BudgetView>> {
    Ok(Json(budget::get_budget(&state, &user, id).await?))
}

/// Replaces a budget's settings (yours, or a shared one as an admin).
#[utoipa::path(put, path = "/budgets/{id}", tag = "costs", params(("id" = Uuid, Path)), request_body = BudgetRequest,
    responses((status = 200, body = BudgetView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
               (status = 422, body = ErrorBody)))]
async fn replace_budget(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(request): ApiJson<BudgetRequest>,
) -> ServiceResult<Json<BudgetView>> {
    Ok(Json(
        budget::replace_budget(&state, &user, id, &request).await?,
    ))
}

/// Deletes a budget (yours, or a shared one as an admin) with its alerts.
#[utoipa::path(delete, path = "/budgets/{id}", tag = "costs", params(("id" = Uuid, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn delete_budget(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiPath(id): ApiPath<Uuid>,
) -> ServiceResult<StatusCode> {
    budget::delete_budget(&state, &user, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Asks for a larger amount on a budget you see (yours, or a shared one), with a reason;
/// an admin decides.
#[utoipa::path(post, path = "/budgets/{id}/increase-requests", tag = "costs", params(("id" = Uuid, Path)),
    request_body = AskForIncrease,
    responses((status = 201, body = IncreaseRequest), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn ask_for_increase(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(request): ApiJson<AskForIncrease>,
) -> ServiceResult<(StatusCode, Json<IncreaseRequest>)> {
    let created = budget_request::ask(&state, &user, id, &request).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

#[derive(Serialize, ToSchema)]
struct IncreaseRequestList {
    data: Vec<IncreaseRequest>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct RequestQuery {
    /// pending, approved or denied
    status: Option<String>,
}

/// Your increase requests (everyone's for admins), newest first.
#[utoipa::path(get, path = "/budget-increase-requests", tag = "costs", params(RequestQuery),
    responses((status = 200, body = IncreaseRequestList), (status = 422, body = ErrorBody)))]
async fn list_increase_requests(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiQuery(query): ApiQuery<RequestQuery>,
) -> ServiceResult<Json<IncreaseRequestList>> {
    let data = budget_request::list(&state, &user, query.status.as_deref()).await?;
    Ok(Json(IncreaseRequestList { data }))
}

/// Approves a pending request (admins): the budget's amount becomes the one asked.
#[utoipa::path(post, path = "/budget-increase-requests/{id}/approve", tag = "costs", params(("id" = Uuid, Path)),
    request_body = Decision,
    responses((status = 200, body = IncreaseRequest), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
               (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn approve_increase(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(decision): ApiJson<Decision>,
) -> ServiceResult<Json<IncreaseRequest>> {
    Ok(Json(
        budget_request::decide(&state, &user, id, true, &decision).await?,
    ))
}

/// Denies a pending request (admins), with an optional note.
#[utoipa::path(post, path = "/budget-increase-requests/{id}/deny", tag = "costs", params(("id" = Uuid, Path)),
    request_body = Decision,
    responses((status = 200, body = IncreaseRequest), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
               (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn deny_increase(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(decision): ApiJson<Decision>,
) -> ServiceResult<Json<IncreaseRequest>> {
    Ok(Json(
        budget_request::decide(&state, &user, id, false, &decision).await?,
    ))
}

/// Spend over a period or date range: totals, the costliest jobs, and spend by team,
/// project and cost center (yours; everyone's for operators and admins).
#[utoipa::path(get, path = "/cost-tracking/summary", tag = "costs", params(CostQuery),
    responses((status = 200, body = CostSummary), (status = 422, body = ErrorBody)))]
async fn cost_summary(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiQuery(query): ApiQuery<CostQuery>,
) -> ServiceResult<Json<CostSummary>> {
    Ok(Json(cost::summary(&state, &user, &query).await?))
}

/// Spend per day, week or month (`period`), every bucket of the range present; default
/// the last 30 days by day.
#[utoipa::path(get, path = "/cost-tracking/trends", tag = "costs", params(CostQuery),
    responses((status = 200, body = CostTrends), (status = 422, body = ErrorBody)))]
async fn cost_trends(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiQuery(query): ApiQuery<CostQuery>,
) -> ServiceResult<Json<CostTrends>> {
    Ok(Json(cost::trends(&state, &user, &query).await?))
}
