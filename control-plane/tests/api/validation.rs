//! Validation runs in the agent protocol: claimed as work of the kind `validation` with
//! the files to fetch, queued again when their agent goes silent, failed with the agent's
//! message on bad input.

use reqwest::{Method, StatusCode};
use serde_json::json;
use sha2::Digest;
use testkit::on_both_backends;

use crate::helpers::{json_of, poll, settings, Backend, TestApp, TestDatabase};
use control_plane::domain::Role;

on_both_backends!(a_lost_agents_validation_is_queued_again_and_bad_input_fails_it);

async fn a_lost_agents_validation_is_queued_again_and_bad_input_fails_it(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let mut config = settings(&database);
    config.fleet.heartbeat_interval_seconds = 1;
    config.fleet.offline_after_seconds = 2;
    let app = TestApp::spawn_with(config).await;
    let ada = app.user("ada@example.com", Role::User).await;
    let job = app.queued_job(&ada).await;
    let secret = app.enroll_agent("host").await;

    // Training ends with an adapter: the job is completed.
    let (_, work) = app.claim_now(&secret).await;
    assert_eq!(work["work"], "training", "{work}");
    let attempt = work["attempt_id"].as_str().expect("attempt");
    let bytes = b"adapter weights".to_vec();
    let sha = hex::encode(sha2::Sha256::digest(&bytes));
    let upload = app
        .client
        .put(app.url(&format!(
            "/api/v1/agent/attempts/{attempt}/artifacts?kind=adapter_weights&name=adapter_model.safetensors&sha256={sha}"
        )))
        .bearer_auth(&secret)
        .body(bytes)
        .send()
        .await
        .expect("upload");
    assert_eq!(upload.status(), StatusCode::CREATED);
    let stage = json!({"reports": [{"kind": "stage", "key": "stage-training", "stage": "training",
                                     "at": "2026-12-04T10:00:00Z"}]});
    let path = format!("/attempts/{attempt}/reports");
    let (status, reply) = app.agent_call(&secret, Method::POST, &path, stage).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let (status, finished) = app
        .agent_call(
            &secret,
            Method::POST,
            &format!("/attempts/{attempt}/finish"),
            json!({"outcome": "succeeded", "summary": {}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{finished}");

    let (status, accepted) = json_of(
        app.post(
            &ada,
            &format!("/api/v1/validation/{job}/run"),
            json!({"test_suites": ["perplexity"]}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let id = accepted["validation_id"]
        .as_str()
        .expect("validation id")
        .to_owned();

    // Claimed as validation work, with the adapter and the training file's split.
    let (_, work) = app.claim_now(&secret).await;
    assert_eq!(work["work"], "validation", "{work}");
    assert_eq!(work["validation_id"], id.as_str());
    assert_eq!(
        work["adapter"]["files"][0]["name"],
        "adapter_model.safetensors"
    );
    assert_eq!(work["adapter"]["files"][0]["sha256"], sha.as_str());
    assert_eq!(work["split"]["fraction"], 0.1);
    let data = work["data"]["download_path"].as_str().expect("data path");
    let fetched = app
        .client
        .get(app.url(&format!("/api/v1{data}")))
        .bearer_auth(&secret)
        .send()
        .await
        .expect("data");
    assert_eq!(fetched.status(), StatusCode::OK);
    // Another user sees none of it.
    let bob = app.user("bob@example.com", Role::User).await;
    assert_eq!(
        app.get(&bob, &format!("/api/v1/validation/runs/{id}"))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );

    // The agent goes silent: the run is queued again.
    let run = poll(
        "the lost run to be queued again",
        std::time::Duration::from_secs(20),
        || async {
            let (_, run) = json_of(
                app.get(&ada, &format!("/api/v1/validation/runs/{id}"))
                    .await,
            )
            .await;
            (run["status"] == "queued").then_some(run)
        },
    )
    .await;
    assert_eq!(run["claim_count"], 1);
    assert!(run["agent_id"].is_null());

    // Claimed again; the agent reports bad input: the run fails with its message.
    let (_, work) = app.claim_now(&secret).await;
    assert_eq!(work["validation_id"], id.as_str(), "{work}");
    let (status, _) = app
        .agent_call(
            &secret,
            Method::POST,
            &format!("/validations/{id}/progress"),
            json!({"suite": "perplexity", "message": "scoring", "done": 1, "total": 2}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app
        .agent_call(&secret, Method::POST, &format!("/validations/{id}/finish"),
                    json!({"outcome": "failed", "kind": "dataset", "message": "held-out.jsonl: line 3: not JSON"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, run) = json_of(
        app.get(&ada, &format!("/api/v1/validation/runs/{id}"))
            .await,
    )
    .await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["error_message"], "held-out.jsonl: line 3: not JSON");
    assert_eq!(run["claim_count"], 2);
    let (_, events) = json_of(
        app.get(&ada, &format!("/api/v1/jobs/{job}/events?limit=50"))
            .await,
    )
    .await;
    let messages = events.to_string();
    assert!(messages.contains("Validation queued again"), "{messages}");
    assert!(
        messages.contains("Validation failed: held-out.jsonl: line 3"),
        "{messages}"
    );
}
