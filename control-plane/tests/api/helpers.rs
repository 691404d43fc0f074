//! A real control plane on a real port, over a fresh SQLite file or a fresh PostgreSQL
//! database, driven over HTTP.

use std::path::PathBuf;
use std::time::Duration;

use control_plane::configuration::Settings;
use control_plane::db::Db;
use control_plane::domain::Role;
use control_plane::service::account::create_account;
use control_plane::service::AppState;
use control_plane::startup::Application;
use reqwest::multipart::{Form, Part};
use reqwest::{Client, Response, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

pub use testkit::{poll, Backend, TestDatabase};

pub struct TestApp {
    pub address: String,
    pub db: Db,
    /// The running server's state, for calling its operations directly.
    pub state: AppState,
    pub client: Client,
    pub data_dir: PathBuf,
}

pub fn settings(database: &TestDatabase) -> Settings {
    Settings {
        listen: "127.0.0.1:0".parse().expect("address"),
        data_dir: database.data_dir.path().to_path_buf(),
        database_url: Some(database.url.clone()),
        ..Settings::default()
    }
}

impl TestApp {
    pub async fn spawn(database: &TestDatabase) -> TestApp {
        Self::spawn_with(settings(database)).await
    }

    pub async fn spawn_with(settings: Settings) -> TestApp {
        let data_dir = settings.data_dir.clone();
        let app = Application::build(settings)
            .await
            .expect("application starts");
        let address = format!("http://{}", app.address());
        let db = app.state().db.clone();
        let state = app.state().clone();
        tokio::spawn(app.run_until(std::future::pending()));
        TestApp {
            address,
            db,
            state,
            client: Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            data_dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// Creates an account directly (as `control-plane create-user` does) and logs in.
    pub async fn user(&self, email: &str, role: Role) -> User {
        create_account(&self.db, email, "password-123".into(), role)
            .await
            .expect("account created");
        let response = self
            .client
            .post(self.url("/api/v1/auth/login"))
            .json(&json!({"email": email, "password": "password-123"}))
            .send()
            .await
            .expect("login request");
        assert_eq!(response.status(), StatusCode::OK, "login as {email}");
        let body: Value = response.json().await.expect("login body");
        User {
            token: body["token"].as_str().expect("token").to_owned(),
            id: body["user"]["id"]
                .as_str()
                .expect("user id")
                .parse()
                .expect("uuid"),
        }
    }

    pub async fn get(&self, user: &User, path: &str) -> Response {
        self.client
            .get(self.url(path))
            .bearer_auth(&user.token)
            .send()
            .await
            .expect("GET")
    }

    pub async fn post(&self, user: &User, path: &str, body: Value) -> Response {
        self.client
            .post(self.url(path))
            .bearer_auth(&user.token)
            .json(&body)
            .send()
            .await
            .expect("POST")
    }

    pub async fn put(&self, user: &User, path: &str, body: Value) -> Response {
        self.client
            .put(self.url(path))
            .bearer_auth(&user.token)
            .json(&body)
            .send()
            .await
            .expect("PUT")
    }

    pub async fn delete(&self, user: &User, path: &str) -> Response {
        self.client
            .delete(self.url(path))
            .bearer_auth(&user.token)
            .send()
            .await
            .expect("DELETE")
    }

    pub async fn upload(
        &self,
        user: &User,
        name: &str,
        file_name: &str,
        content: Vec<u8>,
    ) -> Response {
        let form = Form::new()
            .text("name", name.to_owned())
            .text("description", "test data")
            .part("file", Part::bytes(content).file_name(file_name.to_owned()));
        self.client
            .post(self.url("/api/v1/training-files"))
            .bearer_auth(&user.token)
            .multipart(form)
            .send()
            .await
            .expect("upload")
    }

    /// Uploads and waits for enrichment to end; returns the file as the API shows it.
    pub async fn upload_enriched(&self, user: &User, content: Vec<u8>) -> Value {
        let response = self.upload(user, "dataset", "data.jsonl", content).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let file: Value = response.json().await.expect("file");
        assert_eq!(file["enrichment_status"], "pending");
        self.wait_for_enrichment(user, file["id"].as_str().expect("id"))
            .await
    }

    pub async fn wait_for_enrichment(&self, user: &User, id: &str) -> Value {
        let path = format!("/api/v1/training-files/{id}");
        poll("enrichment to finish", Duration::from_secs(30), || async {
            let file: Value = self.get(user, &path).await.json().await.ok()?;
            matches!(
                file["enrichment_status"].as_str(),
                Some("completed" | "failed")
            )
            .then_some(file)
        })
        .await
    }

    /// A file with enough conversations to be eligible, and a draft job on it.
    pub async fn draft_job(&self, user: &User) -> (Value, Value) {
        let file = self.upload_enriched(user, chat_jsonl(60)).await;
        let response = self
            .post(
                user,
                "/api/v1/jobs",
                json!({"training_file_id": file["id"], "name": "first job", "base_model": "HuggingFaceTB/SmolLM2-135M"}),
            )
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        (file, response.json().await.expect("job"))
    }
}

impl TestApp {
    /// Enrolls an agent; returns its secret.
    pub async fn enroll_agent(&self, name: &str) -> String {
        let token = control_plane::auth::new_token("lce_");
        control_plane::db::users::create_enrollment_token(
            &self.db,
            &control_plane::auth::token_hash(&token),
            control_plane::db::now() + chrono::Duration::hours(1),
        )
        .await
        .expect("token");
        let response = self
            .client
            .post(self.url("/api/v1/agents/register"))
            .json(&json!({"enrollment_token": token, "name": name}))
            .send()
            .await
            .expect("register");
        let (_, registered) = json_of(response).await;
        registered["agent_secret"]
            .as_str()
            .expect("secret")
            .to_owned()
    }

    /// Configures (spot, H100) and starts a draft job on an eligible file; returns its id.
    pub async fn queued_job(&self, user: &User) -> String {
        self.queued_job_with(user, json!({"gpu_type": "spot", "gpu_model": "H100-80GB"}))
            .await
    }

    /// Configures a draft job with `configuration` and starts it; returns its id.
    pub async fn queued_job_with(&self, user: &User, configuration: Value) -> String {
        let (_, job) = self.draft_job(user).await;
        let id = job["id"].as_str().expect("id").to_owned();
        let configure = self
            .put(user, &format!("/api/v1/jobs/{id}/configure"), configuration)
            .await;
        assert_eq!(configure.status(), StatusCode::OK);
        let start = self
            .post(user, &format!("/api/v1/jobs/{id}/start"), json!({}))
            .await;
        assert_eq!(start.status(), StatusCode::OK);
        id
    }

    /// A call of the agent protocol with an agent's secret.
    pub async fn agent_call(
        &self,
        secret: &str,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> (StatusCode, Value) {
        let response = self
            .client
            .request(method, self.url(&format!("/api/v1/agent{path}")))
            .bearer_auth(secret)
            .json(&body)
            .send()
            .await
            .expect("agent call");
        json_of(response).await
    }
}

impl TestApp {
    /// The OpenAPI document the server serves.
    pub async fn openapi_document(&self) -> Value {
        self.client
            .get(self.url("/api/v1/openapi.json"))
            .send()
            .await
            .expect("openapi")
            .json()
            .await
            .expect("json")
    }

    /// Asks for work, without waiting, as the agent holding `secret`.
    pub async fn claim_now(&self, secret: &str) -> (StatusCode, Value) {
        self.agent_call(
            secret,
            reqwest::Method::POST,
            "/claim",
            json!({"wait_seconds": 0, "heartbeat": agent_heartbeat()}),
        )
        .await
    }
}

/// A heartbeat of an on-demand CPU host with 64 GB of RAM.
pub fn agent_heartbeat() -> Value {
    json!({"gpus": [], "host": {"cpu_percent": 1.0, "cpu_count": 2, "memory_used_mb": 1000,
           "memory_total_mb": 64000, "disk_free_mb": 1000}, "capacity": "ondemand",
           "attempt_id": null, "labels": {}})
}

pub struct User {
    pub token: String,
    pub id: Uuid,
}

/// `count` valid chat conversations with metadata, as JSONL.
pub fn chat_jsonl(count: usize) -> Vec<u8> {
    let personas = ["anxious", "curious", "frustrated"];
    let mut out = String::new();
    for i in 0..count {
        let line = json!({
            "messages": [
                {"role": "system", "content": "You are a kind assistant."},
                {"role": "user", "content": format!("Question number {i}?")},
                {"role": "assistant", "content": format!("Answer number {i}.")},
            ],
            "metadata": {
                "persona": personas[i % 3],
                "emotional_arc": "calm",
                "topic": if i % 2 == 0 { "money" } else { "work" },
                "quality_scores": {"empathy": 4.0, "clarity": 5.0, "appropriateness": (3 + i % 3) as f64},
                "human_reviewed": i % 4 == 0,
            }
        });
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out.into_bytes()
}

pub async fn json_of(response: Response) -> (StatusCode, Value) {
    let status = response.status();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// The `field` of each entry in a 422 error's `fields`.
pub fn field_names(error: &Value) -> Vec<&str> {
    error["error"]["fields"]
        .as_array()
        .map(|fields| fields.iter().filter_map(|f| f["field"].as_str()).collect())
        .unwrap_or_default()
}
