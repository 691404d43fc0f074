use std::time::Duration;

use control_plane::domain::Role;
use futures::StreamExt;
use serde_json::{json, Value};

use crate::helpers::{json_of, Backend, TestApp, TestDatabase, User};
use reqwest::{Method, StatusCode};
use testkit::on_both_backends;

struct SseMessage {
    name: String,
    id: Option<String>,
    data: Value,
}

/// Reads server-sent events from a response body.
struct SseReader {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

impl SseReader {
    async fn open(app: &TestApp, user: &User, path: &str) -> SseReader {
        SseReader::resume(app, user, path, None).await
    }

    /// Opens the stream, resuming after `last_event_id` when given.
    async fn resume(
        app: &TestApp,
        user: &User,
        path: &str,
        last_event_id: Option<&str>,
    ) -> SseReader {
        let mut request = app
            .client
            .get(app.url(path))
            .bearer_auth(&user.token)
            .timeout(Duration::from_secs(60));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.expect("stream opens");
        assert_eq!(response.status(), reqwest::StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        SseReader {
            body: response.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    /// The next event, or `None` once the server has closed the stream.
    async fn next_or_end(&mut self) -> Option<SseMessage> {
        let read = async {
            loop {
                if let Some(end) = self.buffer.find("\n\n") {
                    let block: String = self.buffer.drain(..end + 2).collect();
                    let mut message = SseMessage {
                        name: String::from("message"),
                        id: None,
                        data: Value::Null,
                    };
                    let mut data = String::new();
                    for line in block.lines() {
                        if let Some(value) = line.strip_prefix("event:") {
                            message.name = value.trim().to_owned();
                        } else if let Some(value) = line.strip_prefix("data:") {
                            data.push_str(value.trim_start());
                        } else if let Some(value) = line.strip_prefix("id:") {
                            message.id = Some(value.trim().to_owned());
                        }
                    }
                    if data.is_empty() {
                        continue;
                    }
                    message.data = serde_json::from_str(&data).expect("JSON data");
                    return Some(message);
                }
                let chunk = self.body.next().await?.expect("chunk");
                self.buffer.push_str(&String::from_utf8_lossy(&chunk));
            }
        };
        tokio::time::timeout(Duration::from_secs(20), read)
            .await
            .expect("an event arrives in time")
    }

    async fn next_message(&mut self) -> SseMessage {
        self.next_or_end().await.expect("stream open")
    }

    async fn next(&mut self) -> (String, Value) {
        let message = self.next_message().await;
        (message.name, message.data)
    }

    /// Skips events until one named `name` arrives.
    async fn next_named(&mut self, name: &str) -> Value {
        loop {
            let (event, data) = self.next().await;
            if event == name {
                return data;
            }
        }
    }
}

on_both_backends!(the_stream_delivers_status_events_and_metrics);
on_both_backends!(a_reconnect_with_the_last_event_id_misses_nothing_and_repeats_nothing);
on_both_backends!(a_settled_job_s_stream_ends);
on_both_backends!(concurrent_resends_store_each_step_once_and_stream_it_once_in_order);

async fn the_stream_delivers_status_events_and_metrics(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let (_, job) = app.draft_job(&user).await;
    let id = job["id"].as_str().expect("id");
    let mut stream = SseReader::open(&app, &user, &format!("/api/v1/jobs/{id}/stream")).await;
    let (name, snapshot) = stream.next().await;
    assert_eq!(
        (name.as_str(), snapshot["status"].as_str()),
        ("status", Some("draft"))
    );

    app.put(
        &user,
        &format!("/api/v1/jobs/{id}/configure"),
        json!({"gpu_type": "spot", "gpu_model": "L4-24GB"}),
    )
    .await;
    assert_eq!(stream.next_named("status").await["status"], "configured");
    let event = stream.next_named("event").await;
    assert!(event["message"]
        .as_str()
        .expect("message")
        .starts_with("Configured with the Balanced preset"));
}

/// Two control-plane replicas on one PostgreSQL database: a client of one sees what the
/// other writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_share_live_updates() {
    let backend = Backend::Postgres;
    let database = TestDatabase::create(backend).await;
    let first = TestApp::spawn(&database).await;
    let second = TestApp::spawn(&database).await;
    let user = first.user("ada@example.com", Role::User).await;
    let (_, job) = first.draft_job(&user).await;
    let id = job["id"].as_str().expect("id");

    let mut stream = SseReader::open(&first, &user, &format!("/api/v1/jobs/{id}/stream")).await;
    assert_eq!(stream.next_named("status").await["status"], "draft");
    let response = second
        .put(
            &user,
            &format!("/api/v1/jobs/{id}/configure"),
            json!({"gpu_type": "spot", "gpu_model": "L4-24GB"}),
        )
        .await;
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    second
        .post(&user, &format!("/api/v1/jobs/{id}/start"), json!({}))
        .await;
    assert_eq!(stream.next_named("status").await["status"], "configured");
    assert_eq!(stream.next_named("status").await["status"], "queued");
    let event = stream.next_named("event").await;
    assert_eq!(event["job_id"], id);
}

fn metric(step: u64) -> Value {
    json!({"kind": "metric", "key": format!("step-{step}"), "metric": {
        "step": step, "total_steps": 10, "epoch": 0.5, "training_loss": 1.5, "validation_loss": null,
        "learning_rate": 0.0002, "grad_norm": 0.9, "tokens_per_second": 1000.0, "gpu_utilization": 80,
        "memory_used_gb": 10.5, "elapsed_seconds": step as f64, "recorded_at": "2026-11-28T10:00:00Z"}})
}

/// A training job with an agent on it: (user, job id, agent secret, reports path).
async fn training_job(app: &TestApp) -> (User, String, String, String) {
    let user = app.user("ada@example.com", Role::User).await;
    let job = app.queued_job(&user).await;
    let secret = app.enroll_agent("host").await;
    let (status, assignment) = app.claim_now(&secret).await;
    assert_eq!(status, StatusCode::OK, "{assignment}");
    let attempt = assignment["attempt_id"]
        .as_str()
        .expect("attempt")
        .to_owned();
    let reports = format!("/attempts/{attempt}/reports");
    let stage = json!({"reports": [{"kind": "stage", "key": "stage-training", "stage": "training",
                                    "at": "2026-11-28T10:00:00Z"}]});
    let (status, reply) = app.agent_call(&secret, Method::POST, &reports, stage).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    (user, job, secret, reports)
}

async fn report(app: &TestApp, secret: &str, path: &str, reports: Vec<Value>) {
    let (status, reply) = app
        .agent_call(secret, Method::POST, path, json!({ "reports": reports }))
        .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
}

async fn a_reconnect_with_the_last_event_id_misses_nothing_and_repeats_nothing(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let (user, job, secret, reports) = training_job(&app).await;
    let path = format!("/api/v1/jobs/{job}/stream");
    report(&app, &secret, &reports, vec![metric(1), metric(2)]).await;

    let mut stream = SseReader::open(&app, &user, &path).await;
    let snapshot = stream.next_message().await;
    assert_eq!(snapshot.name, "status");
    assert!(snapshot.id.is_some(), "every event carries an id");
    report(&app, &secret, &reports, vec![metric(3), metric(4)]).await;
    let mut last = snapshot;
    while last.name != "metrics" || last.data["step"] != 4 {
        last = stream.next_message().await;
        assert!(last.id.is_some(), "every event carries an id");
        if last.name == "metrics" {
            assert!(
                last.data["step"].as_i64() > Some(2),
                "steps before the snapshot are history"
            );
        }
    }
    drop(stream);

    // While the client is away: more steps (one of them reported twice) and an event.
    let warning = json!({"kind": "event", "key": "warning-1", "event_type": "warning",
        "severity": "warning", "message": "3 conversations were cut", "details": null,
        "at": "2026-11-28T10:00:01Z"});
    report(&app, &secret, &reports, vec![metric(5), metric(6), warning]).await;
    report(&app, &secret, &reports, vec![metric(6), metric(7)]).await;

    let mut resumed = SseReader::resume(&app, &user, &path, last.id.as_deref()).await;
    assert_eq!(resumed.next_message().await.name, "status");
    let (mut steps, mut warnings) = (Vec::new(), 0);
    while steps.last() != Some(&7) {
        let message = resumed.next_message().await;
        match message.name.as_str() {
            "metrics" => steps.push(message.data["step"].as_i64().expect("step")),
            "event" if message.data["event_type"] == "warning" => warnings += 1,
            _ => {}
        }
    }
    assert_eq!(steps, [5, 6, 7], "every missed step once, in order");
    assert_eq!(warnings, 1, "the missed event once");

    // The attempt fails for good: the stream says so and closes.
    let finish = format!(
        "/attempts/{}/finish",
        reports.split('/').nth(2).expect("attempt")
    );
    let (status, reply) = app
        .agent_call(
            &secret,
            Method::POST,
            &finish,
            json!({"outcome": "failed", "kind": "dataset", "message": "line 3: no assistant message"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let end = loop {
        let message = resumed.next_message().await;
        if message.name == "metrics"
            || message.name == "event" && message.data["event_type"] == "warning"
        {
            panic!("nothing is sent twice: {}", message.data);
        }
        if message.name == "end" {
            break message;
        }
    };
    assert_eq!(end.data["status"], "failed");
    assert!(
        resumed.next_or_end().await.is_none(),
        "the stream closes after its end"
    );
}

async fn a_settled_job_s_stream_ends(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let (_, job) = app.draft_job(&user).await;
    let id = job["id"].as_str().expect("id");
    let path = format!("/api/v1/jobs/{id}/stream");

    let (status, error) = json_of(
        app.client
            .get(app.url(&path))
            .bearer_auth(&user.token)
            .header("Last-Event-ID", "not-a-position")
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error["error"]["message"]
        .as_str()
        .expect("message")
        .contains("Last-Event-ID"));

    let cancel = app
        .post(&user, &format!("/api/v1/jobs/{id}/cancel"), json!({}))
        .await;
    assert_eq!(cancel.status(), StatusCode::OK);
    let mut stream = SseReader::open(&app, &user, &path).await;
    assert_eq!(stream.next_message().await.data["status"], "cancelled");
    let end = stream.next_message().await;
    assert_eq!(
        (end.name.as_str(), &end.data["status"]),
        ("end", &json!("cancelled"))
    );
    assert!(
        stream.next_or_end().await.is_none(),
        "the stream closes after its end"
    );
}

/// An agent's retries race its originals (a reply lost, the batch sent again while the
/// first is still being stored): three copies of each batch at once. Each step is
/// stored once, counted once, and streamed once, in order.
async fn concurrent_resends_store_each_step_once_and_stream_it_once_in_order(backend: Backend) {
    const BATCHES: u64 = 15;
    const STEPS: u64 = 20;
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let (user, job, secret, reports) = training_job(&app).await;
    let mut stream = SseReader::open(&app, &user, &format!("/api/v1/jobs/{job}/stream")).await;
    assert_eq!(stream.next_message().await.name, "status");
    for batch in 0..BATCHES {
        let body =
            json!({"reports": (1..=STEPS).map(|s| metric(batch * STEPS + s)).collect::<Vec<_>>()});
        let copies = (0..3).map(|_| app.agent_call(&secret, Method::POST, &reports, body.clone()));
        let replies = futures::future::join_all(copies).await;
        let mut accepted = 0;
        for (status, reply) in replies {
            assert_eq!(status, StatusCode::OK, "{reply}");
            accepted += reply["accepted"].as_u64().expect("accepted");
        }
        assert_eq!(accepted, STEPS, "batch {batch}: each step counted once");
    }
    let mut streamed = Vec::new();
    while streamed.len() < (BATCHES * STEPS) as usize {
        let message = stream.next_message().await;
        if message.name == "metrics" {
            streamed.push(message.data["step"].as_u64().expect("step"));
        }
    }
    let every_step: Vec<u64> = (1..=BATCHES * STEPS).collect();
    assert_eq!(streamed, every_step, "every step once, in order");
    let (_, history) = json_of(
        app.get(&user, &format!("/api/v1/jobs/{job}/metrics?limit=100000"))
            .await,
    )
    .await;
    let stored: Vec<u64> = history["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|p| p["step"].as_u64())
        .collect();
    assert_eq!(stored, every_step, "every step stored once");
}
