//! The dashboard's pages over HTTP: sign-in by form, each page with its key content for
//! its owner, 404 for another user's job, 403 for a user on the fleet page, and a redirect
//! to /login without a session.

use chrono::Utc;
use control_plane::db::metrics::{self, MetricPoint};
use control_plane::domain::Role;
use reqwest::{header, redirect, Client, StatusCode};
use uuid::Uuid;

use crate::helpers::{Backend, TestApp, TestDatabase};
use testkit::on_both_backends;

on_both_backends!(
    every_page_answers_its_owner_and_no_one_else,
    the_file_page_previews_tool_calls_names_weights_and_text
);

/// A browser-like client that keeps redirects visible.
fn browser() -> Client {
    Client::builder()
        .redirect(redirect::Policy::none())
        .build()
        .expect("client")
}

/// Signs in through the login form; returns the session cookie pair.
pub(crate) async fn sign_in(app: &TestApp, email: &str) -> String {
    let response = browser()
        .post(app.url("/login"))
        .form(&[("email", email), ("password", "password-123")])
        .send()
        .await
        .expect("login form");
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()[header::LOCATION], "/");
    response.headers()[header::SET_COOKIE]
        .to_str()
        .expect("cookie")
        .split(';')
        .next()
        .expect("pair")
        .to_owned()
}

pub(crate) async fn page(app: &TestApp, cookie: &str, path: &str) -> (StatusCode, String) {
    let response = browser()
        .get(app.url(path))
        .header(header::COOKIE, cookie)
        .send()
        .await
        .expect("page");
    let status = response.status();
    (status, response.text().await.unwrap_or_default())
}

async fn every_page_answers_its_owner_and_no_one_else(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let owner = app.user("ada@example.com", Role::User).await;
    let job = app.queued_job(&owner).await;
    let job_id: Uuid = job.parse().expect("uuid");
    // A long run: a thousand points still draw a bounded chart.
    for step in 1..=1000 {
        let point = MetricPoint {
            step,
            epoch: Some(0),
            training_loss: Some(2.0 / step as f64),
            validation_loss: (step % 100 == 0).then_some(2.5 / step as f64),
            learning_rate: Some(2e-4),
            grad_norm: Some(1.0),
            tokens_per_second: Some(1000.0),
            gpu_utilization: Some(90),
            memory_used_gb: Some(20.0),
            recorded_at: Utc::now(),
        };
        metrics::record(&app.db, job_id, None, &point)
            .await
            .expect("metric");
    }

    // No session: every page sends the browser to the login form.
    let response = browser()
        .get(app.url("/training/jobs"))
        .send()
        .await
        .expect("page");
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()[header::LOCATION], "/login");
    let response = browser().get(app.url("/login")).send().await.expect("page");
    assert!(response.text().await.expect("html").contains("Sign in"));

    // A wrong password stays on the form, saying why.
    let response = browser()
        .post(app.url("/login"))
        .form(&[("email", "ada@example.com"), ("password", "wrong-password")])
        .send()
        .await
        .expect("login");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response
        .text()
        .await
        .expect("html")
        .contains("do not match an account"));

    let cookie = sign_in(&app, "ada@example.com").await;
    // The upload form works without JavaScript: the file's page follows.
    let form = reqwest::multipart::Form::new()
        .text("name", "form upload")
        .part(
            "file",
            reqwest::multipart::Part::bytes(crate::helpers::chat_jsonl(3)).file_name("chats.jsonl"),
        );
    let response = browser()
        .post(app.url("/training/files"))
        .header(header::COOKIE, &cookie)
        .multipart(form)
        .send()
        .await
        .expect("upload form");
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let location = response.headers()[header::LOCATION]
        .to_str()
        .expect("location")
        .to_owned();
    assert!(location.starts_with("/training/files/"), "{location}");
    let (status, html) = page(&app, &cookie, &location).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("form upload"));
    let (_, files) = crate::helpers::json_of(
        app.get(&owner, "/api/v1/training-files?search=dataset")
            .await,
    )
    .await;
    let file = files["data"][0]["id"].as_str().expect("file id").to_owned();
    for (path, expected) in [
        ("/", "Active and queued jobs"),
        ("/training/files", "Upload a chat dataset"),
        ("/training/files?enrichment_status=completed", "dataset"),
        (
            "/training/files?enrichment_status=failed",
            "No training files yet",
        ),
        (
            &format!("/training/files/{file}") as &str,
            "Eligible for training",
        ),
        ("/training/jobs", "first job"),
        ("/training/create", "New training job"),
        (&format!("/training/{job}/configure"), "Balanced"),
        ("/training/jobs?status=queued", "first job"),
        (&format!("/training/job/{job}"), "Event log"),
        (&format!("/training/job/{job}/live"), "<svg"),
    ] {
        let (status, html) = page(&app, &cookie, path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert!(html.contains(expected), "{path} shows {expected:?}");
    }
    let (_, detail) = page(&app, &cookie, &format!("/training/job/{job}")).await;
    assert!(
        detail.contains("training loss at 1000: 2.0e-3"),
        "the last point is charted"
    );
    assert!(
        detail.matches("<circle").count() <= 5 * 401,
        "thinned to a bounded size"
    );
    assert!(detail.contains("Job queued for training"), "the event log");
    assert!(detail.contains("Cancel job"));
    assert_eq!(
        page(&app, &cookie, "/fleet").await.0,
        StatusCode::FORBIDDEN,
        "users do not see the fleet"
    );

    // Another user: the job page is not found, as in the API.
    app.user("eve@example.com", Role::User).await;
    let intruder = sign_in(&app, "eve@example.com").await;
    let (status, _) = page(&app, &intruder, &format!("/training/job/{job}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = page(&app, &intruder, &format!("/training/files/{file}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Operators see the fleet.
    app.user("ops@example.com", Role::Operator).await;
    let operator = sign_in(&app, "ops@example.com").await;
    app.enroll_agent("gpu-host-7").await;
    let (status, html) = page(&app, &operator, "/fleet").await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("gpu-host-7"));

    // A form posted from another site with the user's cookie is refused.
    let forged = browser()
        .post(app.url(&format!("/training/job/{job}/cancel")))
        .header(header::COOKIE, &cookie)
        .header(header::ORIGIN, "https://evil.example")
        .form(&[("reason", "forged")])
        .send()
        .await
        .expect("forged cancel");
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);

    // Cancel through the form: the job ends cancelled with the reason.
    let response = browser()
        .post(app.url(&format!("/training/job/{job}/cancel")))
        .header(header::COOKIE, &cookie)
        .header(header::ORIGIN, app.url(""))
        .form(&[("reason", "changed my mind")])
        .send()
        .await
        .expect("cancel");
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let (_, view) =
        crate::helpers::json_of(app.get(&owner, &format!("/api/v1/jobs/{job}")).await).await;
    assert_eq!(view["status"], "cancelled");
    assert_eq!(view["cancelled_reason"], "changed my mind");

    // History lists the cancelled job; two jobs compare, one does not.
    let (status, html) = page(&app, &cookie, "/training/history").await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("first job") && html.contains("cancelled"));
    let second = app.queued_job(&owner).await;
    let (status, html) = page(
        &app,
        &cookie,
        &format!("/training/compare?jobId={job}&jobId={second}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("Compare 2 jobs") && html.contains("learning rate"));
    assert!(html.contains("Cost against final loss"));
    let (status, _) = page(&app, &cookie, &format!("/training/compare?jobId={job}")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = page(
        &app,
        &intruder,
        &format!("/training/compare?jobId={job}&jobId={second}"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Saved as a template from its page, the job's recipe starts a new, configured job.
    let response = browser()
        .post(app.url(&format!("/training/job/{job}/template")))
        .header(header::COOKIE, &cookie)
        .form(&[("name", "my recipe")])
        .send()
        .await
        .expect("save as template");
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let (status, html) = page(&app, &cookie, "/training/templates").await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("my recipe"));
    let template_id = html
        .split("/training/templates/")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("a use form");
    let response = browser()
        .post(app.url(&format!("/training/templates/{template_id}/use")))
        .header(header::COOKIE, &cookie)
        .form(&[
            ("training_file_id", file.as_str()),
            ("name", "from the recipe"),
        ])
        .send()
        .await
        .expect("use template");
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let location = response.headers()[header::LOCATION]
        .to_str()
        .expect("location");
    let (status, html) = page(&app, &cookie, location).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("from the recipe") && html.contains("Start training"));

    // Sign out ends the session.
    let response = browser()
        .post(app.url("/logout"))
        .header(header::COOKIE, &cookie)
        .send()
        .await
        .expect("logout");
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let (status, _) = page(&app, &cookie, "/").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
}

/// The conversation preview shows what the ecosystem's formats hold: a speaker's name, a
/// tool call with its arguments, a turn left out of the loss, and a plain text record.
async fn the_file_page_previews_tool_calls_names_weights_and_text(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let lines = [
        r#"{"tools":[{"type":"function","function":{"name":"weather"}}],"messages":[{"role":"user","name":"ada","content":"Weather in Oslo?"},{"role":"assistant","tool_calls":[{"id":"c1","type":"function","function":{"name":"weather","arguments":"{\"city\":\"Oslo\"}"}}]},{"role":"tool","tool_call_id":"c1","content":"-3 C"},{"role":"assistant","content":"Cold.","weight":0}]}"#,
        r#"{"text":"Once upon a time there was a model."}"#,
    ];
    let file = app
        .upload_enriched(&user, lines.join("\n").into_bytes())
        .await;
    assert_eq!(file["conversation_count"], 2, "{file}");
    // The API keeps one shape: messages are an array, tools and text beside them.
    let id = file["id"].as_str().expect("id");
    let listed: serde_json::Value = app
        .get(&user, &format!("/api/v1/training-files/{id}/conversations"))
        .await
        .json()
        .await
        .expect("conversations");
    let conversations = listed["data"].as_array().expect("data");
    let chat = conversations
        .iter()
        .find(|c| c["text"].is_null())
        .expect("the chat");
    let story = conversations
        .iter()
        .find(|c| !c["text"].is_null())
        .expect("the text");
    assert_eq!(chat["messages"].as_array().map(Vec::len), Some(4));
    assert_eq!(chat["tools"][0]["function"]["name"], "weather");
    assert_eq!(story["messages"], serde_json::json!([]));
    assert_eq!(story["text"], "Once upon a time there was a model.");
    let cookie = sign_in(&app, "ada@example.com").await;
    let (status, html) = page(&app, &cookie, &format!("/training/files/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    for expected in [
        "user (ada)",
        "→ weather({&#34;city&#34;:&#34;Oslo&#34;})",
        "assistant, not trained",
        "Once upon a time there was a model.",
    ] {
        assert!(html.contains(expected), "{expected:?} in the page:\n{html}");
    }
}
