//! Operations endpoints: `/healthz` and `/metrics` (Prometheus text format).

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::db::gauges::{counts, Gauge};
use crate::service::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(metrics))
}

/// 200 when the database answers, 503 when it does not.
#[utoipa::path(get, path = "/healthz", tag = "operations", security(), responses((status = 200, body = Object), (status = 503, body = Object)))]
async fn healthz(State(state): State<AppState>) -> Response {
    match state.db.ping().await {
        Ok(()) => Json(json!({"status": "ok", "database": state.db.backend()})).into_response(),
        Err(error) => {
            tracing::error!(%error, "health check: database unreachable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "unavailable", "database": state.db.backend()})),
            )
                .into_response()
        }
    }
}

pub async fn track_requests(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let method = request.method().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let seconds = started.elapsed().as_secs_f64();
    state
        .metrics
        .record_request(method, route, response.status().as_u16(), seconds);
    response
}

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "operations", security(),
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain", body = String)))]
async fn metrics(State(state): State<AppState>) -> Response {
    let gauges: [(&str, &str, Gauge); 3] = [
        ("lora_jobs", "Training jobs by status.", Gauge::JobsByStatus),
        (
            "lora_training_files",
            "Training files by enrichment status.",
            Gauge::FilesByEnrichmentStatus,
        ),
        (
            "lora_agents",
            "Enrolled agents by status.",
            Gauge::AgentsByStatus,
        ),
    ];
    for (name, help, gauge) in gauges {
        match counts(&state.db, gauge).await {
            Ok(rows) => {
                let rows: Vec<(String, f64)> =
                    rows.into_iter().map(|(s, n)| (s, n as f64)).collect();
                state.metrics.set_gauges(name, help, "status", &rows)
            }
            Err(error) => tracing::warn!(%error, metric = name, "could not read a gauge"),
        }
    }
    match crate::service::budget::standings(&state).await {
        Ok(standings) => {
            let (spend, amount): (Vec<_>, Vec<_>) = standings
                .into_iter()
                .map(|(id, spend, amount)| ((id.clone(), spend), (id, amount)))
                .unzip();
            let (spend_help, amount_help) = (
                "Each active budget's spend in its current period, in dollars.",
                "Each active budget's amount per period, in dollars.",
            );
            state
                .metrics
                .set_gauges("lora_budget_spend_dollars", spend_help, "budget", &spend);
            state
                .metrics
                .set_gauges("lora_budget_amount_dollars", amount_help, "budget", &amount);
        }
        Err(error) => tracing::warn!(%error, "could not read the budgets' spend"),
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
