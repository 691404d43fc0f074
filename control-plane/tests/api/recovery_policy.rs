//! Recovery policy set by users: checked field by field, stored, shown and carried by
//! templates; an interruption with automatic resume off, or with its budget spent,
//! leaves the job `interrupted` until someone resumes it. Status changes the control
//! plane attempts against the state machine are refused, logged and counted.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{field_names, json_of, Backend, TestApp, TestDatabase, User};
use control_plane::db::jobs::{self, Change, NewAttempt};
use control_plane::domain::{GpuType, JobStatus, Role};
use control_plane::service::transition::{change_status, Origin};
use control_plane::service::ServiceError;
use testkit::on_both_backends;

on_both_backends!(
    a_bad_policy_names_every_field_and_changes_nothing,
    every_bad_configure_field_is_named_whatever_else_is_valid,
    an_unreadable_label_requirement_fits_no_host,
    the_policy_is_stored_shown_and_carried_by_templates,
    auto_resume_off_leaves_the_job_interrupted,
    a_spent_interruption_budget_leaves_the_job_interrupted,
    an_interruption_within_the_budget_resumes_on_its_own,
    illegal_changes_by_the_control_plane_are_refused_and_logged
);

const H100_SPOT: (&str, &str) = ("spot", "H100-80GB");

fn configuration(recovery: Value) -> Value {
    json!({"gpu_type": H100_SPOT.0, "gpu_model": H100_SPOT.1, "recovery": recovery})
}

async fn view(app: &TestApp, user: &User, job: &str) -> Value {
    json_of(app.get(user, &format!("/api/v1/jobs/{job}")).await)
        .await
        .1
}

async fn messages(app: &TestApp, user: &User, job: &str) -> Vec<String> {
    let (_, events) = json_of(
        app.get(user, &format!("/api/v1/jobs/{job}/events?limit=500"))
            .await,
    )
    .await;
    events["data"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e["message"].as_str().map(str::to_owned))
        .collect()
}

async fn every_bad_configure_field_is_named_whatever_else_is_valid(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let (_, job) = app.draft_job(&user).await;
    let id = job["id"].as_str().expect("id");
    let path = format!("/api/v1/jobs/{id}/configure");
    let configure = |body: Value| app.put(&user, &path, body);

    let (status, error) = json_of(
        configure(json!({"gpu_type": "cheap", "gpu_model": "TPU-1",
            "required_labels": {"zone": 5, "rack": "r1", "tier": null},
            "hyperparameters": {"rank": 0}, "recovery": {"max_retries": 99}}))
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    let mut fields = field_names(&error);
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "gpu_model",
            "gpu_type",
            "hyperparameters.rank",
            "recovery.max_retries",
            "required_labels.tier",
            "required_labels.zone"
        ]
    );
    // One bad label among valid fields: still refused, and nothing of it is kept.
    let (status, error) = json_of(
        configure(json!({"gpu_type": H100_SPOT.0, "gpu_model": H100_SPOT.1,
            "required_labels": {"zone": 5, "rack": "r1"}}))
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    assert_eq!(field_names(&error), ["required_labels.zone"]);
    let unchanged = view(&app, &user, id).await;
    assert_eq!(unchanged["status"], "draft");
    assert_eq!(unchanged["required_labels"], json!({}));
}

async fn an_unreadable_label_requirement_fits_no_host(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let job = app.queued_job(&user).await;
    // A requirement stored before validation was strict (or written by hand).
    let sql = "UPDATE training_jobs SET required_labels = '{\"zone\": 5}'";
    match &app.db {
        control_plane::db::Db::Sqlite(pool) => sqlx::query(sql).execute(pool).await.map(drop),
        control_plane::db::Db::Postgres(pool) => sqlx::query(sql).execute(pool).await.map(drop),
    }
    .expect("requirement written");
    let secret = app.enroll_agent("unlabelled").await;
    let (status, reply) = app.claim_now(&secret).await;
    assert_eq!(
        status,
        StatusCode::NO_CONTENT,
        "an unreadable requirement is no requirement met: {reply}"
    );
    assert_eq!(view(&app, &user, &job).await["status"], "queued");
}

async fn a_bad_policy_names_every_field_and_changes_nothing(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let (_, job) = app.draft_job(&user).await;
    let id = job["id"].as_str().expect("id");
    let response = app
        .put(
            &user,
            &format!("/api/v1/jobs/{id}/configure"),
            configuration(json!({"max_retries": 21, "max_interruptions": "x",
                                 "auto_resume": "yes", "retries": 1})),
        )
        .await;
    let (status, error) = json_of(response).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    let mut fields = field_names(&error);
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "recovery.auto_resume",
            "recovery.max_interruptions",
            "recovery.max_retries",
            "recovery.retries"
        ]
    );
    // One bad field among valid ones still fails the whole request.
    let response = app
        .put(
            &user,
            &format!("/api/v1/jobs/{id}/configure"),
            configuration(json!({"max_retries": 2, "max_interruptions": -1})),
        )
        .await;
    let (status, error) = json_of(response).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(field_names(&error), ["recovery.max_interruptions"]);
    let unchanged = view(&app, &user, id).await;
    assert_eq!(unchanged["status"], "draft");
    assert_eq!(unchanged["max_retries"], 3);
}

async fn the_policy_is_stored_shown_and_carried_by_templates(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let (file, job) = app.draft_job(&user).await;
    let id = job["id"].as_str().expect("id");
    let policy = json!({"max_retries": 0, "max_interruptions": 2, "auto_resume": false});
    let (status, configured) = json_of(
        app.put(
            &user,
            &format!("/api/v1/jobs/{id}/configure"),
            configuration(policy.clone()),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{configured}");
    assert_eq!(
        (
            &configured["max_retries"],
            &configured["max_interruptions"],
            &configured["auto_resume"]
        ),
        (&json!(0), &json!(2), &json!(false))
    );
    // Reconfiguring without a policy keeps the one set.
    let (_, again) = json_of(
        app.put(
            &user,
            &format!("/api/v1/jobs/{id}/configure"),
            json!({"gpu_type": "ondemand", "gpu_model": H100_SPOT.1}),
        )
        .await,
    )
    .await;
    assert_eq!(again["auto_resume"], false);

    let (status, template) = json_of(
        app.post(
            &user,
            "/api/v1/templates",
            json!({"name": "careful", "source_job_id": id}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{template}");
    assert_eq!(template["recovery"], policy);
    let (status, used) = json_of(
        app.post(
            &user,
            &format!(
                "/api/v1/templates/{}/use",
                template["id"].as_str().expect("id")
            ),
            json!({"training_file_id": file["id"], "name": "from the template"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{used}");
    let made = view(&app, &user, used["job_id"].as_str().expect("job id")).await;
    assert_eq!(made["status"], "configured");
    assert_eq!(
        (
            &made["max_retries"],
            &made["max_interruptions"],
            &made["auto_resume"]
        ),
        (&json!(0), &json!(2), &json!(false))
    );
    // A template's own policy is checked like a job's.
    let (status, error) = json_of(
        app.post(
            &user,
            "/api/v1/templates",
            json!({"name": "bad", "recovery": {"max_retries": 99}}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(field_names(&error), ["recovery.max_retries"]);
}

/// Claims the job, reports a step, then reports a spot interruption; returns the job's
/// status after it.
async fn interrupt(app: &TestApp, secret: &str) -> (Value, Value) {
    let (status, assignment) = app.claim_now(secret).await;
    assert_eq!(status, StatusCode::OK, "{assignment}");
    let attempt = assignment["attempt_id"].as_str().expect("attempt");
    let (status, _) = app
        .agent_call(
            secret,
            Method::POST,
            &format!("/attempts/{attempt}/reports"),
            json!({"reports": [{"kind": "stage", "key": "stage-training", "stage": "training",
                                "at": "2026-11-28T10:00:00Z"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, reply) = app
        .agent_call(
            secret,
            Method::POST,
            &format!("/attempts/{attempt}/finish"),
            json!({"outcome": "interrupted", "provider": "aws", "notice_deadline": null,
                   "seconds_used": 1.5, "checkpoint_step": null}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    (assignment, reply)
}

/// The job waits in `interrupted`: nothing is scheduled, it is listed as interrupted, an
/// event says why, another user cannot resume it, its owner can.
async fn waits_for_a_person(backend: Backend, recovery: Value, why: &str) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let job = app.queued_job_with(&user, configuration(recovery)).await;
    let secret = app.enroll_agent("spot host").await;
    let (_, reply) = interrupt(&app, &secret).await;
    assert_eq!(reply["job_status"], "interrupted");

    let (status, _) = app.claim_now(&secret).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "nothing is scheduled");
    let waiting = view(&app, &user, &job).await;
    assert_eq!(waiting["status"], "interrupted");
    assert_eq!(waiting["interruption_count"], 1);
    let (_, listed) = json_of(app.get(&user, "/api/v1/jobs?status=interrupted").await).await;
    assert_eq!(listed["data"][0]["id"], job.as_str());
    let log = messages(&app, &user, &job).await;
    assert!(log.iter().any(|m| m.contains(why)), "{why:?} in {log:#?}");

    let other = app.user("eve@example.com", Role::User).await;
    let foreign = app
        .post(&other, &format!("/api/v1/jobs/{job}/resume"), json!({}))
        .await;
    assert_eq!(foreign.status(), StatusCode::NOT_FOUND);
    let (status, resumed) = json_of(
        app.post(&user, &format!("/api/v1/jobs/{job}/resume"), json!({}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{resumed}");
    assert_eq!(resumed["status"], "queued");
    let (status, second) = app.claim_now(&secret).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(second["job_id"], job.as_str());
    assert_eq!(second["attempt_number"], 2);
}

async fn auto_resume_off_leaves_the_job_interrupted(backend: Backend) {
    waits_for_a_person(
        backend,
        json!({"auto_resume": false}),
        "automatic resume is off",
    )
    .await;
}

async fn a_spent_interruption_budget_leaves_the_job_interrupted(backend: Backend) {
    waits_for_a_person(
        backend,
        json!({"max_interruptions": 0}),
        "automatic resumes are spent",
    )
    .await;
}

async fn an_interruption_within_the_budget_resumes_on_its_own(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let job = app
        .queued_job_with(&user, configuration(json!({"max_interruptions": 1})))
        .await;
    let secret = app.enroll_agent("spot host").await;
    let (_, reply) = interrupt(&app, &secret).await;
    assert_eq!(reply["job_status"], "queued");
    // The second interruption is past the budget of one.
    let (_, reply) = interrupt(&app, &secret).await;
    assert_eq!(reply["job_status"], "interrupted");
    assert_eq!(view(&app, &user, &job).await["interruption_count"], 2);
}

async fn illegal_changes_by_the_control_plane_are_refused_and_logged(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let (_, draft) = app.draft_job(&user).await;
    let id: uuid::Uuid = draft["id"].as_str().expect("id").parse().expect("uuid");
    let job = jobs::get_any(&app.db, id)
        .await
        .expect("read")
        .expect("job");
    let agent_id = uuid::Uuid::new_v4();
    let recipe: protocol::agent::Hyperparameters = serde_json::from_value(json!({
        "rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.0, "learning_rate": 0.001, "epochs": 1,
        "batch_size": 1, "gradient_accumulation_steps": 1, "max_seq_len": 64, "warmup_ratio": 0.0,
        "target_modules": ["q_proj"], "seed": 1}))
    .expect("recipe");
    // A draft can neither start training (an agent report), be resumed (recovery, the
    // sweeper) nor be given to an agent (the scheduler).
    let attempts: [(Change<'_>, Origin); 4] = [
        (Change::StartTraining { agent_id }, Origin::AgentReport),
        (
            Change::Resume {
                checkpoint_id: None,
            },
            Origin::Recovery,
        ),
        (
            Change::Resume {
                checkpoint_id: None,
            },
            Origin::Sweeper,
        ),
        (
            Change::Assign(NewAttempt {
                number: 1,
                agent_id,
                recipe: &recipe,
                gpu_type: GpuType::Spot,
                hourly_rate: 1.0,
            }),
            Origin::Scheduler,
        ),
    ];
    for (change, origin) in attempts {
        let refused = change_status(&app.state, &job, change, Vec::new(), origin).await;
        assert!(
            matches!(refused, Err(ServiceError::IllegalTransition(_))),
            "{origin:?} refused"
        );
    }
    let after = jobs::get_any(&app.db, id)
        .await
        .expect("read")
        .expect("job");
    assert_eq!(after.status, JobStatus::Draft, "nothing written");
    let log = messages(&app, &user, &id.to_string()).await;
    let refusals = log
        .iter()
        .filter(|m| m.starts_with("Refused a status change from draft"))
        .count();
    assert_eq!(refusals, 4, "{log:#?}");
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for origin in ["agent report", "recovery", "sweeper", "scheduler"] {
        assert!(
            metrics.contains(&format!(
                "lora_refused_status_changes_total{{origin=\"{origin}\"}} 1"
            )),
            "{origin} counted in {metrics}"
        );
    }
    // A person's illegal request is answered 409 and not noted as a refusal.
    let start = app
        .post(&user, &format!("/api/v1/jobs/{id}/start"), json!({}))
        .await;
    assert_eq!(start.status(), StatusCode::CONFLICT);
    assert_eq!(
        messages(&app, &user, &id.to_string()).await.len(),
        log.len()
    );
}
