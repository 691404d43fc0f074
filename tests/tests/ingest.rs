//! The metric path under a crash: agents stream report batches while the control plane is
//! killed (SIGKILL, no shutdown); every point it acknowledged is stored after it restarts.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use end_to_end::{chat_jsonl, poll, Api, ControlPlane};
use reqwest::Client;
use serde_json::{json, Value};

const AGENTS: usize = 4;
const STEPS_PER_BATCH: u64 = 25;

#[tokio::test]
async fn sqlite_acknowledged_points_survive_a_kill() {
    acknowledged_points_survive_a_kill(false).await;
}

#[tokio::test]
async fn postgres_acknowledged_points_survive_a_kill() {
    acknowledged_points_survive_a_kill(true).await;
}

fn batch(first: u64) -> Value {
    let reports: Vec<Value> = (first..first + STEPS_PER_BATCH)
        .map(|step| {
            json!({"kind": "metric", "key": format!("step-{step}"), "metric": {
                "step": step, "total_steps": 1_000_000, "epoch": 0.0, "training_loss": 2.0,
                "validation_loss": null, "learning_rate": 0.0002, "grad_norm": 0.5,
                "tokens_per_second": 100.0, "gpu_utilization": null, "memory_used_gb": null,
                "elapsed_seconds": 1.0, "recorded_at": "2026-12-03T10:00:00Z"}})
        })
        .collect();
    json!({ "reports": reports })
}

/// A registered agent's secret and the attempt it claimed.
async fn claiming_agent(plane: &ControlPlane, http: &Client, name: &str) -> (String, String) {
    let registered: Value = http
        .post(format!("{}/api/v1/agents/register", plane.url))
        .json(&json!({"enrollment_token": plane.enrollment_token(), "name": name}))
        .send()
        .await
        .expect("register")
        .json()
        .await
        .expect("registered");
    let secret = registered["agent_secret"]
        .as_str()
        .expect("secret")
        .to_owned();
    let assignment: Value = http
        .post(format!("{}/api/v1/agent/claim", plane.url))
        .bearer_auth(&secret)
        .json(
            &json!({"wait_seconds": 0, "heartbeat": {"gpus": [], "host": {"cpu_percent": 1.0,
            "cpu_count": 2, "memory_used_mb": 1000, "memory_total_mb": 64000, "disk_free_mb": 1000},
            "capacity": "ondemand", "attempt_id": null, "labels": {}}}),
        )
        .send()
        .await
        .expect("claim")
        .json()
        .await
        .expect("assignment");
    let attempt = assignment["attempt_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no assignment: {assignment}"))
        .to_owned();
    (secret, attempt)
}

async fn acknowledged_points_survive_a_kill(postgres: bool) {
    let mut plane = ControlPlane::start(postgres).await;
    let api = Api::login(&plane).await;
    let file = api.upload("chat", chat_jsonl(30)).await;
    let http = Client::new();
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let job = api
            .start_job(
                &file,
                &format!("ingest {i}"),
                Path::new("HuggingFaceTB/SmolLM2-135M"),
                json!({}),
            )
            .await;
        let (secret, attempt) = claiming_agent(&plane, &http, &format!("host-{i}")).await;
        agents.push((job, secret, attempt));
    }

    // Each agent streams batches until the server stops answering; a batch counts as
    // acknowledged when the reply says all of it was stored.
    let acknowledged: Arc<Mutex<Vec<BTreeSet<u64>>>> =
        Arc::new(Mutex::new(vec![BTreeSet::new(); AGENTS]));
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = agents
        .iter()
        .enumerate()
        .map(|(index, (_, secret, attempt))| {
            let (http, acknowledged, stop) = (http.clone(), acknowledged.clone(), stop.clone());
            let url = format!("{}/api/v1/agent/attempts/{attempt}/reports", plane.url);
            let secret = secret.clone();
            tokio::spawn(async move {
                let mut first = 1;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(response) = http
                        .post(&url)
                        .bearer_auth(&secret)
                        .json(&batch(first))
                        .send()
                        .await
                    else {
                        return; // the server is gone
                    };
                    let Ok(reply) = response.json::<Value>().await else {
                        return;
                    };
                    if reply["accepted"] == STEPS_PER_BATCH && reply["stop_attempt"] == false {
                        let mut acknowledged = acknowledged.lock().expect("lock");
                        acknowledged[index].extend(first..first + STEPS_PER_BATCH);
                    }
                    first += STEPS_PER_BATCH;
                }
            })
        })
        .collect();
    // Kill it mid-ingest: once every agent has had batches acknowledged.
    poll(
        "batches acknowledged by the server",
        Duration::from_secs(60),
        || async {
            let acknowledged = acknowledged.lock().expect("lock");
            acknowledged
                .iter()
                .all(|steps| steps.len() as u64 >= 4 * STEPS_PER_BATCH)
                .then_some(())
        },
    )
    .await;
    plane.restart_after(Duration::ZERO).await;
    // A sender that reached the restarted server is done too.
    stop.store(true, Ordering::Relaxed);
    for sender in senders {
        sender.await.expect("sender");
    }

    let acknowledged = acknowledged.lock().expect("lock").clone();
    for ((job, _, _), acknowledged) in agents.iter().zip(acknowledged) {
        let history = api.get(&format!("/jobs/{job}/metrics?limit=100000")).await;
        let stored: BTreeSet<u64> = history["data"]
            .as_array()
            .expect("data")
            .iter()
            .filter_map(|p| p["step"].as_u64())
            .collect();
        let lost: Vec<_> = acknowledged.difference(&stored).collect();
        assert!(
            lost.is_empty(),
            "job {job}: acknowledged but lost: {lost:?}"
        );
        assert!(acknowledged.len() >= 100, "the kill came mid-ingest");
    }
}
