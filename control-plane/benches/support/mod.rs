//! What the benchmarks share: their arguments, and a fresh database of either backend
//! (from `testkit`, as the tests get theirs).

use std::time::Duration;

use chrono::Utc;
use control_plane::configuration::Settings;
use control_plane::db::metrics::MetricPoint;
use control_plane::db::Db;
use control_plane::domain::Role;
use control_plane::service::account::create_account;
use control_plane::startup::Application;
use reqwest::{redirect, Client};
use serde_json::{json, Value};
use testkit::{Backend, TestDatabase};

/// The allocator the control-plane binary runs with, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub const EMAIL: &str = "bench@example.com";
pub const PASSWORD: &str = "bench-password";

/// The real server on a free port over a fresh database, with one user signed in
/// through the API.
#[allow(dead_code)]
pub struct Server {
    pub db: Db,
    pub database: TestDatabase,
    pub base: String,
    pub client: Client,
    /// The user's API token.
    pub token: String,
}

/// Starts the server on `backend` with the default settings changed by `adjust`.
#[allow(dead_code)]
pub async fn server(backend: &str, clients: usize, adjust: impl FnOnce(&mut Settings)) -> Server {
    let (db, database) = self::database(backend).await;
    db.migrate().await.expect("migrations");
    let mut settings = Settings {
        listen: "127.0.0.1:0".parse().expect("address"),
        data_dir: database.data_dir.path().to_path_buf(),
        ..Settings::default()
    };
    adjust(&mut settings);
    let app = Application::with_database(settings, db.clone())
        .await
        .expect("application");
    let base = format!("http://{}", app.address());
    tokio::spawn(app.run_until(std::future::pending()));
    create_account(&db, EMAIL, PASSWORD.into(), Role::User)
        .await
        .expect("account");
    let client = Client::builder()
        .redirect(redirect::Policy::none())
        .pool_max_idle_per_host(clients)
        .build()
        .expect("client");
    let login: Value = client
        .post(format!("{base}/api/v1/auth/login"))
        .json(&json!({"email": EMAIL, "password": PASSWORD}))
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("login");
    let token = login["token"].as_str().expect("token").to_owned();
    Server {
        db,
        database,
        base,
        client,
        token,
    }
}

#[allow(dead_code)]
impl Server {
    async fn api(&self, request: reqwest::RequestBuilder) -> Value {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("request");
        let status = response.status();
        let body: Value = response.json().await.expect("json");
        assert!(status.is_success(), "{status}: {body}");
        body
    }

    /// Uploads a small chat file and waits for its enrichment; returns its id.
    pub async fn training_file(&self) -> String {
        let mut lines = String::new();
        for i in 0..60 {
            lines.push_str(
                &json!({"messages": [{"role": "user", "content": format!("question {i}")},
                                      {"role": "assistant", "content": format!("answer {i}")}]})
                .to_string(),
            );
            lines.push('\n');
        }
        let form = reqwest::multipart::Form::new().text("name", "bench").part(
            "file",
            reqwest::multipart::Part::bytes(lines.into_bytes()).file_name("bench.jsonl"),
        );
        let url = format!("{}/api/v1/training-files", self.base);
        let file = self.api(self.client.post(&url).multipart(form)).await;
        let id = file["id"].as_str().expect("file id").to_owned();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let file = self.api(self.client.get(format!("{url}/{id}"))).await;
            if file["enrichment_status"] == "completed" {
                return id;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "enrichment did not finish: {file}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Creates a job on `file_id` and configures it (spot H100); returns its id.
    pub async fn configured_job(&self, file_id: &str, name: &str) -> String {
        let job = self
            .api(self.client.post(format!("{}/api/v1/jobs", self.base)).json(
                &json!({"training_file_id": file_id, "name": name, "base_model": "HuggingFaceTB/SmolLM2-135M"}),
            ))
            .await;
        let id = job["id"].as_str().expect("job id").to_owned();
        self.api(
            self.client
                .put(format!("{}/api/v1/jobs/{id}/configure", self.base))
                .json(&json!({"gpu_type": "spot", "gpu_model": "H100-80GB"})),
        )
        .await;
        id
    }

    /// Queues a configured job.
    pub async fn start_job(&self, id: &str) {
        self.api(
            self.client
                .post(format!("{}/api/v1/jobs/{id}/start", self.base))
                .json(&json!({})),
        )
        .await;
    }
}

/// A training run's metric point at `step` (six metrics; a validation loss every 100).
#[allow(dead_code)]
pub fn metric_point(step: i64) -> MetricPoint {
    MetricPoint {
        step,
        epoch: Some(step / 1000),
        training_loss: Some(3.0 / (1.0 + step as f64 / 500.0)),
        validation_loss: (step % 100 == 0).then(|| 3.2 / (1.0 + step as f64 / 500.0)),
        learning_rate: Some(2e-4),
        grad_norm: Some(0.8),
        tokens_per_second: Some(3000.0),
        gpu_utilization: Some(95),
        memory_used_gb: Some(40.0),
        recorded_at: Utc::now(),
    }
}

/// A fresh database of `backend` (`sqlite` or `postgres`), connected; it is dropped with
/// the returned [`TestDatabase`].
pub async fn database(backend: &str) -> (Db, TestDatabase) {
    let backend = Backend::parse(backend)
        .unwrap_or_else(|| panic!("unknown backend {backend}: use sqlite or postgres"));
    let database = TestDatabase::create(backend).await;
    let db = Db::connect(&database.url).await.expect("database");
    (db, database)
}

/// The benchmark's own arguments: cargo bench adds flags such as `--bench`.
pub fn positional_args() -> Vec<String> {
    std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect()
}

/// The arguments of a page-load bench: `<sqlite|postgres> [clients] [seconds]`, default
/// SQLite, 16 clients, 5 s.
#[allow(dead_code)]
pub fn load_args() -> (String, usize, u64) {
    let args = positional_args();
    let backend = args.first().map_or("sqlite", String::as_str).to_owned();
    let clients = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(16);
    let seconds = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(5);
    (backend, clients, seconds)
}

/// The `p`-quantile (0..=1) of ascending `sorted`; NaN when empty.
#[allow(dead_code)] // each bench binary includes this module and uses part of it
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

/// What a closed-loop load run measured.
#[allow(dead_code)]
pub struct Load {
    pub requests: usize,
    /// Sum of what the requests reported (points stored, say).
    pub units: u64,
    pub seconds: f64,
    /// Request latencies in milliseconds, ascending.
    pub latencies_ms: Vec<f64>,
}

#[allow(dead_code)]
impl Load {
    pub fn requests_per_second(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    pub fn units_per_second(&self) -> f64 {
        self.units as f64 / self.seconds
    }

    pub fn p50(&self) -> f64 {
        percentile(&self.latencies_ms, 0.50)
    }

    pub fn p99(&self) -> f64 {
        percentile(&self.latencies_ms, 0.99)
    }
}

/// `clients` tasks each send one request after another for `duration`: client `c`'s
/// `i`-th request is `request(c, i)`, whose output counts as units.
#[allow(dead_code)]
pub async fn closed_loop<F, Fut>(clients: usize, duration: std::time::Duration, request: F) -> Load
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = u64> + Send,
{
    let started = std::time::Instant::now();
    let deadline = started + duration;
    let workers: Vec<_> = (0..clients)
        .map(|client| {
            let request = request.clone();
            tokio::spawn(async move {
                let (mut latencies, mut units) = (Vec::new(), 0);
                let mut iteration = 0;
                while std::time::Instant::now() < deadline {
                    let sent = std::time::Instant::now();
                    units += request(client, iteration).await;
                    latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                    iteration += 1;
                }
                (latencies, units)
            })
        })
        .collect();
    let mut load = Load {
        requests: 0,
        units: 0,
        seconds: 0.0,
        latencies_ms: Vec::new(),
    };
    for worker in workers {
        let (latencies, units) = worker.await.expect("load client");
        load.requests += latencies.len();
        load.units += units;
        load.latencies_ms.extend(latencies);
    }
    load.seconds = started.elapsed().as_secs_f64();
    load.latencies_ms.sort_by(f64::total_cmp);
    load
}
