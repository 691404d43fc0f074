//! Every error the API answers is its JSON error: unknown routes, wrong methods, malformed
//! path ids, bodies that are not JSON or not multipart. The dashboard answers its page.

use control_plane::domain::Role;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{Backend, TestApp, TestDatabase};

/// (method, path, body, content type, status, error code)
type Case = (
    Method,
    &'static str,
    Option<reqwest::Body>,
    Option<&'static str>,
    StatusCode,
    &'static str,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_the_json_error() {
    let database = TestDatabase::create(Backend::Sqlite).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let cases: Vec<Case> = vec![
        (
            Method::GET,
            "/api/v1/no-such-thing",
            None,
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::DELETE,
            "/api/v1/jobs",
            None,
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            Method::GET,
            "/api/v1/jobs/not-a-uuid",
            None,
            None,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Method::POST,
            "/api/v1/auth/login",
            Some("{".into()),
            Some("application/json"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Method::POST,
            "/api/v1/auth/login",
            Some(json!({"email": 1}).to_string().into()),
            Some("application/json"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "rule_violated",
        ),
        (
            Method::POST,
            "/api/v1/auth/signup",
            Some("not json".into()),
            Some("text/plain"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Method::POST,
            "/api/v1/training-files",
            Some(json!({"file": "x"}).to_string().into()),
            Some("application/json"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
    ];
    for (method, path, body, content_type, status, code) in cases {
        let mut request = app
            .client
            .request(method.clone(), app.url(path))
            .bearer_auth(&user.token);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request.send().await.expect("request");
        assert_eq!(response.status(), status, "{method} {path}");
        let body: serde_json::Value = response
            .json()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON: {e}"));
        assert_eq!(body["error"]["code"], code, "{method} {path}: {body}");
        assert!(body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    // An unknown page of the dashboard is its own not-found page.
    let page = app
        .client
        .get(app.url("/no-such-page"))
        .send()
        .await
        .expect("page");
    assert_eq!(page.status(), StatusCode::NOT_FOUND);
    assert!(page
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html")));
}

/// PostgreSQL cannot store NUL in text: a field carrying one is the request's fault (400),
/// not a server error, and nothing is stored.
#[tokio::test]
async fn postgres_refuses_text_with_nul_as_a_bad_request() {
    let database = TestDatabase::create(Backend::Postgres).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let response = app
        .post(&user, "/api/v1/templates", json!({"name": "tone\u{0}v2"}))
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "bad_request");
    assert!(body["error"]["message"]
        .as_str()
        .expect("message")
        .contains("NUL"));
    let (_, templates) = crate::helpers::json_of(app.get(&user, "/api/v1/templates").await).await;
    assert_eq!(templates["data"], json!([]));
}
