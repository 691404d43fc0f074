//! PEFT-compatible adapters: `adapter_config.json` and `adapter_model.safetensors` with
//! keys such as `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, as
//! `peft.PeftModel.from_pretrained`, vLLM, LoRAX and llama.cpp's converter read them.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::error::{Result, TrainerError};
use crate::hub::BaseModelReference;
use crate::lora::LoraConfig;
use crate::model::Model;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainerError + '_ {
    move |source| TrainerError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub fn save_adapter(
    dir: &Path,
    model: &Model,
    lora: &LoraConfig,
    base_model: &BaseModelReference,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model.name_or_path,
        "revision": base_model.revision,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": lora.target_modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": lora.use_rslora,
        "use_dora": false,
        "modules_to_save": null,
        "init_lora_weights": true,
        "inference_mode": true,
    });
    let path = dir.join("adapter_config.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&config).unwrap_or_default(),
    )
    .map_err(io(&path))?;
    let tensors: HashMap<String, Tensor> = model
        .lora_parameters()
        .into_iter()
        .map(|(name, var)| Ok((name, var.as_tensor().to_dtype(DType::F32)?)))
        .collect::<candle_core::Result<_>>()?;
    crate::tensor_file::save(&tensors, &dir.join("adapter_model.safetensors"))?;
    Ok(())
}

/// The adapter's base model as a local directory (its `base_model_name_or_path`); an
/// error naming the field when it is not one.
pub fn base_model_dir(adapter_dir: &Path) -> Result<std::path::PathBuf> {
    let (path, value) = adapter_config_json(adapter_dir)?;
    let base = value
        .get("base_model_name_or_path")
        .and_then(|v| v.as_str())
        .map(std::path::PathBuf::from)
        .filter(|dir| dir.join("config.json").is_file());
    base.ok_or_else(|| TrainerError::Config {
        path: path.display().to_string(),
        message: "base_model_name_or_path is not a local model directory: pass --model".into(),
    })
}

/// The adapter's `adapter_config.json`, parsed, with its path.
fn adapter_config_json(dir: &Path) -> Result<(std::path::PathBuf, serde_json::Value)> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let value = serde_json::from_str(&text).map_err(|e| TrainerError::Config {
        path: path.display().to_string(),
        message: format!("invalid JSON: {e}"),
    })?;
    Ok((path, value))
}

/// Reads an adapter's configuration.
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig> {
    let (path, value) = adapter_config_json(dir)?;
    let invalid = |message: &str| TrainerError::Config {
        path: path.display().to_string(),
        message: message.to_owned(),
    };
    if value.get("peft_type").and_then(|v| v.as_str()) != Some("LORA") {
        return Err(invalid("not a LoRA adapter (peft_type is not \"LORA\")"));
    }
    if value.get("use_dora").and_then(|v| v.as_bool()) == Some(true) {
        return Err(invalid("DoRA adapters are not supported"));
    }
    let target_modules = match value.get("target_modules") {
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|m| m.as_str().map(str::to_owned))
            .collect(),
        _ => return Err(invalid("\"target_modules\" must be a list")),
    };
    let config = LoraConfig {
        rank: value
            .get("r")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| invalid("\"r\" is missing"))? as usize,
        alpha: value
            .get("lora_alpha")
            .and_then(|v| v.as_f64())
            .ok_or_else(|| invalid("\"lora_alpha\" is missing"))?,
        dropout: value
            .get("lora_dropout")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0),
        target_modules,
        use_rslora: value
            .get("use_rslora")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
    };
    config.validate().map_err(|m| invalid(&m))?;
    Ok(config)
}

/// Sets the model's LoRA parameters from an adapter directory; every parameter must be there.
pub fn load_adapter_weights(dir: &Path, model: &Model, device: &Device) -> Result<()> {
    let path = dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&path, device)?;
    for (name, var) in model.lora_parameters() {
        let tensor = tensors.get(&name).ok_or_else(|| TrainerError::Config {
            path: path.display().to_string(),
            message: format!("{name} is missing"),
        })?;
        if tensor.dims() != var.dims() {
            return Err(TrainerError::Config {
                path: path.display().to_string(),
                message: format!(
                    "{name} has shape {:?}, the model expects {:?}",
                    tensor.dims(),
                    var.dims()
                ),
            });
        }
        var.set(&tensor.to_dtype(var.dtype())?)?;
    }
    Ok(())
}
