//! The web dashboard: server-rendered pages (askama, one view struct per page), SVG
//! charts drawn here, and a little JavaScript of our own for live updates over the
//! job's SSE stream. Everything but live updates works without JavaScript.

use askama::Template;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

use crate::service::AppState;
use crate::service::CurrentUser;
use crate::service::ServiceError;

mod account;
pub mod charts;
mod costs;
mod create;
mod files;
mod fleet;
mod frame;
mod history;
mod home;
mod job_templates;
mod jobs;
mod login;
mod validation;

pub fn router() -> Router<AppState> {
    login::router()
        .merge(account::router())
        .merge(home::router())
        .merge(jobs::router())
        .merge(files::router())
        .merge(fleet::router())
        .merge(create::router())
        .merge(history::router())
        .merge(costs::router())
        .merge(job_templates::router())
        .merge(validation::router())
        .route("/static/app.css", get(stylesheet))
        .route("/static/app.js", get(script))
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        include_str!("../../static/app.css"),
    )
        .into_response()
}

async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        include_str!("../../static/app.js"),
    )
        .into_response()
}

/// The signed-in user of a page, with the budget alerts of this period that every page's
/// frame shows; without a session the page redirects to `/login`.
pub struct PageUser(pub CurrentUser, pub Vec<String>);

impl FromRequestParts<AppState> for PageUser {
    type Rejection = PageError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let user = CurrentUser::from_request_parts(parts, state)
            .await
            .map_err(PageError)?;
        let banners = crate::service::budget::alert_banners(state, &user).await?;
        Ok(PageUser(user, banners))
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    status: u16,
    title: String,
    message: String,
}

/// An error shown as a page: 401 sends the browser to `/login`, the rest render the
/// error page with the status that fits.
pub struct PageError(pub ServiceError);

impl<E: Into<ServiceError>> From<E> for PageError {
    fn from(error: E) -> Self {
        PageError(error.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let (status, title) = match &self.0 {
            ServiceError::Unauthorized => return Redirect::to("/login").into_response(),
            ServiceError::NotFound(_) => (StatusCode::NOT_FOUND, "Not found"),
            ServiceError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "Not allowed"),
            ServiceError::Forbidden(_) => (StatusCode::FORBIDDEN, "Not allowed"),
            ServiceError::Conflict(_) | ServiceError::IllegalTransition(_) => {
                (StatusCode::CONFLICT, "Not possible right now")
            }
            ServiceError::Validation(_) | ServiceError::Unprocessable { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "Please check the form")
            }
            ServiceError::BadRequest(_) => (StatusCode::BAD_REQUEST, "Bad request"),
            ServiceError::TooManyRequests { .. } => (StatusCode::TOO_MANY_REQUESTS, "Slow down"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "Something went wrong"),
        };
        let message = if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self.0, "page failed");
            "The server could not show this page; see its log.".to_owned()
        } else {
            self.0.to_string()
        };
        let page = ErrorPage {
            status: status.as_u16(),
            title: title.to_owned(),
            message,
        };
        (status, render(&page)).into_response()
    }
}

/// A page for an address nothing answers: the dashboard's not-found page.
pub async fn no_such_page() -> PageError {
    PageError(ServiceError::NotFound("page"))
}

/// Renders a template to an HTML response.
pub fn render(template: &impl Template) -> Response {
    match template.render() {
        Ok(html) => Html(html).into_response(),
        Err(error) => {
            tracing::error!(%error, "template failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "template error").into_response()
        }
    }
}
