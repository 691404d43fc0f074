//! Job templates (spec §5.9): save a configuration, start new jobs from it.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::auth::CurrentUser;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::jobs::{configure_job, create_draft, visible_job, ConfigureJob, CreateJob};
use super::{ApiJson, ApiQuery, AppState};
use crate::db::presets;
use crate::db::templates::{self, NewTemplate, Template};
use crate::domain::{hyperparameters, FieldError, GpuType, JobStatus};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(use_template))
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct NewTemplateRequest {
    pub name: String,
    pub description: Option<String>,
    pub icon: Option<String>,
    pub preset_id: Option<Uuid>,
    #[schema(value_type = Option<Object>)]
    pub hyperparameters: Option<Map<String, Value>>,
    pub gpu_type: Option<String>,
    pub gpu_model: Option<String>,
    pub base_model: Option<String>,
    /// Copy what the request leaves out from this job.
    pub source_job_id: Option<Uuid>,
    #[serde(default)]
    pub is_public: bool,
}

/// Saves a job configuration as a template.
#[utoipa::path(post, path = "/templates", tag = "templates", request_body = NewTemplateRequest,
    responses((status = 201, body = Template), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn create(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(request): ApiJson<NewTemplateRequest>,
) -> ApiResult<(StatusCode, Json<Template>)> {
    let template = create_template(&state, &user, request).await?;
    Ok((StatusCode::CREATED, Json(template)))
}

/// Checks and stores a template; one made from a job takes what the request leaves out
/// from that job.
pub async fn create_template(
    state: &AppState,
    user: &CurrentUser,
    mut request: NewTemplateRequest,
) -> ApiResult<Template> {
    // A template made from a job takes what the request leaves out from that job.
    if let Some(job_id) = request.source_job_id {
        let job = visible_job(state, user, job_id).await?;
        request.preset_id = request.preset_id.or(job.preset_id);
        request.gpu_type = request.gpu_type.or(job.gpu_type);
        request.gpu_model = request.gpu_model.or(job.gpu_model);
        request.base_model = request.base_model.or(Some(job.base_model));
        if request.hyperparameters.is_none() {
            request.hyperparameters = job.hyperparameters.and_then(|h| h.0.as_object().cloned());
        }
    }
    let mut errors = Vec::new();
    let name = request.name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        errors.push(FieldError::new("name", "must be 1 to 200 characters"));
    }
    if let Some(gpu_type) = &request.gpu_type {
        if GpuType::parse(gpu_type).is_none() {
            errors.push(FieldError::new("gpu_type", "must be spot or ondemand"));
        }
    }
    if let Some(model) = &request.gpu_model {
        if state.catalog.find(model).is_none() {
            errors.push(FieldError::new(
                "gpu_model",
                format!(
                    "unknown GPU model; available: {}",
                    state.catalog.model_names()
                ),
            ));
        }
    }
    if let Some(preset_id) = request.preset_id {
        if presets::get_visible(&state.db, preset_id, user.0.id)
            .await?
            .is_none()
        {
            errors.push(FieldError::new("preset_id", "no such preset"));
        }
    }
    if let Some(hyperparameters) = &request.hyperparameters {
        if let Err(field_errors) =
            hyperparameters::resolve(&Map::new(), hyperparameters, &state.settings.limits)
        {
            errors.extend(
                field_errors
                    .into_iter()
                    .map(|e| FieldError::new(format!("hyperparameters.{}", e.field), e.message)),
            );
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let hyperparameters = request.hyperparameters.map(Value::Object);
    let template = templates::create(
        &state.db,
        user.0.id,
        NewTemplate {
            name,
            description: request.description.as_deref(),
            icon: request.icon.as_deref(),
            preset_id: request.preset_id,
            hyperparameters: hyperparameters.as_ref(),
            gpu_type: request.gpu_type.as_deref(),
            gpu_model: request.gpu_model.as_deref(),
            base_model: request.base_model.as_deref(),
            source_job_id: request.source_job_id,
            is_public: request.is_public,
        },
    )
    .await?;
    Ok(template)
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListParams {
    is_public: Option<bool>,
    search: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct TemplateList {
    data: Vec<Template>,
}

/// The caller's templates and public ones.
#[utoipa::path(get, path = "/templates", tag = "templates", params(ListParams), responses((status = 200, body = TemplateList)))]
async fn list(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiQuery(params): ApiQuery<ListParams>,
) -> ApiResult<Json<TemplateList>> {
    let search = params.search.as_deref().filter(|s| !s.trim().is_empty());
    let data = templates::visible_to(&state.db, user.0.id, params.is_public, search).await?;
    Ok(Json(TemplateList { data }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UseTemplate {
    pub training_file_id: Uuid,
    pub name: String,
    pub base_model: Option<String>,
}

/// A draft job from a template on `request`'s file (configured too when the template
/// names a GPU); counts the use.
pub async fn job_from_template(
    state: &AppState,
    user: &CurrentUser,
    id: Uuid,
    request: UseTemplate,
) -> ApiResult<crate::db::jobs::Job> {
    let template = templates::get_visible(&state.db, id, user.0.id)
        .await?
        .ok_or(ApiError::NotFound("template"))?;
    let Some(base_model) = request.base_model.or(template.base_model.clone()) else {
        return Err(ApiError::Validation(vec![FieldError::new(
            "base_model",
            "the template names no base model; give one",
        )]));
    };
    let draft = CreateJob {
        training_file_id: request.training_file_id,
        name: request.name,
        description: template.description.clone(),
        base_model,
    };
    let mut job = create_draft(state, user, &draft, template.preset_id).await?;
    if let (Some(gpu_type), Some(gpu_model)) = (&template.gpu_type, &template.gpu_model) {
        let configuration = ConfigureJob {
            preset_id: template.preset_id,
            hyperparameters: template
                .hyperparameters
                .as_ref()
                .and_then(|h| h.0.as_object().cloned())
                .unwrap_or_default(),
            gpu_type: gpu_type.clone(),
            gpu_model: gpu_model.clone(),
            required_labels: Default::default(),
        };
        job = configure_job(state, job, &configuration).await?;
    }
    templates::count_use(&state.db, template.id).await?;
    Ok(job)
}

#[derive(Serialize, ToSchema)]
struct UsedTemplate {
    job_id: Uuid,
    job_name: String,
    status: JobStatus,
}

/// Creates a job from a template. A template with a full configuration (GPU type and
/// model) yields a `configured` job ready to start; otherwise a `draft`.
#[utoipa::path(post, path = "/templates/{id}/use", tag = "templates", params(("id" = Uuid, Path)), request_body = UseTemplate,
    responses((status = 201, body = UsedTemplate), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn use_template(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<Uuid>,
    ApiJson(request): ApiJson<UseTemplate>,
) -> ApiResult<(StatusCode, Json<UsedTemplate>)> {
    let job = job_from_template(&state, &user, id, request).await?;
    Ok((
        StatusCode::CREATED,
        Json(UsedTemplate {
            job_id: job.id,
            job_name: job.name,
            status: job.status,
        }),
    ))
}
