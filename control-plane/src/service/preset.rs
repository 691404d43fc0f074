//! Hyperparameter presets: the system ones and users' own, and whether a user may use one.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::{AppState, CurrentUser, ServiceError, ServiceResult};
use crate::db::presets::{self, Estimates, NewPreset, Preset};
use crate::domain::{hyperparameters, FieldError, RecoveryPolicy};

#[derive(Serialize, ToSchema)]
pub struct PresetView {
    #[serde(flatten)]
    pub preset: Preset,
    /// False while the user has completed fewer jobs than the preset requires.
    pub available: bool,
    pub unmet_requirement: Option<String>,
}

/// System presets and the caller's own, with whether each is available to the caller.
pub async fn list_presets(state: &AppState, user: &CurrentUser) -> ServiceResult<Vec<PresetView>> {
    let completed = presets::completed_jobs_of(&state.db, user.0.id).await?;
    Ok(presets::visible_to(&state.db, user.0.id)
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
        .collect())
}

/// The rule a user who completed `completed_jobs` jobs breaks by choosing `preset`.
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
pub struct NewPresetRequest {
    pub name: String,
    pub description: Option<String>,
    pub icon: Option<String>,
    /// Hyperparameters, checked as a job's are.
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
    /// Defaults to the Balanced preset's.
    pub estimates: Option<Estimates>,
    pub risk_level: Option<String>,
    #[serde(default)]
    pub recommended_for: Vec<String>,
    /// The recovery policy jobs on this preset start with, as in configure.
    #[schema(value_type = Option<Object>)]
    pub recovery: Option<Map<String, Value>>,
}

/// Creates a custom preset owned by the caller; every bad field is named.
pub async fn create_preset(
    state: &AppState,
    user: &CurrentUser,
    request: NewPresetRequest,
) -> ServiceResult<Preset> {
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
    let recovery = request
        .recovery
        .as_ref()
        .map(|overrides| RecoveryPolicy::resolve(RecoveryPolicy::default(), overrides))
        .transpose()
        .map_err(|field_errors| errors.extend(field_errors));
    let (Ok(parameters), Ok(recovery), true) = (parameters, recovery, errors.is_empty()) else {
        return Err(ServiceError::Validation(errors));
    };
    let estimates = match request.estimates {
        Some(estimates) => estimates,
        None => balanced_estimates(state).await?,
    };
    let parameters =
        serde_json::to_value(&parameters).map_err(|e| ServiceError::Internal(e.to_string()))?;
    Ok(presets::create(
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
            recovery,
        },
    )
    .await?)
}

/// Estimates for a custom preset that gives none: the Balanced preset's.
async fn balanced_estimates(state: &AppState) -> ServiceResult<Estimates> {
    let balanced = presets::get_visible(&state.db, presets::BALANCED_PRESET_ID, uuid::Uuid::nil())
        .await?
        .ok_or_else(|| ServiceError::Internal("the Balanced system preset is missing".into()))?;
    Ok(balanced.estimates.0)
}
