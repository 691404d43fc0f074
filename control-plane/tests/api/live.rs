use std::time::Duration;

use control_plane::domain::Role;
use futures::StreamExt;
use serde_json::{json, Value};

use crate::helpers::{Backend, TestApp, TestDatabase, User};
use testkit::on_both_backends;

/// Reads server-sent events from a response body.
struct SseReader {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

impl SseReader {
    async fn open(app: &TestApp, user: &User, path: &str) -> SseReader {
        let response = app
            .client
            .get(app.url(path))
            .bearer_auth(&user.token)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .expect("stream opens");
        assert_eq!(response.status(), reqwest::StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        SseReader {
            body: response.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    /// The next event (name, JSON data), skipping keep-alive comments.
    async fn next(&mut self) -> (String, Value) {
        let read = async {
            loop {
                if let Some(end) = self.buffer.find("\n\n") {
                    let block: String = self.buffer.drain(..end + 2).collect();
                    let mut name = String::from("message");
                    let mut data = String::new();
                    for line in block.lines() {
                        if let Some(value) = line.strip_prefix("event:") {
                            name = value.trim().to_owned();
                        } else if let Some(value) = line.strip_prefix("data:") {
                            data.push_str(value.trim_start());
                        }
                    }
                    if !data.is_empty() {
                        return (name, serde_json::from_str(&data).expect("JSON data"));
                    }
                    continue;
                }
                let chunk = self.body.next().await.expect("stream open").expect("chunk");
                self.buffer.push_str(&String::from_utf8_lossy(&chunk));
            }
        };
        tokio::time::timeout(Duration::from_secs(20), read)
            .await
            .expect("an event arrives in time")
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
