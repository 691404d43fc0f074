//! Login, logout, signup, and the extractor that authenticates every other request.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::{ApiError, ApiResult, ErrorBody};
use super::AppState;
use crate::auth::{dummy_hash, hash_password, new_token, token_hash, verify_password};
use crate::db::jobs::Viewer;
use crate::db::now;
use crate::db::users::{self, TokenKind, User};
use crate::domain::{Email, Password, Role};

pub const SESSION_COOKIE: &str = "lora_session";

/// The authenticated user of a request (bearer token or session cookie).
pub struct CurrentUser(pub User);

impl CurrentUser {
    pub fn viewer(&self) -> Viewer {
        Viewer {
            user_id: self.0.id,
            sees_everything: self.0.role().sees_everything(),
        }
    }
}

enum Credential {
    Bearer(String),
    Session(String),
}

fn credential(headers: &HeaderMap) -> Option<Credential> {
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        return value
            .strip_prefix("Bearer ")
            .map(|token| Credential::Bearer(token.trim().to_owned()));
    }
    session_cookie(headers).map(Credential::Session)
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.to_owned())
}

impl FromRequestParts<AppState> for CurrentUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let (kind, token) = match credential(&parts.headers).ok_or(ApiError::Unauthorized)? {
            Credential::Bearer(token) => (TokenKind::Api, token),
            Credential::Session(token) => (TokenKind::Session, token),
        };
        users::user_for_token(&state.db, kind, &token_hash(&token))
            .await?
            .map(CurrentUser)
            .ok_or(ApiError::Unauthorized)
    }
}

/// Counts failed logins per email and per client address in a sliding window.
pub struct LoginLimiter {
    max_failures: usize,
    window: Duration,
    failures: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl LoginLimiter {
    pub fn new(max_failures: u32, window: Duration) -> LoginLimiter {
        LoginLimiter {
            max_failures: max_failures as usize,
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn keys(email: &str, client: Option<IpAddr>) -> Vec<String> {
        let mut keys = vec![format!("email:{email}")];
        keys.extend(client.map(|ip| format!("ip:{ip}")));
        keys
    }

    /// `Err(seconds)` until the caller may try again.
    fn check(&self, email: &str, client: Option<IpAddr>) -> Result<(), u64> {
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let mut wait = Duration::ZERO;
        for key in Self::keys(email, client) {
            if let Some(times) = failures.get_mut(&key) {
                while times
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= self.window)
                {
                    times.pop_front();
                }
                if times.len() >= self.max_failures {
                    if let Some(oldest) = times.front() {
                        wait = wait.max(self.window - now.duration_since(*oldest));
                    }
                }
            }
        }
        if wait.is_zero() {
            Ok(())
        } else {
            Err(wait.as_secs().max(1))
        }
    }

    fn fail(&self, email: &str, client: Option<IpAddr>) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        for key in Self::keys(email, client) {
            failures.entry(key).or_default().push_back(Instant::now());
        }
    }

    fn succeed(&self, email: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.remove(&format!("email:{email}"));
    }
}

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
}

/// Exchanges email and password for a bearer token and a session cookie.
#[utoipa::path(post, path = "/auth/login", tag = "auth", security(), request_body = Credentials,
    responses((status = 200, body = LoginResponse), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
async fn login(
    State(state): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    Json(credentials): Json<Credentials>,
) -> ApiResult<Response> {
    let user = verify_credentials(
        &state,
        client.ip(),
        &credentials.email,
        credentials.password,
    )
    .await?;
    issue_tokens(&state, user).await
}

/// The user these credentials belong to, within the login rate limit.
pub async fn verify_credentials(
    state: &AppState,
    client: IpAddr,
    email: &str,
    password: String,
) -> ApiResult<User> {
    let client = Some(client);
    let email = email.trim().to_lowercase();
    state
        .login_limiter
        .check(&email, client)
        .map_err(|retry_after_seconds| ApiError::TooManyRequests {
            retry_after_seconds,
        })?;
    let user = match Email::parse(&email) {
        Ok(email) => users::find_by_email(&state.db, &email).await?,
        Err(_) => None,
    };
    let stored_hash = user
        .as_ref()
        .map_or(dummy_hash(), |u| u.password_hash.as_str())
        .to_owned();
    let verified = tokio::task::spawn_blocking(move || verify_password(&password, &stored_hash))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let Some(user) = user.filter(|_| verified) else {
        state.login_limiter.fail(&email, client);
        tracing::info!(email = %email, "failed login");
        return Err(ApiError::Unauthorized);
    };
    state.login_limiter.succeed(&email);
    Ok(user)
}

/// Hands out a bearer token in the body and a session cookie for the dashboard.
async fn issue_tokens(state: &AppState, user: User) -> ApiResult<Response> {
    let auth = &state.settings.auth;
    let api_token = new_token("lcp_");
    let expires_at = now() + ChronoDuration::hours(auth.api_token_ttl_hours);
    users::store_token(
        &state.db,
        TokenKind::Api,
        user.id,
        &token_hash(&api_token),
        expires_at,
    )
    .await?;
    let cookie = start_session(state, &user).await?;
    let mut response = Json(LoginResponse {
        token: api_token,
        expires_at,
        user,
    })
    .into_response();
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(response)
}

/// Stores a new dashboard session for `user`; returns its `Set-Cookie` value.
pub async fn start_session(state: &AppState, user: &User) -> ApiResult<HeaderValue> {
    let auth = &state.settings.auth;
    let session = new_token("lcs_");
    let session_ttl = ChronoDuration::hours(auth.session_ttl_hours);
    users::store_token(
        &state.db,
        TokenKind::Session,
        user.id,
        &token_hash(&session),
        now() + session_ttl,
    )
    .await?;
    let cookie = format!(
        "{SESSION_COOKIE}={session}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}{}",
        session_ttl.num_seconds(),
        if auth.secure_cookies { "; Secure" } else { "" }
    );
    HeaderValue::from_str(&cookie).map_err(|e| ApiError::Internal(e.to_string()))
}

/// Revokes the token or session the request carries.
#[utoipa::path(post, path = "/auth/logout", tag = "auth", responses((status = 204), (status = 401, body = ErrorBody)))]
async fn logout(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    let clear = end_session(&state, &headers).await?;
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(header::SET_COOKIE, clear);
    Ok(response)
}

/// Revokes the request's credentials; returns the `Set-Cookie` value that clears the
/// session cookie.
pub async fn end_session(state: &AppState, headers: &HeaderMap) -> ApiResult<HeaderValue> {
    match credential(headers).ok_or(ApiError::Unauthorized)? {
        Credential::Bearer(token) => {
            users::revoke_token(&state.db, TokenKind::Api, &token_hash(&token)).await?
        }
        Credential::Session(token) => {
            users::revoke_token(&state.db, TokenKind::Session, &token_hash(&token)).await?
        }
    }
    if let Some(session) = session_cookie(headers) {
        users::revoke_token(&state.db, TokenKind::Session, &token_hash(&session)).await?;
    }
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0"
    ))
    .map_err(|e| ApiError::Internal(e.to_string()))
}

/// Creates a user account, when the server allows signup.
#[utoipa::path(post, path = "/auth/signup", tag = "auth", security(), request_body = Credentials,
    responses((status = 201, body = LoginResponse), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn signup(
    State(state): State<AppState>,
    Json(credentials): Json<Credentials>,
) -> ApiResult<Response> {
    if !state.settings.allow_signup {
        return Err(ApiError::Forbidden(
            "signup is disabled; ask an administrator for an account".into(),
        ));
    }
    let user = create_account(
        &state.db,
        &credentials.email,
        credentials.password,
        Role::User,
    )
    .await?;
    let mut response = issue_tokens(&state, user).await?;
    *response.status_mut() = StatusCode::CREATED;
    Ok(response)
}

/// Creates an account, refusing an address already in use.
pub async fn create_account(
    db: &crate::db::Db,
    email: &str,
    password: String,
    role: Role,
) -> ApiResult<User> {
    let mut errors = Vec::new();
    let email =
        Email::parse(email).map_err(|m| errors.push(crate::domain::FieldError::new("email", m)));
    let password = Password::parse(password)
        .map_err(|m| errors.push(crate::domain::FieldError::new("password", m)));
    let (Ok(email), Ok(password)) = (email, password) else {
        return Err(ApiError::Validation(errors));
    };
    let hash = tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    users::create_user(db, &email, &hash, role)
        .await?
        .ok_or_else(|| ApiError::Conflict(format!("an account for {email} already exists")))
}

/// The authenticated user.
#[utoipa::path(get, path = "/auth/me", tag = "auth", responses((status = 200, body = User), (status = 401, body = ErrorBody)))]
async fn me(CurrentUser(user): CurrentUser) -> Json<User> {
    Json(user)
}

/// Refuses state-changing requests authenticated by the session cookie that come from
/// another site (their `Origin`, or else `Referer`, names a different host), so a page
/// elsewhere cannot post the dashboard's forms with the user's cookie. Bearer-token
/// requests carry no ambient credential and pass. Behind a proxy that rewrites `Host`,
/// `public_url`'s host counts as this host too.
pub async fn same_origin_for_cookies(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let headers = request.headers();
    let safe = matches!(
        *request.method(),
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    );
    let uses_cookie =
        !headers.contains_key(header::AUTHORIZATION) && session_cookie(headers).is_some();
    if safe || !uses_cookie {
        return next.run(request).await;
    }
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let source = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))
        .and_then(|v| v.to_str().ok());
    let host_of = |url: &str| -> String {
        let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
        rest.split('/').next().unwrap_or(rest).to_owned()
    };
    let public = state.settings.public_url.as_deref().map(host_of);
    match (source.map(host_of), host) {
        (Some(from), Some(host)) if from != host && Some(&from) != public.as_ref() => {
            tracing::warn!(
                from,
                host,
                "cross-site request with a session cookie refused"
            );
            ApiError::Forbidden("cross-site requests cannot use the session cookie".into())
                .into_response()
        }
        _ => next.run(request).await,
    }
}
