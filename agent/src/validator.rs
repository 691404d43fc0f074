//! Runs one validation: fetch the adapter (and the baseline's), the examples and the
//! training file, run the suites with the trainer library on a blocking thread, post
//! progress as it goes and the results at the end. A bad input ends it as failed with the
//! trainer's message.

use std::path::{Path, PathBuf};

use protocol::agent::FailureKind;
use protocol::validation::{
    AdapterRef, Suite, ValidationAssignment, ValidationOutcome, ValidationProgress,
};
use tokio::sync::mpsc;
use trainer::validation::{Progress, ValidationOptions};

use crate::client::ControlPlane;
use crate::config::AgentConfig;
use crate::error::{AgentError, Result};
use crate::runner::{classify, device};

/// Forwards the trainer's progress to the posting task; never blocks the trainer.
struct Forward(mpsc::UnboundedSender<ValidationProgress>);

impl Progress for Forward {
    fn progress(&mut self, suite: Option<Suite>, message: &str, done: usize, total: usize) {
        let _ = self.0.send(ValidationProgress {
            suite,
            message: message.to_owned(),
            done: done as u32,
            total: total as u32,
        });
    }
}

async fn download_adapter(client: &ControlPlane, adapter: &AdapterRef, into: &Path) -> Result<()> {
    std::fs::create_dir_all(into).map_err(|e| AgentError::io(into, e))?;
    for file in &adapter.files {
        // Names come from the control plane; only the file name part is used.
        let name = Path::new(&file.name)
            .file_name()
            .ok_or_else(|| AgentError::Config(format!("bad adapter file name {:?}", file.name)))?;
        client
            .download(&file.download_path, &into.join(name), &file.sha256)
            .await?;
    }
    Ok(())
}

/// Downloads what the validation needs and builds the trainer's options.
async fn prepare(
    config: &AgentConfig,
    client: &ControlPlane,
    work: &ValidationAssignment,
    dir: &Path,
    has_gpu: bool,
) -> Result<ValidationOptions> {
    let adapter = dir.join("adapter");
    download_adapter(client, &work.adapter, &adapter).await?;
    let baseline = match &work.baseline {
        Some(reference) => {
            let into = dir.join("baseline");
            download_adapter(client, reference, &into).await?;
            Some(into)
        }
        None => None,
    };
    let data = dir.join("validation-data");
    client
        .download(&work.data.download_path, &data, &work.data.sha256)
        .await?;
    let training_data = if work.training_data.download_path == work.data.download_path {
        data.clone()
    } else {
        let path = dir.join("training-data");
        client
            .download(
                &work.training_data.download_path,
                &path,
                &work.training_data.sha256,
            )
            .await?;
        path
    };
    let retention_prompts = match &work.retention_prompts {
        Some(file) => {
            let path = dir.join("retention-prompts");
            client
                .download(&file.download_path, &path, &file.sha256)
                .await?;
            Some(path)
        }
        None => None,
    };
    Ok(ValidationOptions {
        model: PathBuf::from(&work.base_model),
        adapter,
        baseline,
        data,
        split: work.split,
        training_data,
        suites: work.suites.clone(),
        max_samples: work.max_samples as usize,
        max_new_tokens: work.max_new_tokens as usize,
        max_seq_len: Some(work.max_seq_len as usize),
        retention_prompts,
        cache_dir: Some(config.work_dir.join("validation-cache")),
        device: device(config, has_gpu),
    })
}

/// Runs `work` to its end and reports the outcome.
pub async fn run(
    config: &AgentConfig,
    client: &ControlPlane,
    work: ValidationAssignment,
    has_gpu: bool,
) -> Result<()> {
    let id = work.validation_id;
    let dir = config.work_dir.join("validations").join(id.to_string());
    std::fs::create_dir_all(&dir).map_err(|e| AgentError::io(&dir, e))?;
    tracing::info!(validation = %id, job = %work.adapter.job_name, "validation started");
    let outcome = match prepare(config, client, &work, &dir, has_gpu).await {
        Err(error) => ValidationOutcome::Failed {
            kind: FailureKind::Other,
            message: error.to_string(),
        },
        Ok(options) => {
            let (sender, mut receiver) = mpsc::unbounded_channel();
            let running = tokio::task::spawn_blocking(move || {
                trainer::validation::run(&options, &mut Forward(sender))
            });
            let poster = {
                let client = client.clone();
                tokio::spawn(async move {
                    while let Some(mut progress) = receiver.recv().await {
                        // Only the newest update matters when several are waiting.
                        while let Ok(newer) = receiver.try_recv() {
                            progress = newer;
                        }
                        if let Err(error) = client.validation_progress(id, &progress).await {
                            tracing::debug!(%error, "validation progress not delivered");
                        }
                    }
                })
            };
            let result = running
                .await
                .map_err(|e| AgentError::Config(format!("the validation thread failed: {e}")))?;
            let _ = poster.await;
            match result {
                Ok(results) => ValidationOutcome::Completed { results },
                Err(error) => {
                    tracing::error!(%error, "validation failed");
                    ValidationOutcome::Failed {
                        kind: classify(&error),
                        message: error.to_string(),
                    }
                }
            }
        }
    };
    client.finish_validation(id, &outcome).await?;
    let _ = std::fs::remove_dir_all(&dir);
    tracing::info!(validation = %id, "validation reported");
    Ok(())
}
