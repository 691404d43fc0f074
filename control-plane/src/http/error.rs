//! The one error type of the HTTP layer and its mapping to status codes.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::db::DbError;
use crate::domain::job_status::IllegalTransition;
use crate::domain::{FieldError, JobStatus};

/// The body of every error response.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, such as `validation_failed` or `illegal_transition`.
    pub code: &'static str,
    pub message: String,
    /// One entry per invalid field (422).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fields: Option<Vec<FieldError>>,
    /// The rules a request breaks, such as eligibility rules (422).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<String>>,
    /// The job's status when a state change is refused (409).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_status: Option<JobStatus>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("authentication required")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    /// Also what another user's resource answers: its existence is not revealed.
    #[error("{0} not found")]
    NotFound(&'static str),
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
    Database(#[from] DbError),
    #[error("{0}")]
    Internal(String),
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        ApiError::Database(error.into())
    }
}

impl From<std::io::Error> for ApiError {
    fn from(error: std::io::Error) -> Self {
        ApiError::Internal(format!("I/O error: {error}"))
    }
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Conflict(_) | ApiError::IllegalTransition(_) => StatusCode::CONFLICT,
            ApiError::Validation(_) | ApiError::Unprocessable { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Database(_) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Conflict(_) => "conflict",
            ApiError::IllegalTransition(_) => "illegal_transition",
            ApiError::Validation(_) => "validation_failed",
            ApiError::Unprocessable { .. } => "rule_violated",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::TooManyRequests { .. } => "too_many_requests",
            ApiError::Database(_) | ApiError::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self, "request failed");
            "internal error; see the server log".to_owned()
        } else {
            self.to_string()
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message,
                fields: match &self {
                    ApiError::Validation(fields) => Some(fields.clone()),
                    _ => None,
                },
                rules: match &self {
                    ApiError::Unprocessable { rules, .. } if !rules.is_empty() => {
                        Some(rules.clone())
                    }
                    _ => None,
                },
                current_status: match &self {
                    ApiError::IllegalTransition(transition) => Some(transition.from),
                    _ => None,
                },
            },
        };
        let mut response = (status, Json(body)).into_response();
        if let ApiError::TooManyRequests {
            retry_after_seconds,
        } = self
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, retry_after_seconds.into());
        }
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body is never read, so the connection cannot be reused.
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
