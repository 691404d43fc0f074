use control_plane::domain::Role;
use reqwest::{header, StatusCode};
use serde_json::json;

use crate::helpers::{field_names, json_of, settings, Backend, TestApp, TestDatabase};
use testkit::on_both_backends;

on_both_backends!(
    login_gives_a_token_and_a_session_cookie,
    failed_logins_are_rate_limited,
    signup_follows_config
);

async fn login_gives_a_token_and_a_session_cookie(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;

    let (status, me) = json_of(app.get(&user, "/api/v1/auth/me").await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["email"], "ada@example.com");
    assert!(
        me.get("password_hash").is_none(),
        "the hash never leaves the server"
    );

    let response = app
        .client
        .post(app.url("/api/v1/auth/login"))
        .json(&json!({"email": "ADA@example.com", "password": "password-123"}))
        .send()
        .await
        .expect("login");
    let cookie = response.headers()[header::SET_COOKIE]
        .to_str()
        .expect("cookie")
        .to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.starts_with("lora_session="),
        "{cookie}"
    );
    let session = cookie.split(';').next().expect("pair").to_owned();
    // A request authenticated by the session cookie alone, as the dashboard sends it.
    let with_session = |method: reqwest::Method, path: &str| {
        app.client
            .request(method, app.url(path))
            .header(header::COOKIE, &session)
            .send()
    };
    let me = with_session(reqwest::Method::GET, "/api/v1/auth/me")
        .await
        .expect("me");
    assert_eq!(me.status(), StatusCode::OK);

    let logout = app.post(&user, "/api/v1/auth/logout", json!({})).await;
    assert_eq!(logout.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        app.get(&user, "/api/v1/auth/me").await.status(),
        StatusCode::UNAUTHORIZED
    );
    let cookie_logout = with_session(reqwest::Method::POST, "/api/v1/auth/logout")
        .await
        .expect("logout");
    assert_eq!(cookie_logout.status(), StatusCode::NO_CONTENT);
    let me = with_session(reqwest::Method::GET, "/api/v1/auth/me")
        .await
        .expect("me");
    assert_eq!(me.status(), StatusCode::UNAUTHORIZED);

    let anonymous = app
        .client
        .get(app.url("/api/v1/jobs"))
        .send()
        .await
        .expect("jobs");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let forged = app
        .client
        .get(app.url("/api/v1/jobs"))
        .bearer_auth("lcp_forged")
        .send()
        .await
        .expect("jobs");
    assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);
}

async fn failed_logins_are_rate_limited(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    app.user("bob@example.com", Role::User).await;
    let attempt = |password: &'static str| {
        app.client
            .post(app.url("/api/v1/auth/login"))
            .json(&json!({"email": "bob@example.com", "password": password}))
            .send()
    };
    for _ in 0..5 {
        assert_eq!(
            attempt("wrong-password").await.expect("login").status(),
            StatusCode::UNAUTHORIZED
        );
    }
    let limited = attempt("password-123").await.expect("login");
    assert_eq!(
        limited.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "even the right password waits"
    );
    assert!(limited.headers().contains_key(header::RETRY_AFTER));
}

async fn signup_follows_config(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let body = json!({"email": "new@example.com", "password": "long-enough-1"});
    let refused = app
        .client
        .post(app.url("/api/v1/auth/signup"))
        .json(&body)
        .send()
        .await
        .expect("signup");
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);

    let database = TestDatabase::create(backend).await;
    let mut open = settings(&database);
    open.allow_signup = true;
    let app = TestApp::spawn_with(open).await;
    let created = app
        .client
        .post(app.url("/api/v1/auth/signup"))
        .json(&body)
        .send()
        .await
        .expect("signup");
    assert_eq!(created.status(), StatusCode::CREATED);
    let again = app
        .client
        .post(app.url("/api/v1/auth/signup"))
        .json(&body)
        .send()
        .await
        .expect("signup");
    assert_eq!(again.status(), StatusCode::CONFLICT);
    let (status, error) = json_of(
        app.client
            .post(app.url("/api/v1/auth/signup"))
            .json(&json!({"email": "not-an-email", "password": "short"}))
            .send()
            .await
            .expect("signup"),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let fields = field_names(&error);
    assert_eq!(fields, ["email", "password"]);
}
