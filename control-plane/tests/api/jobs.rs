use control_plane::db::metrics::{self, MetricPoint};
use control_plane::domain::Role;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{chat_jsonl, field_names, json_of, Backend, TestApp, TestDatabase};
use testkit::on_both_backends;

on_both_backends!(
    a_job_goes_from_draft_to_cancelled_with_an_event_per_step,
    ineligible_files_are_refused_naming_the_rule,
    hyperparameters_are_checked_field_by_field,
    illegal_transitions_answer_409_naming_the_status,
    queued_jobs_know_their_place,
    metrics_are_read_back_sampled_and_latest,
    chart_samples_are_the_first_stored_step_at_each_mark,
);

async fn a_job_goes_from_draft_to_cancelled_with_an_event_per_step(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let (_, job) = app.draft_job(&user).await;
    assert_eq!(job["status"], "draft");
    let path = format!("/api/v1/jobs/{}", job["id"].as_str().expect("id"));

    let presets: Value = app
        .get(&user, "/api/v1/presets")
        .await
        .json()
        .await
        .expect("presets");
    let names: Vec<&str> = presets["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["Conservative", "Balanced", "Aggressive"]);
    let conservative = &presets["data"][0];
    assert_eq!(conservative["parameters"]["rank"], 8);
    assert_eq!(conservative["estimates"]["cost_spot_max"], 30.0);
    assert_eq!(conservative["success_rate"], 98.0);
    assert_eq!(conservative["risk_level"], "low");
    assert_eq!(
        presets["data"][2]["available"], false,
        "Aggressive needs 3 completed jobs"
    );

    let (status, aggressive) = json_of(
        app.put(&user, &format!("{path}/configure"), json!({"preset_id": presets["data"][2]["id"], "gpu_type": "spot", "gpu_model": "H100-80GB"}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        aggressive["error"]["message"],
        "the Aggressive preset requires 3 completed training jobs; you have 0"
    );

    let (status, configured) = json_of(
        app.put(
            &user,
            &format!("{path}/configure"),
            json!({"preset_id": conservative["id"], "hyperparameters": {"epochs": 4}, "gpu_type": "spot", "gpu_model": "H100-80GB"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{configured}");
    assert_eq!(configured["status"], "configured");
    assert_eq!(configured["hyperparameters"]["rank"], 8);
    assert_eq!(configured["hyperparameters"]["epochs"], 4);
    assert_eq!(configured["total_epochs"], 4);
    // Nothing measured yet for SmolLM2-135M on an H100, so the throughput is modelled: the
    // H100's 989 TFLOP/s × the assumed 8% ÷ (4 × 135M parameters) per token. The file's
    // 60 conversations hold 1,730 estimated tokens (each: 3 messages of 4 tokens' template
    // plus a quarter of their characters); 4 epochs train on 6,920.
    let basis = &configured["estimate_basis"];
    assert_eq!(basis["throughput"]["source"], "modelled", "{basis}");
    let tokens_per_second = 989e12 * 0.08 / (4.0 * 0.135e9);
    let modelled = basis["throughput"]["tokens_per_second"]
        .as_f64()
        .expect("tokens/s");
    assert!((modelled - tokens_per_second).abs() < 1e-6, "{basis}");
    assert_eq!(basis["tokens_per_epoch"], 1730);
    assert_eq!(basis["total_tokens"], 6920);
    let hours = |field: &str| configured[field].as_f64().expect(field);
    // Half to twice the modelled speed.
    let expected_min = 6920.0 / (tokens_per_second * 2.0) / 3600.0;
    assert!((hours("estimated_duration_hours_min") - expected_min).abs() < 1e-12);
    assert!((hours("estimated_duration_hours_max") - expected_min * 4.0).abs() < 1e-12);
    assert_eq!(configured["estimated_cost_max"], 0.0, "seconds on an H100");
    assert_eq!(configured["hourly_rate"], 2.5);
    let time = |job: &Value| {
        chrono::DateTime::parse_from_rfc3339(job["updated_at"].as_str().expect("updated_at"))
            .expect("time")
    };
    assert!(time(&configured) > time(&job), "updated_at is maintained");

    let (status, queued) =
        json_of(app.post(&user, &format!("{path}/start"), json!({})).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(queued["status"], "queued");
    assert_eq!(queued["queue_position"], 1);
    assert!(queued["estimated_start_time"].is_string());

    let (status, cancelled) = json_of(
        app.post(
            &user,
            &format!("{path}/cancel"),
            json!({"reason": "wrong dataset"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(cancelled["cancelled_reason"], "wrong dataset");
    assert_eq!(cancelled["final_cost"], 0.0);
    assert!(cancelled["cancelled_at"].is_string());

    let (_, events) = json_of(
        app.get(&user, &format!("{path}/events?event_type=status"))
            .await,
    )
    .await;
    let transitions: Vec<&str> = events["data"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["details"]["to"].as_str())
        .collect();
    assert_eq!(transitions, ["draft", "configured", "queued", "cancelled"]);
    let (_, warnings) = json_of(
        app.get(&user, &format!("{path}/events?severity=warning"))
            .await,
    )
    .await;
    assert_eq!(warnings["count"], 1);
    assert_eq!(
        warnings["data"][0]["message"],
        "Job cancelled: wrong dataset"
    );

    let (_, listed) = json_of(app.get(&user, "/api/v1/jobs?status=cancelled").await).await;
    assert_eq!(listed["count"], 1);
    let (_, none) = json_of(app.get(&user, "/api/v1/jobs?status=training").await).await;
    assert_eq!(none["count"], 0);
    let (status, _) = json_of(app.get(&user, "/api/v1/jobs?status=sleeping").await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

async fn ineligible_files_are_refused_naming_the_rule(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let small = app.upload_enriched(&user, chat_jsonl(10)).await;
    let (status, error) = json_of(
        app.post(
            &user,
            "/api/v1/jobs",
            json!({"training_file_id": small["id"], "name": "tiny", "base_model": "m"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        error["error"]["rules"],
        json!(["at least 50 conversations are required; the file has 10"])
    );

    let (status, error) = json_of(
        app.post(
            &user,
            "/api/v1/jobs",
            json!({"training_file_id": small["id"], "name": " ", "base_model": "a model"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error["error"]["fields"][0]["field"], "name");
    assert_eq!(error["error"]["fields"][1]["field"], "base_model");

    let (status, error) = json_of(
        app.post(&user, "/api/v1/jobs", json!({"name": "no file"}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        error["error"]["message"]
            .as_str()
            .expect("message")
            .contains("missing field"),
        "{error}"
    );
}

async fn hyperparameters_are_checked_field_by_field(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let (_, job) = app.draft_job(&user).await;
    let path = format!("/api/v1/jobs/{}/configure", job["id"].as_str().expect("id"));
    let (status, error) = json_of(
        app.put(
            &user,
            &path,
            json!({
                "gpu_type": "cheap",
                "gpu_model": "TPU",
                "hyperparameters": {
                    "rank": 1000, "lora_alpha": 0, "lora_dropout": 1, "learning_rate": -1, "epochs": 0,
                    "batch_size": "two", "gradient_accumulation_steps": 0, "max_seq_len": 8,
                    "warmup_ratio": 0.9, "target_modules": ["q_proj", "embed_tokens"], "seed": -5,
                    "eval_every": 0, "early_stopping_patience": "3", "early_stopping_min_delta": -1,
                    "keep_best": "yes"
                }
            }),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let fields = field_names(&error);
    assert_eq!(
        fields,
        [
            "gpu_type",
            "gpu_model",
            "hyperparameters.rank",
            "hyperparameters.lora_alpha",
            "hyperparameters.lora_dropout",
            "hyperparameters.learning_rate",
            "hyperparameters.epochs",
            "hyperparameters.batch_size",
            "hyperparameters.gradient_accumulation_steps",
            "hyperparameters.max_seq_len",
            "hyperparameters.warmup_ratio",
            "hyperparameters.target_modules",
            "hyperparameters.seed",
            "hyperparameters.eval_every",
            "hyperparameters.early_stopping_patience",
            "hyperparameters.early_stopping_min_delta",
            "hyperparameters.keep_best",
        ]
    );
    assert_eq!(
        error["error"]["fields"][2]["message"],
        "must be between 1 and 256"
    );
    let (_, unchanged) = json_of(
        app.get(
            &user,
            &format!("/api/v1/jobs/{}", job["id"].as_str().expect("id")),
        )
        .await,
    )
    .await;
    assert_eq!(
        unchanged["status"], "draft",
        "a refused configuration changes nothing"
    );
}

async fn illegal_transitions_answer_409_naming_the_status(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let (_, job) = app.draft_job(&user).await;
    let path = format!("/api/v1/jobs/{}", job["id"].as_str().expect("id"));

    let (status, error) = json_of(app.post(&user, &format!("{path}/start"), json!({})).await).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(
        error["error"]["message"],
        "job is draft; it cannot become queued"
    );
    assert_eq!(error["error"]["current_status"], "draft");

    app.post(&user, &format!("{path}/cancel"), json!({})).await;
    for (action, body) in [("cancel", json!({})), ("start", json!({}))] {
        let (status, error) =
            json_of(app.post(&user, &format!("{path}/{action}"), body).await).await;
        assert_eq!(status, StatusCode::CONFLICT, "{action}");
        assert_eq!(error["error"]["current_status"], "cancelled");
    }
    let (status, _) = json_of(
        app.put(
            &user,
            &format!("{path}/configure"),
            json!({"gpu_type": "spot", "gpu_model": "L4-24GB"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
}

async fn queued_jobs_know_their_place(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let ada = app.user("ada@example.com", Role::User).await;
    let bob = app.user("bob@example.com", Role::User).await;
    let mut paths = Vec::new();
    for user in [&ada, &bob, &ada] {
        let (_, job) = app.draft_job(user).await;
        let path = format!("/api/v1/jobs/{}", job["id"].as_str().expect("id"));
        app.put(
            user,
            &format!("{path}/configure"),
            json!({"gpu_type": "ondemand", "gpu_model": "L4-24GB"}),
        )
        .await;
        let (status, queued) =
            json_of(app.post(user, &format!("{path}/start"), json!({})).await).await;
        assert_eq!(status, StatusCode::OK);
        paths.push((path, queued));
    }
    let positions: Vec<i64> = paths
        .iter()
        .filter_map(|(_, q)| q["queue_position"].as_i64())
        .collect();
    assert_eq!(positions, [1, 2, 3]);
    let start = |q: &Value| q["estimated_start_time"].as_str().map(str::to_owned);
    assert!(
        start(&paths[0].1) < start(&paths[2].1),
        "later jobs wait behind earlier ones"
    );

    app.post(&ada, &format!("{}/cancel", paths[0].0), json!({}))
        .await;
    let (_, third) = json_of(app.get(&ada, &paths[2].0).await).await;
    assert_eq!(third["queue_position"], 2);
}

/// The job page's charts read `metrics::sampled`: for each mark `first + i·spacing`, the
/// first stored step at or after it, and the last step; each once, in order, over a run
/// with gaps (each backend has its own SQL).
async fn chart_samples_are_the_first_stored_step_at_each_mark(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let (_, job) = app.draft_job(&user).await;
    let job_id = job["id"].as_str().expect("id").parse().expect("uuid");
    let stored: Vec<i64> = (3..=40)
        .chain([47, 48])
        .chain((120..=180).step_by(3))
        .chain([400, 401])
        .collect();
    let points: Vec<MetricPoint> = stored
        .iter()
        .map(|&step| MetricPoint {
            step,
            epoch: Some(0),
            training_loss: Some(step as f64),
            validation_loss: None,
            learning_rate: Some(1e-4),
            grad_norm: None,
            tokens_per_second: None,
            gpu_utilization: Some(50),
            memory_used_gb: None,
            recorded_at: control_plane::db::now(),
        })
        .collect();
    metrics::record_all(&app.db, job_id, &points)
        .await
        .expect("stored");
    let (first, last) = (3, 401);
    for wanted in [1, 7, 40, 400] {
        let sampled = metrics::sampled(&app.db, job_id, (first, last), wanted)
            .await
            .expect("sampled");
        let spacing = ((last - first) / wanted).max(1);
        let mut expected: Vec<i64> = (0..)
            .map(|i| first + i * spacing)
            .take_while(|mark| *mark <= last)
            .chain([last])
            .filter_map(|mark| stored.iter().copied().find(|step| *step >= mark))
            .collect();
        expected.sort_unstable();
        expected.dedup();
        let steps: Vec<i64> = sampled.iter().map(|p| p.step).collect();
        assert_eq!(steps, expected, "{wanted} points");
        assert!(
            sampled
                .iter()
                .all(|p| p.training_loss == Some(p.step as f64) && p.gpu_utilization == Some(50)),
            "each sample is its step's row"
        );
    }
}

async fn metrics_are_read_back_sampled_and_latest(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let (_, job) = app.draft_job(&user).await;
    let id = job["id"].as_str().expect("id");
    let path = format!("/api/v1/jobs/{id}");
    assert_eq!(
        app.get(&user, &format!("{path}/metrics/latest"))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );

    let job_id = id.parse().expect("uuid");
    let point_at = |step: i64| MetricPoint {
        step,
        epoch: Some(0),
        training_loss: Some(3.0 - step as f64 * 0.1),
        validation_loss: (step % 10 == 0).then_some(2.5),
        learning_rate: Some(2e-4),
        grad_norm: Some(1.0),
        tokens_per_second: Some(1000.0),
        gpu_utilization: Some(90),
        memory_used_gb: Some(10.5),
        recorded_at: control_plane::db::now(),
    };
    for step in 1..=25 {
        let point = point_at(step);
        assert!(metrics::record(&app.db, job_id, None, &point)
            .await
            .expect("stored"));
        assert!(
            !metrics::record(&app.db, job_id, None, &point)
                .await
                .expect("stored"),
            "a step is kept once"
        );
    }
    let (_, sampled) = json_of(app.get(&user, &format!("{path}/metrics?interval=10")).await).await;
    let steps: Vec<i64> = sampled["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|p| p["step"].as_i64())
        .collect();
    assert_eq!(steps, [10, 20, 25]);
    let (_, columns) = json_of(
        app.get(&user, &format!("{path}/metrics?interval=10&format=columns"))
            .await,
    )
    .await;
    assert_eq!(columns["columns"]["step"], json!([10, 20, 25]), "{columns}");
    for (name, series) in columns["columns"].as_object().expect("columns") {
        assert_eq!(series.as_array().map(Vec::len), Some(3), "{name}");
    }
    assert_eq!(
        columns["columns"]["gpu_utilization"][2],
        sampled["data"][2]["gpu_utilization"]
    );
    let (status, refused) = json_of(
        app.get(&user, &format!("{path}/metrics?format=parquet"))
            .await,
    )
    .await;
    assert!(status.is_client_error(), "{status}: {refused}");
    let (_, limited) = json_of(app.get(&user, &format!("{path}/metrics?limit=5")).await).await;
    assert_eq!(limited["data"].as_array().map(Vec::len), Some(5));
    let (_, latest) = json_of(app.get(&user, &format!("{path}/metrics/latest")).await).await;
    assert_eq!(latest["step"], 25);
    assert_eq!(latest["gpu_utilization"], 90);
    let (_, detail) = json_of(app.get(&user, &path).await).await;
    assert_eq!(detail["current_metrics"]["step"], 25);
    let (_, listed) = json_of(app.get(&user, "/api/v1/jobs").await).await;
    assert_eq!(
        listed["data"][0]["current_metrics"]["step"], 25,
        "lists carry the latest point too"
    );
    let (status, _) = json_of(app.get(&user, &format!("{path}/metrics?interval=0")).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    // A chart's downsample: the extremes of each bucket and both ends, within the budget.
    let spike = |step: i64| MetricPoint {
        step,
        training_loss: Some(if step == 333 { 9.0 } else { 1.0 / step as f64 }),
        validation_loss: None,
        ..point_at(step)
    };
    let points: Vec<MetricPoint> = (26..=1000).map(spike).collect();
    metrics::record_all(&app.db, job_id, &points)
        .await
        .expect("stored");
    let (status, chart) = json_of(
        app.get(&user, &format!("{path}/metrics?max_points=40"))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{chart}");
    let steps: Vec<i64> = chart["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|p| p["step"].as_i64())
        .collect();
    assert!(steps.len() <= 40 && steps.len() >= 30, "{steps:?}");
    assert_eq!((steps[0], steps[steps.len() - 1]), (1, 1000));
    assert!(steps.contains(&333), "the spike survives: {steps:?}");
    let (_, evaluations) = json_of(
        app.get(
            &user,
            &format!("{path}/metrics?max_points=40&series=validation_loss&format=columns"),
        )
        .await,
    )
    .await;
    assert_eq!(
        evaluations["columns"]["step"],
        json!([10, 20]),
        "only points carrying the series"
    );
    for (query, field) in [
        ("max_points=40&limit=5", "limit"),
        ("max_points=3", "max_points"),
        ("series=grad_norm", "series"),
    ] {
        let (status, error) =
            json_of(app.get(&user, &format!("{path}/metrics?{query}")).await).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{query}: {error}");
        assert_eq!(
            crate::helpers::field_names(&error),
            [field],
            "{query}: {error}"
        );
    }
}
