//! The agent's life: enroll once (or load the identity), then heartbeat in the
//! background and claim, run and report jobs one at a time until stopped, interrupted,
//! or `max_attempts` is reached.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::agent::{Capacity, ClaimRequest, Heartbeat, Work};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::client::{Backoff, ControlPlane};
use crate::config::AgentConfig;
use crate::error::{AgentError, Result};
use crate::runner::{self, Ended, LatestGpu};
use crate::spot;
use crate::telemetry::Probe;
use crate::validator;

/// What the agent keeps between runs: who it is to the control plane.
#[derive(Serialize, Deserialize)]
struct Identity {
    agent_id: Uuid,
    secret: String,
    control_plane: String,
}

fn write_private(path: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|e| AgentError::io(path, e))?;
    file.write_all(text.as_bytes())
        .and_then(|_| file.sync_all())
        .map_err(|e| AgentError::io(path, e))
}

/// Loads the identity from the work dir, or enrolls with the token and saves it.
async fn identity(config: &AgentConfig, probe: &Probe) -> Result<Identity> {
    let path = config.identity_path();
    if let Ok(text) = std::fs::read_to_string(&path) {
        let identity: Identity = serde_json::from_str(&text)
            .map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))?;
        if identity.control_plane == config.control_plane {
            return Ok(identity);
        }
        tracing::warn!("the saved identity belongs to another control plane; enrolling again");
    }
    let token = config.enrollment_token.as_deref().ok_or_else(|| {
        AgentError::Config(format!(
            "not enrolled yet: pass --enrollment-token (from `control-plane create-enrollment-token`); \
             the agent then keeps its secret in {}",
            path.display()
        ))
    })?;
    let client = ControlPlane::new(&config.control_plane, config.ca_cert.as_deref())?;
    let (agent_id, secret) = client
        .register(token, &config.display_name(), &config.labels, &probe.gpus())
        .await?;
    let identity = Identity {
        agent_id,
        secret,
        control_plane: config.control_plane.clone(),
    };
    write_private(&path, &serde_json::to_string_pretty(&identity)?)?;
    tracing::info!(%agent_id, "enrolled");
    Ok(identity)
}

struct Shared {
    probe: Mutex<Probe>,
    attempt: Mutex<Option<Uuid>>,
    latest_gpu: LatestGpu,
    capacity: Capacity,
    labels: BTreeMap<String, String>,
}

impl Shared {
    fn heartbeat(&self) -> Heartbeat {
        let (gpus, host) = match self.probe.lock() {
            Ok(mut probe) => (probe.gpus(), probe.host()),
            Err(_) => (Vec::new(), Default::default()),
        };
        if let Ok(mut latest) = self.latest_gpu.lock() {
            *latest = gpus.first().cloned();
        }
        Heartbeat {
            gpus,
            host,
            capacity: self.capacity,
            attempt_id: self.attempt.lock().ok().and_then(|a| *a),
            labels: self.labels.clone(),
        }
    }
}

/// A `gpu` setting must name a GPU of this host: an agent that would otherwise train on
/// the CPU, or report no GPU, stops at start instead.
fn check_gpu_choice(config: &AgentConfig, probe: &Probe) -> Result<()> {
    let Some(gpu) = &config.gpu else {
        return Ok(());
    };
    match probe.host_gpu_count() {
        None => Err(AgentError::Config(format!(
            "gpu = {gpu}: this host has no NVIDIA driver (NVML did not load)"
        ))),
        Some(_) if probe.uses_gpus() => Ok(()),
        Some(count) => Err(AgentError::Config(format!(
            "gpu = {gpu}: no such GPU here; the driver lists {count} (indices 0 to {}, \
             `nvidia-smi -L` prints their UUIDs)",
            count.saturating_sub(1)
        ))),
    }
}

/// Runs until Ctrl-C, an interruption notice, or `max_attempts`.
pub async fn run(config: AgentConfig) -> Result<()> {
    std::fs::create_dir_all(&config.work_dir).map_err(|e| AgentError::io(&config.work_dir, e))?;
    let probe = Probe::new(&config.work_dir);
    check_gpu_choice(&config, &probe)?;
    let me = identity(&config, &probe).await?;
    let client = ControlPlane::new(&config.control_plane, config.ca_cert.as_deref())?
        .with_secret(me.secret.clone());
    let shared = Arc::new(Shared {
        probe: Mutex::new(probe),
        attempt: Mutex::new(None),
        latest_gpu: Arc::new(Mutex::new(None)),
        capacity: if spot::is_spot(&config) {
            Capacity::Spot
        } else {
            Capacity::Ondemand
        },
        labels: config.labels.clone(),
    });
    finish_orphaned_attempts(&config, &client).await;
    let notices = spot::watch(&config);
    let stop = Arc::new(runner::StopSignal::default());
    tokio::spawn(heartbeats(client.clone(), shared.clone(), stop.clone()));
    let interrupted = Arc::new(tokio::sync::Notify::new());
    {
        let stop = stop.clone();
        let interrupted = interrupted.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::warn!("Ctrl-C: stopping");
                stop.stop(false);
                interrupted.notify_one();
            }
        });
    }
    tracing::info!(agent_id = %me.agent_id, name = %config.display_name(), "agent running");
    let mut attempts = 0;
    let mut backoff = Backoff::new();
    loop {
        if notices.borrow().is_some() {
            tracing::warn!("interruption notice: taking no more work");
            return Ok(());
        }
        let request = ClaimRequest {
            wait_seconds: config.claim_wait_seconds,
            heartbeat: shared.heartbeat(),
        };
        let mut waiting_notices = notices.clone();
        let assignment = tokio::select! {
            claimed = client.claim(&request) => claimed,
            _ = interrupted.notified() => return Ok(()),
            _ = waiting_notices.changed() => continue,
        };
        let assignment = match assignment {
            Ok(Some(Work::Training(assignment))) => assignment,
            Ok(Some(Work::Validation(work))) => {
                backoff = Backoff::new();
                let has_gpu = shared.latest_gpu.lock().map(|g| g.is_some()).unwrap_or(false);
                if let Err(error) = validator::run(&config, &client, work, has_gpu).await {
                    tracing::error!(%error, "validation ended with an agent error");
                }
                continue;
            }
            Ok(None) => continue,
            Err(AgentError::Rejected { status: 401, .. }) => {
                return Err(AgentError::Config(format!(
                    "the control plane no longer accepts this agent's secret; remove {} and enroll again",
                    config.identity_path().display()
                )))
            }
            Err(error) => {
                tracing::warn!(%error, "claim failed; retrying");
                backoff.wait().await;
                continue;
            }
        };
        backoff = Backoff::new();
        if let Ok(mut current) = shared.attempt.lock() {
            *current = Some(assignment.attempt_id);
        }
        let ended = runner::run(
            &config,
            &client,
            assignment,
            notices.clone(),
            shared.latest_gpu.clone(),
            stop.clone(),
        )
        .await;
        if let Ok(mut current) = shared.attempt.lock() {
            *current = None;
        }
        attempts += 1;
        match ended {
            Ok(Ended::Interrupted) => {
                tracing::warn!("attempt handed back after an interruption notice; exiting");
                return Ok(());
            }
            Ok(Ended::Normally) => {}
            Err(error) => tracing::error!(%error, "attempt ended with an agent error"),
        }
        if config.max_attempts > 0 && attempts >= config.max_attempts {
            tracing::info!(attempts, "max_attempts reached; exiting");
            return Ok(());
        }
    }
}

/// Attempts whose outbox is still on disk were cut short by a crash or a kill of this
/// agent: deliver what they reported, then end them as failed so the control plane
/// retries them (from their latest checkpoint) instead of waiting on them forever.
async fn finish_orphaned_attempts(config: &AgentConfig, client: &ControlPlane) {
    let Ok(entries) = std::fs::read_dir(config.outbox_dir()) else {
        return;
    };
    let orphans: Vec<Uuid> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".jsonl")?.parse().ok()
        })
        .collect();
    for attempt in orphans {
        tracing::warn!(%attempt, "an attempt was cut short by a restart of this agent; handing it back");
        if let Ok(outbox) = crate::outbox::Outbox::open(&config.outbox_dir(), attempt) {
            outbox.close();
            outbox.deliver(client, |_| {}).await;
        }
        let outcome = protocol::agent::AttemptOutcome::Failed {
            kind: protocol::agent::FailureKind::Other,
            message: "the agent restarted during the attempt".into(),
        };
        match client.finish(attempt, &outcome).await {
            Ok(()) | Err(AgentError::Rejected { .. }) => {
                crate::outbox::Outbox::remove(&config.outbox_dir(), attempt);
                let _ = std::fs::remove_dir_all(config.attempt_dir(attempt));
            }
            Err(error) => tracing::warn!(%error, "could not hand back an interrupted attempt"),
        }
    }
}

/// Heartbeats on the control plane's schedule; a `stop_attempt` answer stops the run.
async fn heartbeats(client: ControlPlane, shared: Arc<Shared>, stop: Arc<runner::StopSignal>) {
    let mut interval = Duration::from_secs(5);
    loop {
        tokio::time::sleep(interval).await;
        let beat = shared.heartbeat();
        match client.heartbeat(&beat).await {
            Ok(reply) => {
                interval = Duration::from_secs(reply.interval_seconds.clamp(1, 60));
                if reply.stop_attempt && beat.attempt_id.is_some() {
                    tracing::warn!(
                        publish_adapter = reply.publish_adapter,
                        "control plane asked to stop the current attempt"
                    );
                    stop.stop(reply.publish_adapter);
                }
            }
            Err(error) => tracing::warn!(%error, "heartbeat failed"),
        }
    }
}
