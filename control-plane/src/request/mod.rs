//! What the JSON API (`http/`) and the dashboard (`web/`) both read from a request: its
//! credential (bearer token or session cookie) and the user it authenticates, the session
//! cookie's header values, the same-origin rule for cookie-authenticated writes, the base
//! URL links are built on, and streamed multipart uploads.

use axum::extract::{FromRequestParts, State};
use axum::http::{header, request::Parts, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};

use crate::service::account::{self, Credential, Issued};
use crate::service::{AppState, CurrentUser, ServiceError, ServiceResult};

pub mod upload;

pub const SESSION_COOKIE: &str = "lora_session";

/// The credential a request carries: `Authorization: Bearer`, else the session cookie.
pub fn credential(headers: &HeaderMap) -> Option<Credential> {
    if headers.contains_key(header::AUTHORIZATION) {
        return bearer_token(headers).map(|token| Credential::Bearer(token.trim().to_owned()));
    }
    session_cookie(headers).map(Credential::Session)
}

/// The token of an `Authorization: Bearer` header (users' API tokens, agents' secrets).
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

pub fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// Authenticates every API route and page that takes a `CurrentUser`.
impl FromRequestParts<AppState> for CurrentUser {
    type Rejection = ServiceError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let credential = credential(&parts.headers).ok_or(ServiceError::Unauthorized)?;
        account::authenticate(state, &credential).await
    }
}

/// Starts a dashboard session for `user`; returns its `Set-Cookie` value.
pub async fn session_cookie_for(
    state: &AppState,
    user: &crate::db::users::User,
) -> ServiceResult<HeaderValue> {
    let Issued {
        token, lifetime, ..
    } = account::start_session(state, user).await?;
    let cookie = format!(
        "{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}{}",
        lifetime.num_seconds(),
        if state.settings.auth.secure_cookies {
            "; Secure"
        } else {
            ""
        }
    );
    HeaderValue::from_str(&cookie).map_err(|e| ServiceError::Internal(e.to_string()))
}

/// Revokes the request's credentials; returns the `Set-Cookie` value that clears the
/// session cookie.
pub async fn end_session(state: &AppState, headers: &HeaderMap) -> ServiceResult<HeaderValue> {
    let credential = credential(headers).ok_or(ServiceError::Unauthorized)?;
    account::end_session(state, &credential, session_cookie(headers).as_deref()).await?;
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0"
    ))
    .map_err(|e| ServiceError::Internal(e.to_string()))
}

/// The base URL links are built on: `public_url`, else the request's Host.
pub fn base_url(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(url) = &state.settings.public_url {
        return url.trim_end_matches('/').to_owned();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    format!("http://{host}")
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
            ServiceError::Forbidden("cross-site requests cannot use the session cookie".into())
                .into_response()
        }
        _ => next.run(request).await,
    }
}
