use control_plane::domain::Role;
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{json_of, Backend, TestApp, TestDatabase};
use testkit::on_both_backends;

on_both_backends!(a_template_from_a_job_starts_configured_jobs);

async fn a_template_from_a_job_starts_configured_jobs(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let (file, job) = app.draft_job(&user).await;
    let job_path = format!("/api/v1/jobs/{}", job["id"].as_str().expect("id"));
    let configure = json!({"gpu_type": "ondemand", "gpu_model": "A100-80GB", "hyperparameters": {"rank": 4, "seed": 7}});
    assert_eq!(
        app.put(&user, &format!("{job_path}/configure"), configure)
            .await
            .status(),
        StatusCode::OK
    );

    let (status, template) = json_of(
        app.post(
            &user,
            "/api/v1/templates",
            json!({"name": "Small rank", "source_job_id": job["id"]}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{template}");
    assert_eq!(template["gpu_model"], "A100-80GB");
    assert_eq!(template["hyperparameters"]["rank"], 4);

    let path = format!(
        "/api/v1/templates/{}/use",
        template["id"].as_str().expect("id")
    );
    let (status, used) = json_of(
        app.post(
            &user,
            &path,
            json!({"training_file_id": file["id"], "name": "again"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{used}");
    assert_eq!(used["status"], "configured");
    assert_eq!(used["job_name"], "again");
    let (_, new_job) = json_of(
        app.get(
            &user,
            &format!("/api/v1/jobs/{}", used["job_id"].as_str().expect("id")),
        )
        .await,
    )
    .await;
    assert_eq!(new_job["hyperparameters"]["seed"], 7);
    assert_eq!(new_job["gpu_type"], "ondemand");
    assert_eq!(new_job["base_model"], job["base_model"]);

    let (_, list) = json_of(app.get(&user, "/api/v1/templates?search=small").await).await;
    assert_eq!(list["data"][0]["use_count"], 1);

    let (status, error) = json_of(
        app.post(
            &user,
            "/api/v1/templates",
            json!({"name": "bad", "hyperparameters": {"rank": 0}}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error["error"]["fields"][0]["field"], "hyperparameters.rank");
}
