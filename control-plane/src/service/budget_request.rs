//! Budget increase requests (spec §4.2.11): anyone who sees a budget (their own, or a
//! shared one) asks for a larger amount with a reason; an admin approves it (the budget's
//! amount becomes the one asked) or denies it, with an optional note. Every request and
//! decision is kept, and logged.

use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{AppState, CurrentUser, ServiceError, ServiceResult};
use crate::db::budget_requests::{self, IncreaseRequest, NewRequest};
use crate::db::budgets;
use crate::db::jobs::round_cents;
use crate::domain::{FieldError, RequestStatus, Role};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AskForIncrease {
    /// The amount asked for, in dollars per period: more than the budget's now.
    pub amount: f64,
    /// Why, for the admin who decides (1 to 2,000 characters).
    pub reason: String,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// Shown to the person who asked (at most 2,000 characters).
    #[serde(default)]
    pub note: Option<String>,
}

/// Longest reason or note, in characters.
const MAX_TEXT: usize = 2_000;
/// Largest amount (as for budgets).
const MAX_AMOUNT: f64 = 1e12;

/// Text a person wrote: trimmed, at most [`MAX_TEXT`] characters, no control characters
/// other than line breaks and tabs.
fn checked_text(text: &str) -> Option<&str> {
    let text = text.trim();
    let printable = !text
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'));
    (text.chars().count() <= MAX_TEXT && printable).then_some(text)
}

pub async fn ask(
    state: &AppState,
    user: &CurrentUser,
    budget_id: Uuid,
    request: &AskForIncrease,
) -> ServiceResult<IncreaseRequest> {
    let budget = budgets::get_visible(&state.db, budget_id, user.0.id)
        .await?
        .ok_or(ServiceError::NotFound("budget"))?;
    let mut errors = Vec::new();
    if !(request.amount > budget.amount && request.amount <= MAX_AMOUNT) {
        errors.push(FieldError::new(
            "amount",
            format!(
                "must be more than the budget's ${:.2} and at most {MAX_AMOUNT}",
                budget.amount
            ),
        ));
    }
    let reason = checked_text(&request.reason).filter(|r| !r.is_empty());
    if reason.is_none() {
        errors.push(FieldError::new(
            "reason",
            format!("must say why, in 1 to {MAX_TEXT} printable characters"),
        ));
    }
    let (Some(reason), true) = (reason, errors.is_empty()) else {
        return Err(ServiceError::Validation(errors));
    };
    let created = budget_requests::insert(
        &state.db,
        &NewRequest {
            budget_id: budget.id,
            requested_by: user.0.id,
            current_amount: budget.amount,
            requested_amount: round_cents(request.amount),
            reason,
        },
    )
    .await?;
    tracing::info!(request_id = %created.id, budget_id = %budget.id, from = budget.amount,
        to = created.requested_amount, "budget increase requested");
    Ok(created)
}

/// The caller's requests, or everyone's for admins, newest first; `status` filters.
pub async fn list(
    state: &AppState,
    user: &CurrentUser,
    status: Option<&str>,
) -> ServiceResult<Vec<IncreaseRequest>> {
    let status = status
        .map(str::parse::<RequestStatus>)
        .transpose()
        .map_err(|message| ServiceError::Validation(vec![FieldError::new("status", message)]))?;
    let whose = (user.0.role() != Role::Admin).then_some(user.0.id);
    Ok(budget_requests::list(&state.db, whose, status, 500).await?)
}

/// Approves or denies a pending request: admins only (403 otherwise); a request already
/// decided answers 409.
pub async fn decide(
    state: &AppState,
    user: &CurrentUser,
    id: Uuid,
    approve: bool,
    decision: &Decision,
) -> ServiceResult<IncreaseRequest> {
    if user.0.role() != Role::Admin {
        return Err(ServiceError::Forbidden(
            "only admins approve or deny budget increase requests".into(),
        ));
    }
    let request = budget_requests::get(&state.db, id)
        .await?
        .ok_or(ServiceError::NotFound("budget increase request"))?;
    let note = match decision.note.as_deref().map(checked_text) {
        None => None,
        Some(Some(note)) => Some(note).filter(|n| !n.is_empty()),
        Some(None) => {
            return Err(ServiceError::Validation(vec![FieldError::new(
                "note",
                format!("must be at most {MAX_TEXT} printable characters"),
            )]))
        }
    };
    let status = if approve {
        RequestStatus::Approved
    } else {
        RequestStatus::Denied
    };
    let already =
        |status: RequestStatus| ServiceError::Conflict(format!("the request was already {status}"));
    if request.status != RequestStatus::Pending {
        return Err(already(request.status));
    }
    if !budget_requests::decide(&state.db, id, status, user.0.id, note).await? {
        // Another admin decided it in between.
        let now = budget_requests::get(&state.db, id).await?;
        return Err(already(now.map_or(status, |r| r.status)));
    }
    tracing::info!(request_id = %id, budget_id = %request.budget_id, decided_by = %user.0.id,
        %status, amount = request.requested_amount, "budget increase request decided");
    budget_requests::get(&state.db, id)
        .await?
        .ok_or(ServiceError::NotFound("budget increase request"))
}
