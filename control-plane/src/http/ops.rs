//! Operations endpoints: `/healthz` and `/metrics` (Prometheus text format).

use std::fmt::Write;
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
        .record(method, route, response.status().as_u16(), seconds);
    response
}

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "operations", security(), responses((status = 200, content_type = "text/plain", body = String)))]
async fn metrics(State(state): State<AppState>) -> Response {
    let mut out = String::new();
    {
        let requests = state.metrics.snapshot();
        out.push_str("# HELP http_requests_total HTTP requests answered.\n# TYPE http_requests_total counter\n");
        for ((method, route, status), (count, _)) in requests.iter() {
            let _ = writeln!(
                out,
                "http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {count}"
            );
        }
        out.push_str(
            "# HELP http_request_duration_seconds_sum Seconds spent answering requests.\n\
             # TYPE http_request_duration_seconds_sum counter\n",
        );
        for ((method, route, status), (_, seconds)) in requests.iter() {
            let _ = writeln!(
                out,
                "http_request_duration_seconds_sum{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {seconds:.6}"
            );
        }
    }
    out.push_str(
        "# HELP lora_refused_status_changes_total Job status changes the control plane attempted against the state machine.\n\
         # TYPE lora_refused_status_changes_total counter\n",
    );
    for (origin, count) in state.metrics.refused_transitions() {
        let _ = writeln!(
            out,
            "lora_refused_status_changes_total{{origin=\"{origin}\"}} {count}"
        );
    }
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
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        match counts(&state.db, gauge).await {
            Ok(rows) => {
                for (status, count) in rows {
                    let _ = writeln!(out, "{name}{{status=\"{status}\"}} {count}");
                }
            }
            Err(error) => tracing::warn!(%error, metric = name, "could not read a gauge"),
        }
    }
    let _ = writeln!(
        out,
        "# HELP lora_build_info Version and database backend.\n# TYPE lora_build_info gauge\n\
         lora_build_info{{version=\"{}\",database=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        state.db.backend()
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
