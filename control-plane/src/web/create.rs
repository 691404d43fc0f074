//! Creating a job in the browser: pick an eligible file, name it and choose the base
//! model; then configure it (preset, GPU, spot or on-demand, overrides) and start it.
//! Both forms post to handlers that call the same functions as the API, and show its
//! field errors next to the form.

use askama::Template;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::frame::Frame;
use super::{render, PageError, PageUser};
use crate::db::files::{self, FileFilter, TrainingFile};
use crate::db::presets::{self, Preset};
use crate::domain::gpu_catalog::GpuOffer;
use crate::domain::{FieldError, RecoveryPolicy};
use crate::service::job::{
    configure_job, create_draft, queue_job, unmet_eligibility, visible_job, ConfigureJob, CreateJob,
};
use crate::service::AppState;
use crate::service::ServiceError;
use protocol::agent::ExportFormat;

type PageResult = Result<Response, PageError>;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/training/create", get(create_form).post(create))
        .route(
            "/training/{id}/configure",
            get(configure_form).post(configure),
        )
        .route("/training/job/{id}/start", post(start))
}

/// A problem with a submitted form, shown above it.
pub(super) fn problems(error: &ServiceError) -> Vec<String> {
    match error {
        ServiceError::Validation(fields) => fields
            .iter()
            .map(|FieldError { field, message }| format!("{field}: {message}"))
            .collect(),
        ServiceError::Unprocessable { rules, message } if rules.is_empty() => vec![message.clone()],
        ServiceError::Unprocessable { rules, .. } => rules.clone(),
        other => vec![other.to_string()],
    }
}

fn recoverable(error: &ServiceError) -> bool {
    matches!(
        error,
        ServiceError::Validation(_)
            | ServiceError::Unprocessable { .. }
            | ServiceError::NotFound(_)
    )
}

#[derive(Template)]
#[template(path = "create.html")]
struct CreatePage {
    frame: Frame,
    files: Vec<TrainingFile>,
    problems: Vec<String>,
    name: String,
    base_model: String,
    file_id: String,
}

/// The user's training files that a job can use.
pub async fn eligible_files(
    state: &AppState,
    user: &PageUser,
) -> Result<Vec<TrainingFile>, PageError> {
    let (list, _) = files::list(
        &state.db,
        user.0 .0.id,
        &FileFilter {
            status: None,
            enrichment_status: Some("completed".into()),
            search: None,
            limit: 500,
            offset: 0,
        },
    )
    .await?;
    Ok(list
        .into_iter()
        .filter(|f| unmet_eligibility(state, f).is_empty())
        .collect())
}

async fn create_form(State(state): State<AppState>, user: PageUser) -> PageResult {
    let page = CreatePage {
        files: eligible_files(&state, &user).await?,
        frame: Frame::new(
            &user,
            "jobs",
            &[("Jobs", "/training/jobs"), ("New job", "")],
        ),
        problems: Vec::new(),
        name: String::new(),
        base_model: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
        file_id: String::new(),
    };
    Ok(render(&page))
}

#[derive(Deserialize)]
struct CreateForm {
    training_file_id: String,
    name: String,
    base_model: String,
}

async fn create(
    State(state): State<AppState>,
    user: PageUser,
    Form(form): Form<CreateForm>,
) -> PageResult {
    let request = form
        .training_file_id
        .parse::<Uuid>()
        .map(|training_file_id| CreateJob {
            training_file_id,
            name: form.name.clone(),
            description: None,
            base_model: form.base_model.clone(),
            team: None,
            project: None,
            cost_center: None,
            tags: None,
            validation_file_id: None,
        });
    let result = match &request {
        Ok(request) => create_draft(&state, &user.0, request, None).await,
        Err(_) => Err(ServiceError::Validation(vec![FieldError::new(
            "training_file_id",
            "choose a training file",
        )])),
    };
    match result {
        Ok(job) => Ok(Redirect::to(&format!("/training/{}/configure", job.id)).into_response()),
        Err(error) if recoverable(&error) => {
            let page = CreatePage {
                files: eligible_files(&state, &user).await?,
                frame: Frame::new(
                    &user,
                    "jobs",
                    &[("Jobs", "/training/jobs"), ("New job", "")],
                ),
                problems: problems(&error),
                name: form.name,
                base_model: form.base_model,
                file_id: form.training_file_id,
            };
            Ok((StatusCode::UNPROCESSABLE_ENTITY, render(&page)).into_response())
        }
        Err(error) => Err(PageError(error)),
    }
}

pub struct PresetCard {
    pub preset: Preset,
    pub unmet: Option<String>,
    /// Scaled hours (min, max) and the preset's epochs, for the page's live estimate.
    pub hours: (f64, f64),
    pub epochs: f64,
    pub duration: String,
    pub spot_cost: String,
    pub ondemand_cost: String,
}

#[derive(Template)]
#[template(path = "configure.html")]
struct ConfigurePage {
    frame: Frame,
    job_id: Uuid,
    job_name: String,
    /// For the live estimate (`POST /api/v1/jobs/estimate`).
    training_file_id: Uuid,
    base_model: String,
    conversations: i64,
    presets: Vec<PresetCard>,
    gpus: Vec<GpuOffer>,
    chosen_preset: String,
    chosen_gpu: String,
    chosen_type: String,
    /// The policy the form shows: as posted, else the job's.
    recovery: RecoveryPolicy,
    /// Whether the adapter is also exported as a llama.cpp GGUF adapter.
    export_gguf: bool,
    problems: Vec<String>,
}

async fn configure_page(
    state: &AppState,
    user: &PageUser,
    id: Uuid,
    form: Option<&ConfigureForm>,
    problems: Vec<String>,
) -> Result<ConfigurePage, PageError> {
    let job = visible_job(state, &user.0, id).await?;
    let recovery = form
        .and_then(|f| RecoveryPolicy::resolve(job.recovery(), &f.recovery()).ok())
        .unwrap_or_else(|| job.recovery());
    let file = files::get(&state.db, job.training_file_id)
        .await?
        .ok_or(ServiceError::NotFound("training file"))?;
    let completed = presets::completed_jobs_of(&state.db, job.user_id).await?;
    // Spec §7.1: estimates are for 200 conversations and scale with the dataset.
    let scale = file.conversation_count as f64 / 200.0;
    let presets = presets::visible_to(&state.db, job.user_id)
        .await?
        .into_iter()
        .map(|preset| {
            let e = preset.estimates.0;
            PresetCard {
                unmet: crate::service::preset::requirement_unmet(&preset, completed),
                hours: (e.duration_hours_min * scale, e.duration_hours_max * scale),
                epochs: preset
                    .parameters
                    .0
                    .get("epochs")
                    .and_then(Value::as_f64)
                    .unwrap_or(1.0),
                duration: format!(
                    "{:.1}–{:.1} h",
                    e.duration_hours_min * scale,
                    e.duration_hours_max * scale
                ),
                spot_cost: format!(
                    "${:.2}–${:.2}",
                    e.cost_spot_min * scale,
                    e.cost_spot_max * scale
                ),
                ondemand_cost: format!(
                    "${:.2}–${:.2}",
                    e.cost_ondemand_min * scale,
                    e.cost_ondemand_max * scale
                ),
                preset,
            }
        })
        .collect();
    Ok(ConfigurePage {
        frame: Frame::new(
            user,
            "jobs",
            &[
                ("Jobs", "/training/jobs"),
                (&job.name, &format!("/training/job/{id}")),
                ("Configure", ""),
            ],
        ),
        job_id: job.id,
        job_name: job.name,
        training_file_id: file.id,
        base_model: job.base_model,
        conversations: file.conversation_count,
        presets,
        gpus: state.catalog.gpus.clone(),
        chosen_preset: form
            .map(|f| f.preset_id.clone())
            .or(job.preset_id.map(|p| p.to_string()))
            .unwrap_or_else(|| presets::BALANCED_PRESET_ID.to_string()),
        chosen_gpu: form
            .map(|f| f.gpu_model.clone())
            .or(job.gpu_model)
            .unwrap_or_default(),
        chosen_type: form
            .map(|f| f.gpu_type.clone())
            .or(job.gpu_type.map(|t| t.as_str().to_owned()))
            .unwrap_or_else(|| "spot".into()),
        recovery,
        export_gguf: form.map_or_else(
            || {
                job.exports
                    .as_ref()
                    .is_some_and(|e| e.0.contains(&ExportFormat::Gguf))
            },
            |f| f.export_gguf.is_some(),
        ),
        problems,
    })
}

async fn configure_form(
    State(state): State<AppState>,
    user: PageUser,
    Path(id): Path<Uuid>,
) -> PageResult {
    Ok(render(
        &configure_page(&state, &user, id, None, Vec::new()).await?,
    ))
}

#[derive(Deserialize)]
struct ConfigureForm {
    preset_id: String,
    gpu_type: String,
    gpu_model: String,
    #[serde(default)]
    epochs: String,
    #[serde(default)]
    learning_rate: String,
    #[serde(default)]
    rank: String,
    #[serde(default)]
    batch_size: String,
    #[serde(default)]
    max_retries: String,
    #[serde(default)]
    max_interruptions: String,
    /// A checkbox: present when ticked.
    auto_resume: Option<String>,
    /// A checkbox: also export a GGUF adapter.
    export_gguf: Option<String>,
    #[serde(default)]
    eval_every: String,
    #[serde(default)]
    early_stopping_patience: String,
    /// A checkbox: keep the best evaluation's adapter.
    keep_best: Option<String>,
    /// A checkbox, ticked by default: pack training examples into rows.
    packing: Option<String>,
    /// How the frozen base is held: none, q8_0 or q4k.
    #[serde(default)]
    base_quant: String,
    /// A checkbox: compute activations again in the backward.
    gradient_checkpointing: Option<String>,
}

impl ConfigureForm {
    /// The overrides filled in; a value that is not a number is passed on as text, so
    /// the same checks as the API's name the field.
    fn overrides(&self) -> Map<String, Value> {
        let mut map = Map::new();
        for (key, text) in [
            ("epochs", &self.epochs),
            ("learning_rate", &self.learning_rate),
            ("rank", &self.rank),
            ("batch_size", &self.batch_size),
            ("eval_every", &self.eval_every),
            ("early_stopping_patience", &self.early_stopping_patience),
        ] {
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            let value = text
                .parse::<i64>()
                .map(Value::from)
                .or_else(|_| text.parse::<f64>().map(Value::from))
                .unwrap_or_else(|_| Value::from(text));
            map.insert(key.to_owned(), value);
        }
        if self.keep_best.is_some() {
            map.insert("keep_best".into(), Value::Bool(true));
        }
        // The form always holds the box, so an unticked one turns packing off.
        map.insert("packing".into(), Value::Bool(self.packing.is_some()));
        let base_quant = self.base_quant.trim();
        if !base_quant.is_empty() {
            map.insert("base_quant".into(), Value::from(base_quant));
        }
        if self.gradient_checkpointing.is_some() {
            map.insert("gradient_checkpointing".into(), Value::Bool(true));
        }
        map
    }

    /// The recovery policy as filled in; blank budgets keep their current values.
    fn recovery(&self) -> Map<String, Value> {
        let mut map = Map::new();
        for (key, text) in [
            ("max_retries", &self.max_retries),
            ("max_interruptions", &self.max_interruptions),
        ] {
            let text = text.trim();
            if !text.is_empty() {
                let value = text
                    .parse::<i64>()
                    .map_or_else(|_| Value::from(text), Value::from);
                map.insert(key.to_owned(), value);
            }
        }
        map.insert(
            "auto_resume".into(),
            Value::Bool(self.auto_resume.is_some()),
        );
        map
    }
}

async fn configure(
    State(state): State<AppState>,
    user: PageUser,
    Path(id): Path<Uuid>,
    Form(form): Form<ConfigureForm>,
) -> PageResult {
    let job = visible_job(&state, &user.0, id).await?;
    let request = ConfigureJob {
        preset_id: form.preset_id.parse().ok(),
        hyperparameters: form.overrides(),
        gpu_type: form.gpu_type.clone(),
        gpu_model: form.gpu_model.clone(),
        required_labels: Map::new(),
        recovery: form.recovery(),
        team: None,
        project: None,
        cost_center: None,
        tags: None,
        validate_on_completion: None,
        exports: Some(form.export_gguf.iter().map(|_| "gguf".to_owned()).collect()),
    };
    match configure_job(&state, job, &request, None).await {
        Ok(job) => Ok(
            Redirect::to(&format!("/training/job/{}?notice=Configured", job.id)).into_response(),
        ),
        Err(error) if recoverable(&error) => {
            let page = configure_page(&state, &user, id, Some(&form), problems(&error)).await?;
            Ok((StatusCode::UNPROCESSABLE_ENTITY, render(&page)).into_response())
        }
        Err(error) => Err(PageError(error)),
    }
}

async fn start(State(state): State<AppState>, user: PageUser, Path(id): Path<Uuid>) -> PageResult {
    let job = visible_job(&state, &user.0, id).await?;
    queue_job(&state, &job).await?;
    Ok(Redirect::to(&format!("/training/job/{id}?notice=Queued+for+training")).into_response())
}
