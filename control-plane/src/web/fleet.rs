//! The fleet (operators and admins): each agent's status, capacity, GPUs and job.
use askama::Template;
use axum::extract::State;
use axum::routing::get;
use axum::Router;
use uuid::Uuid;

use super::frame::{ago, Frame, PageResult};
use super::{render, PageUser};
use crate::db::attempts::{self};
use crate::db::jobs::{self};
use crate::service::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/fleet", get(fleet))
}

pub struct AgentRow {
    pub name: String,
    pub status: String,
    pub capacity: String,
    pub last_seen: String,
    /// The job the agent is running, as (id, name).
    pub current_job: Option<(Uuid, String)>,
    pub host: String,
    pub gpus: Vec<GpuRow>,
}

pub struct GpuRow {
    pub name: String,
    pub utilization: String,
    pub memory: String,
    pub temperature: String,
}

#[derive(Template)]
#[template(path = "fleet.html")]
struct FleetPage {
    frame: Frame,
    agents: Vec<AgentRow>,
}

async fn fleet(State(state): State<AppState>, user: PageUser) -> PageResult {
    let fleet = crate::service::fleet::list_agents(&state, &user.0).await?;
    let mut running = std::collections::HashMap::new();
    for attempt_id in fleet.iter().filter_map(|a| a.current_attempt_id) {
        if let Some(attempt) = attempts::get(&state.db, attempt_id).await? {
            if let Some(job) = jobs::get_any(&state.db, attempt.job_id).await? {
                running.insert(attempt_id, (job.id, job.name));
            }
        }
    }
    let agents = fleet
        .into_iter()
        .map(|agent| {
            let gpus: Vec<protocol::agent::GpuTelemetry> =
                serde_json::from_value(agent.gpus.0.clone()).unwrap_or_default();
            let host: protocol::agent::HostTelemetry =
                serde_json::from_value(agent.host.0.clone()).unwrap_or_default();
            AgentRow {
                name: agent.name,
                status: agent.status.to_string(),
                capacity: agent.capacity,
                last_seen: agent
                    .last_heartbeat_at
                    .as_ref()
                    .map(ago)
                    .unwrap_or_else(|| "never".into()),
                current_job: agent
                    .current_attempt_id
                    .and_then(|a| running.get(&a).cloned()),
                host: format!(
                    "{} CPUs at {:.0}%, {:.1} of {:.1} GB RAM, {:.0} GB free disk",
                    host.cpu_count,
                    host.cpu_percent,
                    host.memory_used_mb as f64 / 1024.0,
                    host.memory_total_mb as f64 / 1024.0,
                    host.disk_free_mb as f64 / 1024.0
                ),
                gpus: gpus
                    .into_iter()
                    .map(|g| GpuRow {
                        utilization: g
                            .utilization_percent
                            .map(|u| format!("{u}%"))
                            .unwrap_or_else(|| "—".into()),
                        memory: format!(
                            "{:.1} / {:.1} GB",
                            g.memory_used_mb as f64 / 1024.0,
                            g.memory_total_mb as f64 / 1024.0
                        ),
                        temperature: g
                            .temperature_c
                            .map(|t| format!("{t} °C"))
                            .unwrap_or_else(|| "—".into()),
                        name: g.name,
                    })
                    .collect(),
            }
        })
        .collect();
    let page = FleetPage {
        frame: Frame::new(&user, "fleet", &[("Fleet", "/fleet")]),
        agents,
    };
    Ok(render(&page))
}
