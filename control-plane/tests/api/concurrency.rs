//! Writes at once: uploads, deletes (one of a file still being enriched), configures,
//! starts and claims. No request may answer a server error on either backend; SQLite's
//! writers wait their turn (`BEGIN IMMEDIATE` within `busy_timeout`) instead of failing
//! "database is locked".

use control_plane::domain::Role;
use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{chat_jsonl, json_of, Backend, TestApp, TestDatabase};
use testkit::on_both_backends;

on_both_backends!(concurrent_writes_never_answer_a_server_error);

async fn concurrent_writes_never_answer_a_server_error(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let agents = [app.enroll_agent("one").await, app.enroll_agent("two").await];
    let mut drafts = Vec::new();
    for _ in 0..4 {
        let (_, job) = app.draft_job(&user).await;
        drafts.push(job["id"].as_str().expect("id").to_owned());
    }
    let mut statuses = Vec::new();
    for round in 0..3 {
        // A large file, deleted while its enrichment writes conversations.
        let (status, big) = json_of(
            app.upload(&user, "big", "big.jsonl", chat_jsonl(20_000))
                .await,
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{big}");
        let big = big["id"].as_str().expect("id").to_owned();
        let deletes = (0..3).map(|_| {
            let path = format!("/api/v1/training-files/{big}");
            let (app, user) = (&app, &user);
            async move { app.delete(user, &path).await.status() }
        });
        let uploads = (0..4).map(|i| {
            let (app, user) = (&app, &user);
            async move {
                app.upload(
                    user,
                    &format!("small {round}-{i}"),
                    "s.jsonl",
                    chat_jsonl(60),
                )
                .await
                .status()
            }
        });
        let configures = drafts.iter().map(|job| {
            let (app, user) = (&app, &user);
            async move {
                let configured = app
                    .put(
                        user,
                        &format!("/api/v1/jobs/{job}/configure"),
                        json!({"gpu_type": "spot", "gpu_model": "H100-80GB"}),
                    )
                    .await
                    .status();
                let started = app
                    .post(user, &format!("/api/v1/jobs/{job}/start"), json!({}))
                    .await
                    .status();
                [configured, started]
            }
        });
        let claims = agents.iter().map(|secret| {
            let app = &app;
            async move { app.claim_now(secret).await.0 }
        });
        let (deleted, uploaded, configured, claimed) = futures::join!(
            join_all(deletes),
            join_all(uploads),
            join_all(configures),
            join_all(claims)
        );
        statuses.extend(deleted);
        statuses.extend(uploaded);
        statuses.extend(configured.into_iter().flatten());
        statuses.extend(claimed);
    }
    let errors: Vec<&StatusCode> = statuses.iter().filter(|s| s.is_server_error()).collect();
    assert!(
        errors.is_empty(),
        "server errors: {errors:?} of {statuses:?}"
    );
    assert!(
        statuses.contains(&StatusCode::NO_CONTENT),
        "the busy file was deleted: {statuses:?}"
    );
}
