//! Agent enrollment and the fleet view. The agent protocol itself (heartbeats, claims)
//! builds on the per-agent secret handed out here.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::auth::CurrentUser;
use super::error::{ApiError, ApiResult};
use super::{ApiJson, AppState};
use crate::auth::{new_token, token_hash};
use crate::db::agents::{self, Agent, NewAgent};
use crate::domain::FieldError;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/agents", get(list))
        .route("/agents/register", post(register))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Registration {
    enrollment_token: String,
    name: String,
    #[serde(default)]
    labels: serde_json::Map<String, Value>,
    #[serde(default)]
    gpus: Vec<Value>,
}

#[derive(Serialize)]
struct Registered {
    agent_id: Uuid,
    /// Shown once: the agent authenticates every later call with it.
    agent_secret: String,
}

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

#[derive(Serialize)]
struct AgentList {
    data: Vec<Agent>,
}

async fn list(State(state): State<AppState>, user: CurrentUser) -> ApiResult<Json<AgentList>> {
    if !user.0.role().sees_everything() {
        return Err(ApiError::Forbidden(
            "the fleet is visible to operators and admins only".into(),
        ));
    }
    Ok(Json(AgentList {
        data: agents::list(&state.db).await?,
    }))
}
