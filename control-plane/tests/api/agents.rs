use chrono::Duration;
use control_plane::auth::{new_token, token_hash};
use control_plane::db::{now, users};
use control_plane::domain::Role;
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{agent_heartbeat, json_of, Backend, TestApp, TestDatabase};
use testkit::on_both_backends;

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

on_both_backends!(
    jobs_go_only_to_agents_with_their_labels,
    concurrent_claims_assign_each_job_exactly_once,
    the_agent_protocol_needs_the_agent_secret
);

async fn concurrent_claims_assign_each_job_exactly_once(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let mut jobs = Vec::new();
    for _ in 0..3 {
        jobs.push(app.queued_job(&user).await);
    }
    let mut secrets = Vec::new();
    for i in 0..8 {
        secrets.push(app.enroll_agent(&format!("host-{i}")).await);
    }
    let claims = secrets.iter().map(|secret| {
        app.client
            .post(app.url("/api/v1/agent/claim"))
            .bearer_auth(secret)
            .json(&json!({"wait_seconds": 0, "heartbeat": agent_heartbeat()}))
            .send()
    });
    let mut assigned = Vec::new();
    for response in futures::future::join_all(claims).await {
        let response = response.expect("claim");
        match response.status() {
            StatusCode::OK => {
                let assignment: serde_json::Value = response.json().await.expect("assignment");
                assigned.push(assignment["job_id"].as_str().expect("job id").to_owned());
            }
            StatusCode::NO_CONTENT => {}
            other => panic!("claim answered {other}"),
        }
    }
    assigned.sort();
    jobs.sort();
    assert_eq!(assigned, jobs, "each queued job to exactly one agent");
    for job in &jobs {
        let (_, view) = json_of(app.get(&user, &format!("/api/v1/jobs/{job}")).await).await;
        assert_eq!(view["status"], "provisioning");
        let (_, attempts) = json_of(
            app.get(&user, &format!("/api/v1/jobs/{job}/attempts"))
                .await,
        )
        .await;
        assert_eq!(attempts["data"].as_array().map(Vec::len), Some(1));
    }
}

async fn the_agent_protocol_needs_the_agent_secret(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    // A user's token is not an agent's secret.
    let response = app
        .client
        .post(app.url("/api/v1/agent/heartbeat"))
        .bearer_auth(&user.token)
        .json(&agent_heartbeat())
        .send()
        .await
        .expect("heartbeat");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let secret = app.enroll_agent("host").await;
    let response = app
        .client
        .post(app.url("/api/v1/agent/heartbeat"))
        .bearer_auth(&secret)
        .json(&agent_heartbeat())
        .send()
        .await
        .expect("heartbeat");
    let (status, reply) = json_of(response).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(reply["stop_attempt"], false);
    // Operators see the latest telemetry and its history.
    let operator = app.user("ops@example.com", Role::Operator).await;
    let (_, fleet) = json_of(app.get(&operator, "/api/v1/agents").await).await;
    assert_eq!(fleet["data"][0]["host"]["memory_total_mb"], 64000);
    let agent_id = fleet["data"][0]["id"]
        .as_str()
        .expect("agent id")
        .to_owned();
    let (status, history) = json_of(
        app.get(&operator, &format!("/api/v1/agents/{agent_id}/telemetry"))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(history["data"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        app.get(&user, &format!("/api/v1/agents/{agent_id}/telemetry"))
            .await
            .status(),
        StatusCode::FORBIDDEN
    );
    // Nothing queued: the claim waits, then answers 204.
    let response = app
        .client
        .post(app.url("/api/v1/agent/claim"))
        .bearer_auth(&secret)
        .json(&json!({"wait_seconds": 1, "heartbeat": agent_heartbeat()}))
        .send()
        .await
        .expect("claim");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    // Report batches know the agent from memory once seen; other secrets are still refused.
    let report = |bearer: String| {
        app.client
            .post(app.url(&format!(
                "/api/v1/agent/attempts/{}/reports",
                uuid::Uuid::new_v4()
            )))
            .bearer_auth(bearer)
            .json(&json!({"reports": []}))
            .send()
    };
    for (bearer, expected) in [
        (secret.clone(), StatusCode::NOT_FOUND),
        (secret.clone(), StatusCode::NOT_FOUND),
        (user.token.clone(), StatusCode::UNAUTHORIZED),
        (format!("{secret}x"), StatusCode::UNAUTHORIZED),
    ] {
        assert_eq!(report(bearer).await.expect("report").status(), expected);
    }
    // Another agent's attempt is not found.
    let response = app
        .client
        .get(app.url(&format!(
            "/api/v1/agent/attempts/{}/training-file",
            uuid::Uuid::new_v4()
        )))
        .bearer_auth(&secret)
        .send()
        .await
        .expect("file");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

async fn jobs_go_only_to_agents_with_their_labels(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let (_, job) = app.draft_job(&user).await;
    let id = job["id"].as_str().expect("id");
    let configure = app
        .put(
            &user,
            &format!("/api/v1/jobs/{id}/configure"),
            json!({"gpu_type": "ondemand", "gpu_model": "H100-80GB", "required_labels": {"zone": "eu-1"}}),
        )
        .await;
    let (status, view) = json_of(configure).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["required_labels"]["zone"], "eu-1");
    app.post(&user, &format!("/api/v1/jobs/{id}/start"), json!({}))
        .await;
    let secret = app.enroll_agent("host").await;
    let claim = |beat: serde_json::Value| {
        app.agent_call(
            &secret,
            reqwest::Method::POST,
            "/claim",
            json!({"wait_seconds": 0, "heartbeat": beat}),
        )
    };
    let (status, _) = claim(agent_heartbeat()).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "no label, no job");
    let mut spot_in_zone = agent_heartbeat();
    spot_in_zone["labels"] = json!({"zone": "eu-1"});
    spot_in_zone["capacity"] = json!("spot");
    let (status, _) = claim(spot_in_zone.clone()).await;
    assert_eq!(
        status,
        StatusCode::NO_CONTENT,
        "an on-demand job stays off spot hosts"
    );
    spot_in_zone["capacity"] = json!("ondemand");
    let (status, assignment) = claim(spot_in_zone).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(assignment["job_id"], id);
}
