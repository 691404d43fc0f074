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
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, TrainerError>;
