//! Budgets (spec §4.2.11, stage 7): create, read, replace and delete them; their spend in
//! the current period, summed from the cost records; alerts when a job's spend crosses a
//! budget's threshold or its amount (once per period and threshold), also while a job
//! runs; `block_start`, which refuses to start a job whose estimate exceeds what a budget
//! has left; and `stop_at_cap`, which stops a running job at a budget's amount with a
//! checkpoint whose adapter becomes the job's.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{AppState, CurrentUser, ServiceError, ServiceResult};
use crate::db::attempts;
use crate::db::budgets::{self, Budget, BudgetAlert, BudgetFields};
use crate::db::cost_tracking::{self, SpendFilter};
use crate::db::events::{self, Event};
use crate::db::jobs::{self, round_cents, Job};
use crate::db::now;
use crate::domain::{
    BudgetPeriod, BudgetScope, Enforcement, EventType, FieldError, Role, Severity,
};
use crate::live::JobUpdate;

/// A budget's settings as a request gives them (create, or replace with `PUT`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetRequest {
    pub name: String,
    /// Dollars per period, at least 0.
    pub amount: f64,
    /// daily, weekly, monthly, quarterly or annual (calendar periods in UTC).
    pub period: String,
    /// Percent of the amount, 1 to 100, at which an alert goes out; default 80. Crossing
    /// 100% alerts too.
    pub alert_threshold: Option<f64>,
    /// Default true.
    pub alert_enabled: Option<bool>,
    /// Only jobs of this team count.
    pub team: Option<String>,
    pub project: Option<String>,
    pub cost_center: Option<String>,
    /// Default true.
    pub is_active: Option<bool>,
    /// personal (default: your jobs) or shared (admins: everyone's jobs of the team,
    /// project or cost center named).
    pub scope: Option<String>,
    /// none (default); block_start: a job whose estimate exceeds what is left may not
    /// start; stop_at_cap: a running job that takes the budget to its amount stops at the
    /// next step boundary with a checkpoint, whose adapter becomes the job's (and a job
    /// may not start once nothing is left).
    pub enforcement: Option<String>,
}

/// A budget with where it stands in its current period.
#[derive(Debug, Serialize, ToSchema)]
pub struct BudgetView {
    #[serde(flatten)]
    pub budget: Budget,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    /// Spend in the current period: the cost records of matching jobs whose spend was
    /// incurred in it, running jobs at their live cost.
    pub current_spend: f64,
    pub remaining: f64,
    /// Current spend as a percentage of the amount.
    pub percent_used: f64,
    /// The spend the period ends at if it goes on at the rate so far.
    pub forecast: f64,
    /// The alerts sent this period, newest first.
    pub alerts: Vec<BudgetAlert>,
}

/// Most characters of a budget's name.
const MAX_NAME: usize = 200;
/// Largest amount, in dollars: far above any budget, and safe to sum and round.
const MAX_AMOUNT: f64 = 1e12;

/// Checks every field; who may keep a shared budget is checked by the caller.
fn parse(request: &BudgetRequest) -> ServiceResult<BudgetFields<'_>> {
    let mut errors = Vec::new();
    let name = request.name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME || name.chars().any(char::is_control) {
        errors.push(FieldError::new(
            "name",
            format!("must be 1 to {MAX_NAME} printable characters"),
        ));
    }
    if !(0.0..=MAX_AMOUNT).contains(&request.amount) {
        errors.push(FieldError::new(
            "amount",
            format!("must be a number of dollars from 0 to {MAX_AMOUNT}"),
        ));
    }
    let alert_threshold = request.alert_threshold.unwrap_or(80.0);
    if !(1.0..=100.0).contains(&alert_threshold) {
        errors.push(FieldError::new(
            "alert_threshold",
            "must be a percentage from 1 to 100",
        ));
    }
    let period: Option<BudgetPeriod> = word("period", &request.period, &mut errors);
    let scope: Option<BudgetScope> = word(
        "scope",
        request.scope.as_deref().unwrap_or("personal"),
        &mut errors,
    );
    let enforcement: Option<Enforcement> = word(
        "enforcement",
        request.enforcement.as_deref().unwrap_or("none"),
        &mut errors,
    );
    let team = filter("team", &request.team, &mut errors);
    let project = filter("project", &request.project, &mut errors);
    let cost_center = filter("cost_center", &request.cost_center, &mut errors);
    if scope == Some(BudgetScope::Shared)
        && team.is_none()
        && project.is_none()
        && cost_center.is_none()
    {
        errors.push(FieldError::new(
            "scope",
            "a shared budget must name a team, project or cost center",
        ));
    }
    let (Some(period), Some(scope), Some(enforcement), true) =
        (period, scope, enforcement, errors.is_empty())
    else {
        return Err(ServiceError::Validation(errors));
    };
    Ok(BudgetFields {
        name,
        amount: round_cents(request.amount),
        period,
        alert_threshold,
        alert_enabled: request.alert_enabled.unwrap_or(true),
        team,
        project,
        cost_center,
        is_active: request.is_active.unwrap_or(true),
        scope,
        enforcement,
    })
}

/// A budget's team, project or cost center filter: absent, or a name.
fn filter<'a>(
    field: &str,
    value: &'a Option<String>,
    errors: &mut Vec<FieldError>,
) -> Option<&'a str> {
    match value.as_deref().map(str::trim) {
        Some("") => {
            errors.push(FieldError::new(
                field,
                "must name a team, project or cost center; leave it out to count all",
            ));
            None
        }
        Some(text) if text.chars().count() > 100 || text.chars().any(char::is_control) => {
            errors.push(FieldError::new(
                field,
                "must be at most 100 printable characters",
            ));
            None
        }
        other => other,
    }
}

/// A vocabulary word, or a field error naming `field`.
fn word<T: std::str::FromStr<Err = String>>(
    field: &str,
    text: &str,
    errors: &mut Vec<FieldError>,
) -> Option<T> {
    text.parse()
        .map_err(|message| errors.push(FieldError::new(field, message)))
        .ok()
}

fn require_admin_for(scope: BudgetScope, user: &CurrentUser) -> ServiceResult<()> {
    if scope == BudgetScope::Shared && user.0.role() != Role::Admin {
        return Err(ServiceError::Forbidden(
            "only admins keep shared budgets".into(),
        ));
    }
    Ok(())
}

pub async fn create_budget(
    state: &AppState,
    user: &CurrentUser,
    request: &BudgetRequest,
) -> ServiceResult<BudgetView> {
    let fields = parse(request)?;
    require_admin_for(fields.scope, user)?;
    let budget = budgets::insert(&state.db, user.0.id, &fields).await?;
    tracing::info!(budget_id = %budget.id, scope = %budget.scope, "budget created");
    watch_jobs_under(state, &[&budget]).await?;
    view(state, budget).await
}

/// The caller's budgets and the shared ones, each with its current period.
pub async fn list_budgets(state: &AppState, user: &CurrentUser) -> ServiceResult<Vec<BudgetView>> {
    views(state, budgets::list_visible(&state.db, user.0.id).await?).await
}

pub async fn get_budget(
    state: &AppState,
    user: &CurrentUser,
    id: Uuid,
) -> ServiceResult<BudgetView> {
    view(state, visible(state, user, id).await?).await
}

/// Replaces a budget's settings: a personal budget by its owner, a shared one by an admin.
pub async fn replace_budget(
    state: &AppState,
    user: &CurrentUser,
    id: Uuid,
    request: &BudgetRequest,
) -> ServiceResult<BudgetView> {
    let budget = editable(state, user, id).await?;
    let fields = parse(request)?;
    require_admin_for(fields.scope, user)?;
    let updated = budgets::update(&state.db, budget.id, &fields)
        .await?
        .ok_or(ServiceError::NotFound("budget"))?;
    watch_jobs_under(state, &[&budget, &updated]).await?;
    view(state, updated).await
}

pub async fn delete_budget(state: &AppState, user: &CurrentUser, id: Uuid) -> ServiceResult<()> {
    let budget = editable(state, user, id).await?;
    if !budgets::delete(&state.db, budget.id).await? {
        return Err(ServiceError::NotFound("budget"));
    }
    watch_jobs_under(state, &[&budget]).await
}

/// A budget created, changed or deleted applies to the jobs running under it at once,
/// not at their next heartbeat: their `stop_cost` follows it, and a cap already reached
/// stops them.
/// (`versions`: the budget before and after a change.)
async fn watch_jobs_under(state: &AppState, versions: &[&Budget]) -> ServiceResult<()> {
    let personal = versions
        .iter()
        .all(|budget| budget.scope == BudgetScope::Personal);
    let owner = personal.then(|| versions[0].user_id);
    for job in jobs::running(&state.db, owner).await? {
        if job.stop_requested.is_none() {
            let job = super::cost::refresh_live_cost(state, job).await?;
            watch_running(state, job, 0.0).await?;
        }
    }
    Ok(())
}

/// A budget the user sees: 404 for another user's personal budget.
async fn visible(state: &AppState, user: &CurrentUser, id: Uuid) -> ServiceResult<Budget> {
    budgets::get_visible(&state.db, id, user.0.id)
        .await?
        .ok_or(ServiceError::NotFound("budget"))
}

/// A budget the user may change: their own personal one, or a shared one for admins
/// (others see shared budgets but get 403).
async fn editable(state: &AppState, user: &CurrentUser, id: Uuid) -> ServiceResult<Budget> {
    let budget = visible(state, user, id).await?;
    require_admin_for(budget.scope, user)?;
    if budget.scope == BudgetScope::Personal && budget.user_id != user.0.id {
        return Err(ServiceError::NotFound("budget"));
    }
    Ok(budget)
}

/// The spend a budget counts over `window`.
async fn spend(
    state: &AppState,
    budget: &Budget,
    (from, until): (DateTime<Utc>, DateTime<Utc>),
) -> ServiceResult<f64> {
    let filter = SpendFilter {
        user_id: (budget.scope == BudgetScope::Personal).then_some(budget.user_id),
        from: Some(from),
        until: Some(until),
        team: budget.team.clone(),
        project: budget.project.clone(),
        cost_center: budget.cost_center.clone(),
    };
    Ok(round_cents(
        cost_tracking::totals(&state.db, &filter).await?.total_cost,
    ))
}

async fn view(state: &AppState, budget: Budget) -> ServiceResult<BudgetView> {
    views(state, vec![budget])
        .await?
        .pop()
        .ok_or_else(|| ServiceError::Internal("a budget view went missing".into()))
}

/// Each budget with where it stands this period: its spend (one aggregate each), and the
/// alerts of all of them read at once.
async fn views(state: &AppState, budgets: Vec<Budget>) -> ServiceResult<Vec<BudgetView>> {
    let at = now();
    let windows: Vec<_> = budgets.iter().map(|b| b.period.window(at)).collect();
    let ids: Vec<Uuid> = budgets.iter().map(|b| b.id).collect();
    let earliest = windows.iter().map(|w| w.0).min().unwrap_or(at);
    let mut alerts = budgets::alerts_since(&state.db, &ids, earliest).await?;
    let mut views = Vec::with_capacity(budgets.len());
    for (budget, window) in budgets.into_iter().zip(windows) {
        let current_spend = spend(state, &budget, window).await?;
        let elapsed = (at - window.0).num_seconds().max(1) as f64;
        let length = (window.1 - window.0).num_seconds().max(1) as f64;
        let (own, rest) = alerts
            .into_iter()
            .partition(|a: &BudgetAlert| a.budget_id == budget.id && a.period_start >= window.0);
        alerts = rest;
        views.push(BudgetView {
            period_start: window.0,
            period_end: window.1,
            current_spend,
            remaining: round_cents((budget.amount - current_spend).max(0.0)),
            percent_used: percent(current_spend, budget.amount),
            forecast: round_cents(current_spend * length / elapsed),
            alerts: own,
            budget,
        });
    }
    Ok(views)
}

/// Every active budget's (id, spend this period, amount), for `/metrics`.
pub async fn standings(state: &AppState) -> ServiceResult<Vec<(String, f64, f64)>> {
    Ok(views(state, budgets::active(&state.db).await?)
        .await?
        .into_iter()
        .map(|view| {
            (
                view.budget.id.to_string(),
                view.current_spend,
                view.budget.amount,
            )
        })
        .collect())
}

/// One line per active budget of the caller's (or shared) that alerted this period, for
/// the banner every dashboard page shows: the highest threshold it crossed, and the spend
/// when it did. Two indexed reads (budgets, then this period's alerts), no spend totals,
/// so it is cheap enough for every page.
pub async fn alert_banners(state: &AppState, user: &CurrentUser) -> ServiceResult<Vec<String>> {
    let budgets: Vec<Budget> = budgets::list_visible(&state.db, user.0.id)
        .await?
        .into_iter()
        .filter(|b| b.is_active && b.alert_enabled)
        .collect();
    if budgets.is_empty() {
        return Ok(Vec::new());
    }
    let at = now();
    let starts: Vec<_> = budgets.iter().map(|b| b.period.window(at).0).collect();
    let ids: Vec<Uuid> = budgets.iter().map(|b| b.id).collect();
    let earliest = starts.iter().min().copied().unwrap_or(at);
    let alerts = budgets::alerts_since(&state.db, &ids, earliest).await?;
    Ok(budgets
        .iter()
        .zip(starts)
        .filter_map(|(budget, start)| {
            let highest = alerts
                .iter()
                .filter(|a| a.budget_id == budget.id && a.period_start >= start)
                .max_by(|a, b| a.threshold.total_cmp(&b.threshold))?;
            Some(format!(
                "“{}” passed {}% of ${:.2} this period (${:.2} spent when it alerted)",
                budget.name, highest.threshold, budget.amount, highest.spend
            ))
        })
        .collect())
}

/// `spend` as a percentage of `amount`, to one decimal (a zero amount is 100% used once
/// anything is spent).
fn percent(spend: f64, amount: f64) -> f64 {
    if amount <= 0.0 {
        return if spend > 0.0 { 100.0 } else { 0.0 };
    }
    (spend / amount * 1000.0).round() / 10.0
}

/// After a job's cost was recorded: each active budget it counts against whose period
/// spend now reaches its alert threshold, or its amount, alerts once per period and
/// threshold, as a warning event on the job. A failure here is logged, never raised: the
/// job's own change has happened.
pub async fn alert_if_crossed(state: &AppState, job: &Job) -> ServiceResult<()> {
    if let Err(error) = alert(state, job).await {
        tracing::warn!(job_id = %job.id, %error, "could not check the job's budgets");
    }
    Ok(())
}

async fn alert(state: &AppState, job: &Job) -> ServiceResult<()> {
    let budgets = counted_against(state, job).await?;
    check_budgets(state, job, &budgets, 0.0).await.map(|_| ())
}

/// While a job runs (on each of its agent's heartbeats, and from a report batch whose
/// cost reached the job's `stop_cost`): its budgets alert as its live cost crosses them,
/// and a `stop_at_cap` budget that the stop would take to its amount asks the agent to
/// stop (once; the event says which budget and where it stands). Until it lands the stop
/// costs `in_flight` (the steps it waits for; nothing from a heartbeat) and its own
/// checkpoint and uploads. Keeps the job's
/// `stop_cost` current. Returns the job as it is now.
pub async fn watch_running(state: &AppState, job: Job, in_flight: f64) -> ServiceResult<Job> {
    let budgets = counted_against(state, &job).await?;
    if !budgets
        .iter()
        .any(|budget| budget.enforcement == Enforcement::StopAtCap)
    {
        if job.stop_cost.is_some() {
            jobs::set_stop_cost(&state.db, job.id, None).await?;
        }
        return check_budgets(state, &job, &budgets, 0.0).await.map(|_| job);
    }
    // A stop stores its checkpoint, then the adapter and the run's results (about as
    // long again, measured): twice what the latest checkpoint took.
    let checkpoint_seconds = attempts::latest_checkpoint_seconds(&state.db, job.id).await?;
    let stop_seconds = 2.0 * checkpoint_seconds.unwrap_or(0.0);
    let stopping_cost = stop_seconds * job.hourly_rate.unwrap_or(0.0) / 3600.0;
    let allowance = in_flight + stopping_cost;
    let standing = check_budgets(state, &job, &budgets, allowance).await?;
    let stop_cost = standing
        .headroom
        .map(|left| round_cents(job.current_cost + left - stopping_cost));
    // Heartbeats come every few seconds: write only a change (no write lock otherwise).
    if stop_cost != job.stop_cost {
        jobs::set_stop_cost(&state.db, job.id, stop_cost).await?;
    }
    let Some((budget, spent)) = standing.capped else {
        return Ok(job);
    };
    let Some(stopping) = jobs::request_stop(&state.db, job.id, STOP_BUDGET_CAP).await? else {
        return Ok(job);
    };
    let event = Event::new(
        job.id,
        EventType::Warning,
        Severity::Warning,
        format!(
            "Budget \"{}\" {} its cap (${spent:.2} of ${:.2} this {} period): stopping at the next step boundary with a checkpoint, whose adapter becomes the job's",
            budget.name,
            if spent >= budget.amount {
                "reached"
            } else {
                "reaches"
            },
            budget.amount,
            budget.period
        ),
    )
    .with_details(json!({
        "budget_id": budget.id, "spend": spent, "amount": budget.amount,
        "stop_allowance": allowance, "enforcement": budget.enforcement, "reason": STOP_BUDGET_CAP,
    }));
    events::insert(&state.db, &event).await?;
    state.metrics.count_budget_stop();
    tracing::warn!(job_id = %job.id, budget_id = %budget.id, spent, allowance, "budget cap: stopping the job");
    state
        .live
        .publish_all(vec![
            JobUpdate::Status {
                job: Box::new(stopping.clone()),
            },
            JobUpdate::Event {
                event: Box::new(event),
            },
        ])
        .await;
    Ok(stopping)
}

/// Where a running job stands against its `stop_at_cap` budgets.
struct CapStanding<'a> {
    /// The first budget the job's spend (plus the allowance) takes to its amount, with its
    /// spend.
    capped: Option<(&'a Budget, f64)>,
    /// The least any of them has left this period; `None` without such a budget.
    headroom: Option<f64>,
}

/// The reason a job stopped at a budget's cap ends cancelled with.
pub const STOP_BUDGET_CAP: &str = "budget_cap";

/// Each of `budgets` whose period the job's spend falls in: alerts for the thresholds its
/// spend reached (once per period and threshold), and where the job stands against the
/// `stop_at_cap` ones, `allowance` more spend counted.
async fn check_budgets<'a>(
    state: &AppState,
    job: &Job,
    budgets: &'a [Budget],
    allowance: f64,
) -> ServiceResult<CapStanding<'a>> {
    let at = now();
    let incurred = cost_tracking::incurred_at(job);
    let mut capped = None;
    let mut headroom: Option<f64> = None;
    for budget in budgets {
        let stops = budget.enforcement == Enforcement::StopAtCap;
        if !budget.alert_enabled && !stops {
            continue;
        }
        let window = budget.period.window(at);
        // Spend incurred in an earlier period does not move this period's budget.
        if incurred < window.0 {
            continue;
        }
        let spent = spend(state, budget, window).await?;
        if stops {
            let left = budget.amount - spent;
            headroom = Some(headroom.map_or(left, |least| least.min(left)));
            if spent + allowance >= budget.amount && capped.is_none() {
                capped = Some((budget, spent));
            }
        }
        if !budget.alert_enabled {
            continue;
        }
        let mut thresholds = vec![budget.alert_threshold];
        if budget.alert_threshold < 100.0 {
            thresholds.push(100.0);
        }
        for threshold in thresholds {
            if spent < budget.amount * threshold / 100.0 || spent <= 0.0 {
                continue;
            }
            let alert = BudgetAlert {
                id: Uuid::new_v4(),
                budget_id: budget.id,
                period_start: window.0,
                threshold,
                spend: spent,
                amount: budget.amount,
                job_id: Some(job.id),
                created_at: at,
                webhook_status: state
                    .settings
                    .budgets
                    .webhook_url
                    .as_ref()
                    .map(|_| "pending".to_owned()),
                webhook_attempts: 0,
                webhook_error: None,
            };
            if !budgets::record_alert(&state.db, &alert).await? {
                continue;
            }
            spawn_webhook(state, &alert, budget);
            let over = threshold >= 100.0;
            let event = Event::new(
                job.id,
                EventType::Warning,
                if over {
                    Severity::Error
                } else {
                    Severity::Warning
                },
                format!(
                    "Budget \"{}\" {} {threshold}% of its {} ${:.2}: ${spent:.2} spent",
                    budget.name,
                    if over { "reached" } else { "passed" },
                    budget.period,
                    budget.amount
                ),
            )
            .with_details(json!({
                "budget_id": budget.id, "threshold": threshold, "spend": spent,
                "amount": budget.amount, "period_start": window.0,
            }));
            events::insert(&state.db, &event).await?;
            state.metrics.count_budget_alert(threshold);
            tracing::warn!(budget_id = %budget.id, job_id = %job.id, threshold, spent, "budget alert");
        }
    }
    Ok(CapStanding { capped, headroom })
}

/// Sends the alert to the configured webhook in the background, so the job's own path
/// never waits on it: a JSON POST signed with HMAC-SHA256 (`X-Lora-Signature:
/// sha256=<hex>` over the body), retried with doubling waits while it fails, the outcome
/// recorded on the alert.
fn spawn_webhook(state: &AppState, alert: &BudgetAlert, budget: &Budget) {
    let settings = state.settings.budgets.clone();
    let Some(url) = settings.webhook_url.clone() else {
        return;
    };
    let body = json!({
        "type": "budget_alert",
        "alert_id": alert.id,
        "budget_id": budget.id,
        "budget_name": budget.name,
        "period": budget.period,
        "period_start": alert.period_start,
        "threshold": alert.threshold,
        "spend": alert.spend,
        "amount": alert.amount,
        "job_id": alert.job_id,
        "created_at": alert.created_at,
    })
    .to_string();
    let (db, metrics, alert_id) = (state.db.clone(), state.metrics.clone(), alert.id);
    tokio::spawn(async move {
        let client = match reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(
                settings.webhook_timeout_seconds,
            ))
            .build()
        {
            Ok(client) => client,
            Err(error) => {
                tracing::warn!(%error, "no HTTP client for budget webhooks");
                return;
            }
        };
        let mut wait = std::time::Duration::from_millis(settings.webhook_first_retry_ms);
        let attempts = settings.webhook_attempts.max(1);
        let mut last_error = String::new();
        for attempt in 1..=attempts {
            let mut request = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body.clone());
            if let Some(secret) = &settings.webhook_secret {
                let signature = crate::auth::sign(&secret.0, &body);
                request = request.header("x-lora-signature", format!("sha256={signature}"));
            }
            last_error = match request.send().await {
                Ok(response) if response.status().is_success() => {
                    metrics.count_budget_webhook("sent");
                    record_outcome(&db, alert_id, "sent", attempt, None).await;
                    return;
                }
                Ok(response) => format!("the webhook answered {}", response.status()),
                Err(error) => format!("the webhook could not be reached: {error}"),
            };
            if attempt < attempts {
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
        tracing::warn!(%alert_id, error = %last_error, "a budget alert's webhook failed");
        metrics.count_budget_webhook("failed");
        record_outcome(&db, alert_id, "failed", attempts, Some(&last_error)).await;
    });
}

async fn record_outcome(
    db: &crate::db::Db,
    alert_id: Uuid,
    status: &str,
    attempts: u32,
    error: Option<&str>,
) {
    let stored =
        budgets::record_webhook_outcome(db, alert_id, status, i64::from(attempts), error).await;
    if let Err(error) = stored {
        tracing::warn!(%alert_id, %error, "could not record a budget webhook's outcome");
    }
}

/// The active budgets a job's spend counts against.
pub async fn counted_against(state: &AppState, job: &Job) -> ServiceResult<Vec<Budget>> {
    Ok(budgets::matching(
        &state.db,
        job.user_id,
        job.team.as_deref(),
        job.project.as_deref(),
        job.cost_center.as_deref(),
    )
    .await?)
}

/// The budgets a job counts against, each with where it stands this period.
pub async fn standing_for_job(state: &AppState, job: &Job) -> ServiceResult<Vec<BudgetView>> {
    views(state, counted_against(state, job).await?).await
}

/// `block_start`: a job whose estimate (the top of its range) is more than what a
/// matching budget has left this period may not start; `stop_at_cap`: nor may one when a
/// matching budget has nothing left. The refusal names the budget, what it has left and
/// the estimate.
pub async fn check_start(state: &AppState, job: &Job) -> ServiceResult<()> {
    let estimate = job.estimated_cost_max.unwrap_or(0.0);
    let mut broken = Vec::new();
    for budget in counted_against(state, job).await? {
        if budget.enforcement == Enforcement::None {
            continue;
        }
        let window = budget.period.window(now());
        let left = round_cents((budget.amount - spend(state, &budget, window).await?).max(0.0));
        let refused = match budget.enforcement {
            Enforcement::BlockStart => estimate > left,
            // It would stop at its first heartbeat.
            _ => left <= 0.0,
        };
        if refused {
            broken.push(format!(
                "budget \"{}\" has ${left:.2} left this {} period and the job's estimate is up to ${estimate:.2}",
                budget.name, budget.period
            ));
        }
    }
    if broken.is_empty() {
        return Ok(());
    }
    Err(ServiceError::Unprocessable {
        message: format!("the job cannot start: {}", broken.join("; ")),
        rules: broken,
    })
}
