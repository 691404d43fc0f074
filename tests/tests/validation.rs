//! Acceptance of stage 6: validations of completed jobs run on a real agent with the
//! real trainer on a tiny model; the judge is a local stand-in speaking the
//! chat-completions protocol. Perplexity equals `trainer eval`, the judge's scores reach
//! the emotional intelligence suite (and a down judge fails it), gates give each
//! verdict, a baseline gives deltas, exports hold the figures, other users get 404, and
//! `validate_on_completion` runs on its own.

use std::path::Path;
use std::time::Duration;

use end_to_end::{
    chat_jsonl, poll, tiny_model, trainer_eval, Agent, Api, ControlPlane, JudgeStandIn,
};
use reqwest::Method;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(300);

fn hyperparameters(epochs: u32, learning_rate: f64) -> Value {
    json!({"rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.0, "learning_rate": learning_rate, "epochs": epochs,
           "batch_size": 4, "gradient_accumulation_steps": 1, "max_seq_len": 64, "warmup_ratio": 0.0, "seed": 7})
}

/// Conversations held out for validation, with the metadata voice breaks down by.
fn validation_jsonl() -> Vec<u8> {
    let mut out = String::new();
    for i in 100..108 {
        let persona = if i % 2 == 0 { "calm" } else { "anxious" };
        let line = json!({
            "messages": [
                {"role": "user", "content": format!("What is the code for item {i}?")},
                {"role": "assistant", "content": format!("The code for item {i} is C-{}.", i * 7 % 100)},
            ],
            "metadata": {"persona": persona, "emotional_arc": "steady"},
        });
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out.into_bytes()
}

/// Creates, configures and starts a job with `extra` fields on create and configure.
async fn start_job(
    api: &Api,
    file: &str,
    name: &str,
    model: &Path,
    create: Value,
    configure: Value,
) -> String {
    let mut body =
        json!({"training_file_id": file, "name": name, "base_model": model.display().to_string()});
    merge(&mut body, create);
    let job = api.send(Method::POST, "/jobs", body).await;
    let id = job["id"].as_str().expect("job id").to_owned();
    let mut body = json!({"preset_id": "00000000-0000-4000-8000-000000000002", "gpu_type": "spot",
                          "gpu_model": "H100-80GB"});
    merge(&mut body, configure);
    api.send(Method::PUT, &format!("/jobs/{id}/configure"), body)
        .await;
    api.send(Method::POST, &format!("/jobs/{id}/start"), json!({}))
        .await;
    id
}

fn merge(into: &mut Value, from: Value) {
    if let (Some(into), Value::Object(from)) = (into.as_object_mut(), from) {
        into.extend(from);
    }
}

/// Queues a validation and waits for it to end; returns the run.
async fn validate(api: &Api, job: &str, request: Value) -> Value {
    let (status, accepted) = api
        .try_send(
            Method::POST,
            &format!("/validation/{job}/run"),
            Some(request),
        )
        .await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["status"], "queued");
    assert!(accepted["estimated_completion"].is_string());
    let id = accepted["validation_id"]
        .as_str()
        .expect("validation id")
        .to_owned();
    wait_run(api, &id).await
}

async fn wait_run(api: &Api, id: &str) -> Value {
    poll(&format!("validation {id} to end"), LONG, || async {
        let run = api.get(&format!("/validation/runs/{id}")).await;
        matches!(run["status"].as_str(), Some("completed" | "failed")).then_some(run)
    })
    .await
}

fn close(a: &Value, b: &Value) -> bool {
    matches!((a.as_f64(), b.as_f64()), (Some(a), Some(b)) if (a - b).abs() < 1e-6)
}

async fn suites_gates_comparison_and_exports(postgres: bool) {
    let judge = JudgeStandIn::start().await;
    let plane = ControlPlane::start_with_env(
        postgres,
        &[("CONTROL_PLANE_VALIDATION__JUDGE__BASE_URL", &judge.url)],
    )
    .await;
    let api = Api::login(&plane).await;
    let scratch = tempfile::tempdir().expect("temp dir");
    let model = tiny_model(scratch.path());
    let training = api.upload("codes", chat_jsonl(40)).await;
    let held_out = api.upload("held-out", validation_jsonl()).await;
    let _agent = Agent::start(&plane, "validator", &[]);

    // A job that validates on completion, on its own validation file.
    let tuned = start_job(
        &api,
        &training,
        "tuned codes",
        &model,
        json!({"validation_file_id": held_out}),
        json!({"hyperparameters": hyperparameters(4, 0.01),
               "validate_on_completion": {"test_suites": ["perplexity", "stop_behaviour"], "max_samples": 3,
                                          "max_new_tokens": 12}}),
    )
    .await;
    api.wait_status(&tuned, "completed", LONG).await;
    // Training measured its validation loss on the validation file, not on a split.
    let events = api.get(&format!("/jobs/{tuned}/events?limit=200")).await;
    let summary = events["data"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|e| e["details"]["summary"].as_object().cloned())
        .expect("the completion event's summary");
    assert_eq!(summary["validation_examples"], 8, "{summary:?}");
    assert_eq!(summary["train_examples"], 40, "{summary:?}");
    let automatic = poll("the automatic validation", LONG, || async {
        let (status, run) = api
            .try_send(Method::GET, &format!("/validation/{tuned}"), None)
            .await;
        (status == 200 && run["status"] == "completed").then_some(run)
    })
    .await;
    assert_eq!(automatic["automatic"], true, "{automatic}");
    assert_eq!(automatic["examples"]["source"], "validation_file");
    assert_eq!(
        automatic["examples"]["lines"].as_array().map(Vec::len),
        Some(8)
    );

    // An over-trained adapter on the same base model: the baseline.
    let overtrained = start_job(
        &api,
        &training,
        "over-trained codes",
        &model,
        json!({}),
        json!({"hyperparameters": hyperparameters(12, 0.08)}),
    )
    .await;
    api.wait_status(&overtrained, "completed", LONG).await;

    let run = validate(
        &api,
        &tuned,
        json!({"test_suites": ["perplexity", "knowledge_retention", "voice_consistency", "emotional_intelligence",
                               "stop_behaviour"],
               "comparison_baseline": overtrained, "retention_file_id": held_out, "max_samples": 3, "max_new_tokens": 12}),
    )
    .await;
    assert_eq!(run["status"], "completed", "{run}");
    assert!(run["overall_score"].as_f64().is_some(), "{run}");
    assert!(matches!(
        run["overall_status"].as_str(),
        Some("production_ready" | "review_required" | "blocked")
    ));

    // Perplexity equals `trainer eval` on the same examples, base and adapter.
    let adapter_dir = scratch.path().join("adapter");
    std::fs::create_dir_all(&adapter_dir).expect("adapter dir");
    for (name, bytes) in api.download_artifacts(&tuned).await {
        if name.starts_with("adapter_") {
            std::fs::write(adapter_dir.join(name), bytes).expect("adapter file");
        }
    }
    let data = scratch.path().join("held-out.jsonl");
    std::fs::write(&data, validation_jsonl()).expect("data");
    let base_eval = trainer_eval(&model, None, &data);
    let adapter_eval = trainer_eval(&model, Some(&adapter_dir), &data);
    let perplexity = &run["perplexity_results"]["figures"];
    assert!(
        close(&perplexity["base"]["loss"], &base_eval["loss"]),
        "{perplexity} vs {base_eval}"
    );
    assert!(
        close(&perplexity["adapter"]["loss"], &adapter_eval["loss"]),
        "{perplexity} vs {adapter_eval}"
    );

    // The judge's scores reach emotional intelligence, with its raw answers kept.
    let ei = &run["emotional_intelligence_results"];
    assert_eq!(ei["status"], "completed", "{ei}");
    assert_eq!(ei["figures"]["empathy"], 8.0);
    assert_eq!(ei["score"], 80.0);
    assert!(ei["samples"][0]["judge_answer"]
        .as_str()
        .is_some_and(|a| a.contains("empathy")));

    // Retention asked the held-out file's user turns, not the built-in prompts.
    let retention = &run["knowledge_retention_results"];
    assert_eq!(retention["figures"]["prompts"], 3, "{retention}");
    assert_eq!(
        retention["samples"][0]["prompt"],
        "What is the code for item 100?"
    );
    // Retention of the over-trained baseline is below the tuned adapter's, and below 100.
    let baseline = run["baseline_results"]
        .as_array()
        .expect("baseline results");
    let baseline_retention = baseline
        .iter()
        .find(|r| r["suite"] == "knowledge_retention")
        .and_then(|r| r["score"].as_f64())
        .expect("baseline retention");
    assert!(baseline_retention < 100.0, "{baseline_retention}");
    // The comparison holds per-suite deltas and before/after samples.
    let comparison = &run["comparison"]["perplexity"];
    assert!(
        comparison["score_delta"].as_f64().is_some(),
        "{}",
        run["comparison"]
    );
    assert!(run["comparison"]["voice_consistency"]["samples"][0]["before"].is_string());
    assert!(run["voice_consistency_results"]["figures"]["by_persona"]["calm"].is_object());

    // Exports hold the job name and the figures.
    let run_id = run["id"].as_str().expect("run id");
    let mut exported = Vec::new();
    for format in ["pdf", "csv", "json"] {
        let link = api
            .send(
                Method::POST,
                &format!("/validation/runs/{run_id}/export"),
                json!({"format": format}),
            )
            .await;
        assert!(
            link["file_name"]
                .as_str()
                .is_some_and(|n| n.ends_with(format)),
            "{link}"
        );
        let bytes = api
            .fetch_bytes(link["download_url"].as_str().expect("url"))
            .await;
        assert_eq!(link["file_size"].as_u64(), Some(bytes.len() as u64));
        exported.push(bytes);
    }
    let pdf = lopdf::Document::load_mem(&exported[0]).expect("a PDF");
    let pages: Vec<u32> = pdf.get_pages().keys().copied().collect();
    let text = pdf.extract_text(&pages).expect("PDF text");
    assert!(text.contains("tuned codes"), "{text}");
    assert!(text.contains("Perplexity"), "{text}");
    assert!(text.contains("Verdict"), "{text}");
    let csv = String::from_utf8(exported[1].clone()).expect("CSV text");
    assert!(
        csv.starts_with("validation_id,job_name,subject,suite,metric,value"),
        "{csv}"
    );
    assert!(
        csv.contains(",tuned codes,adapter,perplexity,improvement_pct,"),
        "{csv}"
    );
    let document: Value = serde_json::from_slice(&exported[2]).expect("JSON");
    assert_eq!(document["job"]["name"], "tuned codes");
    assert_eq!(document["validation"]["id"], run_id);

    // Gates give each verdict on crafted thresholds.
    for (gate, verdict) in [
        (json!({"pass": -1e9, "warn": -1e9}), "production_ready"),
        (json!({"pass": 1e9, "warn": -1e9}), "review_required"),
        (json!({"pass": 1e9, "warn": 1e9}), "blocked"),
    ] {
        let gated = validate(
            &api,
            &tuned,
            json!({"test_suites": ["perplexity"], "gates": {"perplexity_improvement_pct": gate}, "max_samples": 1}),
        )
        .await;
        assert_eq!(gated["overall_status"], verdict, "{gated}");
    }

    // A judge that is down fails its suite, and the verdict follows; nothing else fails.
    judge.take_down();
    let judged = validate(
        &api,
        &tuned,
        json!({"test_suites": ["emotional_intelligence", "stop_behaviour"], "max_samples": 2, "max_new_tokens": 8}),
    )
    .await;
    assert_eq!(judged["status"], "completed");
    assert_eq!(
        judged["emotional_intelligence_results"]["status"], "failed",
        "{judged}"
    );
    assert!(judged["emotional_intelligence_results"]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("503")));
    assert_eq!(judged["overall_status"], "blocked");
    assert_eq!(judged["stop_behaviour_results"]["status"], "completed");

    // History, newest first.
    let history = api.get(&format!("/validation/{tuned}?all=true")).await;
    assert_eq!(history["data"].as_array().map(Vec::len), Some(6));
    assert_eq!(history["data"][0]["id"], judged["id"]);

    // Refusals: unknown suite or gate (422, named), a job not completed (409), a baseline
    // of another base model (422), another user's job, run or baseline (404).
    let (status, body) = api
        .try_send(
            Method::POST,
            &format!("/validation/{tuned}/run"),
            Some(json!({"test_suites": ["vibes"], "gates": {"bogus": 1}})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let text = body.to_string();
    assert!(
        text.contains("test_suites[0]") && text.contains("gates.bogus"),
        "{text}"
    );
    let draft = &api.create_job(&training, "draft", &model).await;
    let (status, body) = api
        .try_send(
            Method::POST,
            &format!("/validation/{draft}/run"),
            Some(json!({"test_suites": ["perplexity"]})),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    let other_model = scratch.path().join("other-model");
    trainer::init::write_tiny_model(
        &other_model,
        &trainer::init::TinyModel {
            seed: 99,
            ..Default::default()
        },
    )
    .expect("other model");
    let elsewhere = start_job(
        &api,
        &training,
        "other base",
        &other_model,
        json!({}),
        json!({"hyperparameters": hyperparameters(1, 0.01)}),
    )
    .await;
    api.wait_status(&elsewhere, "completed", LONG).await;
    let (status, body) = api
        .try_send(
            Method::POST,
            &format!("/validation/{tuned}/run"),
            Some(json!({"test_suites": ["perplexity"], "comparison_baseline": elsewhere})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.to_string().contains("other base"), "{body}");

    plane.create_user("someone@example.com", "another-long-password");
    let someone = Api::login_as(&plane, "someone@example.com", "another-long-password").await;
    for (method, path, body) in [
        (Method::GET, format!("/validation/{tuned}"), None),
        (Method::GET, format!("/validation/runs/{run_id}"), None),
        (
            Method::POST,
            format!("/validation/{tuned}/run"),
            Some(json!({"test_suites": ["perplexity"]})),
        ),
        (
            Method::POST,
            format!("/validation/runs/{run_id}/export"),
            Some(json!({"format": "json"})),
        ),
    ] {
        let (status, answer) = someone.try_send(method, &path, body).await;
        assert_eq!(status, 404, "{path}: {answer}");
    }

    // Prometheus counts validations.
    let metrics = reqwest::get(format!("{}/metrics", plane.url))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(
        metrics.contains("lora_validations_total{outcome=\"completed\"}"),
        "{metrics}"
    );
    assert!(metrics.contains(
        "lora_validation_suites_total{suite=\"emotional_intelligence\",status=\"failed\"}"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_on_sqlite() {
    suites_gates_comparison_and_exports(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_on_postgres() {
    suites_gates_comparison_and_exports(true).await;
}
