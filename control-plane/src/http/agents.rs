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

use super::auth::CurrentUser;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::{ApiJson, AppState};
use crate::auth::{new_token, token_hash};
use crate::db::agents::{self, Agent, NewAgent};
use crate::domain::FieldError;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
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
) -> ApiResult<(StatusCode, Json<Registered>)> {
    let name = request.name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::Validation(vec![FieldError::new(
            "name",
            "must be 1 to 200 characters",
        )]));
    }
    if let Some((key, _)) = request.labels.iter().find(|(_, v)| !v.is_string()) {
        return Err(ApiError::Validation(vec![FieldError::new(
            format!("labels.{key}"),
            "label values must be strings",
        )]));
    }
    let secret = new_token("lca_");
    let agent = agents::register(
        &state.db,
        &token_hash(request.enrollment_token.trim()),
        NewAgent {
            name,
            labels: &Value::Object(request.labels),
            gpus: &Value::Array(request.gpus),
            secret_hash: &token_hash(&secret),
        },
    )
    .await?
    .ok_or(ApiError::Unauthorized)?;
    tracing::info!(agent_id = %agent.id, name = %agent.name, "agent enrolled");
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

fn operators_only(user: &CurrentUser) -> ApiResult<()> {
    if user.0.role().sees_everything() {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "the fleet is visible to operators and admins only".into(),
        ))
    }
}

#[derive(Serialize, ToSchema)]
struct TelemetryHistory {
    data: Vec<agents::TelemetryPoint>,
}

/// An agent's recent heartbeats, oldest first (operators and admins).
#[utoipa::path(get, path = "/agents/{id}/telemetry", tag = "agents", params(("id" = Uuid, Path)),
    responses((status = 200, body = TelemetryHistory), (status = 403, body = ErrorBody)))]
async fn telemetry(
    State(state): State<AppState>,
    user: CurrentUser,
    axum::extract::Path(id): axum::extract::Path<Uuid>,
) -> ApiResult<Json<TelemetryHistory>> {
    operators_only(&user)?;
    Ok(Json(TelemetryHistory {
        data: agents::telemetry(&state.db, id, 720).await?,
    }))
}

/// The fleet (operators and admins).
#[utoipa::path(get, path = "/agents", tag = "agents", responses((status = 200, body = AgentList), (status = 403, body = ErrorBody)))]
async fn list(State(state): State<AppState>, user: CurrentUser) -> ApiResult<Json<AgentList>> {
    operators_only(&user)?;
    Ok(Json(AgentList {
        data: agents::list(&state.db).await?,
    }))
}
