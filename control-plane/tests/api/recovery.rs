//! The agent protocol's failure paths, driven as an agent would: out-of-memory retries
//! with half the micro-batch, then with gradient checkpointing, dataset errors failing at
//! once, an operator's resume, a
//! silent agent's job going back to the queue, idempotent reports, verified uploads and
//! signed download links.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::Digest;

use crate::helpers::{agent_heartbeat, json_of, poll, settings, Backend, TestApp, TestDatabase};
use control_plane::domain::Role;
use testkit::on_both_backends;

on_both_backends!(
    an_attempt_the_agent_stops_naming_is_ended,
    out_of_memory_is_retried_with_half_the_micro_batch_then_checkpointing,
    dataset_errors_fail_at_once_and_operators_resume,
    a_silent_agents_job_goes_back_to_the_queue,
    reports_and_uploads_are_idempotent_and_verified
);

/// A user with a queued job, and an enrolled agent's secret.
async fn queued_job_and_agent(app: &TestApp) -> (crate::helpers::User, String, String) {
    let user = app.user("ada@example.com", Role::User).await;
    let job = app.queued_job(&user).await;
    let secret = app.enroll_agent("host").await;
    (user, job, secret)
}

/// The job came back to the queue as an interruption: its first attempt was lost.
async fn assert_first_attempt_lost(
    app: &TestApp,
    user: &crate::helpers::User,
    job: &str,
    view: &Value,
) {
    assert_eq!(view["interruption_count"], 1);
    let (_, attempts) = json_of(app.get(user, &format!("/api/v1/jobs/{job}/attempts")).await).await;
    assert_eq!(attempts["data"][0]["status"], "lost");
}

/// Claims the next job as the agent holding `secret`; returns the assignment.
async fn claim(app: &TestApp, secret: &str) -> Value {
    let (status, assignment) = app.claim_now(secret).await;
    assert_eq!(status, StatusCode::OK, "{assignment}");
    assignment
}

fn metric(step: u64) -> Value {
    json!({"kind": "metric", "key": format!("step-{step}"), "metric": {
        "step": step, "total_steps": 10, "epoch": 0.5, "training_loss": 1.5, "validation_loss": null,
        "learning_rate": 0.0002, "grad_norm": 0.9, "tokens_per_second": 1000.0, "gpu_utilization": 80,
        "memory_used_gb": 10.5, "elapsed_seconds": step as f64, "recorded_at": "2026-11-28T10:00:00Z"}})
}

async fn finish(app: &TestApp, secret: &str, attempt: &Value, outcome: Value) -> Value {
    let path = format!("/attempts/{}/finish", attempt.as_str().expect("attempt id"));
    let (status, reply) = app.agent_call(secret, Method::POST, &path, outcome).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    reply
}

async fn out_of_memory_is_retried_with_half_the_micro_batch_then_checkpointing(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let (user, job, secret) = queued_job_and_agent(&app).await;
    let first = claim(&app, &secret).await;
    let batch = first["hyperparameters"]["batch_size"]
        .as_u64()
        .expect("batch");
    let accumulation = first["hyperparameters"]["gradient_accumulation_steps"]
        .as_u64()
        .expect("accumulation");
    let reply = finish(
        &app,
        &secret,
        &first["attempt_id"],
        json!({"outcome": "failed", "kind": "out_of_memory", "message": "CUDA out of memory"}),
    )
    .await;
    assert_eq!(reply["job_status"], "queued");
    let second = claim(&app, &secret).await;
    assert_eq!(second["job_id"], job.as_str());
    assert_eq!(second["attempt_number"], 2);
    assert_eq!(second["hyperparameters"]["batch_size"], batch / 2);
    assert_eq!(
        second["hyperparameters"]["gradient_accumulation_steps"],
        accumulation * 2
    );
    let (_, view) = json_of(app.get(&user, &format!("/api/v1/jobs/{job}")).await).await;
    assert_eq!(view["retry_count"], 1);
    assert_eq!(view["interruption_count"], 0);

    // Down to micro-batch 1, the next retry computes activations again in the backward;
    // out of memory even so, the job fails saying why.
    let mut attempt = second;
    while attempt["hyperparameters"]["batch_size"] != 1 {
        let oom =
            json!({"outcome": "failed", "kind": "out_of_memory", "message": "CUDA out of memory"});
        finish(&app, &secret, &attempt["attempt_id"], oom).await;
        attempt = claim(&app, &secret).await;
    }
    assert_eq!(
        attempt["hyperparameters"]["gradient_checkpointing"],
        Value::Null
    );
    let oom =
        json!({"outcome": "failed", "kind": "out_of_memory", "message": "CUDA out of memory"});
    let reply = finish(&app, &secret, &attempt["attempt_id"], oom.clone()).await;
    assert_eq!(reply["job_status"], "queued");
    let checkpointing = claim(&app, &secret).await;
    assert_eq!(checkpointing["hyperparameters"]["batch_size"], 1);
    assert_eq!(
        checkpointing["hyperparameters"]["gradient_checkpointing"],
        true
    );
    let reply = finish(&app, &secret, &checkpointing["attempt_id"], oom).await;
    assert_eq!(reply["job_status"], "failed");
    let (_, view) = json_of(app.get(&user, &format!("/api/v1/jobs/{job}")).await).await;
    assert_eq!(view["error_message"], "CUDA out of memory");
    let (_, events) = json_of(app.get(&user, &format!("/api/v1/jobs/{job}/events")).await).await;
    let messages: Vec<&str> = events["data"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|event| event["message"].as_str())
        .collect();
    assert!(
        messages
            .iter()
            .any(|m| m.contains("retrying with gradient checkpointing")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("out of memory at micro-batch 1 with gradient checkpointing")),
        "{messages:?}"
    );
}

async fn dataset_errors_fail_at_once_and_operators_resume(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let (user, job, secret) = queued_job_and_agent(&app).await;
    let assignment = claim(&app, &secret).await;
    let reply = finish(
        &app,
        &secret,
        &assignment["attempt_id"],
        json!({"outcome": "failed", "kind": "dataset", "message": "line 3: no assistant message"}),
    )
    .await;
    assert_eq!(reply["job_status"], "failed");
    let (_, view) = json_of(app.get(&user, &format!("/api/v1/jobs/{job}")).await).await;
    assert_eq!(view["error_message"], "line 3: no assistant message");
    assert_eq!(view["retry_count"], 0, "a dataset error is not retried");

    // A queued job cannot be resumed; a failed one can, by its owner.
    let resumed = app
        .post(&user, &format!("/api/v1/jobs/{job}/resume"), json!({}))
        .await;
    let (status, view) = json_of(resumed).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["status"], "queued");
    let again = app
        .post(&user, &format!("/api/v1/jobs/{job}/resume"), json!({}))
        .await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
    let other = app.user("eve@example.com", Role::User).await;
    assert_eq!(
        app.post(&other, &format!("/api/v1/jobs/{job}/resume"), json!({}))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    let next = claim(&app, &secret).await;
    assert_eq!(next["job_id"], job.as_str());
}

async fn a_silent_agents_job_goes_back_to_the_queue(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let mut config = settings(&database);
    config.fleet.heartbeat_interval_seconds = 1;
    config.fleet.offline_after_seconds = 1;
    let app = TestApp::spawn_with(config).await;
    let (user, job, secret) = queued_job_and_agent(&app).await;
    claim(&app, &secret).await;
    // No more heartbeats: the sweeper ends the attempt as lost and requeues the job.
    let view = poll(
        "requeued after the agent went silent",
        std::time::Duration::from_secs(20),
        || async {
            let (_, view) = json_of(app.get(&user, &format!("/api/v1/jobs/{job}")).await).await;
            (view["status"] == "queued").then_some(view)
        },
    )
    .await;
    assert_first_attempt_lost(&app, &user, &job, &view).await;
    let operator = app.user("ops@example.com", Role::Operator).await;
    let (_, fleet) = json_of(app.get(&operator, "/api/v1/agents").await).await;
    assert_eq!(fleet["data"][0]["status"], "offline");
}

async fn reports_and_uploads_are_idempotent_and_verified(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let (user, job, secret) = queued_job_and_agent(&app).await;
    let assignment = claim(&app, &secret).await;
    let attempt = assignment["attempt_id"].as_str().expect("attempt");
    let batch = json!({"reports": [
        {"kind": "stage", "key": "stage-training", "stage": "training", "at": "2026-11-28T10:00:00Z"},
        metric(1), metric(2),
        {"kind": "event", "key": "warning-1", "event_type": "warning", "severity": "warning",
         "message": "3 conversations were cut", "details": null, "at": "2026-11-28T10:00:01Z"},
    ]});
    let path = format!("/attempts/{attempt}/reports");
    let (status, reply) = app
        .agent_call(&secret, Method::POST, &path, batch.clone())
        .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["accepted"], 4);
    assert_eq!(reply["stop_attempt"], false);
    // The same batch again (a lost reply, a restarted agent): nothing new is stored.
    let (_, reply) = app.agent_call(&secret, Method::POST, &path, batch).await;
    assert_eq!(reply["accepted"], 0);
    // A batch overlapping the stored steps, with one step twice: only step 3 is new, once.
    let overlapping = json!({"reports": [metric(2), metric(3), metric(3)]});
    let (_, reply) = app
        .agent_call(&secret, Method::POST, &path, overlapping)
        .await;
    assert_eq!(reply["accepted"], 1, "{reply}");
    let (_, points) = json_of(app.get(&user, &format!("/api/v1/jobs/{job}/metrics")).await).await;
    let steps: Vec<i64> = points["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|p| p["step"].as_i64())
        .collect();
    assert_eq!(steps, [1, 2, 3], "{points}");
    let (_, view) = json_of(app.get(&user, &format!("/api/v1/jobs/{job}")).await).await;
    assert_eq!(view["status"], "training");
    assert_eq!(view["current_step"], 3);
    assert_eq!(view["progress_percentage"], 30);
    assert_eq!(view["current_metrics"]["gpu_utilization"], 80);
    // The attempt's last step follows its reports.
    let (_, attempts) = json_of(
        app.get(&user, &format!("/api/v1/jobs/{job}/attempts"))
            .await,
    )
    .await;
    assert_eq!(attempts["data"][0]["last_step"], 3, "{attempts}");
    let (_, events) = json_of(
        app.get(
            &user,
            &format!("/api/v1/jobs/{job}/events?event_type=warning"),
        )
        .await,
    )
    .await;
    assert_eq!(events["count"], 1);

    // An upload whose bytes do not match its SHA-256 is refused and leaves nothing.
    let bytes = b"adapter bytes".to_vec();
    let good = hex::encode(sha2::Sha256::digest(&bytes));
    let upload = |sha: String| {
        app.client
            .put(app.url(&format!(
                "/api/v1/agent/attempts/{attempt}/artifacts?kind=adapter_weights&name=adapter_model.safetensors&sha256={sha}"
            )))
            .bearer_auth(&secret)
            .body(bytes.clone())
            .send()
    };
    let bad = upload("0".repeat(64)).await.expect("upload");
    assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let (_, listed) = json_of(
        app.get(&user, &format!("/api/v1/jobs/{job}/artifacts"))
            .await,
    )
    .await;
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(0));
    assert_eq!(
        upload(good.clone()).await.expect("upload").status(),
        StatusCode::CREATED
    );
    assert_eq!(
        upload(good.clone()).await.expect("upload").status(),
        StatusCode::CREATED
    );
    let (_, listed) = json_of(
        app.get(&user, &format!("/api/v1/jobs/{job}/artifacts"))
            .await,
    )
    .await;
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed["data"][0]["checksum"], good.as_str());
    assert_eq!(listed["data"][0]["file_size"], bytes.len());
    let artifact = listed["data"][0]["id"].as_str().expect("id").to_owned();

    // Signed links: the owner gets one, it serves the bytes, a tampered one is refused.
    let (status, link) = json_of(
        app.get(&user, &format!("/api/v1/artifacts/{artifact}/download"))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let url = link["download_url"].as_str().expect("url").to_owned();
    let served = app.client.get(&url).send().await.expect("download");
    assert_eq!(served.status(), StatusCode::OK);
    assert_eq!(served.bytes().await.expect("bytes").to_vec(), bytes);
    let tampered = url.replace("signature=", "signature=0");
    assert_eq!(
        app.client
            .get(&tampered)
            .send()
            .await
            .expect("download")
            .status(),
        StatusCode::FORBIDDEN
    );
    let expired = app
        .client
        .get(app.url(&format!(
            "/api/v1/artifacts/{artifact}/content?expires=1&signature={}",
            control_plane::auth::sign("wrong key", "x")
        )))
        .send()
        .await
        .expect("download");
    assert_eq!(expired.status(), StatusCode::FORBIDDEN);
    let other = app.user("eve@example.com", Role::User).await;
    assert_eq!(
        app.get(&other, &format!("/api/v1/artifacts/{artifact}/download"))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    let (_, listed) = json_of(
        app.get(&user, &format!("/api/v1/jobs/{job}/artifacts"))
            .await,
    )
    .await;
    assert_eq!(listed["data"][0]["download_count"], 1);

    // An attempt that ends keeps the step it reached.
    finish(
        &app,
        &secret,
        &assignment["attempt_id"],
        json!({"outcome": "failed", "kind": "dataset", "message": "line 3: no assistant message"}),
    )
    .await;
    let (_, attempts) = json_of(
        app.get(&user, &format!("/api/v1/jobs/{job}/attempts"))
            .await,
    )
    .await;
    assert_eq!(attempts["data"][0]["status"], "failed", "{attempts}");
    assert_eq!(attempts["data"][0]["last_step"], 3, "{attempts}");
}

async fn an_attempt_the_agent_stops_naming_is_ended(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let mut config = settings(&database);
    config.fleet.offline_after_seconds = 1;
    let app = TestApp::spawn_with(config).await;
    let (user, job, secret) = queued_job_and_agent(&app).await;
    claim(&app, &secret).await;
    // The agent stays alive but its heartbeats name no attempt (it lost its state).
    let view = poll(
        "requeued once the agent stopped naming its attempt",
        std::time::Duration::from_secs(20),
        || async {
            app.agent_call(&secret, Method::POST, "/heartbeat", agent_heartbeat())
                .await;
            let (_, view) = json_of(app.get(&user, &format!("/api/v1/jobs/{job}")).await).await;
            (view["status"] == "queued").then_some(view)
        },
    )
    .await;
    assert_first_attempt_lost(&app, &user, &job, &view).await;
}
