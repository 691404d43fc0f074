//! Hyperparameter presets: the system ones and users' own.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::auth::CurrentUser;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::{ApiJson, AppState};
use crate::db::presets::{self, Estimates, NewPreset, Preset};
use crate::domain::{hyperparameters, FieldError};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list, create))
}

#[derive(Serialize, ToSchema)]
struct PresetView {
    #[serde(flatten)]
    preset: Preset,
    /// False while the user has completed fewer jobs than the preset requires.
    available: bool,
    unmet_requirement: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct PresetList {
    data: Vec<PresetView>,
}

/// System presets and the caller's own, with whether each is available to the caller.
#[utoipa::path(get, path = "/presets", tag = "presets", responses((status = 200, body = PresetList), (status = 401, body = ErrorBody)))]
async fn list(State(state): State<AppState>, user: CurrentUser) -> ApiResult<Json<PresetList>> {
    let completed = presets::completed_jobs_of(&state.db, user.0.id).await?;
    let data = presets::visible_to(&state.db, user.0.id)
        .await?
        .into_iter()
        .map(|preset| {
            let unmet = requirement_unmet(&preset, completed);
            PresetView {
                available: unmet.is_none(),
                unmet_requirement: unmet,
                preset,
            }
        })
        .collect();
    Ok(Json(PresetList { data }))
}

pub fn requirement_unmet(preset: &Preset, completed_jobs: i64) -> Option<String> {
    (completed_jobs < preset.requires_completed_jobs).then(|| {
        format!(
            "the {} preset requires {} completed training jobs; you have {completed_jobs}",
            preset.name, preset.requires_completed_jobs
        )
    })
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewPresetRequest {
    name: String,
    description: Option<String>,
    icon: Option<String>,
    /// Hyperparameters, checked as a job's are.
    #[schema(value_type = Object)]
    parameters: Map<String, Value>,
    /// Defaults to the Balanced preset's.
    estimates: Option<Estimates>,
    risk_level: Option<String>,
    #[serde(default)]
    recommended_for: Vec<String>,
}

/// Creates a custom preset owned by the caller.
#[utoipa::path(post, path = "/presets", tag = "presets", request_body = NewPresetRequest,
    responses((status = 201, body = Preset), (status = 422, body = ErrorBody)))]
async fn create(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(request): ApiJson<NewPresetRequest>,
) -> ApiResult<(StatusCode, Json<Preset>)> {
    let mut errors = Vec::new();
    let name = request.name.trim();
    if name.is_empty() || name.len() > 100 {
        errors.push(FieldError::new("name", "must be 1 to 100 characters"));
    }
    let risk_level = request.risk_level.as_deref().unwrap_or("medium");
    if !["low", "medium", "high"].contains(&risk_level) {
        errors.push(FieldError::new(
            "risk_level",
            "must be one of low, medium, high",
        ));
    }
    let parameters =
        hyperparameters::resolve(&Map::new(), &request.parameters, &state.settings.limits).map_err(
            |field_errors| {
                errors.extend(
                    field_errors
                        .into_iter()
                        .map(|e| FieldError::new(format!("parameters.{}", e.field), e.message)),
                )
            },
        );
    let Ok(parameters) = parameters else {
        return Err(ApiError::Validation(errors));
    };
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let estimates = match request.estimates {
        Some(estimates) => estimates,
        None => balanced_estimates(&state).await?,
    };
    let parameters =
        serde_json::to_value(&parameters).map_err(|e| ApiError::Internal(e.to_string()))?;
    let preset = presets::create(
        &state.db,
        user.0.id,
        NewPreset {
            name,
            description: request.description.as_deref(),
            icon: request.icon.as_deref(),
            parameters: &parameters,
            estimates: &estimates,
            risk_level,
            recommended_for: &request.recommended_for,
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(preset)))
}

/// Estimates for a custom preset that gives none: the Balanced preset's.
async fn balanced_estimates(state: &AppState) -> ApiResult<Estimates> {
    let balanced = presets::get_visible(&state.db, presets::BALANCED_PRESET_ID, uuid::Uuid::nil())
        .await?
        .ok_or_else(|| ApiError::Internal("the Balanced system preset is missing".into()))?;
    Ok(balanced.estimates.0)
}
