//! Login, logout, signup and the current user. Requests authenticate through the
//! `CurrentUser` extractor (`request/`).

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::ErrorBody;
use super::ApiJson;
use crate::db::users::User;
use crate::request::{end_session, session_cookie_for};
use crate::service::account::{self, issue_api_token, DefaultAttribution};
use crate::service::{AppState, CurrentUser, ServiceResult};

#[derive(Deserialize, ToSchema)]
struct Credentials {
    email: String,
    password: String,
}

#[derive(Serialize, ToSchema)]
struct LoginResponse {
    /// Bearer token for `Authorization: Bearer …`.
    token: String,
    expires_at: DateTime<Utc>,
    user: User,
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(logout))
        .routes(routes!(signup))
        .routes(routes!(me))
        .routes(routes!(set_default_attribution))
}

/// Exchanges email and password for a bearer token and a session cookie.
#[utoipa::path(post, path = "/auth/login", tag = "auth", security(), request_body = Credentials,
    responses((status = 200, body = LoginResponse), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
async fn login(
    State(state): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    ApiJson(credentials): ApiJson<Credentials>,
) -> ServiceResult<Response> {
    let user = account::verify_credentials(
        &state,
        client.ip(),
        &credentials.email,
        credentials.password,
    )
    .await?;
    issue_tokens(&state, user).await
}

/// Hands out a bearer token in the body and a session cookie for the dashboard.
async fn issue_tokens(state: &AppState, user: User) -> ServiceResult<Response> {
    let issued = issue_api_token(state, &user).await?;
    let cookie = session_cookie_for(state, &user).await?;
    let mut response = Json(LoginResponse {
        token: issued.token,
        expires_at: issued.expires_at,
        user,
    })
    .into_response();
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(response)
}

/// Revokes the token or session the request carries.
#[utoipa::path(post, path = "/auth/logout", tag = "auth", responses((status = 204), (status = 401, body = ErrorBody)))]
async fn logout(State(state): State<AppState>, headers: HeaderMap) -> ServiceResult<Response> {
    let clear = end_session(&state, &headers).await?;
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(header::SET_COOKIE, clear);
    Ok(response)
}

/// Creates a user account, when the server allows signup.
#[utoipa::path(post, path = "/auth/signup", tag = "auth", security(), request_body = Credentials,
    responses((status = 201, body = LoginResponse), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn signup(
    State(state): State<AppState>,
    ApiJson(credentials): ApiJson<Credentials>,
) -> ServiceResult<Response> {
    let user = account::sign_up(&state, &credentials.email, credentials.password).await?;
    let mut response = issue_tokens(&state, user).await?;
    *response.status_mut() = StatusCode::CREATED;
    Ok(response)
}

/// Sets what your new jobs are charged to where a request names none (team, project,
/// cost center, tags); kept in your preferences.
#[utoipa::path(put, path = "/auth/me/default-attribution", tag = "auth", request_body = DefaultAttribution,
    responses((status = 200, body = User), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn set_default_attribution(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(request): ApiJson<DefaultAttribution>,
) -> ServiceResult<Json<User>> {
    Ok(Json(
        account::set_default_attribution(&state, &user, &request).await?,
    ))
}

/// The authenticated user.
#[utoipa::path(get, path = "/auth/me", tag = "auth", responses((status = 200, body = User), (status = 401, body = ErrorBody)))]
async fn me(CurrentUser(user): CurrentUser) -> Json<User> {
    Json(user)
}
