//! Folding an adapter into its base model: `W' = W + scale · B A` for every adapted
//! projection, written as a Hugging Face model directory that loads without PEFT.
//!
//! Shards are merged one at a time and keep their names (and the index), so peak memory
//! is one shard, not the whole model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Result, TrainerError};
use crate::loader::weight_files;
use crate::peft::read_adapter_config;

const ADAPTER_PREFIX: &str = "base_model.model.";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainerError + '_ {
    move |source| TrainerError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The low-rank pairs of an adapter, keyed by the base weight they update.
fn adapter_updates(adapter: &Path) -> Result<HashMap<String, (Tensor, Tensor)>> {
    let path = adapter.join("adapter_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;
    let invalid = |message: String| TrainerError::Config {
        path: path.display().to_string(),
        message,
    };
    let mut updates = HashMap::new();
    let a_names: Vec<String> = tensors
        .keys()
        .filter(|k| k.ends_with(".lora_A.weight"))
        .cloned()
        .collect();
    for a_name in a_names {
        let module = a_name
            .strip_prefix(ADAPTER_PREFIX)
            .and_then(|rest| rest.strip_suffix(".lora_A.weight"))
            .ok_or_else(|| invalid(format!("{a_name} is not a PEFT key")))?;
        let b_name = format!("{ADAPTER_PREFIX}{module}.lora_B.weight");
        let b = tensors
            .remove(&b_name)
            .ok_or_else(|| invalid(format!("{b_name} is missing")))?;
        let Some(a) = tensors.remove(&a_name) else {
            continue;
        };
        updates.insert(format!("{module}.weight"), (a, b));
    }
    if let Some(stray) = tensors.keys().next() {
        return Err(invalid(format!("{stray} has no lora_A partner")));
    }
    if updates.is_empty() {
        return Err(invalid("no LoRA weights".into()));
    }
    Ok(updates)
}

/// Files of a model directory that are not weights: config, tokenizer, chat template.
fn companion_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_file() && !name.ends_with(".safetensors") && !name.starts_with('.') {
            files.push(path);
        }
    }
    Ok(files)
}

/// Writes `base` with `adapter` folded in to `out`; returns how many weights changed.
pub fn merge_adapter(base: &Path, adapter: &Path, out: &Path) -> Result<usize> {
    let base = crate::hub::resolve_model(base)?;
    let scale = read_adapter_config(adapter)?.scale();
    let updates = adapter_updates(adapter)?;
    // Written next to `out` and renamed at the end, so `out` is never half-written.
    let staging = out.with_extension("merging");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    let merged = write_merged(&base, adapter, updates, scale, &staging).inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&staging);
    })?;
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(io(out))?;
    }
    std::fs::rename(&staging, out).map_err(io(out))?;
    Ok(merged)
}

fn write_merged(
    base: &Path,
    adapter: &Path,
    mut updates: HashMap<String, (Tensor, Tensor)>,
    scale: f64,
    staging: &Path,
) -> Result<usize> {
    for file in companion_files(base)? {
        let target = staging.join(file.file_name().unwrap_or_default());
        std::fs::copy(&file, &target).map_err(io(&target))?;
    }
    let mut merged = 0;
    for shard in weight_files(base)? {
        let mut tensors = candle_core::safetensors::load(&shard, &Device::Cpu)?;
        for (name, weight) in tensors.iter_mut() {
            let Some((a, b)) = updates.remove(name) else {
                continue;
            };
            let delta = b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)?;
            if delta.dims() != weight.dims() {
                return Err(TrainerError::Config {
                    path: adapter.display().to_string(),
                    message: format!(
                        "the update of {name} has shape {:?}, the weight {:?}",
                        delta.dims(),
                        weight.dims()
                    ),
                });
            }
            let sum = (weight.to_dtype(DType::F32)? + (delta * scale)?)?;
            *weight = sum.to_dtype(weight.dtype())?;
            merged += 1;
        }
        let target = staging.join(shard.file_name().unwrap_or_default());
        crate::tensor_file::save(&tensors, &target)?;
    }
    if let Some(name) = updates.keys().next() {
        return Err(TrainerError::Config {
            path: adapter.display().to_string(),
            message: format!("the base model has no weight {name}"),
        });
    }
    Ok(merged)
}
