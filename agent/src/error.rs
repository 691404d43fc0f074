use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Config(String),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("control plane: {0}")]
    Http(#[from] reqwest::Error),
    #[error("control plane refused the {what} ({status}): {body}")]
    Rejected {
        what: String,
        status: u16,
        body: String,
    },
    #[error("{what}: SHA-256 {actual} does not match the expected {expected}")]
    Checksum {
        what: String,
        expected: String,
        actual: String,
    },
    #[error(transparent)]
    Trainer(#[from] trainer::TrainerError),
    #[error("{0}")]
    Json(#[from] serde_json::Error),
}

impl AgentError {
    pub fn io(path: &Path, source: std::io::Error) -> AgentError {
        AgentError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, AgentError>;
