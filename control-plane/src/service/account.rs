//! Accounts and credentials: who a token or session belongs to, login within a rate
//! limit, API tokens and dashboard sessions, signup and account creation.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Duration as ChronoDuration, Utc};

use super::{AppState, ServiceError, ServiceResult};
use crate::auth::{dummy_hash, hash_password, new_token, token_hash, verify_password};
use crate::db::jobs::Viewer;
use crate::db::users::{self, TokenKind, User};
use crate::db::{now, Db};
use crate::domain::{Attribution, Email, FieldError, Password, Role};

/// The authenticated user an operation acts for.
#[derive(Debug, Clone)]
pub struct CurrentUser(pub User);

impl CurrentUser {
    pub fn viewer(&self) -> Viewer {
        Viewer {
            user_id: self.0.id,
            sees_everything: self.0.role().sees_everything(),
        }
    }

    /// Operators and admins act on every user's jobs and see the fleet.
    pub fn is_operator(&self) -> bool {
        self.0.role().sees_everything()
    }
}

/// The key of a user's preferences holding the attribution their new jobs get where a
/// request names none.
const DEFAULT_ATTRIBUTION: &str = "default_attribution";

/// What a user's new jobs are charged to by default.
#[derive(Debug, Default, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DefaultAttribution {
    pub team: Option<String>,
    pub project: Option<String>,
    pub cost_center: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub tags: Option<serde_json::Map<String, serde_json::Value>>,
}

impl CurrentUser {
    /// The attribution the user's new jobs get where a request names none (a profile
    /// setting; stored already checked).
    pub fn default_attribution(&self) -> Attribution {
        let stored: DefaultAttribution = self
            .0
            .preferences
            .0
            .get(DEFAULT_ATTRIBUTION)
            .and_then(|value| serde_json::from_value(value.clone()).ok())
            .unwrap_or_default();
        Attribution {
            team: stored.team,
            project: stored.project,
            cost_center: stored.cost_center,
            tags: stored.tags,
        }
    }
}

/// Sets the attribution the user's new jobs get by default; every bad field is named.
pub async fn set_default_attribution(
    state: &AppState,
    user: &CurrentUser,
    request: &DefaultAttribution,
) -> ServiceResult<User> {
    let mut errors = Vec::new();
    let parsed = Attribution::parse(
        request.team.as_deref(),
        request.project.as_deref(),
        request.cost_center.as_deref(),
        request.tags.as_ref(),
        &mut errors,
    );
    if !errors.is_empty() {
        return Err(ServiceError::Validation(errors));
    }
    let stored = DefaultAttribution {
        team: parsed.team,
        project: parsed.project,
        cost_center: parsed.cost_center,
        tags: parsed.tags,
    };
    let mut preferences = user.0.preferences.0.clone();
    if !preferences.is_object() {
        preferences = serde_json::json!({});
    }
    preferences[DEFAULT_ATTRIBUTION] =
        serde_json::to_value(&stored).map_err(|e| ServiceError::Internal(e.to_string()))?;
    users::replace_preferences(&state.db, user.0.id, &preferences)
        .await?
        .ok_or(ServiceError::Unauthorized)
}

/// A credential a request carries.
pub enum Credential {
    /// `Authorization: Bearer …`, an API token.
    Bearer(String),
    /// The dashboard's session cookie.
    Session(String),
}

/// The user a credential belongs to, while it is valid.
pub async fn authenticate(state: &AppState, credential: &Credential) -> ServiceResult<CurrentUser> {
    let (kind, token) = match credential {
        Credential::Bearer(token) => (TokenKind::Api, token),
        Credential::Session(token) => (TokenKind::Session, token),
    };
    users::user_for_token(&state.db, kind, &token_hash(token))
        .await?
        .map(CurrentUser)
        .ok_or(ServiceError::Unauthorized)
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

/// The user these credentials belong to, within the login rate limit.
pub async fn verify_credentials(
    state: &AppState,
    client: IpAddr,
    email: &str,
    password: String,
) -> ServiceResult<User> {
    let client = Some(client);
    let email = email.trim().to_lowercase();
    state
        .login_limiter
        .check(&email, client)
        .map_err(|retry_after_seconds| ServiceError::TooManyRequests {
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
        .map_err(|e| ServiceError::Internal(e.to_string()))?;
    let Some(user) = user.filter(|_| verified) else {
        state.login_limiter.fail(&email, client);
        tracing::info!(email = %email, "failed login");
        return Err(ServiceError::Unauthorized);
    };
    state.login_limiter.succeed(&email);
    Ok(user)
}

/// A freshly issued secret and when it stops working.
pub struct Issued {
    pub token: String,
    pub expires_at: DateTime<Utc>,
    pub lifetime: ChronoDuration,
}

/// Stores a new API token for `user` (`auth.api_token_ttl_hours`).
pub async fn issue_api_token(state: &AppState, user: &User) -> ServiceResult<Issued> {
    issue(
        state,
        user,
        TokenKind::Api,
        "lcp_",
        state.settings.auth.api_token_ttl_hours,
    )
    .await
}

/// Stores a new dashboard session for `user` (`auth.session_ttl_hours`).
pub async fn start_session(state: &AppState, user: &User) -> ServiceResult<Issued> {
    issue(
        state,
        user,
        TokenKind::Session,
        "lcs_",
        state.settings.auth.session_ttl_hours,
    )
    .await
}

async fn issue(
    state: &AppState,
    user: &User,
    kind: TokenKind,
    prefix: &str,
    ttl_hours: i64,
) -> ServiceResult<Issued> {
    let token = new_token(prefix);
    let lifetime = ChronoDuration::hours(ttl_hours);
    let expires_at = now() + lifetime;
    users::store_token(&state.db, kind, user.id, &token_hash(&token), expires_at).await?;
    Ok(Issued {
        token,
        expires_at,
        lifetime,
    })
}

/// Revokes the credentials a request carries (its token, and its session cookie too).
pub async fn end_session(
    state: &AppState,
    credential: &Credential,
    session: Option<&str>,
) -> ServiceResult<()> {
    match credential {
        Credential::Bearer(token) => {
            users::revoke_token(&state.db, TokenKind::Api, &token_hash(token)).await?
        }
        Credential::Session(token) => {
            users::revoke_token(&state.db, TokenKind::Session, &token_hash(token)).await?
        }
    }
    if let Some(session) = session {
        users::revoke_token(&state.db, TokenKind::Session, &token_hash(session)).await?;
    }
    Ok(())
}

/// Creates a user account through signup, when the server allows it.
pub async fn sign_up(state: &AppState, email: &str, password: String) -> ServiceResult<User> {
    if !state.settings.allow_signup {
        return Err(ServiceError::Forbidden(
            "signup is disabled; ask an administrator for an account".into(),
        ));
    }
    create_account(&state.db, email, password, Role::User).await
}

/// Creates an account, refusing an address already in use.
pub async fn create_account(
    db: &Db,
    email: &str,
    password: String,
    role: Role,
) -> ServiceResult<User> {
    let mut errors = Vec::new();
    let email = Email::parse(email).map_err(|m| errors.push(FieldError::new("email", m)));
    let password =
        Password::parse(password).map_err(|m| errors.push(FieldError::new("password", m)));
    let (Ok(email), Ok(password)) = (email, password) else {
        return Err(ServiceError::Validation(errors));
    };
    let hash = tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))?
        .map_err(|e| ServiceError::Internal(e.to_string()))?;
    users::create_user(db, &email, &hash, role)
        .await?
        .ok_or_else(|| ServiceError::Conflict(format!("an account for {email} already exists")))
}

/// A new enrollment token agents register with, valid for `lifetime`; returns it and its
/// expiry. Only its hash is stored.
pub async fn create_enrollment_token(
    db: &Db,
    lifetime: ChronoDuration,
) -> ServiceResult<(String, DateTime<Utc>)> {
    let token = new_token("lce_");
    let expires_at = now() + lifetime;
    users::create_enrollment_token(db, &token_hash(&token), expires_at).await?;
    Ok((token, expires_at))
}
