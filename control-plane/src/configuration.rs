//! Settings, layered: built-in defaults, then the config file, then `CONTROL_PLANE_*`
//! environment variables (and `DATABASE_URL`), then command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Address the HTTP server binds; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Holds the SQLite database (unless `database_url` says otherwise) and artifacts.
    pub data_dir: PathBuf,
    /// `postgres://…` or `sqlite://…`; empty means SQLite at `<data_dir>/control-plane.db`.
    pub database_url: Option<String>,
    pub database: DatabaseSettings,
    /// Lets anyone create an account with `POST /api/v1/auth/signup`.
    pub allow_signup: bool,
    /// Base URL users reach the server at, for links the API hands out.
    pub public_url: Option<String>,
    /// GPU price list; relative paths resolve against the working directory.
    pub gpu_catalog: Option<PathBuf>,
    pub limits: Limits,
    pub auth: AuthSettings,
    pub eligibility: Eligibility,
    pub enrichment: Enrichment,
    pub fleet: Fleet,
    pub storage: Storage,
    pub budgets: Budgets,
    pub estimates: Estimates,
    pub validation: ValidationSettings,
}

/// How the database is used.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// SQLite's `synchronous` setting (the journal is always WAL). `full`: a commit is
    /// on disk when it is acknowledged, and survives a power loss. `normal`: a commit
    /// survives the process being killed, but the last ones before a power loss or OS
    /// crash may be lost (the database stays consistent); fewer fsyncs.
    pub sqlite_synchronous: SqliteSynchronous,
    /// Most agent report batches one SQLite group commit takes together.
    pub max_batches_per_commit: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SqliteSynchronous {
    Full,
    Normal,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            sqlite_synchronous: SqliteSynchronous::Full,
            max_batches_per_commit: 64,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest training file accepted, in bytes; larger uploads answer 413.
    pub max_upload_bytes: u64,
    /// Largest single record (JSONL line, array element, CSV row), in bytes.
    pub max_record_bytes: usize,
    /// How many bad records an enrichment error lists before summarising.
    pub max_reported_errors: usize,
    pub max_rank: u32,
    pub max_seq_len: u32,
    pub max_epochs: u32,
    pub max_batch_size: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    pub session_ttl_hours: i64,
    pub api_token_ttl_hours: i64,
    /// Failed logins allowed per email and per client address within the window.
    pub login_max_failures: u32,
    pub login_window_seconds: u64,
    /// Set the session cookie's `Secure` flag (enable behind HTTPS).
    pub secure_cookies: bool,
}

/// The rules of spec §7.1 a training file must meet before a job can use it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Eligibility {
    pub min_conversations: i64,
}

/// Agents, scheduling and recovery.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Fleet {
    /// How often agents are told to send a heartbeat.
    pub heartbeat_interval_seconds: u64,
    /// An agent silent this long is marked offline and its jobs go back to the queue.
    pub offline_after_seconds: u64,
    /// Heartbeat history kept per agent.
    pub telemetry_retention_minutes: i64,
    /// Longest a claim request is held open waiting for work.
    pub max_claim_wait_seconds: u64,
    /// Agents checkpoint every this many optimizer steps (0: only on a spot notice).
    pub checkpoint_every_steps: u32,
}

/// Where artifacts (adapters, checkpoints, reports) are kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Storage {
    /// `s3://bucket/prefix` (credentials and endpoint from the AWS_* environment, e.g.
    /// AWS_ENDPOINT for MinIO); unset: `<data_dir>/artifacts`.
    pub url: Option<String>,
    /// Lifetime of the download links handed to users.
    pub signed_url_ttl_seconds: i64,
    /// Largest artifact an agent may upload, in bytes.
    pub max_artifact_bytes: u64,
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet {
            heartbeat_interval_seconds: 5,
            offline_after_seconds: 30,
            telemetry_retention_minutes: 60,
            max_claim_wait_seconds: 30,
            checkpoint_every_steps: 50,
        }
    }
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            url: None,
            signed_url_ttl_seconds: 900,
            max_artifact_bytes: 64 << 30,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data"),
            database_url: None,
            database: DatabaseSettings::default(),
            allow_signup: false,
            public_url: None,
            gpu_catalog: None,
            limits: Limits::default(),
            auth: AuthSettings::default(),
            eligibility: Eligibility::default(),
            enrichment: Enrichment::default(),
            fleet: Fleet::default(),
            storage: Storage::default(),
            budgets: Budgets::default(),
            estimates: Estimates::default(),
            validation: ValidationSettings::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_upload_bytes: 1 << 30,
            max_record_bytes: protocol::dataset::DEFAULT_MAX_RECORD_BYTES,
            max_reported_errors: 20,
            max_rank: 256,
            max_seq_len: 32_768,
            max_epochs: 100,
            max_batch_size: 1024,
        }
    }
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            session_ttl_hours: 24 * 7,
            api_token_ttl_hours: 24 * 30,
            login_max_failures: 5,
            login_window_seconds: 300,
            secure_cookies: false,
        }
    }
}

impl Default for Eligibility {
    fn default() -> Self {
        Eligibility {
            min_conversations: 50,
        }
    }
}

/// Background enrichment of uploads, on every replica.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Enrichment {
    /// An enrichment that has not heartbeated for this long is taken as abandoned (its
    /// server died) and started over by the next sweep of any replica.
    pub abandoned_after_seconds: u64,
    /// How often each replica looks for pending and abandoned files.
    pub sweep_every_seconds: u64,
}

impl Default for Enrichment {
    fn default() -> Self {
        Enrichment {
            abandoned_after_seconds: 120,
            sweep_every_seconds: 30,
        }
    }
}

/// Values given on the command line; they override every other layer.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// Config file (TOML); see configs/control-plane.toml.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Data directory (SQLite database and artifacts).
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    /// Database URL (postgres://… or sqlite://…); DATABASE_URL also works.
    #[arg(long, global = true)]
    pub database_url: Option<String>,
}

impl Settings {
    pub fn load(overrides: &Overrides) -> Result<Settings, Box<figment::Error>> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(path) = &overrides.config {
            if !path.exists() {
                return Err(Box::new(figment::Error::from(format!(
                    "config file {} does not exist",
                    path.display()
                ))));
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment
            .merge(Env::prefixed("CONTROL_PLANE_").split("__"))
            .merge(Env::raw().only(&["DATABASE_URL"]));
        let mut settings: Settings = figment.extract().map_err(Box::new)?;
        if let Some(dir) = &overrides.data_dir {
            settings.data_dir = dir.clone();
        }
        if let Some(url) = &overrides.database_url {
            settings.database_url = Some(url.clone());
        }
        settings.database_url = settings.database_url.filter(|url| !url.trim().is_empty());
        Ok(settings)
    }

    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}",
                self.data_dir.join("control-plane.db").display()
            )
        })
    }

    pub fn artifacts_dir(&self) -> PathBuf {
        self.data_dir.join("artifacts")
    }

    pub fn uploads_dir(&self) -> PathBuf {
        self.data_dir.join("training-files")
    }

    pub fn gpu_catalog_path(&self) -> Option<&Path> {
        self.gpu_catalog.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// configs/control-plane.toml documents the defaults; keep it true.
    #[test]
    fn the_documented_config_file_holds_the_defaults() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/control-plane.toml");
        let overrides = Overrides {
            config: Some(path.into()),
            ..Overrides::default()
        };
        let mut from_file = Settings::load(&overrides).expect("configs/control-plane.toml parses");
        from_file.database_url = None; // DATABASE_URL in the environment may set it
        assert_eq!(
            toml::to_string(&from_file).ok(),
            toml::to_string(&Settings::default()).ok()
        );
    }
}

/// Where budget alerts go besides the job's event log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Budgets {
    /// Each alert is POSTed here as JSON; none: alerts are events only.
    pub webhook_url: Option<String>,
    /// Signs each POST: `X-Lora-Signature: sha256=<hex HMAC-SHA256 of the body>`. Give it
    /// as CONTROL_PLANE_BUDGETS__WEBHOOK_SECRET rather than in a file.
    pub webhook_secret: Option<Secret>,
    /// Tries per alert, the first included; each retry waits twice as long as the last.
    pub webhook_attempts: u32,
    pub webhook_first_retry_ms: u64,
    pub webhook_timeout_seconds: u64,
}

impl Default for Budgets {
    fn default() -> Self {
        Budgets {
            webhook_url: None,
            webhook_secret: None,
            webhook_attempts: 5,
            webhook_first_retry_ms: 1_000,
            webhook_timeout_seconds: 10,
        }
    }
}

/// How cost estimates find their throughput, and how often storage costs are updated.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Estimates {
    /// Completed attempts of the same base model on the same GPU model whose measured
    /// tokens/s an estimate takes the median of (the newest this many).
    pub throughput_samples: i64,
    /// Share of the GPU's peak FLOP/s a run is assumed to reach when nothing is measured.
    pub assumed_utilization: f64,
    /// How often every cost record's storage cost is brought up to date (artifacts cost
    /// while they are kept); a record is also updated when its job stops and on each
    /// download.
    pub storage_refresh_minutes: u64,
}

impl Default for Estimates {
    fn default() -> Self {
        Estimates {
            throughput_samples: 20,
            // The H200 runs measured 4–9% of peak for 0.5B–1B models (README, Performance).
            assumed_utilization: 0.08,
            storage_refresh_minutes: 60,
        }
    }
}

/// Quality validation (stage 6): sample caps, gate defaults and the judge model.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValidationSettings {
    /// Prompts generated for per suite when a request names no `max_samples`.
    pub default_samples: u32,
    /// The most a request may ask for.
    pub max_samples: u32,
    pub default_new_tokens: u32,
    pub max_new_tokens: u32,
    /// Gate thresholds (`name = { pass = …, warn = … }`); a request's `gates` and a job's
    /// `validate_on_completion.gates` override them one by one.
    pub gates: Gates,
    pub judge: JudgeSettings,
}

impl Default for ValidationSettings {
    fn default() -> Self {
        ValidationSettings {
            default_samples: 16,
            max_samples: 200,
            default_new_tokens: 96,
            max_new_tokens: 512,
            gates: default_gates(),
            judge: JudgeSettings::default(),
        }
    }
}

/// A quality gate passes at or above `pass`, warns at or above `warn`, and fails below.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    pub pass: f64,
    pub warn: f64,
}

/// Gate thresholds by gate name (`domain::validation::GATES` lists the names).
pub type Gates = std::collections::BTreeMap<String, Threshold>;

/// The built-in gate thresholds.
pub fn default_gates() -> Gates {
    [
        ("perplexity_improvement_pct", 5.0, 0.0),
        ("knowledge_retention", 80.0, 60.0),
        ("voice_consistency", 30.0, 15.0),
        ("stop_rate", 0.95, 0.8),
        ("emotional_intelligence", 7.0, 5.0),
    ]
    .into_iter()
    .map(|(name, pass, warn)| (name.to_owned(), Threshold { pass, warn }))
    .collect()
}

/// The judge of emotional intelligence: any OpenAI-compatible chat-completions endpoint
/// (a local vLLM or llama.cpp server works). Unset `base_url`: the suite is skipped.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JudgeSettings {
    /// Such as `http://127.0.0.1:8000/v1`; `/chat/completions` is appended.
    pub base_url: Option<String>,
    pub model: String,
    /// The environment variable holding the API key (sent as a bearer token when set).
    pub api_key_env: String,
    pub timeout_seconds: u64,
    /// Replies scored at once.
    pub concurrency: usize,
}

impl Default for JudgeSettings {
    fn default() -> Self {
        JudgeSettings {
            base_url: None,
            model: "gpt-4o-mini".into(),
            api_key_env: "VALIDATION_JUDGE_API_KEY".into(),
            timeout_seconds: 30,
            concurrency: 4,
        }
    }
}

/// A setting that must never reach a log: its `Debug` hides it.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}
