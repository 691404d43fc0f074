//! Dashboard latency under concurrent load: the real server on a real port, a signed-in
//! session, 50 jobs, one with 10,000 metric points and 500 events; for each page, N
//! concurrent clients request it for a few seconds.
//!
//!   cargo bench -p control-plane --bench dashboard -- <sqlite|postgres> [clients] [seconds]
//!
//! Prints one table row per page: backend, page, clients, requests/s, p50 and p99 ms.
//! `scripts/bench-dashboard` runs both backends.

use std::time::Duration;

use control_plane::db::events::{self, Event};
use control_plane::db::metrics::{self, MetricPoint};
use control_plane::domain::{EventType, Severity};
use reqwest::header;

#[path = "support/mod.rs"]
mod support;

const METRIC_POINTS: i64 = 10_000;

#[tokio::main]
async fn main() {
    let (backend, clients, seconds) = support::load_args();

    let server = support::server(&backend, clients, |_| ()).await;
    let (db, base, client) = (&server.db, &server.base, &server.client);
    let session = client
        .post(format!("{base}/login"))
        .form(&[("email", support::EMAIL), ("password", support::PASSWORD)])
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
    let file = server.training_file().await;
    let mut job = String::new();
    for i in 0..50 {
        job = server.configured_job(&file, &format!("job {i}")).await;
    }
    let job_id = job.parse().expect("uuid");
    let points: Vec<MetricPoint> = (1..=METRIC_POINTS).map(support::metric_point).collect();
    metrics::record_all(db, job_id, &points)
        .await
        .expect("metrics");
    for i in 0..500 {
        events::insert(
            db,
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
        let (url, cookie) = (format!("{base}{path}"), cookie.clone());
        let load = support::closed_loop(clients, Duration::from_secs(seconds), {
            let client = client.clone();
            move |_, _| {
                let (client, url, cookie) = (client.clone(), url.clone(), cookie.clone());
                async move {
                    let response = client
                        .get(&url)
                        .header(header::COOKIE, &cookie)
                        .send()
                        .await
                        .expect("page");
                    let _ = response.bytes().await.expect("body");
                    1
                }
            }
        })
        .await;
        println!(
            "| {backend:<8} | {page:<24} | {clients:>7} | {:>10.0} | {:>7.1} | {:>7.1} |",
            load.requests_per_second(),
            load.p50(),
            load.p99(),
        );
    }
    server.db.close().await;
}
