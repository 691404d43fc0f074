//! Metric ingest and history reads, side by side with an MLflow tracking server.
//!
//! The same load on both: C clients, each streaming training steps in order with six
//! metrics per step and B steps per request, in a closed loop. Ours: C enrolled agents,
//! each posting report batches for the attempt it claimed. MLflow: C runs, each sent
//! `runs/log-batch` requests. Then one job's (run's) 10,000-step history read back.
//!
//!   cargo bench -p control-plane --bench ingest -- <sqlite|postgres> <mlflow-url,...> [seconds] [CxB,...]
//!
//! With several MLflow URLs (servers with different worker counts) MLflow's best is the
//! figure each cell compares against. Prints table rows; `scripts/bench-ingest` starts the
//! MLflow servers and runs both backends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use control_plane::db::metrics;
use reqwest::Client;
use serde_json::{json, Value};

#[path = "support/mod.rs"]
mod support;
use support::{closed_loop, Load};

const METRICS_PER_STEP: u64 = 6;
const HISTORY_STEPS: i64 = 10_000;
const HISTORY_READS: usize = 20;

/// A claimed attempt: the agent's secret and the attempt's id.
struct Attempt {
    secret: String,
    id: String,
}

async fn enrolled_agent(server: &support::Server, name: &str) -> String {
    let token = control_plane::auth::new_token("lce_");
    control_plane::db::users::create_enrollment_token(
        &server.db,
        &control_plane::auth::token_hash(&token),
        control_plane::db::now() + chrono::Duration::hours(1),
    )
    .await
    .expect("enrollment token");
    let registered: Value = server
        .client
        .post(format!("{}/api/v1/agents/register", server.base))
        .json(&json!({"enrollment_token": token, "name": name}))
        .send()
        .await
        .expect("register")
        .json()
        .await
        .expect("registered");
    registered["agent_secret"]
        .as_str()
        .expect("secret")
        .to_owned()
}

async fn claimed_attempts(server: &support::Server, count: usize) -> Vec<Attempt> {
    let file = server.training_file().await;
    let mut attempts = Vec::new();
    for i in 0..count {
        let job = server.configured_job(&file, &format!("ingest {i}")).await;
        server.start_job(&job).await;
        let secret = enrolled_agent(server, &format!("host-{i}")).await;
        let assignment: Value = server
            .client
            .post(format!("{}/api/v1/agent/claim", server.base))
            .bearer_auth(&secret)
            .json(&json!({"wait_seconds": 0, "heartbeat": {"gpus": [], "host": {"cpu_percent": 1.0,
                "cpu_count": 2, "memory_used_mb": 1000, "memory_total_mb": 64000, "disk_free_mb": 1000},
                "capacity": "ondemand", "attempt_id": null, "labels": {}}}))
            .send()
            .await
            .expect("claim")
            .json()
            .await
            .expect("assignment");
        let id = assignment["attempt_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no assignment: {assignment}"))
            .to_owned();
        attempts.push(Attempt { secret, id });
    }
    attempts
}

fn our_batch(first_step: u64, steps: u64) -> Value {
    let now = Utc::now();
    let reports: Vec<Value> = (first_step..first_step + steps)
        .map(|step| {
            json!({"kind": "metric", "key": format!("step-{step}"), "metric": {
                "step": step, "total_steps": 1_000_000_000u64, "epoch": 0.5,
                "training_loss": 3.0 / (1.0 + step as f64 / 500.0), "validation_loss": null,
                "learning_rate": 0.0002, "grad_norm": 0.9, "tokens_per_second": 3000.0,
                "gpu_utilization": 95, "memory_used_gb": 40.0, "elapsed_seconds": step as f64,
                "recorded_at": now}})
        })
        .collect();
    json!({ "reports": reports })
}

fn mlflow_batch(run_id: &str, first_step: u64, steps: u64) -> Value {
    let timestamp = Utc::now().timestamp_millis();
    let mut metrics = Vec::new();
    for step in first_step..first_step + steps {
        for (key, value) in [
            ("training_loss", 3.0 / (1.0 + step as f64 / 500.0)),
            ("learning_rate", 0.0002),
            ("grad_norm", 0.9),
            ("tokens_per_second", 3000.0),
            ("gpu_utilization", 95.0),
            ("memory_used_gb", 40.0),
        ] {
            metrics.push(json!({"key": key, "value": value, "timestamp": timestamp, "step": step}));
        }
    }
    json!({"run_id": run_id, "metrics": metrics})
}

/// Ours, C clients × B steps per request, continuing each attempt's steps after `next`.
async fn our_ingest(
    server: &support::Server,
    attempts: &Arc<Vec<Attempt>>,
    next: &Arc<Vec<std::sync::atomic::AtomicU64>>,
    clients: usize,
    steps: u64,
    duration: Duration,
) -> Load {
    let (client, base) = (server.client.clone(), server.base.clone());
    let (attempts, next) = (attempts.clone(), next.clone());
    closed_loop(clients, duration, move |c, _| {
        let (client, base, attempts, next) =
            (client.clone(), base.clone(), attempts.clone(), next.clone());
        async move {
            let first = next[c].fetch_add(steps, std::sync::atomic::Ordering::Relaxed);
            let attempt = &attempts[c];
            let reply: Value = client
                .post(format!(
                    "{base}/api/v1/agent/attempts/{}/reports",
                    attempt.id
                ))
                .bearer_auth(&attempt.secret)
                .json(&our_batch(first, steps))
                .send()
                .await
                .expect("reports")
                .json()
                .await
                .expect("reply");
            assert_eq!(reply["accepted"], steps, "{reply}");
            steps * METRICS_PER_STEP
        }
    })
    .await
}

async fn mlflow_call(client: &Client, base: &str, path: &str, body: &Value) -> Value {
    let url = format!("{base}/api/2.0/mlflow/{path}");
    // MLflow's gunicorn closes a kept-alive connection after 2 idle seconds (between
    // cells), and a request sent on it as it closes fails before the server reads it
    // (hyper's IncompleteMessage): send that one again on a fresh connection.
    let mut tries = 0;
    let response = loop {
        tries += 1;
        match client.post(&url).json(body).send().await {
            Ok(response) => break response,
            Err(error) if tries < 3 && error.is_request() => continue,
            Err(error) => panic!("MLflow {path}: {error:?}"),
        }
    };
    let status = response.status();
    let text = response.text().await.expect("mlflow body");
    assert!(status.is_success(), "MLflow {path}: {status}: {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

async fn mlflow_runs(client: &Client, base: &str, count: usize) -> Vec<String> {
    let name = format!("bench-{}", uuid::Uuid::new_v4());
    let experiment = mlflow_call(client, base, "experiments/create", &json!({"name": name})).await;
    let experiment_id = experiment["experiment_id"].as_str().expect("experiment");
    let mut runs = Vec::new();
    for _ in 0..count {
        let run = mlflow_call(
            client,
            base,
            "runs/create",
            &json!({"experiment_id": experiment_id, "start_time": Utc::now().timestamp_millis()}),
        )
        .await;
        runs.push(
            run["run"]["info"]["run_id"]
                .as_str()
                .expect("run id")
                .to_owned(),
        );
    }
    runs
}

async fn mlflow_ingest(
    client: &Client,
    base: &str,
    clients: usize,
    steps: u64,
    duration: Duration,
) -> Load {
    let runs = Arc::new(mlflow_runs(client, base, clients).await);
    let (client, base) = (client.clone(), base.to_owned());
    closed_loop(clients, duration, move |c, i| {
        let (client, base, runs) = (client.clone(), base.clone(), runs.clone());
        async move {
            let body = mlflow_batch(&runs[c], 1 + i * steps, steps);
            mlflow_call(&client, &base, "runs/log-batch", &body).await;
            steps * METRICS_PER_STEP
        }
    })
    .await
}

/// Milliseconds of `reads` sequential GETs of `url`, ascending.
async fn read_latencies(request: impl Fn() -> reqwest::RequestBuilder, reads: usize) -> Vec<f64> {
    let mut latencies = Vec::with_capacity(reads);
    for _ in 0..=reads {
        let sent = Instant::now();
        let response = request().send().await.expect("read");
        assert!(response.status().is_success(), "{}", response.status());
        let body = response.bytes().await.expect("body");
        assert!(body.len() > 100_000, "a 10,000-step history is large");
        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.remove(0); // the first warms caches and connections
    latencies.sort_by(f64::total_cmp);
    latencies
}

#[tokio::main]
async fn main() {
    let args = support::positional_args();
    let backend = args.first().map_or("sqlite", String::as_str).to_owned();
    let mlflow: Vec<String> = args
        .get(1)
        .expect("MLflow URL(s), comma-separated")
        .split(',')
        .map(str::to_owned)
        .collect();
    let seconds: u64 = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(5);
    let duration = Duration::from_secs(seconds);
    // Optionally the cells to run, as C×B pairs: `1x1,16x50`.
    let cells: Vec<(usize, u64)> = args.get(3).map_or_else(
        || vec![(1, 1), (4, 1), (16, 1), (1, 50), (4, 50), (16, 50)],
        |cells| {
            cells
                .split(',')
                .map(|cell| {
                    let (c, b) = cell.split_once('x').expect("cells as CxB,CxB");
                    (
                        c.parse().expect("clients"),
                        b.parse().expect("steps per request"),
                    )
                })
                .collect()
        },
    );
    let most_clients = cells.iter().map(|(c, _)| *c).max().unwrap_or(1);

    let server = support::server(&backend, most_clients, |settings| {
        // Report batches are all these agents send: no heartbeats, so none goes offline.
        settings.fleet.offline_after_seconds = 24 * 3600;
    })
    .await;
    let attempts = Arc::new(claimed_attempts(&server, most_clients).await);
    let next = Arc::new(
        (0..most_clients)
            .map(|_| std::sync::atomic::AtomicU64::new(1))
            .collect::<Vec<_>>(),
    );
    let client = Client::builder()
        .pool_max_idle_per_host(most_clients)
        .build()
        .expect("client");

    // A second of load on each server first, not counted: connections, caches and
    // SQLite's WAL exist before anything is timed (the first cell read 10× low without).
    let warm_up = Duration::from_secs(1);
    our_ingest(&server, &attempts, &next, 1, 1, warm_up).await;
    for url in &mlflow {
        mlflow_ingest(&client, url, 1, 1, warm_up).await;
    }
    for &(clients, steps) in &cells {
        let ours = our_ingest(&server, &attempts, &next, clients, steps, duration).await;
        let mut best: Option<Load> = None;
        for url in &mlflow {
            let theirs = mlflow_ingest(&client, url, clients, steps, duration).await;
            if best
                .as_ref()
                .is_none_or(|b| theirs.units_per_second() > b.units_per_second())
            {
                best = Some(theirs);
            }
        }
        let theirs = best.expect("an MLflow server");
        println!(
            "| {backend:<8} | {clients:>2}, {steps:>2} | {:>11.0} | {:>7.1} | {:>7.1} | {:>14.0} | {:>10.1} | {:>6.1}× |",
            ours.units_per_second(),
            ours.p50(),
            ours.p99(),
            theirs.units_per_second(),
            theirs.p99(),
            ours.units_per_second() / theirs.units_per_second(),
        );
    }

    // History: one job's 10,000 steps (six metrics each), against one MLflow series.
    let file = server.training_file().await;
    let job = server.configured_job(&file, "history").await;
    let points: Vec<_> = (1..=HISTORY_STEPS).map(support::metric_point).collect();
    metrics::record_all(&server.db, job.parse().expect("uuid"), &points)
        .await
        .expect("history");
    let history = |format: &'static str| {
        let (client, token) = (server.client.clone(), server.token.clone());
        let url = format!(
            "{}/api/v1/jobs/{job}/metrics?limit={HISTORY_STEPS}&format={format}",
            server.base
        );
        move || client.get(&url).bearer_auth(&token)
    };
    let rows = read_latencies(history("rows"), HISTORY_READS).await;
    let columns = read_latencies(history("columns"), HISTORY_READS).await;
    let run = mlflow_runs(&client, &mlflow[0], 1).await.remove(0);
    for first in (1..=HISTORY_STEPS as u64).step_by(150) {
        let steps = 150.min(HISTORY_STEPS as u64 + 1 - first);
        mlflow_call(
            &client,
            &mlflow[0],
            "runs/log-batch",
            &mlflow_batch(&run, first, steps),
        )
        .await;
    }
    let url = format!(
        "{}/api/2.0/mlflow/metrics/get-history?run_id={run}&metric_key=training_loss&max_results=25000",
        mlflow[0]
    );
    let theirs = read_latencies(|| client.get(&url), HISTORY_READS).await;
    let p50 = |l: &[f64]| support::percentile(l, 0.5);
    println!(
        "history| {backend:<8} | {:>12.1} | {:>15.1} | {:>16.1} | {:>6.1}× |",
        p50(&rows),
        p50(&columns),
        p50(&theirs),
        p50(&theirs) / p50(&rows),
    );
    server.db.close().await;
}
