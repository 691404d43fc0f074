//! The harness of the acceptance tests: the `control-plane` and `agent` binaries run as
//! real processes on real ports; the API is driven over HTTP; the clouds' metadata
//! endpoints, which cannot be reached from here, are local stand-ins speaking their
//! protocol.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Client;
use serde_json::{json, Value};

pub mod browser;

/// A workspace binary, built next to the test executable (`target/<profile>/`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (scripts/test does)",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub use testkit::poll;

pub const EMAIL: &str = "owner@example.com";
pub const PASSWORD: &str = "a-long-password";

pub struct ControlPlane {
    child: Child,
    pub url: String,
    data_dir: tempfile::TempDir,
    database_url: String,
    env: Vec<(String, String)>,
    /// Dropped with the control plane.
    _database: testkit::TestDatabase,
}

impl ControlPlane {
    /// Starts `control-plane serve` on SQLite in a temporary data dir, or on a fresh
    /// PostgreSQL database when `postgres` is set, with a user account ready.
    pub async fn start(postgres: bool) -> ControlPlane {
        Self::start_with_env(postgres, &[]).await
    }

    /// As [`ControlPlane::start`], with extra environment (settings) for the server.
    pub async fn start_with_env(postgres: bool, env: &[(&str, &str)]) -> ControlPlane {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let data_dir = tempfile::tempdir().expect("temp dir");
        let backend = if postgres {
            testkit::Backend::Postgres
        } else {
            testkit::Backend::Sqlite
        };
        let database = testkit::TestDatabase::create(backend).await;
        let database_url = database.url.clone();
        let port = free_port();
        create_user(data_dir.path(), &database_url, EMAIL, PASSWORD, "admin");
        let child = serve(data_dir.path(), &database_url, port, &env);
        let plane = ControlPlane {
            child,
            url: format!("http://127.0.0.1:{port}"),
            data_dir,
            database_url,
            env,
            _database: database,
        };
        plane.wait_until_up().await;
        plane
    }

    async fn wait_until_up(&self) {
        let http = Client::new();
        poll(
            "the control plane to answer",
            Duration::from_secs(60),
            || {
                let request = http.get(format!("{}/healthz", self.url)).send();
                async move { request.await.ok().filter(|r| r.status().is_success()) }
            },
        )
        .await;
    }

    /// Kills the server (no graceful shutdown), waits `outage`, and starts it again on
    /// the same port and database.
    pub async fn restart_after(&mut self, outage: Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        tokio::time::sleep(outage).await;
        let port: u16 = self
            .url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        self.child = serve(self.data_dir.path(), &self.database_url, port, &self.env);
        self.wait_until_up().await;
    }

    /// Creates an account with the `user` role (who sees only their own resources).
    pub fn create_user(&self, email: &str, password: &str) {
        create_user(
            self.data_dir.path(),
            &self.database_url,
            email,
            password,
            "user",
        );
    }

    pub fn enrollment_token(&self) -> String {
        let output = Command::new(binary("control-plane"))
            .args(["create-enrollment-token", "--expires-in", "1h"])
            .args(["--data-dir", &self.data_dir.path().display().to_string()])
            .args(["--database-url", &self.database_url])
            .output()
            .expect("create-enrollment-token");
        assert!(output.status.success());
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The database drops after this, with the field.
    }
}

/// `control-plane create-user` with the password on stdin.
fn create_user(data_dir: &Path, database_url: &str, email: &str, password: &str, role: &str) {
    let mut create = Command::new(binary("control-plane"))
        .args([
            "create-user",
            "--email",
            email,
            "--role",
            role,
            "--password-stdin",
        ])
        .args(["--data-dir", &data_dir.display().to_string()])
        .args(["--database-url", database_url])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("control-plane create-user");
    if let Some(stdin) = create.stdin.as_mut() {
        writeln!(stdin, "{password}").expect("password");
    }
    assert!(create.wait().expect("create-user").success());
}

fn serve(data_dir: &Path, database_url: &str, port: u16, env: &[(String, String)]) -> Child {
    Command::new(binary("control-plane"))
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .arg("serve")
        .args(["--data-dir", &data_dir.display().to_string()])
        .args(["--database-url", database_url])
        .env("CONTROL_PLANE_LISTEN", format!("127.0.0.1:{port}"))
        .env("CONTROL_PLANE_FLEET__HEARTBEAT_INTERVAL_SECONDS", "1")
        .env("CONTROL_PLANE_FLEET__OFFLINE_AFTER_SECONDS", "10")
        .env("CONTROL_PLANE_FLEET__CHECKPOINT_EVERY_STEPS", "20")
        .env("CONTROL_PLANE_ELIGIBILITY__MIN_CONVERSATIONS", "20")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("control-plane serve")
}

pub struct Agent {
    child: Child,
    pub work_dir: tempfile::TempDir,
    pub name: String,
}

impl Agent {
    /// Starts `agent run` against `plane`; `extra` adds flags (spot provider and its
    /// stand-in's URL).
    pub fn start(plane: &ControlPlane, name: &str, extra: &[&str]) -> Agent {
        let work_dir = tempfile::tempdir().expect("temp dir");
        let child = Self::spawn(plane, name, work_dir.path(), extra);
        Agent {
            child,
            work_dir,
            name: name.to_owned(),
        }
    }

    /// Starts the agent again on the same work dir (so with the same identity), after
    /// killing it if it still runs.
    pub fn restart(&mut self, plane: &ControlPlane, extra: &[&str]) {
        self.kill();
        self.child = Self::spawn(plane, &self.name, self.work_dir.path(), extra);
    }

    fn spawn(plane: &ControlPlane, name: &str, work_dir: &Path, extra: &[&str]) -> Child {
        Command::new(binary("agent"))
            .arg("run")
            .args(["--control-plane", &plane.url])
            .args(["--enrollment-token", &plane.enrollment_token()])
            .args(["--name", name])
            .args(["--work-dir", &work_dir.display().to_string()])
            .args(["--device", "cpu"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("agent run")
    }

    /// SIGTERM, as a cloud sends before it reclaims the host.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
    }

    /// SIGKILL: the host vanishes without a word.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let child = &mut self.child;
        poll("the agent to exit", timeout, || {
            let status = child.try_wait().ok().flatten();
            async move { status }
        })
        .await
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The JSON API as a logged-in user.
pub struct Api {
    http: Client,
    base: String,
    token: String,
}

impl Api {
    pub async fn login(plane: &ControlPlane) -> Api {
        Self::login_as(plane, EMAIL, PASSWORD).await
    }

    pub async fn login_as(plane: &ControlPlane, email: &str, password: &str) -> Api {
        let http = Client::new();
        let base = format!("{}/api/v1", plane.url);
        let response: Value = http
            .post(format!("{base}/auth/login"))
            .json(&json!({"email": email, "password": password}))
            .send()
            .await
            .expect("login")
            .json()
            .await
            .expect("login JSON");
        let token = response["token"].as_str().expect("token").to_owned();
        Api { http, base, token }
    }

    /// A dashboard page's HTML (the same credentials work there).
    pub async fn page(&self, path: &str) -> String {
        let root = self.base.trim_end_matches("/api/v1");
        let response = self
            .http
            .get(format!("{root}{path}"))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("page");
        assert!(
            response.status().is_success(),
            "GET {path}: {}",
            response.status()
        );
        response.text().await.expect("page text")
    }

    pub async fn get(&self, path: &str) -> Value {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("GET");
        assert!(
            response.status().is_success(),
            "GET {path}: {}",
            response.status()
        );
        response.json().await.expect("JSON")
    }

    /// The status and JSON body of a request, whatever the status.
    pub async fn try_send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Fetches a URL that needs no credentials (a signed link).
    pub async fn fetch_bytes(&self, url: &str) -> Vec<u8> {
        let response = self.http.get(url).send().await.expect("GET");
        assert!(
            response.status().is_success(),
            "GET {url}: {}",
            response.status()
        );
        response.bytes().await.expect("bytes").to_vec()
    }

    pub async fn send(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let response = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .expect("request");
        let status = response.status();
        let value: Value = response.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "{method} {path}: {status} {value}");
        value
    }

    /// Uploads a chat dataset and waits until it is enriched; returns its id.
    pub async fn upload(&self, name: &str, bytes: Vec<u8>) -> String {
        let form = reqwest::multipart::Form::new()
            .text("name", name.to_owned())
            .part(
                "file",
                reqwest::multipart::Part::bytes(bytes).file_name(format!("{name}.jsonl")),
            );
        let response: Value = self
            .http
            .post(format!("{}/training-files", self.base))
            .bearer_auth(&self.token)
            .multipart(form)
            .send()
            .await
            .expect("upload")
            .json()
            .await
            .expect("upload JSON");
        let id = response["id"].as_str().expect("file id").to_owned();
        poll("enrichment", Duration::from_secs(60), || async {
            let file = self.get(&format!("/training-files/{id}")).await;
            (file["enrichment_status"] == "completed").then_some(())
        })
        .await;
        id
    }

    /// Creates, configures (spot) and starts a job; returns its id.
    pub async fn start_job(
        &self,
        file_id: &str,
        name: &str,
        model: &Path,
        hyperparameters: Value,
    ) -> String {
        self.start_job_with(file_id, name, model, hyperparameters, json!({}))
            .await
    }

    /// Creates a draft job training `model` on the file; returns its id.
    pub async fn create_job(&self, file_id: &str, name: &str, model: &Path) -> String {
        let job = self
            .send(
                reqwest::Method::POST,
                "/jobs",
                json!({"training_file_id": file_id, "name": name, "base_model": model.display().to_string()}),
            )
            .await;
        job["id"].as_str().expect("job id").to_owned()
    }

    /// Creates, configures (spot, with `recovery` as its recovery policy) and starts a
    /// job; returns its id.
    pub async fn start_job_with(
        &self,
        file_id: &str,
        name: &str,
        model: &Path,
        hyperparameters: Value,
        recovery: Value,
    ) -> String {
        let id = self.create_job(file_id, name, model).await;
        let configured = self
            .send(
                reqwest::Method::PUT,
                &format!("/jobs/{id}/configure"),
                json!({"preset_id": "00000000-0000-4000-8000-000000000002", "hyperparameters": hyperparameters,
                       "gpu_type": "spot", "gpu_model": "H100-80GB", "recovery": recovery}),
            )
            .await;
        assert_eq!(configured["status"], "configured", "{configured}");
        self.send(
            reqwest::Method::POST,
            &format!("/jobs/{id}/start"),
            json!({}),
        )
        .await;
        id
    }

    pub async fn wait_status(&self, job: &str, status: &str, timeout: Duration) -> Value {
        poll(&format!("job {job} to be {status}"), timeout, || async {
            let view = self.get(&format!("/jobs/{job}")).await;
            (view["status"] == status).then_some(view)
        })
        .await
    }

    /// Every artifact of the job, downloaded through its signed link and checked
    /// against its checksum; returns (name, bytes).
    pub async fn download_artifacts(&self, job: &str) -> Vec<(String, Vec<u8>)> {
        let list = self.get(&format!("/jobs/{job}/artifacts")).await;
        let mut files = Vec::new();
        for artifact in list["data"].as_array().cloned().unwrap_or_default() {
            if artifact["artifact_type"] == "checkpoint" {
                continue;
            }
            let id = artifact["id"].as_str().expect("artifact id");
            let link = self.get(&format!("/artifacts/{id}/download")).await;
            let url = link["download_url"].as_str().expect("download_url");
            // The link needs no credentials: it is signed.
            let bytes = self
                .http
                .get(url)
                .send()
                .await
                .expect("download")
                .bytes()
                .await
                .expect("bytes")
                .to_vec();
            let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
            assert_eq!(
                Some(digest.as_str()),
                artifact["checksum"].as_str(),
                "{artifact}"
            );
            files.push((
                artifact["name"].as_str().unwrap_or_default().to_owned(),
                bytes,
            ));
        }
        files
    }
}

/// A chat dataset the tiny model can learn: each answer repeats its question's number.
/// `trainer eval` on `data`, with the adapter in `adapter` when given.
pub fn trainer_eval(model: &Path, adapter: Option<&Path>, data: &Path) -> Value {
    let mut command = std::process::Command::new(binary("trainer"));
    command
        .args(["eval", "--model"])
        .arg(model)
        .arg("--data")
        .arg(data);
    command.args(["--max-seq-len", "64"]);
    if let Some(adapter) = adapter {
        command.arg("--adapter").arg(adapter);
    }
    let output = command.output().expect("trainer eval");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("eval JSON")
}

pub fn chat_jsonl(count: usize) -> Vec<u8> {
    let mut out = String::new();
    for i in 0..count {
        let line = json!({"messages": [
            {"role": "user", "content": format!("What is the code for item {i}?")},
            {"role": "assistant", "content": format!("The code for item {i} is C-{}.", i * 7 % 100)},
        ]});
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out.into_bytes()
}

/// A tiny random Llama-shaped model directory for the agents to train.
pub fn tiny_model(dir: &Path) -> PathBuf {
    let path = dir.join("tiny-model");
    trainer::init::write_tiny_model(&path, &trainer::init::TinyModel::default())
        .expect("tiny model");
    path
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloud {
    Aws,
    Gcp,
    Azure,
}

impl Cloud {
    pub fn flag(self) -> &'static str {
        match self {
            Cloud::Aws => "aws",
            Cloud::Gcp => "gcp",
            Cloud::Azure => "azure",
        }
    }
}

/// A stand-in for one cloud's instance metadata service: answers "no notice" until
/// [`MetadataStandIn::raise`], then the cloud's preemption notice.
pub struct MetadataStandIn {
    pub url: String,
    notice: Arc<AtomicBool>,
    pub acknowledged: Arc<AtomicBool>,
}

impl MetadataStandIn {
    pub async fn start(cloud: Cloud) -> MetadataStandIn {
        use axum::http::{HeaderMap, StatusCode};
        use axum::routing::{get, put};
        let notice = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(AtomicBool::new(false));
        let raised = notice.clone();
        let router = match cloud {
            Cloud::Aws => axum::Router::new()
                .route(
                    "/latest/api/token",
                    put(|headers: HeaderMap| async move {
                        if headers.contains_key("x-aws-ec2-metadata-token-ttl-seconds") {
                            (StatusCode::OK, "token-123".to_owned())
                        } else {
                            (StatusCode::BAD_REQUEST, String::new())
                        }
                    }),
                )
                .route(
                    "/latest/meta-data/spot/instance-action",
                    get(move |headers: HeaderMap| {
                        let raised = raised.load(Ordering::SeqCst);
                        async move {
                            if headers
                                .get("x-aws-ec2-metadata-token")
                                .and_then(|v| v.to_str().ok())
                                != Some("token-123")
                            {
                                return (StatusCode::UNAUTHORIZED, String::new());
                            }
                            if !raised {
                                return (StatusCode::NOT_FOUND, String::new());
                            }
                            let time = (chrono::Utc::now() + chrono::Duration::minutes(2))
                                .format("%Y-%m-%dT%H:%M:%SZ");
                            (
                                StatusCode::OK,
                                json!({"action": "terminate", "time": time.to_string()})
                                    .to_string(),
                            )
                        }
                    }),
                ),
            Cloud::Gcp => axum::Router::new().route(
                "/computeMetadata/v1/instance/preempted",
                get(move |headers: HeaderMap| {
                    let raised = raised.load(Ordering::SeqCst);
                    async move {
                        if headers.get("metadata-flavor").and_then(|v| v.to_str().ok())
                            != Some("Google")
                        {
                            return (StatusCode::FORBIDDEN, String::new());
                        }
                        (
                            StatusCode::OK,
                            if raised { "TRUE" } else { "FALSE" }.to_owned(),
                        )
                    }
                }),
            ),
            Cloud::Azure => {
                let acked = acknowledged.clone();
                axum::Router::new().route(
                    "/metadata/scheduledevents",
                    get(move |headers: HeaderMap| {
                        let raised = raised.load(Ordering::SeqCst);
                        async move {
                            if headers.get("metadata").and_then(|v| v.to_str().ok()) != Some("true") {
                                return (StatusCode::BAD_REQUEST, String::new());
                            }
                            let events = if raised {
                                let not_before = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
                                json!([{"EventId": "E1", "EventType": "Preempt", "ResourceType": "VirtualMachine",
                                        "Resources": ["vm1"], "EventStatus": "Scheduled", "NotBefore": not_before}])
                            } else {
                                json!([])
                            };
                            (StatusCode::OK, json!({"DocumentIncarnation": 1, "Events": events}).to_string())
                        }
                    })
                    .post(move |body: String| {
                        if body.contains("\"E1\"") {
                            acked.store(true, Ordering::SeqCst);
                        }
                        async { StatusCode::OK }
                    }),
                )
            }
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind stand-in");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        MetadataStandIn {
            url,
            notice,
            acknowledged,
        }
    }

    pub fn raise(&self) {
        self.notice.store(true, Ordering::SeqCst);
    }
}

/// A stand-in judge model speaking OpenAI's chat-completions protocol: it rates every
/// reply 8 (empathy), 7 (clarity), 9 (appropriateness) while up, and answers 503 once
/// taken down.
pub struct JudgeStandIn {
    /// The base URL to configure (`…/v1`).
    pub url: String,
    up: Arc<AtomicBool>,
    pub requests: Arc<std::sync::atomic::AtomicUsize>,
}

impl JudgeStandIn {
    pub async fn start() -> JudgeStandIn {
        use axum::http::StatusCode;
        use axum::routing::post;
        let up = Arc::new(AtomicBool::new(true));
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (serving, counted) = (up.clone(), requests.clone());
        let router = axum::Router::new().route(
            "/v1/chat/completions",
            post(move |axum::Json(body): axum::Json<Value>| {
                let up = serving.load(Ordering::SeqCst);
                counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    let asks_for_a_rating = body["messages"][1]["content"]
                        .as_str()
                        .is_some_and(|c| c.contains("The assistant replied"));
                    if !up || !asks_for_a_rating {
                        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({})));
                    }
                    let content = r#"Rating: {"empathy": 8, "clarity": 7, "appropriateness": 9}"#;
                    (
                        StatusCode::OK,
                        axum::Json(json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind stand-in");
        let url = format!("http://{}/v1", listener.local_addr().expect("address"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        JudgeStandIn { url, up, requests }
    }

    pub fn take_down(&self) {
        self.up.store(false, Ordering::SeqCst);
    }
}
