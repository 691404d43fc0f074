//! The one error type of the service layer: what an operation refuses and why. The HTTP
//! layer maps it to status codes and bodies (`http/error.rs`), the dashboard to pages.

use crate::db::DbError;
use crate::domain::job_status::IllegalTransition;
use crate::domain::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("authentication required")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    /// Also what another user's resource answers: its existence is not revealed.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The resource exists but does not answer this method.
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    IllegalTransition(#[from] IllegalTransition),
    #[error("invalid fields")]
    Validation(Vec<FieldError>),
    /// A rule the request breaks, such as a training file not eligible for training.
    #[error("{message}")]
    Unprocessable { message: String, rules: Vec<String> },
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("too many failed attempts; try again in {retry_after_seconds} s")]
    TooManyRequests { retry_after_seconds: u64 },
    #[error(transparent)]
    Database(DbError),
    #[error("{0}")]
    Internal(String),
}

impl From<DbError> for ServiceError {
    fn from(error: DbError) -> Self {
        if error.is_unstorable_text() {
            return ServiceError::BadRequest(
                "text may not contain the NUL character (\\u0000)".into(),
            );
        }
        ServiceError::Database(error)
    }
}

impl From<sqlx::Error> for ServiceError {
    fn from(error: sqlx::Error) -> Self {
        DbError::from(error).into()
    }
}

impl From<std::io::Error> for ServiceError {
    fn from(error: std::io::Error) -> Self {
        ServiceError::Internal(format!("I/O error: {error}"))
    }
}

impl ServiceError {
    pub fn code(&self) -> &'static str {
        match self {
            ServiceError::Unauthorized => "unauthorized",
            ServiceError::Forbidden(_) => "forbidden",
            ServiceError::NotFound(_) => "not_found",
            ServiceError::MethodNotAllowed(_) => "method_not_allowed",
            ServiceError::BadRequest(_) => "bad_request",
            ServiceError::Conflict(_) => "conflict",
            ServiceError::IllegalTransition(_) => "illegal_transition",
            ServiceError::Validation(_) => "validation_failed",
            ServiceError::Unprocessable { .. } => "rule_violated",
            ServiceError::PayloadTooLarge(_) => "payload_too_large",
            ServiceError::TooManyRequests { .. } => "too_many_requests",
            ServiceError::Database(_) | ServiceError::Internal(_) => "internal",
        }
    }
}

pub type ServiceResult<T> = Result<T, ServiceError>;
