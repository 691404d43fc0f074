//! Job templates (spec §5.9): save a configuration (with its recovery policy), start new
//! jobs from it.

use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use super::job::{configure_job, create_draft, visible_job, ConfigureJob, CreateJob};
use super::{AppState, CurrentUser, ServiceError, ServiceResult};
use crate::db::job_templates::{self, NewTemplate, Template};
use crate::db::jobs::Job;
use crate::db::presets;
use crate::domain::{hyperparameters, Attribution, FieldError, GpuType, RecoveryPolicy};

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
    /// The recovery policy jobs from this template get, as in configure.
    #[schema(value_type = Option<Object>)]
    pub recovery: Option<Map<String, Value>>,
    /// The attribution jobs from this template get (as on `POST /jobs`).
    pub team: Option<String>,
    pub project: Option<String>,
    pub cost_center: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub tags: Option<Map<String, Value>>,
    /// Copy what the request leaves out from this job.
    pub source_job_id: Option<Uuid>,
    #[serde(default)]
    pub is_public: bool,
}

/// Checks and stores a template; one made from a job takes what the request leaves out
/// from that job (its recovery policy too).
pub async fn create_template(
    state: &AppState,
    user: &CurrentUser,
    mut request: NewTemplateRequest,
) -> ServiceResult<Template> {
    let mut base_recovery = RecoveryPolicy::default();
    let mut errors = Vec::new();
    let mut attribution = Attribution::parse(
        request.team.as_deref(),
        request.project.as_deref(),
        request.cost_center.as_deref(),
        request.tags.as_ref(),
        &mut errors,
    );
    if let Some(job_id) = request.source_job_id {
        let job = visible_job(state, user, job_id).await?;
        base_recovery = job.recovery();
        attribution = attribution.or(&job.attribution());
        request.preset_id = request.preset_id.or(job.preset_id);
        request.gpu_type = request
            .gpu_type
            .or(job.gpu_type.map(|t| t.as_str().to_owned()));
        request.gpu_model = request.gpu_model.or(job.gpu_model);
        request.base_model = request.base_model.or(Some(job.base_model));
        if request.hyperparameters.is_none() {
            request.hyperparameters = job
                .hyperparameters
                .and_then(|h| serde_json::to_value(h.0).ok())
                .and_then(|h| h.as_object().cloned());
        }
        request.recovery = request.recovery.or_else(|| Some(Map::new()));
    }
    let name = request.name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        errors.push(FieldError::new("name", "must be 1 to 200 characters"));
    }
    let gpu_type = match &request.gpu_type {
        Some(text) => {
            let parsed = GpuType::parse(text);
            if parsed.is_none() {
                errors.push(FieldError::new("gpu_type", "must be spot or ondemand"));
            }
            parsed
        }
        None => None,
    };
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
    let recovery = match &request.recovery {
        Some(overrides) => match RecoveryPolicy::resolve(base_recovery, overrides) {
            Ok(policy) => Some(policy),
            Err(field_errors) => {
                errors.extend(field_errors);
                None
            }
        },
        None => None,
    };
    if !errors.is_empty() {
        return Err(ServiceError::Validation(errors));
    }
    Ok(job_templates::create(
        &state.db,
        user.0.id,
        NewTemplate {
            name,
            description: request.description.as_deref(),
            icon: request.icon.as_deref(),
            preset_id: request.preset_id,
            hyperparameters: request.hyperparameters.as_ref(),
            gpu_type,
            gpu_model: request.gpu_model.as_deref(),
            base_model: request.base_model.as_deref(),
            source_job_id: request.source_job_id,
            is_public: request.is_public,
            recovery,
            attribution: &attribution,
        },
    )
    .await?)
}

/// The caller's templates and public ones.
pub async fn list_templates(
    state: &AppState,
    user: &CurrentUser,
    is_public: Option<bool>,
    search: Option<&str>,
) -> ServiceResult<Vec<Template>> {
    let search = search.filter(|s| !s.trim().is_empty());
    Ok(job_templates::visible_to(&state.db, user.0.id, is_public, search).await?)
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
) -> ServiceResult<Job> {
    let template = job_templates::get_visible(&state.db, id, user.0.id)
        .await?
        .ok_or(ServiceError::NotFound("template"))?;
    let Some(base_model) = request.base_model.or(template.base_model.clone()) else {
        return Err(ServiceError::Validation(vec![FieldError::new(
            "base_model",
            "the template names no base model; give one",
        )]));
    };
    let draft = CreateJob {
        training_file_id: request.training_file_id,
        name: request.name,
        description: template.description.clone(),
        base_model,
        team: template.team.clone(),
        project: template.project.clone(),
        cost_center: template.cost_center.clone(),
        tags: template.tags.as_ref().map(|tags| tags.0.clone()),
        validation_file_id: None,
    };
    let mut job = create_draft(state, user, &draft, template.preset_id).await?;
    if let (Some(gpu_type), Some(gpu_model)) = (template.gpu_type, &template.gpu_model) {
        let configuration = ConfigureJob {
            preset_id: template.preset_id,
            hyperparameters: template
                .hyperparameters
                .as_ref()
                .map(|h| h.0.clone())
                .unwrap_or_default(),
            gpu_type: gpu_type.as_str().to_owned(),
            gpu_model: gpu_model.clone(),
            required_labels: Map::new(),
            recovery: Map::new(),
            team: None,
            project: None,
            cost_center: None,
            tags: None,
            validate_on_completion: None,
            exports: None,
        };
        let recovery = template.recovery.as_ref().map(|r| r.0);
        job = configure_job(state, job, &configuration, recovery).await?;
    }
    job_templates::count_use(&state.db, template.id).await?;
    Ok(job)
}
