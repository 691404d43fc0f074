#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {message}")]
    Config { path: String, message: String },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// A problem in the training data; `message` names the line.
    #[error("{path}: {message}")]
    Dataset { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, TrainerError>;
