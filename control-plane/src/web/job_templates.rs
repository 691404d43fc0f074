//! Job templates (spec stage 5): the user's and public ones, with how often each was used,
//! and a form to start a job from one on an eligible file.

use askama::Template;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;
use uuid::Uuid;

use super::create::{eligible_files, problems};
use super::frame::Frame;
use super::{render, PageError, PageUser};
use crate::db::files::TrainingFile;
use crate::db::job_templates::Template as JobTemplate;
use crate::service::template::{
    create_template, job_from_template, NewTemplateRequest, UseTemplate,
};
use crate::service::AppState;
use crate::service::ServiceError;

type PageResult = Result<Response, PageError>;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/training/templates", get(list))
        .route("/training/templates/{id}/use", post(use_template))
        .route("/training/job/{id}/template", post(save_job_as_template))
}

#[derive(Template)]
#[template(path = "templates.html")]
struct TemplatesPage {
    frame: Frame,
    templates: Vec<JobTemplate>,
    files: Vec<TrainingFile>,
    problem: Option<String>,
}

async fn page(
    state: &AppState,
    user: &PageUser,
    problem: Option<String>,
) -> Result<TemplatesPage, PageError> {
    Ok(TemplatesPage {
        frame: Frame::new(user, "templates", &[("Templates", "/training/templates")]),
        templates: crate::service::template::list_templates(state, &user.0, None, None).await?,
        files: eligible_files(state, user).await?,
        problem,
    })
}

async fn list(State(state): State<AppState>, user: PageUser) -> PageResult {
    Ok(render(&page(&state, &user, None).await?))
}

#[derive(Deserialize)]
struct UseForm {
    training_file_id: Uuid,
    name: String,
}

async fn use_template(
    State(state): State<AppState>,
    user: PageUser,
    Path(id): Path<Uuid>,
    Form(form): Form<UseForm>,
) -> PageResult {
    let request = UseTemplate {
        training_file_id: form.training_file_id,
        name: form.name,
        base_model: None,
    };
    match job_from_template(&state, &user.0, id, request).await {
        Ok(job) => Ok(Redirect::to(&format!(
            "/training/job/{}?notice=Created+from+the+template",
            job.id
        ))
        .into_response()),
        Err(error @ (ServiceError::Validation(_) | ServiceError::Unprocessable { .. })) => {
            let page = page(&state, &user, Some(problems(&error).join("; "))).await?;
            Ok((StatusCode::UNPROCESSABLE_ENTITY, render(&page)).into_response())
        }
        Err(error) => Err(PageError(error)),
    }
}

#[derive(Deserialize)]
struct SaveForm {
    name: String,
}

async fn save_job_as_template(
    State(state): State<AppState>,
    user: PageUser,
    Path(id): Path<Uuid>,
    Form(form): Form<SaveForm>,
) -> PageResult {
    let request = NewTemplateRequest {
        name: form.name,
        source_job_id: Some(id),
        ..NewTemplateRequest::default()
    };
    create_template(&state, &user.0, request).await?;
    Ok(Redirect::to("/training/templates").into_response())
}
