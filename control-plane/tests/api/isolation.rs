use control_plane::domain::Role;
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{json_of, Backend, TestApp, TestDatabase};
use sha2::Digest;
use testkit::on_both_backends;

on_both_backends!(
    another_users_resources_answer_404,
    operators_see_every_job,
    every_id_route_hides_another_users_resources_whatever_their_state
);

async fn another_users_resources_answer_404(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let ada = app.user("ada@example.com", Role::User).await;
    let bob = app.user("bob@example.com", Role::User).await;
    let (file, job) = app.draft_job(&ada).await;
    let (file_id, job_id) = (
        file["id"].as_str().expect("id"),
        job["id"].as_str().expect("id"),
    );
    let template = app
        .post(
            &ada,
            "/api/v1/templates",
            json!({"name": "mine", "source_job_id": job_id}),
        )
        .await;
    assert_eq!(template.status(), StatusCode::CREATED);
    let template_id = template
        .json::<serde_json::Value>()
        .await
        .expect("template")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let preset = app
        .post(
            &ada,
            "/api/v1/presets",
            json!({"name": "Ada's", "parameters": {"rank": 4}}),
        )
        .await
        .json::<serde_json::Value>()
        .await
        .expect("preset");

    let reads = [
        format!("/api/v1/training-files/{file_id}"),
        format!("/api/v1/training-files/{file_id}/conversations"),
        format!("/api/v1/jobs/{job_id}"),
        format!("/api/v1/jobs/{job_id}/metrics"),
        format!("/api/v1/jobs/{job_id}/metrics/latest"),
        format!("/api/v1/jobs/{job_id}/events"),
        format!("/api/v1/jobs/{job_id}/stream"),
    ];
    for path in &reads {
        let (status, body) = json_of(app.get(&bob, path).await).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "GET {path}");
        assert!(
            !body.to_string().contains(file_id) && !body.to_string().contains("first job"),
            "{body}"
        );
    }
    let configure = json!({"gpu_type": "spot", "gpu_model": "L4-24GB", "preset_id": preset["id"]});
    assert_eq!(
        app.put(&bob, &format!("/api/v1/jobs/{job_id}/configure"), configure)
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    for action in ["start", "cancel"] {
        let status = app
            .post(&bob, &format!("/api/v1/jobs/{job_id}/{action}"), json!({}))
            .await
            .status();
        assert_eq!(status, StatusCode::NOT_FOUND, "{action}");
    }
    assert_eq!(
        app.delete(&bob, &format!("/api/v1/training-files/{file_id}"))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    let use_template = json!({"training_file_id": file_id, "name": "stolen"});
    assert_eq!(
        app.post(
            &bob,
            &format!("/api/v1/templates/{template_id}/use"),
            use_template
        )
        .await
        .status(),
        StatusCode::NOT_FOUND
    );
    let (status, _) = json_of(
        app.post(
            &bob,
            "/api/v1/jobs",
            json!({"training_file_id": file_id, "name": "x", "base_model": "m"}),
        )
        .await,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "Bob cannot train on Ada's file"
    );

    for (path, key) in [
        ("/api/v1/training-files", "count"),
        ("/api/v1/jobs", "count"),
    ] {
        let (_, list) = json_of(app.get(&bob, path).await).await;
        assert_eq!(list[key], 0, "{path}");
    }
    let (_, templates) = json_of(app.get(&bob, "/api/v1/templates").await).await;
    assert_eq!(templates["data"].as_array().map(Vec::len), Some(0));
    let (_, presets) = json_of(app.get(&bob, "/api/v1/presets").await).await;
    assert_eq!(
        presets["data"].as_array().map(Vec::len),
        Some(3),
        "only the system presets"
    );

    let (_, ada_job) = json_of(app.get(&ada, &format!("/api/v1/jobs/{job_id}")).await).await;
    assert_eq!(ada_job["status"], "draft", "Bob's attempts changed nothing");
}

async fn operators_see_every_job(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let ada = app.user("ada@example.com", Role::User).await;
    let operator = app.user("ops@example.com", Role::Operator).await;
    let (file, job) = app.draft_job(&ada).await;
    let (_, jobs) = json_of(app.get(&operator, "/api/v1/jobs").await).await;
    assert_eq!(jobs["count"], 1);
    let status = app
        .get(
            &operator,
            &format!("/api/v1/jobs/{}", job["id"].as_str().expect("id")),
        )
        .await
        .status();
    assert_eq!(status, StatusCode::OK);
    let status = app
        .get(
            &operator,
            &format!(
                "/api/v1/training-files/{}",
                file["id"].as_str().expect("id")
            ),
        )
        .await
        .status();
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "datasets stay private to their owner"
    );
}

/// Sweeps every `{id}` route of the OpenAPI document that a user may call with another
/// user's ids, and a well-formed body: each answers 404, before any rule that would
/// refuse the owner (a file a live job uses, a job that cannot be configured now).
async fn every_id_route_hides_another_users_resources_whatever_their_state(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let ada = app.user("ada@example.com", Role::User).await;
    let bob = app.user("bob@example.com", Role::User).await;
    // Ada's job is running on an agent and has an artifact; her file is in use.
    let job = app.queued_job(&ada).await;
    let (_, view) = json_of(app.get(&ada, &format!("/api/v1/jobs/{job}")).await).await;
    let file = view["training_file_id"]
        .as_str()
        .expect("file id")
        .to_owned();
    let secret = app.enroll_agent("host").await;
    let (_, assignment) = app.claim_now(&secret).await;
    let attempt = assignment["attempt_id"].as_str().expect("attempt");
    let bytes = b"adapter".to_vec();
    let sha = hex::encode(sha2::Sha256::digest(&bytes));
    let uploaded: serde_json::Value = app
        .client
        .put(app.url(&format!(
            "/api/v1/agent/attempts/{attempt}/artifacts?kind=adapter_weights&name=a.safetensors&sha256={sha}"
        )))
        .bearer_auth(&secret)
        .body(bytes)
        .send()
        .await
        .expect("upload")
        .json()
        .await
        .expect("artifact");
    let artifact = uploaded["artifact"]["id"]
        .as_str()
        .expect("artifact id")
        .to_owned();
    let (_, template) = json_of(
        app.post(
            &ada,
            "/api/v1/templates",
            json!({"name": "private", "source_job_id": job}),
        )
        .await,
    )
    .await;
    let template = template["id"].as_str().expect("template id").to_owned();
    let budget_body = json!({"name": "private", "amount": 10, "period": "monthly"});
    let (_, budget) = json_of(app.post(&ada, "/api/v1/budgets", budget_body.clone()).await).await;
    let budget = budget["id"].as_str().expect("budget id").to_owned();
    let (_, increase) = json_of(
        app.post(
            &ada,
            &format!("/api/v1/budgets/{budget}/increase-requests"),
            json!({"amount": 20, "reason": "more runs"}),
        )
        .await,
    )
    .await;
    let increase = increase["id"].as_str().expect("request id").to_owned();
    let job_id: uuid::Uuid = job.parse().expect("job uuid");
    let gates = control_plane::domain::validation::default_gates();
    let validation = control_plane::db::validations::insert(
        &app.db,
        control_plane::db::validations::NewRun {
            job_id,
            user_id: ada.id,
            suites: &[protocol::validation::Suite::Perplexity],
            baseline: None,
            retention_file: None,
            gates: &gates,
            max_samples: 1,
            max_new_tokens: 1,
            automatic: false,
        },
    )
    .await
    .expect("a validation run")
    .id
    .to_string();
    // The owner is refused by a rule on some of these routes: others must not learn that.
    assert_eq!(
        app.delete(&ada, &format!("/api/v1/training-files/{file}"))
            .await
            .status(),
        StatusCode::CONFLICT
    );

    let document = app.openapi_document().await;
    let mut swept = 0;
    for (path, item) in document["paths"].as_object().expect("paths") {
        // Agent routes take an agent's secret; the fleet is operators'; content links are signed.
        let for_users = (path.contains("{id}") || path.contains("{job_id}"))
            && !path.starts_with("/api/v1/agent")
            && !path.ends_with("/content");
        if !for_users {
            continue;
        }
        let id = if path.starts_with("/api/v1/jobs/") {
            &job
        } else if path.starts_with("/api/v1/training-files/") {
            &file
        } else if path.starts_with("/api/v1/templates/") {
            &template
        } else if path.starts_with("/api/v1/artifacts/") {
            &artifact
        } else if path.starts_with("/api/v1/budgets/") {
            &budget
        } else if path.starts_with("/api/v1/budget-increase-requests/") {
            &increase
        } else if path.starts_with("/api/v1/validation/runs/") {
            &validation
        } else if path.starts_with("/api/v1/validation/") {
            &job
        } else {
            panic!("{path}: which resource does its id name?")
        };
        let url = app.url(&path.replace("{id}", id).replace("{job_id}", id));
        for method in item.as_object().expect("operations").keys() {
            let body = if path.ends_with("/configure") {
                json!({"gpu_type": "spot", "gpu_model": "H100-80GB"})
            } else if path.ends_with("/use") {
                json!({"training_file_id": file, "name": "stolen"})
            } else if path.ends_with("/increase-requests") {
                json!({"amount": 50, "reason": "mine now"})
            } else if path.starts_with("/api/v1/budgets/") {
                budget_body.clone()
            } else if path.ends_with("/export") {
                json!({"format": "json"})
            } else if path.ends_with("/run") {
                json!({"test_suites": ["perplexity"]})
            } else {
                json!({})
            };
            let method: reqwest::Method = method.to_uppercase().parse().expect("method");
            let response = app
                .client
                .request(method.clone(), &url)
                .bearer_auth(&bob.token)
                .json(&body)
                .send()
                .await
                .expect("request");
            // Deciding increase requests is for admins: refused before anything is looked up.
            let expected = if path.starts_with("/api/v1/budget-increase-requests/") {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::NOT_FOUND
            };
            assert_eq!(response.status(), expected, "{method} {path}");
            swept += 1;
        }
    }
    assert!(swept >= 25, "swept {swept} operations");
}
