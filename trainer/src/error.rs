#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error(transparent)]
    Candle(candle_core::Error),
    /// The device ran out of memory (CUDA's `CUDA_ERROR_OUT_OF_MEMORY`, or an allocation
    /// candle refused): a smaller micro-batch may fit.
    #[error("out of memory: {0}")]
    OutOfMemory(candle_core::Error),
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

impl From<candle_core::Error> for TrainerError {
    fn from(error: candle_core::Error) -> TrainerError {
        // candle passes the CUDA driver's and cuBLAS' errors on as text.
        let text = error.to_string().to_ascii_lowercase();
        if text.contains("out of memory")
            || text.contains("out_of_memory")
            || text.contains("alloc_failed")
        {
            TrainerError::OutOfMemory(error)
        } else {
            TrainerError::Candle(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_out_of_memory_error_is_its_own_kind() {
        let cuda = candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        );
        assert!(matches!(
            TrainerError::from(cuda),
            TrainerError::OutOfMemory(_)
        ));
        let other = candle_core::Error::Msg("shape mismatch".into());
        assert!(matches!(TrainerError::from(other), TrainerError::Candle(_)));
    }
}
