//! Where a model comes from: a local directory, or a Hugging Face hub id resolved through
//! the hub cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`)
//! and downloaded with hf-hub when missing (`HF_ENDPOINT` picks the hub;
//! `HF_HUB_OFFLINE=1` forbids the network).

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Result, TrainerError};

/// Files a model directory may hold beyond config, tokenizer and weights.
const OPTIONAL_FILES: [&str; 3] = [
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
];

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

fn cache() -> Cache {
    match std::env::var("HF_HUB_CACHE") {
        Ok(path) if !path.is_empty() => Cache::new(PathBuf::from(path)),
        _ => Cache::from_env(),
    }
}

fn is_repo_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let valid = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    matches!((parts.next(), parts.next(), parts.next()), (Some(org), Some(name), None) if valid(org) && valid(name))
}

/// How an adapter names its base model, as PEFT and llama.cpp's converter read it: a local
/// directory as an absolute path (a relative one would resolve against the reader's working
/// directory, or send it to the hub), a hub id as `org/name` with its revision apart.
pub struct BaseModelReference {
    pub name_or_path: String,
    pub revision: Option<String>,
}

pub fn base_model_reference(spec: &Path) -> BaseModelReference {
    if spec.is_dir() {
        let path = std::fs::canonicalize(spec).unwrap_or_else(|_| spec.to_path_buf());
        return BaseModelReference {
            name_or_path: path.display().to_string(),
            revision: None,
        };
    }
    let text = spec.to_string_lossy();
    match text.split_once('@') {
        Some((repo_id, revision)) => BaseModelReference {
            name_or_path: repo_id.to_owned(),
            revision: Some(revision.to_owned()),
        },
        None => BaseModelReference {
            name_or_path: text.into_owned(),
            revision: None,
        },
    }
}

/// The local directory holding the model named by `spec`: the directory itself, or the
/// hub cache's snapshot of `org/name` (optionally `org/name@revision`).
pub fn resolve_model(spec: &Path) -> Result<PathBuf> {
    if spec.is_dir() {
        return Ok(spec.to_path_buf());
    }
    let text = spec.to_string_lossy();
    let (repo_id, revision) = text.split_once('@').unwrap_or((&text, "main"));
    if !is_repo_id(repo_id) {
        return Err(TrainerError::Config {
            path: text.into_owned(),
            message: "no such model directory, and not a hub id of the form org/name".into(),
        });
    }
    let repo = Repo::with_revision(repo_id.to_owned(), RepoType::Model, revision.to_owned());
    let cache = cache();
    let cached = cache.repo(repo.clone());
    let api = if offline() {
        None
    } else {
        let mut builder = ApiBuilder::from_cache(cache.clone()).with_progress(false);
        if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
            builder = builder.with_endpoint(endpoint);
        }
        Some(
            builder
                .build()
                .map_err(|e| hub_error(repo_id, "", e))?
                .repo(repo),
        )
    };
    let fetch = |file: &str, required: bool| -> Result<Option<PathBuf>> {
        if let Some(path) = cached.get(file) {
            return Ok(Some(path));
        }
        let Some(api) = &api else {
            return if required {
                Err(TrainerError::Config {
                    path: format!("{repo_id}/{file}"),
                    message: format!(
                        "not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set",
                        cache.path().display()
                    ),
                })
            } else {
                Ok(None)
            };
        };
        match api.download(file) {
            Ok(path) => Ok(Some(path)),
            Err(ApiError::RequestError(error))
                if !required && matches!(*error, ureq::Error::Status(404, _)) =>
            {
                Ok(None)
            }
            Err(error) => Err(hub_error(repo_id, file, error)),
        }
    };

    let config =
        fetch("config.json", true)?.ok_or_else(|| hub_error(repo_id, "config.json", "missing"))?;
    fetch("tokenizer.json", true)?;
    for file in OPTIONAL_FILES {
        fetch(file, false)?;
    }
    if fetch("model.safetensors", false)?.is_none() {
        let index = fetch("model.safetensors.index.json", true)?
            .ok_or_else(|| hub_error(repo_id, "weights", "missing"))?;
        let text = std::fs::read_to_string(&index).map_err(|source| TrainerError::Io {
            path: index.display().to_string(),
            source,
        })?;
        let index: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| TrainerError::Config {
                path: index.display().to_string(),
                message: format!("invalid JSON: {e}"),
            })?;
        let mut shards: Vec<&str> = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .map(|m| m.values().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        shards.sort_unstable();
        shards.dedup();
        for shard in shards {
            fetch(shard, true)?;
        }
    }
    config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| hub_error(repo_id, "config.json", "has no parent directory"))
}

fn hub_error(repo_id: &str, file: &str, error: impl std::fmt::Display) -> TrainerError {
    TrainerError::Config {
        path: format!("{repo_id}/{file}"),
        message: format!("hub download failed: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_base_model_is_named_by_its_absolute_path_and_a_hub_id_as_typed() {
        // Unit tests run in the crate's directory, which holds `src/`.
        let local = base_model_reference(Path::new("src"));
        assert!(Path::new(&local.name_or_path).is_absolute());
        assert!(
            local.name_or_path.ends_with("/src"),
            "{}",
            local.name_or_path
        );
        assert_eq!(local.revision, None);

        let pinned = base_model_reference(Path::new("meta-llama/Llama-3.2-1B@abc123"));
        assert_eq!(
            (pinned.name_or_path.as_str(), pinned.revision.as_deref()),
            ("meta-llama/Llama-3.2-1B", Some("abc123"))
        );
        let latest = base_model_reference(Path::new("meta-llama/Llama-3.2-1B"));
        assert_eq!(
            (latest.name_or_path.as_str(), latest.revision),
            ("meta-llama/Llama-3.2-1B", None)
        );
    }
}
