//! Agent settings, layered: defaults, then `--config FILE` (see configs/agent.toml), then
//! `AGENT_*` environment variables, then flags.

use std::collections::BTreeMap;
use std::path::PathBuf;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::gpu_choice::GpuChoice;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SpotProvider {
    /// Probe each cloud's metadata endpoint and watch the ones that answer.
    Auto,
    Aws,
    Gcp,
    Azure,
    /// On-demand host: only SIGTERM counts as a notice.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// CUDA when the agent is built with it and a GPU is present, else CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Base URL of the control plane, e.g. https://lora.example.com.
    pub control_plane: String,
    /// Used once, to enroll; the agent then keeps its own secret in the work dir.
    pub enrollment_token: Option<String>,
    /// Name shown in the fleet view (default: the host name).
    pub name: Option<String>,
    /// Labels jobs can require, e.g. zone = "eu-west-1a".
    pub labels: BTreeMap<String, String>,
    /// Holds the agent's identity (mode 0600), outboxes, data and checkpoints.
    pub work_dir: PathBuf,
    /// PEM CA certificate to trust for the control plane (besides the system roots).
    pub ca_cert: Option<PathBuf>,
    pub spot_provider: SpotProvider,
    pub aws_metadata_url: String,
    pub gcp_metadata_url: String,
    pub azure_metadata_url: String,
    /// How often the spot notice endpoints are polled.
    pub spot_poll_milliseconds: u64,
    /// Longest a claim waits at the control plane for work.
    pub claim_wait_seconds: u64,
    pub device: Device,
    /// The one GPU this agent uses, for one agent per GPU on a multi-GPU host (unset: the
    /// GPUs `CUDA_VISIBLE_DEVICES` lists, or all; the trainer uses the first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuChoice>,
    /// Exit after this many attempts (0: run until stopped); for scripts and tests.
    pub max_attempts: u32,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            control_plane: "http://127.0.0.1:8080".into(),
            enrollment_token: None,
            name: None,
            labels: BTreeMap::new(),
            work_dir: PathBuf::from("./agent-work"),
            ca_cert: None,
            spot_provider: SpotProvider::Auto,
            aws_metadata_url: "http://169.254.169.254".into(),
            gcp_metadata_url: "http://metadata.google.internal".into(),
            azure_metadata_url: "http://169.254.169.254".into(),
            spot_poll_milliseconds: 2000,
            claim_wait_seconds: 20,
            device: Device::Auto,
            gpu: None,
            max_attempts: 0,
        }
    }
}

/// Flag values; each overrides the file and the environment.
#[derive(Debug, Default, clap::Args)]
pub struct Flags {
    /// TOML file with the keys of configs/agent.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub control_plane: Option<String>,
    #[arg(long, env = "AGENT_ENROLLMENT_TOKEN")]
    pub enrollment_token: Option<String>,
    #[arg(long)]
    pub name: Option<String>,
    /// key=value,key=value
    #[arg(long, value_delimiter = ',')]
    pub labels: Option<Vec<String>>,
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub spot_provider: Option<SpotProvider>,
    #[arg(long)]
    pub aws_metadata_url: Option<String>,
    #[arg(long)]
    pub gcp_metadata_url: Option<String>,
    #[arg(long)]
    pub azure_metadata_url: Option<String>,
    #[arg(long)]
    pub spot_poll_milliseconds: Option<u64>,
    #[arg(long, value_enum)]
    pub device: Option<Device>,
    /// One GPU of the host, by index (as nvidia-smi numbers them) or UUID (GPU-…).
    #[arg(long)]
    pub gpu: Option<GpuChoice>,
    #[arg(long)]
    pub max_attempts: Option<u32>,
}

impl AgentConfig {
    pub fn load(flags: Flags) -> Result<AgentConfig, String> {
        let mut figment = Figment::from(Serialized::defaults(AgentConfig::default()));
        if let Some(path) = &flags.config {
            if !path.exists() {
                return Err(format!("config file {} does not exist", path.display()));
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(Env::prefixed("AGENT_").split("__"));
        let mut config: AgentConfig = figment.extract().map_err(|e| e.to_string())?;
        macro_rules! take {
            ($($field:ident),*) => { $( if let Some(value) = flags.$field { config.$field = value; } )* };
        }
        take!(
            control_plane,
            work_dir,
            spot_provider,
            aws_metadata_url,
            gcp_metadata_url,
            azure_metadata_url,
            spot_poll_milliseconds,
            device,
            max_attempts
        );
        config.enrollment_token = flags.enrollment_token.or(config.enrollment_token);
        config.name = flags.name.or(config.name);
        config.ca_cert = flags.ca_cert.or(config.ca_cert);
        config.gpu = flags.gpu.or(config.gpu);
        for pair in flags.labels.unwrap_or_default() {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("--labels: {pair:?} is not key=value"))?;
            config
                .labels
                .insert(key.trim().to_owned(), value.trim().to_owned());
        }
        config.control_plane = config.control_plane.trim_end_matches('/').to_owned();
        Ok(config)
    }

    pub fn display_name(&self) -> String {
        self.name
            .clone()
            .or_else(sysinfo::System::host_name)
            .unwrap_or_else(|| "agent".into())
    }

    pub fn identity_path(&self) -> PathBuf {
        self.work_dir.join("agent-identity.json")
    }

    pub fn attempt_dir(&self, attempt: uuid::Uuid) -> PathBuf {
        self.work_dir.join("attempts").join(attempt.to_string())
    }

    pub fn outbox_dir(&self) -> PathBuf {
        self.work_dir.join("outbox")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// configs/agent.toml documents the defaults; keep it true.
    #[test]
    fn the_documented_config_file_holds_the_defaults() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/agent.toml");
        let from_file = AgentConfig::load(Flags {
            config: Some(path.into()),
            ..Flags::default()
        })
        .expect("configs/agent.toml parses");
        assert_eq!(
            toml::to_string(&from_file).ok(),
            toml::to_string(&AgentConfig::default()).ok()
        );
    }

    fn load_file(text: &str) -> Result<AgentConfig, String> {
        let file = tempfile::NamedTempFile::new().expect("temporary file");
        std::fs::write(file.path(), text).expect("written");
        AgentConfig::load(Flags {
            config: Some(file.path().into()),
            ..Flags::default()
        })
    }

    #[test]
    fn a_gpu_is_an_index_or_a_uuid_in_the_file_and_a_flag_wins() {
        assert_eq!(
            load_file("gpu = 2").map(|c| c.gpu),
            Ok(Some(GpuChoice::Index(2)))
        );
        assert_eq!(
            load_file("gpu = \"GPU-5f2c\"").map(|c| c.gpu),
            Ok(Some(GpuChoice::Uuid("GPU-5f2c".into())))
        );
        let error = load_file("gpu = \"first\"").expect_err("neither");
        assert!(
            error.contains("\"first\" is neither a GPU index"),
            "{error}"
        );
        let error = load_file("gpu = -1").expect_err("negative");
        assert!(error.contains("-1 is not a GPU index"), "{error}");
        let flagged = AgentConfig::load(Flags {
            gpu: Some(GpuChoice::Index(1)),
            ..Flags::default()
        });
        assert_eq!(flagged.map(|c| c.gpu), Ok(Some(GpuChoice::Index(1))));
    }

    #[test]
    fn labels_must_be_pairs() {
        let error = AgentConfig::load(Flags {
            labels: Some(vec!["zone".into()]),
            ..Flags::default()
        })
        .expect_err("not key=value");
        assert!(error.contains("\"zone\" is not key=value"), "{error}");
    }
}
