//! The signed-in user's own settings: who they are, and what their new jobs are charged
//! to by default (the same operation as `PUT /api/v1/auth/me/default-attribution`).

use askama::Template;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::create::problems;
use super::frame::{Frame, PageResult};
use super::{render, PageError, PageUser};
use crate::service::account::{set_default_attribution, DefaultAttribution};
use crate::service::{AppState, ServiceError};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/account", get(account_page))
        .route("/account/attribution", post(save_attribution))
}

/// The default attribution as the form shows and sends it: tags one `key=value` a line.
#[derive(Deserialize, Default)]
struct AttributionForm {
    team: String,
    project: String,
    cost_center: String,
    tags: String,
}

impl AttributionForm {
    fn of(user: &PageUser) -> AttributionForm {
        let current = user.0.default_attribution();
        AttributionForm {
            team: current.team.unwrap_or_default(),
            project: current.project.unwrap_or_default(),
            cost_center: current.cost_center.unwrap_or_default(),
            tags: current
                .tags
                .unwrap_or_default()
                .iter()
                .map(|(key, value)| format!("{key}={}", value.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    /// The API's request; a tag line without `=` is left for the service to name (an
    /// empty key).
    fn request(&self) -> DefaultAttribution {
        let text = |value: &str| Some(value.trim().to_owned()).filter(|v| !v.is_empty());
        let tags: Map<String, Value> = self
            .tags
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                let (key, value) = line.split_once('=').unwrap_or(("", line));
                (key.trim().to_owned(), Value::from(value.trim()))
            })
            .collect();
        DefaultAttribution {
            team: text(&self.team),
            project: text(&self.project),
            cost_center: text(&self.cost_center),
            tags: (!tags.is_empty()).then_some(tags),
        }
    }
}

#[derive(Template)]
#[template(path = "account.html")]
struct AccountPage {
    frame: Frame,
    email: String,
    role: String,
    form: AttributionForm,
    problems: Vec<String>,
    saved: bool,
}

#[derive(Deserialize)]
struct Saved {
    saved: Option<String>,
}

async fn account_page(user: PageUser, Query(query): Query<Saved>) -> PageResult {
    let form = AttributionForm::of(&user);
    page(
        &user,
        form,
        Vec::new(),
        query.saved.is_some(),
        StatusCode::OK,
    )
}

fn page(
    user: &PageUser,
    form: AttributionForm,
    problems: Vec<String>,
    saved: bool,
    status: StatusCode,
) -> PageResult {
    let page = AccountPage {
        frame: Frame::new(user, "account", &[("Account", "")]),
        email: user.0 .0.email.clone(),
        role: user.0 .0.role().as_str().to_owned(),
        form,
        problems,
        saved,
    };
    Ok((status, render(&page)).into_response())
}

async fn save_attribution(
    State(state): State<AppState>,
    user: PageUser,
    Form(form): Form<AttributionForm>,
) -> PageResult {
    match set_default_attribution(&state, &user.0, &form.request()).await {
        Ok(_) => Ok(Redirect::to("/account?saved=1").into_response()),
        Err(error @ ServiceError::Validation(_)) => page(
            &user,
            form,
            problems(&error),
            false,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        Err(error) => Err(PageError(error)),
    }
}
