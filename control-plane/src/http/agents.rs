//! Agent enrollment and the fleet view. The agent protocol itself (heartbeats, claims)
//! builds on the per-agent secret handed out here.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::error::ErrorBody;
use super::{ApiJson, ApiPath};
use crate::db::agents::{Agent, TelemetryPoint};
use crate::service::{fleet, AppState, CurrentUser, ServiceResult};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_agents))
        .routes(routes!(telemetry))
        .routes(routes!(register))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Registration {
    /// From `control-plane create-enrollment-token`.
    enrollment_token: String,
    name: String,
    /// String values only, such as {"zone": "eu-west-1a"}.
    #[serde(default)]
    #[schema(value_type = Object)]
    labels: serde_json::Map<String, Value>,
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    gpus: Vec<Value>,
}

#[derive(Serialize, ToSchema)]
struct Registered {
    agent_id: Uuid,
    /// Shown once: the agent authenticates every later call with it.
    agent_secret: String,
}

/// Enrolls an agent with an enrollment token; answers with its secret.
#[utoipa::path(post, path = "/agents/register", tag = "agents", security(), request_body = Registration,
    responses((status = 201, body = Registered), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn register(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<Registration>,
) -> ServiceResult<(StatusCode, Json<Registered>)> {
    let (agent, secret) = fleet::enroll(
        &state,
        &request.enrollment_token,
        &request.name,
        request.labels,
        request.gpus,
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(Registered {
            agent_id: agent.id,
            agent_secret: secret,
        }),
    ))
}

#[derive(Serialize, ToSchema)]
struct AgentList {
    data: Vec<Agent>,
}

#[derive(Serialize, ToSchema)]
struct TelemetryHistory {
    data: Vec<TelemetryPoint>,
}

/// An agent's recent heartbeats, oldest first (operators and admins).
#[utoipa::path(get, path = "/agents/{id}/telemetry", tag = "agents", params(("id" = Uuid, Path)),
    responses((status = 200, body = TelemetryHistory), (status = 403, body = ErrorBody)))]
async fn telemetry(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiPath(id): ApiPath<Uuid>,
) -> ServiceResult<Json<TelemetryHistory>> {
    Ok(Json(TelemetryHistory {
        data: fleet::agent_telemetry(&state, &user, id).await?,
    }))
}

/// The fleet (operators and admins).
#[utoipa::path(get, path = "/agents", tag = "agents", responses((status = 200, body = AgentList), (status = 403, body = ErrorBody)))]
async fn list_agents(
    State(state): State<AppState>,
    user: CurrentUser,
) -> ServiceResult<Json<AgentList>> {
    Ok(Json(AgentList {
        data: fleet::list_agents(&state, &user).await?,
    }))
}
