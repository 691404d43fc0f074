use chrono::Duration;
use control_plane::auth::{new_token, token_hash};
use control_plane::db::{now, users};
use control_plane::domain::Role;
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{json_of, Backend, TestApp, TestDatabase};
use crate::on_both_backends;

on_both_backends!(agents_enroll_with_a_live_token_and_operators_see_them);

async fn agents_enroll_with_a_live_token_and_operators_see_them(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let token = new_token("lce_");
    users::create_enrollment_token(&app.db, &token_hash(&token), now() + Duration::hours(1))
        .await
        .expect("token");
    let expired = new_token("lce_");
    users::create_enrollment_token(&app.db, &token_hash(&expired), now() - Duration::seconds(1))
        .await
        .expect("token");

    let register = |enrollment_token: String| {
        app.client
            .post(app.url("/api/v1/agents/register"))
            .json(&json!({
                "enrollment_token": enrollment_token,
                "name": "gpu-host-1",
                "labels": {"zone": "eu-west-1a", "spot": "true"},
                "gpus": [{"name": "NVIDIA H100 80GB HBM3", "memory_total_mb": 81559}]
            }))
            .send()
    };
    let (status, registered) = json_of(register(token.clone()).await.expect("register")).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(registered["agent_secret"]
        .as_str()
        .expect("secret")
        .starts_with("lca_"));
    assert_eq!(
        register(expired).await.expect("register").status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        register("lce_unknown".into())
            .await
            .expect("register")
            .status(),
        StatusCode::UNAUTHORIZED
    );

    let user = app.user("ada@example.com", Role::User).await;
    assert_eq!(
        app.get(&user, "/api/v1/agents").await.status(),
        StatusCode::FORBIDDEN
    );
    let operator = app.user("ops@example.com", Role::Operator).await;
    let (status, fleet) = json_of(app.get(&operator, "/api/v1/agents").await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fleet["data"][0]["name"], "gpu-host-1");
    assert_eq!(fleet["data"][0]["labels"]["zone"], "eu-west-1a");
    assert!(fleet["data"][0].get("secret_hash").is_none());
}
