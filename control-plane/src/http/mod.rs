//! The JSON API under `/api/v1`, plus `/healthz` and `/metrics`.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::routing::get;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::OpenApi as OpenApiDocument;
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

use crate::configuration::Settings;
use crate::db::Db;
use crate::domain::{FieldError, GpuCatalog};
use crate::enrichment::Enricher;
use crate::live::LiveUpdates;
use crate::storage::ArtifactStore;

pub mod agent_api;
pub mod agents;
pub mod artifacts;
pub mod auth;
pub mod error;
pub mod files;
pub mod jobs;
pub mod ops;
pub mod presets;
pub mod stream;
pub mod templates;

use error::{ApiError, ApiResult};

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub settings: Arc<Settings>,
    pub catalog: Arc<GpuCatalog>,
    pub live: LiveUpdates,
    pub enricher: Enricher,
    pub login_limiter: Arc<auth::LoginLimiter>,
    pub metrics: Arc<ops::RequestMetrics>,
    pub artifacts: ArtifactStore,
    /// Signs download links; shared by every replica through the database.
    pub signing_key: Arc<str>,
    /// Wakes claims waiting for work when a job is queued on this replica.
    pub work_available: Arc<tokio::sync::Notify>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "LoRA fine-tuning control plane",
        description = "Users, training files, presets, jobs, metrics, events and live updates."
    ),
    modifiers(&SecuritySchemes),
    security(("bearer" = []), ("session" = [])),
    tags(
        (name = "auth"), (name = "training-files"), (name = "presets"), (name = "jobs"),
        (name = "templates"), (name = "artifacts"), (name = "agents"), (name = "agent protocol"),
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
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(auth::SESSION_COOKIE))),
        );
    }
}

/// The routes and the OpenAPI document describing them, built from the same handlers.
pub fn router(state: AppState) -> Router {
    let api = OpenApiRouter::new()
        .merge(auth::router())
        .merge(files::router())
        .merge(presets::router())
        .merge(jobs::router())
        .merge(stream::router())
        .merge(templates::router())
        .merge(artifacts::router())
        .merge(agents::router())
        .merge(agent_api::router());
    let (routes, document) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .nest("/api/v1", api)
        .merge(ops::router())
        .split_for_parts();
    let routes = routes.merge(crate::web::router());
    let document = Arc::new(document);
    routes
        .route(
            "/api/v1/openapi.json",
            get(move || async move { Json(document.as_ref().clone()) }),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::same_origin_for_cookies,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            ops::track_requests,
        ))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// `Query` whose rejection is our JSON error.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| ApiQuery(value))
            .map_err(|rejection: QueryRejection| {
                ApiError::BadRequest(format!("invalid query string: {}", rejection.body_text()))
            })
    }
}

/// `Json` whose rejection is our JSON error, naming what is wrong with the body.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        axum::Json::<T>::from_request(request, state)
            .await
            .map(|axum::Json(value)| ApiJson(value))
            .map_err(|rejection: JsonRejection| match rejection {
                JsonRejection::JsonDataError(e) => ApiError::Unprocessable {
                    message: format!("invalid request body: {}", e.body_text()),
                    rules: Vec::new(),
                },
                other => {
                    ApiError::BadRequest(format!("invalid request body: {}", other.body_text()))
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

pub const MAX_PAGE_SIZE: i64 = 500;

pub fn page_bounds(limit: Option<i64>, offset: Option<i64>, default: i64) -> ApiResult<(i64, i64)> {
    let limit = limit.unwrap_or(default);
    let offset = offset.unwrap_or(0);
    let mut errors = Vec::new();
    if !(1..=MAX_PAGE_SIZE).contains(&limit) {
        errors.push(FieldError::new(
            "limit",
            format!("must be between 1 and {MAX_PAGE_SIZE}"),
        ));
    }
    if offset < 0 {
        errors.push(FieldError::new("offset", "must not be negative"));
    }
    if errors.is_empty() {
        Ok((limit, offset))
    } else {
        Err(ApiError::Validation(errors))
    }
}

pub fn one_of(field: &str, value: &str, allowed: &[&str]) -> ApiResult<()> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(ApiError::Validation(vec![FieldError::new(
            field,
            format!("must be one of {}", allowed.join(", ")),
        )]))
    }
}
