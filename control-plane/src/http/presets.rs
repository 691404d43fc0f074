//! Hyperparameter presets: the system ones and users' own.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::ErrorBody;
use super::ApiJson;
use crate::db::presets::Preset;
use crate::service::preset::{self, NewPresetRequest, PresetView};
use crate::service::{AppState, CurrentUser, ServiceResult};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_presets, create_preset))
}

#[derive(Serialize, ToSchema)]
struct PresetList {
    data: Vec<PresetView>,
}

/// System presets and the caller's own, with whether each is available to the caller.
#[utoipa::path(get, path = "/presets", tag = "presets", responses((status = 200, body = PresetList), (status = 401, body = ErrorBody)))]
async fn list_presets(
    State(state): State<AppState>,
    user: CurrentUser,
) -> ServiceResult<Json<PresetList>> {
    Ok(Json(PresetList {
        data: preset::list_presets(&state, &user).await?,
    }))
}

/// Creates a custom preset owned by the caller.
#[utoipa::path(post, path = "/presets", tag = "presets", request_body = NewPresetRequest,
    responses((status = 201, body = Preset), (status = 422, body = ErrorBody)))]
async fn create_preset(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(request): ApiJson<NewPresetRequest>,
) -> ServiceResult<(StatusCode, Json<Preset>)> {
    let created = preset::create_preset(&state, &user, request).await?;
    Ok((StatusCode::CREATED, Json(created)))
}
