//! The JSON API under `/api/v1`, plus `/healthz` and `/metrics`.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{OpenApi as OpenApiDocument, RefOr};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

use crate::request::SESSION_COOKIE;
use crate::service::{AppState, ServiceError};

pub mod agent_api;
pub mod agents;
pub mod artifacts;
pub mod auth;
pub mod budgets;
pub mod error;
pub mod files;
pub mod job_templates;
pub mod jobs;
pub mod ops;
pub mod presets;
pub mod stream;
pub mod validation;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "LoRA fine-tuning control plane",
        description = "Users, training files, presets, jobs, metrics, events and live updates."
    ),
    servers((url = "/", description = "this control plane")),
    modifiers(&SecuritySchemes),
    security(("bearer" = []), ("session" = [])),
    tags(
        (name = "auth"), (name = "training-files"), (name = "presets"), (name = "jobs"),
        (name = "templates"), (name = "artifacts"), (name = "validation"), (name = "costs"), (name = "agents"), (name = "agent protocol"),
        (name = "operations"),
    )
)]
struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut OpenApiDocument) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(SESSION_COOKIE))),
        );
    }
}

/// OpenAPI requires a description on every response; where a handler gives none, the
/// status' reason phrase ("Not Found") is used, so the document stays valid whatever
/// handlers are added.
struct DescribedResponses;

impl Modify for DescribedResponses {
    fn modify(&self, openapi: &mut OpenApiDocument) {
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.options,
                &mut item.head,
                &mut item.patch,
                &mut item.trace,
            ];
            for operation in operations.into_iter().flatten() {
                for (status, response) in operation.responses.responses.iter_mut() {
                    let RefOr::T(response) = response else {
                        continue;
                    };
                    if response.description.is_empty() {
                        response.description = status
                            .parse::<u16>()
                            .ok()
                            .and_then(|code| StatusCode::from_u16(code).ok())
                            .and_then(|code| code.canonical_reason())
                            .unwrap_or("Response")
                            .to_owned();
                    }
                }
            }
        }
    }
}

/// The API's routes and the OpenAPI document describing them, built from the same
/// handlers. `startup` merges them with the dashboard's and adds the middleware.
pub fn router() -> Router<AppState> {
    let api = OpenApiRouter::new()
        .merge(auth::router())
        .merge(files::router())
        .merge(presets::router())
        .merge(jobs::router())
        .merge(stream::router())
        .merge(job_templates::router())
        .merge(artifacts::router())
        .merge(budgets::router())
        .merge(validation::router())
        .merge(agents::router())
        .merge(agent_api::router());
    let (routes, mut document) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .nest("/api/v1", api)
        .merge(ops::router())
        .split_for_parts();
    // After the routes' operations are in: `ApiDoc`'s own modifiers run before.
    DescribedResponses.modify(&mut document);
    let document = Arc::new(document);
    routes.route(
        "/api/v1/openapi.json",
        get(move || async move { Json(document.as_ref().clone()) }),
    )
}

/// An API address nothing answers: our JSON 404.
pub async fn no_such_route() -> ServiceError {
    ServiceError::NotFound("route")
}

/// A route asked with a method it does not answer: our JSON 405.
pub async fn method_not_allowed(request: Request) -> ServiceError {
    ServiceError::MethodNotAllowed(format!(
        "{} is not allowed on {}",
        request.method(),
        request.uri().path()
    ))
}

/// `Query` whose rejection is our JSON error.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ServiceError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| ApiQuery(value))
            .map_err(|rejection: QueryRejection| {
                ServiceError::BadRequest(format!("invalid query string: {}", rejection.body_text()))
            })
    }
}

/// `Path` whose rejection (an id that is not a UUID, say) is our JSON error.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ServiceError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| ApiPath(value))
            .map_err(|rejection: PathRejection| {
                ServiceError::BadRequest(format!("invalid path: {}", rejection.body_text()))
            })
    }
}

/// `Json` whose rejection is our JSON error, naming what is wrong with the body.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ServiceError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        axum::Json::<T>::from_request(request, state)
            .await
            .map(|axum::Json(value)| ApiJson(value))
            .map_err(|rejection: JsonRejection| match rejection {
                JsonRejection::JsonDataError(e) => ServiceError::Unprocessable {
                    message: format!("invalid request body: {}", e.body_text()),
                    rules: Vec::new(),
                },
                other => {
                    ServiceError::BadRequest(format!("invalid request body: {}", other.body_text()))
                }
            })
    }
}

/// A page of a list, as spec §5.2 shapes it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub data: Vec<T>,
    /// Rows matching the filters, on every page.
    pub count: i64,
    pub page: i64,
    pub total_pages: i64,
}

impl<T> Page<T> {
    pub fn new(data: Vec<T>, count: i64, limit: i64, offset: i64) -> Page<T> {
        Page {
            data,
            count,
            page: offset / limit + 1,
            total_pages: (count + limit - 1) / limit,
        }
    }
}
