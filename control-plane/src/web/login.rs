//! Signing in and out of the dashboard (the same credential check and rate limit as the API).
use askama::Template;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;

use super::frame::PageResult;
use super::{render, PageError};
use crate::request::{end_session, session_cookie_for};
use crate::service::account::verify_credentials;
use crate::service::AppState;
use crate::service::ServiceError;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    email: String,
    error: Option<String>,
}

async fn login_form() -> Response {
    render(&LoginPage {
        email: String::new(),
        error: None,
    })
}

#[derive(Deserialize)]
struct LoginForm {
    email: String,
    password: String,
}

async fn login(
    State(state): State<AppState>,
    ConnectInfo(client): ConnectInfo<std::net::SocketAddr>,
    Form(form): Form<LoginForm>,
) -> PageResult {
    match verify_credentials(&state, client.ip(), &form.email, form.password).await {
        Ok(user) => {
            let cookie = session_cookie_for(&state, &user).await?;
            Ok(([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response())
        }
        Err(error @ (ServiceError::Unauthorized | ServiceError::TooManyRequests { .. })) => {
            let (status, message) = match error {
                ServiceError::Unauthorized => (
                    StatusCode::UNAUTHORIZED,
                    "That email and password do not match an account.".to_owned(),
                ),
                other => (StatusCode::TOO_MANY_REQUESTS, other.to_string()),
            };
            let page = LoginPage {
                email: form.email,
                error: Some(message),
            };
            Ok((status, render(&page)).into_response())
        }
        Err(other) => Err(PageError(other)),
    }
}

async fn logout(State(state): State<AppState>, headers: HeaderMap) -> PageResult {
    let clear = end_session(&state, &headers).await?;
    Ok(([(header::SET_COOKIE, clear)], Redirect::to("/login")).into_response())
}
