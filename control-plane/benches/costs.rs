//! Cost reports at scale: the real server over a database holding 100,000 cost records
//! (one per finished job, spread over the last 90 days and 20 teams), 10,000 of them the
//! signed-in user's; N concurrent clients ask for each report for a few seconds.
//!
//!   cargo bench -p control-plane --bench costs -- <sqlite|postgres> [clients] [seconds]
//!
//! Prints one table row per report: backend, report, clients, requests/s, p50 and p99 ms.
//! `scripts/bench-costs` runs both backends.

use std::time::Duration;

use chrono::Utc;
use control_plane::db::Db;
use control_plane::domain::{JobStatus, Role};
use control_plane::service::account::create_account;
use uuid::Uuid;

#[path = "support/mod.rs"]
mod support;

const RECORDS: usize = 100_000;
/// Of `RECORDS`, the signed-in user's.
const OWN: usize = 10_000;
const ROWS_PER_INSERT: usize = 1_000;

/// Inserts `RECORDS` finished jobs and their cost records, every tenth the user's.
async fn fill(db: &Db, user: Uuid, other: Uuid, file: Uuid) {
    let now = Utc::now();
    let rows: Vec<(Uuid, Uuid, String, chrono::DateTime<Utc>, f64)> = (0..RECORDS)
        .map(|i| {
            let owner = if i % (RECORDS / OWN) == 0 {
                user
            } else {
                other
            };
            let at = now - chrono::Duration::minutes((i as i64 * 127) % (90 * 24 * 60));
            (
                Uuid::new_v4(),
                owner,
                format!("team-{}", i % 20),
                at,
                0.5 + (i % 97) as f64,
            )
        })
        .collect();
    macro_rules! insert_all {
        ($pool:expr) => {{
            let mut tx = $pool.begin().await.expect("transaction");
            for chunk in rows.chunks(ROWS_PER_INSERT) {
                let mut jobs = sqlx::QueryBuilder::new(
                    "INSERT INTO training_jobs (id, user_id, name, base_model, training_file_id, status,
                                                created_at, updated_at, started_at, team, project) ",
                );
                jobs.push_values(chunk, |mut row, (id, owner, team, at, _)| {
                    row.push_bind(*id)
                        .push_bind(*owner)
                        .push_bind("bench job")
                        .push_bind("m")
                        .push_bind(file)
                        .push_bind(JobStatus::Completed)
                        .push_bind(*at)
                        .push_bind(*at)
                        .push_bind(*at)
                        .push_bind(team.clone())
                        .push_bind("bench");
                });
                jobs.build().execute(&mut *tx).await.expect("jobs");
                let mut records = sqlx::QueryBuilder::new(
                    "INSERT INTO cost_tracking (id, job_id, user_id, incurred_at, compute_cost, storage_cost,
                                                network_cost, total_cost, gpu_hours, spot_savings, team, project,
                                                created_at, updated_at) ",
                );
                records.push_values(chunk, |mut row, (id, owner, team, at, cost)| {
                    row.push_bind(Uuid::new_v4())
                        .push_bind(*id)
                        .push_bind(*owner)
                        .push_bind(*at)
                        .push_bind(*cost)
                        .push_bind(0.0)
                        .push_bind(0.0)
                        .push_bind(*cost)
                        .push_bind(cost / 3.0)
                        .push_bind(cost / 5.0)
                        .push_bind(team.clone())
                        .push_bind("bench")
                        .push_bind(*at)
                        .push_bind(*at);
                });
                records.build().execute(&mut *tx).await.expect("cost records");
            }
            tx.commit().await.expect("commit");
        }};
    }
    match db {
        Db::Sqlite(pool) => insert_all!(pool),
        Db::Postgres(pool) => {
            insert_all!(pool);
            // What autovacuum does to a table after this many inserts: statistics, and the
            // visibility map index-only scans rely on. Measured without it, the first
            // minutes after a bulk load plan from stale statistics.
            sqlx::query("VACUUM ANALYZE")
                .execute(pool)
                .await
                .expect("vacuum");
        }
    }
    // Records written behind the server's back: the daily rollup is rebuilt, as the hourly
    // storage refresh does.
    control_plane::db::cost_tracking::refresh_artifact_costs(
        db,
        None,
        &Default::default(),
        control_plane::db::now(),
    )
    .await
    .expect("rollup");
}

#[tokio::main]
async fn main() {
    let (backend, clients, seconds) = support::load_args();

    let server = support::server(&backend, clients, |_| ()).await;
    let me: serde_json::Value = server
        .client
        .get(format!("{}/api/v1/auth/me", server.base))
        .bearer_auth(&server.token)
        .send()
        .await
        .expect("me")
        .json()
        .await
        .expect("me");
    let user: Uuid = me["id"].as_str().expect("id").parse().expect("uuid");
    let other = create_account(
        &server.db,
        "other@example.com",
        "a-password".into(),
        Role::User,
    )
    .await
    .expect("other user")
    .id;
    let file: Uuid = server.training_file().await.parse().expect("uuid");
    fill(&server.db, user, other, file).await;

    let start_date = (Utc::now().date_naive() - chrono::Duration::days(89)).to_string();
    let reports = [
        (
            "summary, this month",
            "/api/v1/cost-tracking/summary".to_owned(),
        ),
        (
            "summary, one team, 90 days",
            format!("/api/v1/cost-tracking/summary?team=team-7&start_date={start_date}"),
        ),
        (
            "trends, 30 days by day",
            "/api/v1/cost-tracking/trends".to_owned(),
        ),
        (
            "trends, 90 days by week",
            format!("/api/v1/cost-tracking/trends?period=week&start_date={start_date}"),
        ),
        ("budgets (3)", "/api/v1/budgets".to_owned()),
    ];
    for (name, amount) in [("month", 5000.0), ("team-7", 800.0), ("quarter", 20000.0)] {
        let body = match name {
            "team-7" => {
                serde_json::json!({"name": name, "amount": amount, "period": "monthly", "team": "team-7"})
            }
            "quarter" => serde_json::json!({"name": name, "amount": amount, "period": "quarterly"}),
            _ => serde_json::json!({"name": name, "amount": amount, "period": "monthly"}),
        };
        let response = server
            .client
            .post(format!("{}/api/v1/budgets", server.base))
            .bearer_auth(&server.token)
            .json(&body)
            .send()
            .await
            .expect("budget");
        assert!(response.status().is_success(), "{}", response.status());
    }
    for (name, path) in reports {
        let (client, token, url) = (
            server.client.clone(),
            server.token.clone(),
            format!("{}{path}", server.base),
        );
        let load = support::closed_loop(clients, Duration::from_secs(seconds), move |_, _| {
            let (client, token, url) = (client.clone(), token.clone(), url.clone());
            async move {
                let response = client
                    .get(&url)
                    .bearer_auth(&token)
                    .send()
                    .await
                    .expect("report");
                assert!(
                    response.status().is_success(),
                    "{url}: {}",
                    response.status()
                );
                response.bytes().await.expect("body");
                1
            }
        })
        .await;
        println!(
            "| {backend:<8} | {name:<28} | {clients:>7} | {:>10.0} | {:>7.1} | {:>7.1} |",
            load.requests_per_second(),
            load.p50(),
            load.p99()
        );
    }
    server.db.close().await;
}
