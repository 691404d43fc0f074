use reqwest::{Method, StatusCode};

use crate::helpers::{Backend, TestApp, TestDatabase};

/// The OpenAPI document lists exactly the routes the server answers.
#[tokio::test]
async fn the_openapi_document_matches_the_routes() {
    let database = TestDatabase::create(Backend::Sqlite).await;
    let app = TestApp::spawn(&database).await;
    let document = app.openapi_document().await;
    assert!(document["openapi"]
        .as_str()
        .expect("version")
        .starts_with("3."));

    let mut operations = Vec::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("item").keys() {
            operations.push(format!("{} {path}", method.to_uppercase()));
        }
    }
    operations.sort();
    assert_eq!(
        operations,
        [
            "DELETE /api/v1/budgets/{id}",
            "DELETE /api/v1/training-files/{id}",
            "GET /api/v1/agent/attempts/{id}/training-file",
            "GET /api/v1/agent/attempts/{id}/validation-file",
            "GET /api/v1/agent/checkpoints/{id}/archive",
            "GET /api/v1/agent/validations/{id}/artifacts/{artifact_id}",
            "GET /api/v1/agent/validations/{id}/files/{file_id}",
            "GET /api/v1/agents",
            "GET /api/v1/agents/{id}/telemetry",
            "GET /api/v1/artifacts/{id}/content",
            "GET /api/v1/artifacts/{id}/download",
            "GET /api/v1/auth/me",
            "GET /api/v1/budget-increase-requests",
            "GET /api/v1/budgets",
            "GET /api/v1/budgets/{id}",
            "GET /api/v1/cost-tracking/summary",
            "GET /api/v1/cost-tracking/trends",
            "GET /api/v1/jobs",
            "GET /api/v1/jobs/{id}",
            "GET /api/v1/jobs/{id}/artifacts",
            "GET /api/v1/jobs/{id}/attempts",
            "GET /api/v1/jobs/{id}/checkpoints",
            "GET /api/v1/jobs/{id}/cost",
            "GET /api/v1/jobs/{id}/events",
            "GET /api/v1/jobs/{id}/metrics",
            "GET /api/v1/jobs/{id}/metrics/latest",
            "GET /api/v1/jobs/{id}/stream",
            "GET /api/v1/presets",
            "GET /api/v1/templates",
            "GET /api/v1/training-files",
            "GET /api/v1/training-files/{id}",
            "GET /api/v1/training-files/{id}/conversations",
            "GET /api/v1/validation/runs/{id}",
            "GET /api/v1/validation/{job_id}",
            "GET /healthz",
            "GET /metrics",
            "POST /api/v1/agent/attempts/{id}/finish",
            "POST /api/v1/agent/attempts/{id}/reports",
            "POST /api/v1/agent/claim",
            "POST /api/v1/agent/heartbeat",
            "POST /api/v1/agent/validations/{id}/finish",
            "POST /api/v1/agent/validations/{id}/progress",
            "POST /api/v1/agents/register",
            "POST /api/v1/auth/login",
            "POST /api/v1/auth/logout",
            "POST /api/v1/auth/signup",
            "POST /api/v1/budget-increase-requests/{id}/approve",
            "POST /api/v1/budget-increase-requests/{id}/deny",
            "POST /api/v1/budgets",
            "POST /api/v1/budgets/{id}/increase-requests",
            "POST /api/v1/jobs",
            "POST /api/v1/jobs/estimate",
            "POST /api/v1/jobs/{id}/cancel",
            "POST /api/v1/jobs/{id}/resume",
            "POST /api/v1/jobs/{id}/start",
            "POST /api/v1/presets",
            "POST /api/v1/templates",
            "POST /api/v1/templates/{id}/use",
            "POST /api/v1/training-files",
            "POST /api/v1/validation/runs/{id}/export",
            "POST /api/v1/validation/{job_id}/run",
            "PUT /api/v1/agent/attempts/{id}/artifacts",
            "PUT /api/v1/auth/me/default-attribution",
            "PUT /api/v1/budgets/{id}",
            "PUT /api/v1/jobs/{id}/configure",
        ]
    );
    // Each documented operation is routed: the router's own 404 has an empty body, and a
    // documented path answering 405 would mean a method mismatch.
    for operation in &operations {
        let (method, path) = operation.split_once(' ').expect("method and path");
        let url = app.url(&path.replace("{id}", "00000000-0000-4000-8000-00000000abcd"));
        let response = app
            .client
            .request(Method::from_bytes(method.as_bytes()).expect("method"), url)
            .send()
            .await
            .expect("request");
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{operation}");
        assert!(
            !(status == StatusCode::NOT_FOUND && body.is_empty()),
            "{operation} is not routed"
        );
    }
    let undocumented = app
        .client
        .get(app.url("/api/v1/not-a-route"))
        .send()
        .await
        .expect("request");
    assert_eq!(undocumented.status(), StatusCode::NOT_FOUND);

    let schemas = document["components"]["schemas"]
        .as_object()
        .expect("schemas");
    for name in [
        "JobView",
        "TrainingFile",
        "ErrorBody",
        "Preset",
        "JobStatus",
    ] {
        assert!(schemas.contains_key(name), "schema {name} is documented");
    }
}
