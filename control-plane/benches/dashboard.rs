//! Dashboard latency under concurrent load: the real server on a real port, a signed-in
//! session, 50 jobs, one with 10,000 metric points and 500 events; for each page, N
//! concurrent clients request it for a few seconds.
//!
//!   cargo bench -p control-plane --bench dashboard -- <sqlite|postgres> [clients] [seconds]
//!
//! Prints one table row per page: backend, page, clients, requests/s, p50 and p99 ms.
//! `scripts/bench-dashboard` runs both backends.

use std::time::{Duration, Instant};

use chrono::Utc;
use control_plane::configuration::Settings;
use control_plane::db::events::{self, Event};
use control_plane::db::metrics::{self, MetricPoint};
use control_plane::domain::{EventType, Role, Severity};
use control_plane::service::account::create_account;
use control_plane::startup::Application;
use reqwest::{header, redirect, Client};
use serde_json::{json, Value};

#[path = "support/mod.rs"]
mod support;

const METRIC_POINTS: i64 = 10_000;

async fn seed(client: &Client, base: &str, token: &str) -> String {
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
    let file: Value = client
        .post(format!("{base}/api/v1/training-files"))
        .bearer_auth(token)
        .multipart(form)
        .send()
        .await
        .expect("upload")
        .json()
        .await
        .expect("file");
    let file_id = file["id"].as_str().expect("file id").to_owned();
    loop {
        let file: Value = client
            .get(format!("{base}/api/v1/training-files/{file_id}"))
            .bearer_auth(token)
            .send()
            .await
            .expect("file")
            .json()
            .await
            .expect("file");
        if file["enrichment_status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut last = String::new();
    for i in 0..50 {
        let job: Value = client
            .post(format!("{base}/api/v1/jobs"))
            .bearer_auth(token)
            .json(&json!({"training_file_id": file_id, "name": format!("job {i}"), "base_model": "HuggingFaceTB/SmolLM2-135M"}))
            .send()
            .await
            .expect("job")
            .json()
            .await
            .expect("job");
        last = job["id"].as_str().expect("job id").to_owned();
        client
            .put(format!("{base}/api/v1/jobs/{last}/configure"))
            .bearer_auth(token)
            .json(&json!({"gpu_type": "spot", "gpu_model": "H100-80GB"}))
            .send()
            .await
            .expect("configure");
    }
    last
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

#[tokio::main]
async fn main() {
    let args = support::positional_args();
    let backend = args.first().map_or("sqlite", String::as_str).to_owned();
    let clients: usize = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(16);
    let seconds: u64 = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(5);

    let (db, database) = support::database(&backend).await;
    let dir = &database.data_dir;
    db.migrate().await.expect("migrations");
    let settings = Settings {
        listen: "127.0.0.1:0".parse().expect("address"),
        data_dir: dir.path().to_path_buf(),
        ..Settings::default()
    };
    let app = Application::with_database(settings, db.clone())
        .await
        .expect("application");
    let base = format!("http://{}", app.address());
    tokio::spawn(app.run_until(std::future::pending()));
    create_account(
        &db,
        "bench@example.com",
        "bench-password".into(),
        Role::User,
    )
    .await
    .expect("account");

    let client = Client::builder()
        .redirect(redirect::Policy::none())
        .pool_max_idle_per_host(clients)
        .build()
        .expect("client");
    let login: Value = client
        .post(format!("{base}/api/v1/auth/login"))
        .json(&json!({"email": "bench@example.com", "password": "bench-password"}))
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("login");
    let token = login["token"].as_str().expect("token").to_owned();
    let session = client
        .post(format!("{base}/login"))
        .form(&[
            ("email", "bench@example.com"),
            ("password", "bench-password"),
        ])
        .send()
        .await
        .expect("login form");
    let cookie = session.headers()[header::SET_COOKIE]
        .to_str()
        .expect("cookie")
        .split(';')
        .next()
        .expect("pair")
        .to_owned();
    let job = seed(&client, &base, &token).await;
    let job_id = job.parse().expect("uuid");
    let points: Vec<MetricPoint> = (1..=METRIC_POINTS)
        .map(|step| MetricPoint {
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
        })
        .collect();
    metrics::record_all(&db, job_id, &points)
        .await
        .expect("metrics");
    for i in 0..500 {
        events::insert(
            &db,
            &Event::new(
                job_id,
                EventType::Info,
                Severity::Info,
                format!("event {i}"),
            ),
        )
        .await
        .expect("event");
    }

    for (page, path) in [
        ("home", "/".to_owned()),
        ("jobs list", "/training/jobs".to_owned()),
        ("job detail (10k points)", format!("/training/job/{job}")),
    ] {
        // One request first, so the measured ones find warm caches and connections.
        let warm = client
            .get(format!("{base}{path}"))
            .header(header::COOKIE, &cookie)
            .send()
            .await
            .expect("page");
        assert!(warm.status().is_success(), "{path}: {}", warm.status());
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let started = Instant::now();
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                let (client, url, cookie) =
                    (client.clone(), format!("{base}{path}"), cookie.clone());
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    while Instant::now() < deadline {
                        let sent = Instant::now();
                        let response = client
                            .get(&url)
                            .header(header::COOKIE, &cookie)
                            .send()
                            .await
                            .expect("page");
                        let _ = response.bytes().await.expect("body");
                        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                    }
                    latencies
                })
            })
            .collect();
        let mut latencies = Vec::new();
        for worker in workers {
            latencies.extend(worker.await.expect("worker"));
        }
        let elapsed = started.elapsed().as_secs_f64();
        latencies.sort_by(f64::total_cmp);
        println!(
            "| {backend:<8} | {page:<24} | {clients:>7} | {:>10.0} | {:>7.1} | {:>7.1} |",
            latencies.len() as f64 / elapsed,
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.99),
        );
    }
    db.close().await;
}
