//! Operations endpoints: `/healthz` and `/metrics` (Prometheus text format).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::AppState;
use crate::db::on_pool;

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

/// (method, route, status)
type RouteKey = (String, String, u16);

/// Request counts and total seconds per (method, route, status).
#[derive(Default)]
pub struct RequestMetrics {
    requests: Mutex<BTreeMap<RouteKey, (u64, f64)>>,
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
    let mut requests = state
        .metrics
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let entry = requests
        .entry((method, route, response.status().as_u16()))
        .or_default();
    entry.0 += 1;
    entry.1 += seconds;
    response
}

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "operations", security(), responses((status = 200, content_type = "text/plain", body = String)))]
async fn metrics(State(state): State<AppState>) -> Response {
    let mut out = String::new();
    {
        let requests = state
            .metrics
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner());
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
    let gauges: [(&str, &str, &str); 3] = [
        ("lora_jobs", "Training jobs by status.", "SELECT status, COUNT(*) FROM training_jobs GROUP BY status"),
        (
            "lora_training_files",
            "Training files by enrichment status.",
            "SELECT enrichment_status, COUNT(*) FROM training_files WHERE deleted_at IS NULL GROUP BY enrichment_status",
        ),
        ("lora_agents", "Enrolled agents by status.", "SELECT status, COUNT(*) FROM agents GROUP BY status"),
    ];
    for (name, help, sql) in gauges {
        let rows: Result<Vec<(String, i64)>, sqlx::Error> =
            on_pool!(&state.db, pool => sqlx::query_as(sql).fetch_all(pool).await);
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        match rows {
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
