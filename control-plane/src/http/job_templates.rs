//! Job templates (spec §5.9): save a configuration, start new jobs from it.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::error::ErrorBody;
use super::{ApiJson, ApiPath, ApiQuery};
use crate::db::job_templates::Template;
use crate::domain::JobStatus;
use crate::service::template::{self, NewTemplateRequest, UseTemplate};
use crate::service::{AppState, CurrentUser, ServiceResult};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_templates, create_template))
        .routes(routes!(use_template))
}

/// Saves a job configuration as a template.
#[utoipa::path(post, path = "/templates", tag = "templates", request_body = NewTemplateRequest,
    responses((status = 201, body = Template), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn create_template(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(request): ApiJson<NewTemplateRequest>,
) -> ServiceResult<(StatusCode, Json<Template>)> {
    let template = template::create_template(&state, &user, request).await?;
    Ok((StatusCode::CREATED, Json(template)))
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
async fn list_templates(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiQuery(params): ApiQuery<ListParams>,
) -> ServiceResult<Json<TemplateList>> {
    let data =
        template::list_templates(&state, &user, params.is_public, params.search.as_deref()).await?;
    Ok(Json(TemplateList { data }))
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
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(request): ApiJson<UseTemplate>,
) -> ServiceResult<(StatusCode, Json<UsedTemplate>)> {
    let job = template::job_from_template(&state, &user, id, request).await?;
    Ok((
        StatusCode::CREATED,
        Json(UsedTemplate {
            job_id: job.id,
            job_name: job.name,
            status: job.status,
        }),
    ))
}
