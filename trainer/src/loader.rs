//! Loading a model directory: `config.json` and the weights, single-file
//! (`model.safetensors`) or sharded (`model.safetensors.index.json`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;

use crate::config::ModelConfig;
use crate::error::{Result, TrainerError};
use crate::lora::LoraConfig;
use crate::model::Model;
use crate::quantized::BaseQuant;
use crate::rng::Rng;

/// The safetensors files holding a model's weights.
pub(crate) fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index_path).map_err(|_| TrainerError::Config {
        path: dir.display().to_string(),
        message: "no model.safetensors or model.safetensors.index.json".into(),
    })?;
    let index: Value = serde_json::from_str(&text).map_err(|e| TrainerError::Config {
        path: index_path.display().to_string(),
        message: format!("invalid JSON: {e}"),
    })?;
    let mut files: Vec<String> = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| TrainerError::Config {
            path: index_path.display().to_string(),
            message: "no \"weight_map\"".into(),
        })?
        .values()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Reads every weight of the checkpoint in `dir` onto `device`.
pub fn load_weights(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut weights = HashMap::new();
    for file in weight_files(dir)? {
        if !file.exists() {
            return Err(TrainerError::Config {
                path: file.display().to_string(),
                message: "weight shard is missing".into(),
            });
        }
        weights.extend(candle_core::safetensors::load(&file, device)?);
    }
    Ok(weights)
}

/// The model in `dir` (a directory or a hub id, see [`crate::hub`]) with fresh LoRA
/// adapters: base weights in `dtype`, adapters in `lora_dtype`, the decoder layers'
/// projections quantized when `base_quant` says so.
pub fn load_model(
    dir: &Path,
    lora: &LoraConfig,
    (dtype, base_quant): (DType, BaseQuant),
    lora_dtype: DType,
    device: &Device,
    rng: &mut Rng,
) -> Result<(ModelConfig, Model)> {
    let dir = crate::hub::resolve_model(dir)?;
    let dir = dir.as_path();
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    // Weights to be quantized are read on the host and only their blocks go to the device;
    // the others move there one by one as the model takes them.
    let weights = if base_quant.is_none() {
        load_weights(dir, device)?
    } else {
        load_weights(dir, &Device::Cpu)?
    };
    let vb = VarBuilder::from_tensors(weights, dtype, device);
    let model = Model::new(&config, vb, lora, lora_dtype, base_quant, rng).map_err(|e| {
        TrainerError::Config {
            path: dir.display().to_string(),
            message: format!("the weights do not match config.json: {e}"),
        }
    })?;
    Ok((config, model))
}
