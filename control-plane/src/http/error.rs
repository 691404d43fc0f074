//! The service error as an HTTP response: its status code and the JSON error body.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::domain::{FieldError, JobStatus};
use crate::service::ServiceError;

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

/// The one mapping of service errors to HTTP status codes.
pub fn status_of(error: &ServiceError) -> StatusCode {
    match error {
        ServiceError::Unauthorized => StatusCode::UNAUTHORIZED,
        ServiceError::Forbidden(_) => StatusCode::FORBIDDEN,
        ServiceError::NotFound(_) => StatusCode::NOT_FOUND,
        ServiceError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
        ServiceError::BadRequest(_) => StatusCode::BAD_REQUEST,
        ServiceError::Conflict(_) | ServiceError::IllegalTransition(_) => StatusCode::CONFLICT,
        ServiceError::Validation(_) | ServiceError::Unprocessable { .. } => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        ServiceError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        ServiceError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
        ServiceError::Database(_) | ServiceError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ServiceError {
    fn into_response(self) -> Response {
        let status = status_of(&self);
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
                    ServiceError::Validation(fields) => Some(fields.clone()),
                    _ => None,
                },
                rules: match &self {
                    ServiceError::Unprocessable { rules, .. } if !rules.is_empty() => {
                        Some(rules.clone())
                    }
                    _ => None,
                },
                current_status: match &self {
                    ServiceError::IllegalTransition(transition) => Some(transition.from),
                    _ => None,
                },
            },
        };
        let mut response = (status, Json(body)).into_response();
        if let ServiceError::TooManyRequests {
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
