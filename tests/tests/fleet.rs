//! Acceptance: jobs submitted to the control plane are trained by agents, exactly once;
//! a spot notice hands a job to another agent, which resumes it from the checkpoint to
//! the same adapter an uninterrupted run makes; a cancel stops training; a budget's cap
//! stops it with its adapter kept.

use std::collections::BTreeSet;
use std::time::Duration;

use end_to_end::{
    chat_jsonl, poll, tiny_model, trainer_eval, Agent, Api, Cloud, ControlPlane, MetadataStandIn,
};
use reqwest::Method;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(240);
/// Long enough that a notice or a kill lands mid-training even on a fast machine.
const LONG_RUN_EPOCHS: u32 = 12;

fn hyperparameters(epochs: u32) -> Value {
    json!({"rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.05, "learning_rate": 0.01, "epochs": epochs,
           "batch_size": 2, "gradient_accumulation_steps": 1, "max_seq_len": 64, "warmup_ratio": 0.0, "seed": 7})
}

/// A control plane on SQLite, a signed-in API client, a tiny model and an enriched file
/// holding `data`.
async fn setup(
    data: Vec<u8>,
) -> (
    ControlPlane,
    Api,
    tempfile::TempDir,
    std::path::PathBuf,
    String,
) {
    let plane = ControlPlane::start(false).await;
    let api = Api::login(&plane).await;
    let scratch = tempfile::tempdir().expect("temp dir");
    let model = tiny_model(scratch.path());
    let file = api.upload("codes", data).await;
    (plane, api, scratch, model, file)
}

/// The details of the job's event that reports the figure `key` (the agent's packing plan,
/// its quantization report).
async fn event_details(api: &Api, job: &str, key: &str) -> Value {
    let events = api.get(&format!("/jobs/{job}/events?limit=200")).await;
    events["data"]
        .as_array()
        .expect("events")
        .iter()
        .find(|e| e["details"][key].is_number())
        .map(|e| e["details"].clone())
        .unwrap_or_else(|| panic!("an event with {key} in its details"))
}

/// The bytes of the downloaded artifact named `name`.
fn published(files: &[(String, Vec<u8>)], name: &str) -> Vec<u8> {
    files
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, bytes)| bytes.clone())
        .unwrap_or_else(|| panic!("{name} published"))
}

/// Waits until the job has reported `step`; returns its view then.
async fn wait_for_step(api: &Api, job: &str, step: i64) -> Value {
    poll(&format!("step {step}"), LONG, || async {
        let view = api.get(&format!("/jobs/{job}")).await;
        (view["current_step"].as_i64() >= Some(step)).then_some(view)
    })
    .await
}

/// Waits until the job has a stored checkpoint (they come every 20 steps).
async fn wait_for_checkpoint(api: &Api, job: &str) {
    poll("a stored checkpoint", LONG, || async {
        let checkpoints = api.get(&format!("/jobs/{job}/checkpoints")).await;
        checkpoints["data"]
            .as_array()
            .filter(|c| !c.is_empty())
            .map(|_| ())
    })
    .await;
}

async fn metric_steps(api: &Api, job: &str) -> Vec<i64> {
    let history = api
        .get(&format!("/jobs/{job}/metrics?limit=10000&interval=1"))
        .await;
    history["data"]
        .as_array()
        .or_else(|| history.as_array())
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|p| p["step"].as_i64())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_train_five_jobs_exactly_once() {
    let plane = ControlPlane::start(true).await;
    let api = Api::login(&plane).await;
    let scratch = tempfile::tempdir().expect("temp dir");
    let model = tiny_model(scratch.path());
    let file = api.upload("codes", chat_jsonl(24)).await;
    let estimate_body = json!({"training_file_id": file, "base_model": model.display().to_string(),
                               "gpu_type": "spot", "gpu_model": "H100-80GB", "hyperparameters": hyperparameters(1)});
    // Before any run, the estimate models throughput from the size counted in the local
    // model's config.json (its name says nothing).
    let modelled = api
        .send(Method::POST, "/jobs/estimate", estimate_body.clone())
        .await;
    assert_eq!(modelled["throughput"]["source"], "modelled", "{modelled}");
    let mut jobs = Vec::new();
    for i in 0..5 {
        jobs.push(
            api.start_job(&file, &format!("job {i}"), &model, hyperparameters(1))
                .await,
        );
    }
    let _first = Agent::start(&plane, "first", &["--spot-provider", "none"]);
    let _second = Agent::start(&plane, "second", &["--spot-provider", "none"]);

    let mut agents_used = BTreeSet::new();
    let mut measured = Vec::new();
    for job in &jobs {
        let view = api.wait_status(job, "completed", LONG).await;
        assert_eq!(view["progress_percentage"], 100);
        let attempts = api.get(&format!("/jobs/{job}/attempts")).await;
        let attempts = attempts["data"].as_array().cloned().unwrap_or_default();
        assert_eq!(attempts.len(), 1, "trained exactly once: {attempts:?}");
        assert_eq!(attempts[0]["status"], "succeeded");
        agents_used.insert(attempts[0]["agent_id"].to_string());
        let steps = metric_steps(&api, job).await;
        let total = view["total_steps"].as_i64().expect("total_steps");
        assert_eq!(
            steps,
            (1..=total).collect::<Vec<_>>(),
            "one metric per step"
        );
        let files = api.download_artifacts(job).await;
        let names: BTreeSet<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        for expected in [
            "adapter_model.safetensors",
            "adapter_config.json",
            "summary.json",
            "metrics.jsonl",
        ] {
            assert!(names.contains(expected), "{expected} in {names:?}");
        }
        let summary: Value =
            serde_json::from_slice(&published(&files, "summary.json")).expect("summary");
        measured.push(summary["tokens_per_second"].as_f64().expect("tokens/s"));
    }
    assert_eq!(agents_used.len(), 2, "both agents took work");

    // The next estimate for this model on this GPU rests on the five runs: the median of
    // the tokens/s their trainers measured.
    let estimate = api
        .send(Method::POST, "/jobs/estimate", estimate_body.clone())
        .await;
    measured.sort_by(f64::total_cmp);
    assert_eq!(estimate["throughput"]["source"], "measured", "{estimate}");
    assert_eq!(estimate["throughput"]["samples"], 5);
    assert_eq!(
        estimate["throughput"]["tokens_per_second"].as_f64(),
        Some(measured[2]),
        "{estimate}"
    );
    // Runs that kept their activations say nothing of one that computes them again: a
    // checkpointing job's estimate is modelled, at 5 FLOPs a parameter instead of 4.
    let mut checkpointing = estimate_body;
    checkpointing["hyperparameters"]["gradient_checkpointing"] = json!(true);
    let slower = api
        .send(Method::POST, "/jobs/estimate", checkpointing)
        .await;
    assert_eq!(slower["throughput"]["source"], "modelled", "{slower}");
    let (plain, checkpointed) = (
        modelled["throughput"]["flops_per_token"]
            .as_f64()
            .expect("flops"),
        slower["throughput"]["flops_per_token"]
            .as_f64()
            .expect("flops"),
    );
    assert!(
        (checkpointed / plain - 1.25).abs() < 1e-9,
        "{modelled} {slower}"
    );
    let fleet = api.get("/agents").await;
    assert_eq!(fleet["data"].as_array().map(Vec::len), Some(2));
}

/// Trains the job as one uninterrupted run with the trainer library, the way an agent
/// would, and returns the adapter's tensors.
fn reference_adapter(
    model: &std::path::Path,
    data: &[u8],
    dir: &std::path::Path,
) -> std::collections::HashMap<String, candle_core::Tensor> {
    let data_path = dir.join("reference-data.jsonl");
    std::fs::write(&data_path, data).expect("data");
    let recipe: protocol::agent::Hyperparameters = serde_json::from_value(
        json!({"target_modules": protocol::LORA_TARGET_MODULES, "rank": 4, "lora_alpha": 8.0,
            "lora_dropout": 0.05, "learning_rate": 0.01, "epochs": LONG_RUN_EPOCHS, "batch_size": 2,
            "gradient_accumulation_steps": 1, "max_seq_len": 64, "warmup_ratio": 0.0, "seed": 7,
            "packing": true}),
    )
    .expect("recipe");
    let options = agent::runner::train_options(
        &recipe,
        model,
        &data_path,
        &dir.join("reference"),
        None,
        None,
        trainer::train::DeviceChoice::Cpu,
    );
    trainer::train::train(&options, &mut (), &trainer::train::Control::default())
        .expect("reference run");
    candle_core::safetensors::load(
        dir.join("reference/adapter/adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .expect("reference adapter")
}

/// Where the notice comes from: a cloud's metadata endpoint, or SIGTERM (`None`).
async fn interruption_resumes_elsewhere(cloud: Option<Cloud>) {
    let data = chat_jsonl(40);
    let (plane, api, scratch, model, file) = setup(data.clone()).await;
    let stand_in = match cloud {
        Some(cloud) => Some(MetadataStandIn::start(cloud).await),
        None => None,
    };
    let provider = cloud.map_or("sigterm", Cloud::flag);
    let mut flags = vec!["--spot-poll-milliseconds".to_owned(), "100".to_owned()];
    match (cloud, &stand_in) {
        (Some(cloud), Some(stand_in)) => flags.extend([
            "--spot-provider".to_owned(),
            cloud.flag().to_owned(),
            format!("--{}-metadata-url", cloud.flag()),
            stand_in.url.clone(),
        ]),
        _ => flags.extend(["--spot-provider".to_owned(), "none".to_owned()]),
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut spot = Agent::start(&plane, "spot", &flags);
    let job = api
        .start_job(
            &file,
            "interrupted",
            &model,
            hyperparameters(LONG_RUN_EPOCHS),
        )
        .await;
    let view = api.wait_status(&job, "training", LONG).await;
    let total = wait_for_step(&api, &job, 3).await["total_steps"]
        .as_i64()
        .expect("total steps");
    assert!(view["agent_id"].is_string());
    let _other = Agent::start(&plane, "on-demand", &["--spot-provider", "none"]);
    match &stand_in {
        Some(stand_in) => stand_in.raise(),
        None => spot.terminate(),
    }
    assert!(
        spot.wait_exit(LONG).await.success(),
        "the spot agent hands back and exits"
    );

    let done = api.wait_status(&job, "completed", LONG).await;
    let attempts = api.get(&format!("/jobs/{job}/attempts")).await;
    let attempts = attempts["data"].as_array().cloned().unwrap_or_default();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(attempts[0]["status"], "interrupted");
    assert_eq!(attempts[0]["interruption_provider"], provider);
    assert_eq!(attempts[1]["status"], "succeeded");
    assert_ne!(attempts[0]["agent_id"], attempts[1]["agent_id"]);
    let resumed_from = attempts[1]["resumed_from_step"]
        .as_i64()
        .expect("resumed from a checkpoint");
    assert!(
        resumed_from >= 3 && resumed_from < total,
        "resumed from step {resumed_from} of {total}"
    );
    assert_eq!(done["interruption_count"], 1);
    if let (Some(Cloud::Azure), Some(stand_in)) = (cloud, &stand_in) {
        assert!(
            stand_in
                .acknowledged
                .load(std::sync::atomic::Ordering::SeqCst),
            "Preempt event acknowledged"
        );
    }
    // Cost counts both attempts, at the spot rate, with what spot saved.
    let cost = api.get(&format!("/jobs/{job}/cost")).await;
    assert_eq!(cost["attempts"].as_array().map(Vec::len), Some(2));
    assert!(cost["gpu_hours"].as_f64() > Some(0.0));
    assert!(cost["spot_savings"].as_f64() >= Some(0.0));
    assert_eq!(cost["attempts"][0]["gpu_type"], "spot");
    assert!(cost["attempts"][0]["cost"].as_f64() > Some(0.0));

    // Metrics continue from the resumed step: every step once.
    assert_eq!(
        metric_steps(&api, &job).await,
        (1..=total).collect::<Vec<_>>()
    );
    let events = api.get(&format!("/jobs/{job}/events?limit=500")).await;
    let messages: Vec<String> = events["data"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e["message"].as_str().map(str::to_owned))
        .collect();
    for expected in [
        "Spot interruption",
        "queued again after interruption",
        "resuming from the checkpoint",
        "Training completed",
    ] {
        assert!(
            messages.iter().any(|m| m.contains(expected)),
            "{expected:?} in {messages:#?}"
        );
    }
    let checkpoints = api.get(&format!("/jobs/{job}/checkpoints")).await;
    assert!(checkpoints["data"]
        .as_array()
        .is_some_and(|c| !c.is_empty()));

    // The adapter equals an uninterrupted run's.
    let files = api.download_artifacts(&job).await;
    let (_, adapter) = files
        .iter()
        .find(|(name, _)| name == "adapter_model.safetensors")
        .expect("adapter uploaded");
    let resumed =
        candle_core::safetensors::load_buffer(adapter, &candle_core::Device::Cpu).expect("adapter");
    let reference = reference_adapter(&model, &data, scratch.path());
    assert_eq!(resumed.len(), reference.len());
    for (name, tensor) in &reference {
        let other = &resumed[name];
        let difference = (tensor - other)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("difference");
        assert!(difference <= 1e-5, "{name} differs by {difference}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_notice_resumes_on_another_agent() {
    interruption_resumes_elsewhere(Some(Cloud::Aws)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcp_notice_resumes_on_another_agent() {
    interruption_resumes_elsewhere(Some(Cloud::Gcp)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_notice_resumes_on_another_agent() {
    interruption_resumes_elsewhere(Some(Cloud::Azure)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_resumes_on_another_agent() {
    interruption_resumes_elsewhere(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_agent() {
    let (plane, api, _scratch, model, file) = setup(chat_jsonl(40)).await;
    let _agent = Agent::start(&plane, "worker", &["--spot-provider", "none"]);
    let job = api
        .start_job(&file, "to cancel", &model, hyperparameters(50))
        .await;
    wait_for_step(&api, &job, 2).await;
    let cancelled = api
        .send(
            Method::POST,
            &format!("/jobs/{job}/cancel"),
            json!({"reason": "enough"}),
        )
        .await;
    assert_eq!(cancelled["status"], "cancelled");
    let attempt = poll("the attempt to end", LONG, || async {
        let attempts = api.get(&format!("/jobs/{job}/attempts")).await;
        attempts["data"][0]
            .get("ended_at")
            .filter(|v| !v.is_null())
            .map(|_| attempts["data"][0].clone())
    })
    .await;
    assert_eq!(attempt["status"], "cancelled");
    let total = cancelled["total_steps"].as_i64().expect("total steps");
    let last = *metric_steps(&api, &job).await.last().expect("some steps");
    assert!(last < total, "stopped at step {last} of {total}");
}

/// `stop_at_cap`: a job whose live cost takes a budget to its amount stops at a step
/// boundary with a checkpoint, publishes that checkpoint's adapter, and ends cancelled
/// with reason budget_cap. A catalog at $36,000 an hour makes seconds of CPU cost dollars.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_cap_stops_the_job_and_keeps_its_adapter() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let catalog = scratch.path().join("catalog.toml");
    std::fs::write(
        &catalog,
        "[[gpu]]\nmodel = \"H100-80GB\"\nmemory_gb = 80\nspot_hourly = 36000\nondemand_hourly = 72000\n",
    )
    .expect("catalog");
    let plane = ControlPlane::start_with_env(
        false,
        &[
            ("CONTROL_PLANE_GPU_CATALOG", catalog.to_str().expect("path")),
            ("CONTROL_PLANE_FLEET__HEARTBEAT_INTERVAL_SECONDS", "1"),
        ],
    )
    .await;
    let api = Api::login(&plane).await;
    let model = tiny_model(scratch.path());
    let file = api.upload("codes", chat_jsonl(200)).await;
    let _agent = Agent::start(&plane, "worker", &["--spot-provider", "none"]);
    // Steps of 0.02–0.1 s: a stop's own checkpoint and uploads then take less than a step,
    // as on a real model. About a thousand of them, so the run outlasts the cap on a fast
    // machine too (100 steps once ended before it: 2.5 s of spend against 3).
    let mut settings = hyperparameters(100);
    settings["batch_size"] = json!(4);
    settings["gradient_accumulation_steps"] = json!(5);
    let job = api.start_job(&file, "capped", &model, settings).await;
    // Training is under way before the budget exists; its cap lies 3 seconds of spend
    // ($10 a second) ahead, past the next heartbeat, so the stop lands mid-training.
    let running = wait_for_step(&api, &job, 2).await;
    let cap = running["current_cost"].as_f64().expect("live cost") + 30.0;
    let budget = api
        .send(
            Method::POST,
            "/budgets",
            json!({"name": "lab", "amount": cap, "period": "monthly", "enforcement": "stop_at_cap"}),
        )
        .await;
    assert_eq!(budget["enforcement"], "stop_at_cap", "{budget}");

    let ended = api.wait_status(&job, "cancelled", LONG).await;
    assert_eq!(ended["cancelled_reason"], "budget_cap", "{ended}");
    assert_eq!(ended["stop_requested"], "budget_cap");
    let total = ended["total_steps"].as_i64().expect("total steps");
    let last = *metric_steps(&api, &job).await.last().expect("some steps");
    assert!(last < total, "stopped at step {last} of {total}");
    // The spend never passes the cap by more than one step's cost (the step's cost as
    // measured over the run: its seconds at the rate). It may fall short by what the stop
    // expected to cost (its event's `stop_allowance`: the steps in flight and twice the
    // latest checkpoint's time, which a loaded machine stretches) and a step.
    let allowance = event_details(&api, &job, "stop_allowance").await["stop_allowance"]
        .as_f64()
        .expect("allowance");
    let history = api
        .get(&format!("/jobs/{job}/metrics?limit=10000&interval=1"))
        .await;
    let points = history["data"].as_array().expect("points");
    let at = |point: &Value| {
        let recorded = point["recorded_at"].as_str().expect("recorded_at");
        let recorded = chrono::DateTime::parse_from_rfc3339(recorded).expect("timestamp");
        (point["step"].as_f64().expect("step"), recorded)
    };
    let ((first_step, first_at), (last_step, last_at)) =
        (at(&points[0]), at(&points[points.len() - 1]));
    let seconds = (last_at - first_at).as_seconds_f64();
    let step_cost = seconds / (last_step - first_step) * 10.0;
    let spent = ended["final_cost"].as_f64().expect("final cost");
    assert!(
        spent <= cap + step_cost && spent >= cap - allowance - step_cost,
        "spent ${spent} against a ${cap} cap; a step costs ${step_cost}, the stop allowed ${allowance}"
    );

    // The story: which budget stopped it, then the step whose adapter it keeps.
    let events = api.get(&format!("/jobs/{job}/events?limit=200")).await;
    let messages: Vec<&str> = events["data"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("Budget \"lab\" reaches its cap")),
        "{messages:?}"
    );
    let stopped = format!(
        "Stopped at the budget cap after step {last} (attempt 1): the adapter as of the checkpoint at step {last} is the job's adapter"
    );
    assert!(messages.contains(&stopped.as_str()), "{messages:?}");
    let attempts = api.get(&format!("/jobs/{job}/attempts")).await;
    assert_eq!(attempts["data"][0]["status"], "cancelled");

    // The published adapter is the checkpoint taken at the stop, tensor for tensor.
    let files = api.download_artifacts(&job).await;
    let file_named = |name: &str| published(&files, name);
    let summary: Value = serde_json::from_slice(&file_named("summary.json")).expect("summary");
    assert_eq!(summary["steps"], last, "{summary}");
    let adapter = candle_core::safetensors::load_buffer(
        &file_named("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .expect("adapter");
    let artifacts = api.get(&format!("/jobs/{job}/artifacts")).await;
    let checkpoint = artifacts["data"]
        .as_array()
        .expect("artifacts")
        .iter()
        .find(|a| {
            a["artifact_type"] == "checkpoint" && a["name"] == format!("checkpoint-step-{last}.tar")
        })
        .unwrap_or_else(|| panic!("a checkpoint at step {last}: {artifacts}"))
        .clone();
    let link = api
        .get(&format!(
            "/artifacts/{}/download",
            checkpoint["id"].as_str().expect("id")
        ))
        .await;
    let archive = api
        .fetch_bytes(link["download_url"].as_str().expect("url"))
        .await;
    let mut tar = tar::Archive::new(archive.as_slice());
    let mut weights = Vec::new();
    for entry in tar.entries().expect("entries") {
        let mut entry = entry.expect("entry");
        if entry
            .path()
            .expect("path")
            .ends_with("adapter_model.safetensors")
        {
            std::io::Read::read_to_end(&mut entry, &mut weights).expect("read");
        }
    }
    let checkpointed = candle_core::safetensors::load_buffer(&weights, &candle_core::Device::Cpu)
        .expect("weights");
    assert_eq!(adapter.len(), checkpointed.len());
    let mut trained = false;
    for (name, tensor) in &adapter {
        let values = |t: &candle_core::Tensor| -> Vec<f32> {
            t.flatten_all().expect("flat").to_vec1().expect("values")
        };
        let ours = values(tensor);
        assert_eq!(ours, values(&checkpointed[name]), "{name}");
        trained |= name.contains("lora_B") && ours.iter().any(|v| *v != 0.0);
    }
    assert!(trained, "the adapter has learned something");
    // It loads and evaluates with `trainer eval`, better than the base model.
    let adapter_dir = scratch.path().join("capped-adapter");
    std::fs::create_dir_all(&adapter_dir).expect("adapter dir");
    for name in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::write(adapter_dir.join(name), file_named(name)).expect("adapter file");
    }
    let data_path = scratch.path().join("capped-data.jsonl");
    std::fs::write(&data_path, chat_jsonl(40)).expect("data");
    let (base, tuned) = (
        trainer_eval(&model, None, &data_path),
        trainer_eval(&model, Some(&adapter_dir), &data_path),
    );
    assert!(
        tuned["loss"].as_f64() < base["loss"].as_f64(),
        "the kept adapter helps: {base} vs {tuned}"
    );

    // The budget's spend is the job's. Lowered to it, the budget has nothing left, and a
    // new job against it may not start.
    let budget_path = format!("/budgets/{}", budget["id"].as_str().expect("id"));
    let standing = api.get(&budget_path).await;
    assert_eq!(
        standing["current_spend"].as_f64(),
        Some(spent),
        "{standing}"
    );
    api.send(
        Method::PUT,
        &budget_path,
        json!({"name": "lab", "amount": spent, "period": "monthly", "enforcement": "stop_at_cap"}),
    )
    .await;
    let next_id = &api.create_job(&file, "after", &model).await;
    api.send(
        Method::PUT,
        &format!("/jobs/{next_id}/configure"),
        json!({"gpu_type": "spot", "gpu_model": "H100-80GB"}),
    )
    .await;
    let (status, refused) = api
        .try_send(
            Method::POST,
            &format!("/jobs/{next_id}/start"),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    assert!(
        refused["error"]["rules"][0]
            .as_str()
            .is_some_and(|r| r.contains("budget \"lab\" has $0.00 left")),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_outage_loses_no_step() {
    let (mut plane, api, _scratch, model, file) = setup(chat_jsonl(40)).await;
    let _agent = Agent::start(&plane, "worker", &["--spot-provider", "none"]);
    let job = api
        .start_job(&file, "through an outage", &model, hyperparameters(6))
        .await;
    wait_for_step(&api, &job, 2).await;
    // The agent keeps training and queues its reports on disk while the server is away.
    plane.restart_after(Duration::from_secs(2)).await;
    let done = api.wait_status(&job, "completed", LONG).await;
    let total = done["total_steps"].as_i64().expect("total steps");
    assert_eq!(
        metric_steps(&api, &job).await,
        (1..=total).collect::<Vec<_>>()
    );
    let attempts = api.get(&format!("/jobs/{job}/attempts")).await;
    assert_eq!(
        attempts["data"].as_array().map(Vec::len),
        Some(1),
        "one attempt, not a retry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_agents_job_resumes_from_its_last_checkpoint() {
    let (plane, api, _scratch, model, file) = setup(chat_jsonl(40)).await;
    let mut doomed = Agent::start(&plane, "doomed", &["--spot-provider", "none"]);
    let job = api
        .start_job(&file, "survivor", &model, hyperparameters(LONG_RUN_EPOCHS))
        .await;
    // Once a checkpoint is stored, pull the plug.
    wait_for_checkpoint(&api, &job).await;
    doomed.kill();
    let _rescuer = Agent::start(&plane, "rescuer", &["--spot-provider", "none"]);
    let done = api.wait_status(&job, "completed", LONG).await;
    let total = done["total_steps"].as_i64().expect("total steps");
    let attempts = api.get(&format!("/jobs/{job}/attempts")).await;
    assert_eq!(attempts["data"][0]["status"], "lost");
    assert_eq!(attempts["data"][1]["status"], "succeeded");
    assert!(attempts["data"][1]["resumed_from_step"].as_i64() >= Some(20));
    // Steps the lost attempt ran past its checkpoint were replayed, and appear once.
    assert_eq!(
        metric_steps(&api, &job).await,
        (1..=total).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_hands_back_its_cut_short_attempt() {
    let (plane, api, _scratch, model, file) = setup(chat_jsonl(40)).await;
    let mut agent = Agent::start(&plane, "flaky", &["--spot-provider", "none"]);
    let job = api
        .start_job(&file, "cut short", &model, hyperparameters(LONG_RUN_EPOCHS))
        .await;
    wait_for_checkpoint(&api, &job).await;
    // Killed and started again on the same host: it must not leave its job hanging.
    agent.restart(&plane, &["--spot-provider", "none"]);
    let done = api.wait_status(&job, "completed", LONG).await;
    let total = done["total_steps"].as_i64().expect("total steps");
    let attempts = api.get(&format!("/jobs/{job}/attempts")).await;
    assert_eq!(attempts["data"][0]["status"], "failed");
    assert_eq!(
        attempts["data"][0]["error_message"],
        "the agent restarted during the attempt"
    );
    assert!(attempts["data"][1]["resumed_from_step"].as_i64() >= Some(20));
    assert_eq!(done["retry_count"], 1);
    assert_eq!(
        metric_steps(&api, &job).await,
        (1..=total).collect::<Vec<_>>()
    );
}

/// With a policy that does not resume on its own, a spot notice leaves the job
/// `interrupted` while an idle agent keeps asking for work and gets none; a person's
/// resume then completes it on that agent from the notice's checkpoint, every step once.
async fn an_interrupted_job_waits_for_a_resume(recovery: Value, why: &str) {
    let (plane, api, scratch, model, file) = setup(chat_jsonl(40)).await;
    let stand_in = MetadataStandIn::start(Cloud::Aws).await;
    let flags = [
        "--spot-poll-milliseconds",
        "100",
        "--spot-provider",
        "aws",
        "--aws-metadata-url",
        &stand_in.url,
    ];
    let mut spot = Agent::start(&plane, "spot", &flags);
    let job = api
        .start_job_with(
            &file,
            "waits",
            &model,
            hyperparameters(LONG_RUN_EPOCHS),
            recovery,
        )
        .await;
    api.wait_status(&job, "training", LONG).await;
    let total = wait_for_step(&api, &job, 3).await["total_steps"]
        .as_i64()
        .expect("total steps");
    // The idle agent asks for work every second.
    let config = scratch.path().join("idle-agent.toml");
    std::fs::write(&config, "claim_wait_seconds = 1\n").expect("agent config");
    let config = config.display().to_string();
    let _idle = Agent::start(
        &plane,
        "idle",
        &["--spot-provider", "none", "--config", &config],
    );
    stand_in.raise();
    assert!(spot.wait_exit(LONG).await.success(), "the spot agent exits");

    let interrupted = api.wait_status(&job, "interrupted", LONG).await;
    let interrupted_at: chrono::DateTime<chrono::Utc> = interrupted["updated_at"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .expect("updated_at");
    poll("the idle agent to ask for work again", LONG, || async {
        let fleet = api.get("/agents").await;
        fleet["data"]
            .as_array()?
            .iter()
            .find(|a| a["name"] == "idle")?["last_heartbeat_at"]
            .as_str()?
            .parse::<chrono::DateTime<chrono::Utc>>()
            .ok()
            .filter(|at| *at > interrupted_at + chrono::Duration::seconds(2))
    })
    .await;
    let waiting = api.get(&format!("/jobs/{job}")).await;
    assert_eq!(waiting["status"], "interrupted", "nothing resumed it");
    let attempts = api.get(&format!("/jobs/{job}/attempts")).await;
    assert_eq!(attempts["data"].as_array().map(Vec::len), Some(1));
    let events = api.get(&format!("/jobs/{job}/events?limit=500")).await;
    assert!(
        events["data"].as_array().is_some_and(|e| e
            .iter()
            .any(|e| e["message"].as_str().is_some_and(|m| m.contains(why)))),
        "{why:?} in {events}"
    );

    let resumed = api
        .send(Method::POST, &format!("/jobs/{job}/resume"), json!({}))
        .await;
    assert_eq!(resumed["status"], "queued");
    let done = api.wait_status(&job, "completed", LONG).await;
    assert_eq!(done["interruption_count"], 1);
    let attempts = api.get(&format!("/jobs/{job}/attempts")).await;
    let attempts = attempts["data"].as_array().cloned().unwrap_or_default();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(attempts[0]["status"], "interrupted");
    assert_eq!(attempts[1]["status"], "succeeded");
    assert_ne!(attempts[0]["agent_id"], attempts[1]["agent_id"]);
    assert!(attempts[1]["resumed_from_step"].as_i64() >= Some(3));
    assert_eq!(
        metric_steps(&api, &job).await,
        (1..=total).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auto_resume_off_an_interruption_waits_for_a_resume() {
    an_interrupted_job_waits_for_a_resume(json!({"auto_resume": false}), "automatic resume is off")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_interruptions_allowed_an_interruption_waits_for_a_resume() {
    an_interrupted_job_waits_for_a_resume(
        json!({"max_interruptions": 0}),
        "automatic resumes are spent",
    )
    .await;
}

/// A job that asks for a GGUF export ends with a `gguf_adapter` artifact: the llama.cpp
/// adapter `trainer export` writes from the job's own PEFT adapter, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_asks_for_a_gguf_adapter_and_gets_one() {
    let (plane, api, scratch, model, file) = setup(chat_jsonl(20)).await;
    let id = api.create_job(&file, "gguf", &model).await;
    let configure = |exports: Value| {
        json!({"hyperparameters": hyperparameters(1), "gpu_type": "spot", "gpu_model": "H100-80GB",
               "exports": exports})
    };
    let (status, refused) = api
        .try_send(
            Method::PUT,
            &format!("/jobs/{id}/configure"),
            Some(configure(json!(["gguf", "onnx"]))),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    assert!(refused.to_string().contains("exports[1]"), "{refused}");
    let configured = api
        .send(
            Method::PUT,
            &format!("/jobs/{id}/configure"),
            configure(json!(["gguf"])),
        )
        .await;
    assert_eq!(configured["exports"], json!(["gguf"]), "{configured}");
    api.send(Method::POST, &format!("/jobs/{id}/start"), json!({}))
        .await;
    let _agent = Agent::start(&plane, "worker", &["--spot-provider", "none"]);
    api.wait_status(&id, "completed", LONG).await;

    let artifacts = api.get(&format!("/jobs/{id}/artifacts")).await;
    assert!(
        artifacts["data"]
            .as_array()
            .expect("artifacts")
            .iter()
            .any(|a| a["artifact_type"] == "gguf_adapter" && a["name"] == "adapter.gguf"),
        "{artifacts}"
    );
    let files = api.download_artifacts(&id).await;
    let file_named = |name: &str| published(&files, name);
    let gguf = file_named("adapter.gguf");
    assert_eq!(&gguf[..4], b"GGUF");
    let adapter_dir = scratch.path().join("downloaded").join("adapter");
    std::fs::create_dir_all(&adapter_dir).expect("adapter dir");
    for name in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::write(adapter_dir.join(name), file_named(name)).expect("adapter file");
    }
    let exported = scratch.path().join("exported.gguf");
    let output = std::process::Command::new(end_to_end::binary("trainer"))
        .args(["export", "--format", "gguf", "--dtype", "f16"])
        .arg("--adapter")
        .arg(&adapter_dir)
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(&exported)
        .output()
        .expect("trainer export");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        std::fs::read(&exported).expect("exported") == gguf,
        "the job's GGUF adapter is its PEFT adapter's export"
    );
}

/// Keep-best and early stopping through the platform: the job's hyperparameters reach
/// the trainer, an event says why training stopped early, the published adapter is the
/// best evaluation's and the job page's loss chart marks that step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_stops_early_and_keeps_its_best_adapter() {
    let (plane, api, _scratch, model, file) = setup(chat_jsonl(20)).await;
    let mut settings = hyperparameters(5);
    // No evaluation improves by 100 nats: training stops after two evaluations.
    settings["eval_every"] = json!(1);
    settings["early_stopping_patience"] = json!(1);
    settings["early_stopping_min_delta"] = json!(100.0);
    settings["keep_best"] = json!(true);
    let job = api.start_job(&file, "early", &model, settings).await;
    let _agent = Agent::start(&plane, "worker", &["--spot-provider", "none"]);
    let ended = api.wait_status(&job, "completed", LONG).await;
    assert_eq!(ended["current_step"], 2, "{ended}");
    assert_eq!(ended["hyperparameters"]["keep_best"], true);

    let events = api.get(&format!("/jobs/{job}/events?limit=200")).await;
    assert!(
        events["data"]
            .as_array()
            .expect("events")
            .iter()
            .any(|e| e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("Stopped early after step 2"))),
        "{events}"
    );
    let files = api.download_artifacts(&job).await;
    let summary: Value =
        serde_json::from_slice(&published(&files, "summary.json")).expect("summary");
    let best = summary["best_step"].as_i64().expect("best step");
    assert_eq!(
        summary["adapter_step"], best,
        "the best evaluation's adapter"
    );

    let page = api.page(&format!("/training/job/{job}")).await;
    assert!(
        page.contains(&format!("best · step {best}")),
        "the loss chart marks the best step: {}",
        page.split("<figcaption>Loss</figcaption>")
            .nth(1)
            .unwrap_or(&page)
            .split("</svg>")
            .next()
            .unwrap_or_default()
    );
}

/// Packing through the platform: a new job packs by default, its agent reports the plan
/// (an event with its figures), the job page shows it and the trainer's summary counts
/// the run's efficiency; a step then holds more conversations than rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packed_job_shows_its_packing_on_the_job_page() {
    let (plane, api, _scratch, model, file) = setup(chat_jsonl(24)).await;
    let mut settings = hyperparameters(1);
    // Rows long enough for several of these short conversations each.
    settings["max_seq_len"] = json!(256);
    let job = api.start_job(&file, "packed", &model, settings).await;
    let _agent = Agent::start(&plane, "worker", &["--spot-provider", "none"]);
    let ended = api.wait_status(&job, "completed", LONG).await;
    assert_eq!(ended["hyperparameters"]["packing"], true, "{ended}");

    let plan = event_details(&api, &job, "packing_efficiency").await;
    let (conversations, rows) = (
        plan["conversations"].as_u64().expect("conversations"),
        plan["rows"].as_u64().expect("rows"),
    );
    assert!(rows * 2 <= conversations, "{plan}");

    let files = api.download_artifacts(&job).await;
    let summary: Value =
        serde_json::from_slice(&published(&files, "summary.json")).expect("summary");
    assert_eq!(summary["packing"], true);
    assert_eq!(summary["train_examples"].as_u64(), Some(conversations));
    assert_eq!(
        summary["steps"].as_u64(),
        Some(rows.div_ceil(2)),
        "two rows a step, not two conversations"
    );
    let efficiency = summary["packing_efficiency"].as_f64().expect("efficiency");
    assert!(efficiency > 0.0 && efficiency <= 1.0, "{summary}");

    let page = api.page(&format!("/training/job/{job}")).await;
    let expected = format!(
        "Batching: packed: {conversations} conversations in {rows} rows of up to 256 tokens"
    );
    assert!(page.contains(&expected), "{expected:?} on the job page");
}

/// A quantized base and gradient checkpointing through the platform: the job asks for
/// q8_0 and checkpointing, its agent trains on the quantized projections (computing each
/// layer again in the backward) and reports their sizes (an event with its figures), the
/// job page shows both and the trainer's summary records them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_on_a_quantized_base_shows_how_it_was_held() {
    let (plane, api, _scratch, model, file) = setup(chat_jsonl(20)).await;
    let mut settings = hyperparameters(1);
    settings["base_quant"] = json!("q8_0");
    settings["gradient_checkpointing"] = json!(true);
    let job = api.start_job(&file, "quantized", &model, settings).await;
    let _agent = Agent::start(&plane, "worker", &["--spot-provider", "none"]);
    let ended = api.wait_status(&job, "completed", LONG).await;
    assert_eq!(ended["hyperparameters"]["base_quant"], "q8_0", "{ended}");

    let sizes = event_details(&api, &job, "held_bytes").await;
    let (held, dense) = (
        sizes["held_bytes"].as_f64().expect("held"),
        sizes["dense_bytes"].as_f64().expect("dense"),
    );
    // f32 weights held as q8_0 blocks: 34 bytes for every 32 weights of 4 bytes.
    assert!((held / dense - 34.0 / 128.0).abs() < 1e-9, "{sizes}");

    let files = api.download_artifacts(&job).await;
    let summary: Value =
        serde_json::from_slice(&published(&files, "summary.json")).expect("summary");
    assert_eq!(summary["quantization"]["base_quant"], "q8_0", "{summary}");
    assert_eq!(summary["gradient_checkpointing"], true, "{summary}");

    let page = api.page(&format!("/training/job/{job}")).await;
    assert!(
        page.contains("Base: decoder projections quantized to q8_0"),
        "the job page says how the base was held"
    );
    assert!(
        page.contains("Memory: gradient checkpointing"),
        "the job page says the activations are computed again"
    );
}
