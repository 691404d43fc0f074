use control_plane::domain::Role;
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{Backend, TestApp, TestDatabase};
use testkit::on_both_backends;

on_both_backends!(health_and_prometheus_metrics);

async fn health_and_prometheus_metrics(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let health: Value = app
        .client
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("healthz")
        .json()
        .await
        .expect("json");
    let expected = if backend == Backend::Sqlite {
        "sqlite"
    } else {
        "postgres"
    };
    assert_eq!(
        (health["status"].as_str(), health["database"].as_str()),
        (Some("ok"), Some(expected))
    );

    let user = app.user("ada@example.com", Role::User).await;
    app.draft_job(&user).await;
    let response = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"]
        .to_str()
        .expect("type")
        .starts_with("text/plain"));
    let text = response.text().await.expect("text");
    assert!(
        text.contains(r#"http_requests_total{method="POST",route="/api/v1/jobs",status="201"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"lora_jobs{status="draft"} 1"#), "{text}");
    assert!(
        text.contains(r#"lora_training_files{status="completed"} 1"#),
        "{text}"
    );
    assert!(!text.contains(&user.token), "no secrets in metrics");
}
