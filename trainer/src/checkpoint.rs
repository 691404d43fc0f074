//! Exact, resumable checkpoints.
//!
//! `checkpoints/step-N/` holds the LoRA weights (`adapter_model.safetensors`), the AdamW
//! moments (`optimizer.safetensors`), `state.json` (step, epoch, the optimizer's step
//! count, and hashes of the run's configuration and data) and
//! `manifest.json` (SHA-256 of each file). A run that keeps its best evaluation also keeps
//! that evaluation's LoRA weights (`best_adapter.safetensors`) and where it stands
//! (`best` in `state.json`: the step, its validation loss, the evaluations since), so a
//! resumed run keeps its best-so-far and its patience. It is written into a temporary directory and
//! renamed into place, so a crash never leaves a half-written checkpoint under its name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Result, TrainerError};

const FILES: [&str; 3] = [
    "adapter_model.safetensors",
    "optimizer.safetensors",
    "state.json",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimizer steps completed.
    pub step: usize,
    pub epoch: usize,
    pub optimizer_steps: usize,
    /// SHA-256 of everything in the run's configuration that changes the maths.
    pub config_hash: String,
    /// SHA-256 of the training (and validation) data.
    pub data_hash: String,
    /// The best validation loss so far, when the run evaluates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<BestSoFar>,
}

/// The best evaluation of a run so far, for keep-best and early stopping.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BestSoFar {
    pub step: usize,
    pub validation_loss: f64,
    /// Evaluations in a row that did not improve on the best before them by more than
    /// the minimum delta (early stopping's patience count).
    pub evaluations_since: usize,
}

/// The best evaluation's LoRA weights, kept by keep-best runs.
const BEST_ADAPTER: &str = "best_adapter.safetensors";

/// What a checkpoint restores.
pub struct Restored {
    pub state: CheckpointState,
    pub lora: HashMap<String, Tensor>,
    pub first_moments: Vec<Tensor>,
    pub second_moments: Vec<Tensor>,
    /// The best evaluation's LoRA weights, when the run kept them.
    pub best_weights: Option<HashMap<String, Tensor>>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainerError + '_ {
    move |source| TrainerError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(io(path))?;
    Ok(hex::encode(hasher.finalize()))
}

pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Writes `step-N` under `checkpoints_dir` atomically; returns its path.
pub fn save(
    checkpoints_dir: &Path,
    state: &CheckpointState,
    lora: &[(String, Var)],
    moments: (&[Tensor], &[Tensor]),
    best_weights: Option<&HashMap<String, Tensor>>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(checkpoints_dir).map_err(io(checkpoints_dir))?;
    let final_dir = checkpoints_dir.join(format!("step-{}", state.step));
    let temporary = checkpoints_dir.join(format!(
        ".step-{}.partial-{}",
        state.step,
        std::process::id()
    ));
    if temporary.exists() {
        std::fs::remove_dir_all(&temporary).map_err(io(&temporary))?;
    }
    std::fs::create_dir_all(&temporary).map_err(io(&temporary))?;

    let weights: HashMap<String, Tensor> = lora
        .iter()
        .map(|(name, var)| Ok((name.clone(), var.as_tensor().to_dtype(DType::F32)?)))
        .collect::<candle_core::Result<_>>()?;
    crate::tensor_file::save(&weights, &temporary.join(FILES[0]))?;
    let mut optimizer = HashMap::new();
    for (i, (name, _)) in lora.iter().enumerate() {
        optimizer.insert(format!("exp_avg.{name}"), moments.0[i].clone());
        optimizer.insert(format!("exp_avg_sq.{name}"), moments.1[i].clone());
    }
    crate::tensor_file::save(&optimizer, &temporary.join(FILES[1]))?;
    let state_path = temporary.join(FILES[2]);
    std::fs::write(
        &state_path,
        serde_json::to_string_pretty(state).unwrap_or_default(),
    )
    .map_err(io(&state_path))?;

    let mut manifest = serde_json::Map::new();
    if let Some(best) = best_weights {
        crate::tensor_file::save(best, &temporary.join(BEST_ADAPTER))?;
        manifest.insert(
            BEST_ADAPTER.to_owned(),
            sha256_file(&temporary.join(BEST_ADAPTER))?.into(),
        );
    }
    for name in FILES {
        manifest.insert(name.to_owned(), sha256_file(&temporary.join(name))?.into());
    }
    let manifest_path = temporary.join("manifest.json");
    std::fs::write(
        &manifest_path,
        serde_json::to_string_pretty(&manifest).unwrap_or_default(),
    )
    .map_err(io(&manifest_path))?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
    }
    std::fs::rename(&temporary, &final_dir).map_err(io(&final_dir))?;
    Ok(final_dir)
}

/// Reads a checkpoint after checking every file against the manifest, and that it was
/// written by a run with the same configuration and data.
pub fn load(
    dir: &Path,
    parameter_names: &[String],
    config_hash: &str,
    data_hash: &str,
    device: &Device,
) -> Result<Restored> {
    let refuse = |message: String| {
        TrainerError::Invalid(format!("cannot resume from {}: {message}", dir.display()))
    };
    let manifest_path = dir.join("manifest.json");
    let manifest: HashMap<String, String> = serde_json::from_str(
        &std::fs::read_to_string(&manifest_path)
            .map_err(|e| refuse(format!("no readable manifest.json ({e})")))?,
    )
    .map_err(|e| refuse(format!("manifest.json is invalid ({e})")))?;
    let kept_best = manifest.contains_key(BEST_ADAPTER);
    let listed = FILES.iter().chain(kept_best.then_some(&BEST_ADAPTER));
    for name in listed {
        let expected = manifest
            .get(*name)
            .ok_or_else(|| refuse(format!("the manifest does not list {name}")))?;
        let actual = sha256_file(&dir.join(name)).map_err(|e| refuse(e.to_string()))?;
        if &actual != expected {
            return Err(refuse(format!(
                "{name} is corrupt (its SHA-256 does not match the manifest)"
            )));
        }
    }
    let state: CheckpointState = serde_json::from_str(
        &std::fs::read_to_string(dir.join(FILES[2])).map_err(io(&dir.join(FILES[2])))?,
    )
    .map_err(|e| refuse(format!("state.json is invalid ({e})")))?;
    if state.config_hash != config_hash {
        return Err(refuse(
            "it was written with a different configuration (model, hyperparameters or seed); resume with the same settings".into(),
        ));
    }
    if state.data_hash != data_hash {
        return Err(refuse("it was written for different training data".into()));
    }
    let lora = candle_core::safetensors::load(dir.join(FILES[0]), device)?;
    let optimizer = candle_core::safetensors::load(dir.join(FILES[1]), device)?;
    let mut first_moments = Vec::with_capacity(parameter_names.len());
    let mut second_moments = Vec::with_capacity(parameter_names.len());
    for name in parameter_names {
        let missing = || refuse(format!("optimizer state for {name} is missing"));
        first_moments.push(
            optimizer
                .get(&format!("exp_avg.{name}"))
                .ok_or_else(missing)?
                .clone(),
        );
        second_moments.push(
            optimizer
                .get(&format!("exp_avg_sq.{name}"))
                .ok_or_else(missing)?
                .clone(),
        );
        if !lora.contains_key(name) {
            return Err(refuse(format!("LoRA weight {name} is missing")));
        }
    }
    let best_weights = match kept_best {
        true => Some(candle_core::safetensors::load(
            dir.join(BEST_ADAPTER),
            device,
        )?),
        false => None,
    };
    Ok(Restored {
        state,
        lora,
        first_moments,
        second_moments,
        best_weights,
    })
}
