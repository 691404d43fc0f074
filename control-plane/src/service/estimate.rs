//! Cost estimates (stage 7): before anything exists (`POST /jobs/estimate`, which the
//! configure page calls as it is filled in) and when a job is configured (kept on the job,
//! what `block_start` budgets compare). A run's tokens × epochs ÷ its throughput, priced
//! at the GPU's rate; the throughput is measured on earlier runs of the same base model
//! and GPU model where there are any (`domain::estimate`).

use chrono::Duration;
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{AppState, CurrentUser, ServiceError, ServiceResult};
use crate::db::files::TrainingFile;
use crate::db::jobs::{self, round_cents};
use crate::db::presets::{self, Preset};
use crate::db::{attempts, files, now};
use crate::domain::estimate::{Estimate, Throughput, TOKEN_METHOD};
use crate::domain::gpu_catalog::GpuOffer;
use crate::domain::placement::{parameters_billions, parameters_from_config};
use crate::domain::{hyperparameters, FieldError, GpuType, Hyperparameters};

/// The parts of `POST /jobs` and `PUT /jobs/{id}/configure` an estimate needs; the rest of
/// those bodies may come along and is ignored, so the same body serves all three.
#[derive(Debug, Deserialize, ToSchema)]
pub struct EstimateRequest {
    pub training_file_id: Uuid,
    pub base_model: String,
    /// Default: Balanced.
    pub preset_id: Option<Uuid>,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub hyperparameters: Map<String, Value>,
    /// spot or ondemand
    pub gpu_type: String,
    pub gpu_model: String,
}

/// What a run is made of, each part checked.
pub struct RunPlan<'a> {
    pub preset: Preset,
    pub hyperparameters: Hyperparameters,
    pub gpu: &'a GpuOffer,
    pub gpu_type: GpuType,
}

/// Checks the preset (visible to the user), the hyperparameters over it, the capacity and
/// the GPU model; each problem is pushed to `errors`, named by its field. `None` when any
/// part is missing.
pub async fn plan<'a>(
    state: &'a AppState,
    user_id: Uuid,
    preset_id: Uuid,
    overrides: &Map<String, Value>,
    (gpu_type, gpu_model): (&str, &str),
    errors: &mut Vec<FieldError>,
) -> ServiceResult<Option<RunPlan<'a>>> {
    let gpu_type = GpuType::parse(gpu_type);
    if gpu_type.is_none() {
        errors.push(FieldError::new("gpu_type", "must be spot or ondemand"));
    }
    let gpu = state.catalog.find(gpu_model);
    if gpu.is_none() {
        errors.push(FieldError::new(
            "gpu_model",
            format!(
                "unknown GPU model; available: {}",
                state.catalog.model_names()
            ),
        ));
    }
    let preset = presets::get_visible(&state.db, preset_id, user_id).await?;
    if preset.is_none() {
        errors.push(FieldError::new("preset_id", "no such preset"));
    }
    let hyperparameters = hyperparameters::resolve(
        preset.as_ref().map_or(&Map::new(), |p| &p.parameters.0),
        overrides,
        &state.settings.limits,
    )
    .map_err(|field_errors| {
        errors.extend(
            field_errors
                .into_iter()
                .map(|e| FieldError::new(format!("hyperparameters.{}", e.field), e.message)),
        )
    });
    Ok(match (gpu_type, gpu, preset, hyperparameters) {
        (Some(gpu_type), Some(gpu), Some(preset), Ok(hyperparameters)) => Some(RunPlan {
            preset,
            hyperparameters,
            gpu,
            gpu_type,
        }),
        _ => None,
    })
}

/// The estimate for training `base_model` on `file` as `plan` says.
pub async fn estimate(
    state: &AppState,
    file: &TrainingFile,
    base_model: &str,
    plan: &RunPlan<'_>,
) -> ServiceResult<Estimate> {
    let hp = &plan.hyperparameters;
    let counts = file.token_counts.as_ref().map(|counts| &counts.0);
    let tokens_per_epoch = counts.map_or(0, |c| c.per_epoch(i64::from(hp.max_seq_len)));
    let total_tokens = tokens_per_epoch * i64::from(hp.epochs);
    let throughput = match counts {
        // Not counted (enriched before counting existed and not migrated): the table.
        None => Throughput::Preset,
        Some(_) => {
            let samples = attempts::throughput_samples(
                &state.db,
                base_model,
                &plan.gpu.model,
                state.settings.estimates.throughput_samples,
            )
            .await?;
            let alike: Vec<f64> = samples
                .iter()
                .filter(|sample| sample.gradient_checkpointing == hp.gradient_checkpointing)
                .map(|sample| sample.tokens_per_second)
                .collect();
            let parameters = model_parameters(base_model).await;
            Throughput::measured(&alike)
                .or_else(|| {
                    Throughput::modelled(
                        parameters,
                        plan.gpu.bf16_tflops,
                        state.settings.estimates.assumed_utilization,
                        hp.gradient_checkpointing,
                    )
                })
                .unwrap_or(Throughput::Preset)
        }
    };
    let (shortest, longest) = throughput
        .hours(total_tokens)
        .unwrap_or_else(|| preset_hours(file, plan));
    let rate = plan.gpu.hourly(plan.gpu_type);
    let hours = |h: f64| Duration::milliseconds((h * 3_600_000.0).round() as i64);
    let start = now() + hours(jobs::queued_hours_ahead(&state.db).await?);
    Ok(Estimate {
        tokens_per_epoch,
        epochs: hp.epochs,
        total_tokens,
        token_method: TOKEN_METHOD.to_owned(),
        throughput,
        duration_hours_min: shortest,
        duration_hours_max: longest,
        hourly_rate: rate,
        cost_min: round_cents(shortest * rate),
        cost_max: round_cents(longest * rate),
        gpu_model: plan.gpu.model.clone(),
        gpu_type: plan.gpu_type,
        estimated_start_time: start,
        completion_earliest: start + hours(shortest),
        completion_latest: start + hours(longest),
    })
}

/// The base model's size: counted from its `config.json` when it is a directory the
/// control plane can read (a local model, as on one host), else read from its name.
async fn model_parameters(base_model: &str) -> Option<f64> {
    let config = std::path::Path::new(base_model).join("config.json");
    tokio::fs::read(&config)
        .await
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .and_then(|config| parameters_from_config(&config))
        .or_else(|| parameters_billions(base_model))
}

/// Spec §7.1: a preset's durations are for 200 conversations and scale linearly; they
/// also scale by epochs against the preset's own.
fn preset_hours(file: &TrainingFile, plan: &RunPlan<'_>) -> (f64, f64) {
    let scale = file.conversation_count as f64 / 200.0;
    let preset_epochs = plan
        .preset
        .parameters
        .0
        .get("epochs")
        .and_then(Value::as_f64)
        .unwrap_or(1.0);
    let epoch_scale = f64::from(plan.hyperparameters.epochs) / preset_epochs.max(1.0);
    let table = &plan.preset.estimates.0;
    (
        table.duration_hours_min * scale * epoch_scale,
        table.duration_hours_max * scale * epoch_scale,
    )
}

/// `POST /jobs/estimate`: the estimate for a job that does not exist yet, on one of the
/// user's files; every bad field is named.
pub async fn estimate_request(
    state: &AppState,
    user: &CurrentUser,
    request: &EstimateRequest,
) -> ServiceResult<Estimate> {
    let mut errors = Vec::new();
    let base_model = super::job::checked_base_model(&request.base_model, &mut errors);
    let file = files::get_owned(&state.db, request.training_file_id, user.0.id).await?;
    match &file {
        None => errors.push(FieldError::new(
            "training_file_id",
            "no such training file of yours",
        )),
        Some(file) if file.token_counts.is_none() => errors.push(FieldError::new(
            "training_file_id",
            format!(
                "training file \"{}\" has not been enriched yet (its enrichment is {})",
                file.name, file.enrichment_status
            ),
        )),
        Some(_) => {}
    }
    let preset_id = request.preset_id.unwrap_or(presets::BALANCED_PRESET_ID);
    let plan = plan(
        state,
        user.0.id,
        preset_id,
        &request.hyperparameters,
        (&request.gpu_type, &request.gpu_model),
        &mut errors,
    )
    .await?;
    let (Some(file), Some(plan), true) = (file, plan, errors.is_empty()) else {
        return Err(ServiceError::Validation(errors));
    };
    estimate(state, &file, base_model, &plan).await
}
