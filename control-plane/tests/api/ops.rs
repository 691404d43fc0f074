use control_plane::domain::Role;
use prometheus_parse::Value;
use reqwest::StatusCode;

use crate::helpers::{Backend, TestApp, TestDatabase};
use testkit::on_both_backends;

on_both_backends!(health_and_prometheus_metrics);

async fn health_and_prometheus_metrics(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let health: serde_json::Value = app
        .client
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("healthz")
        .json()
        .await
        .expect("json");
    let expected = if backend == Backend::Sqlite {
        "sqlite"
    } else {
        "postgres"
    };
    assert_eq!(
        (health["status"].as_str(), health["database"].as_str()),
        (Some("ok"), Some(expected))
    );

    let user = app.user("ada@example.com", Role::User).await;
    app.draft_job(&user).await;
    let response = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"]
        .to_str()
        .expect("type")
        .starts_with("text/plain"));
    let text = response.text().await.expect("text");
    assert!(!text.contains(&user.token), "no secrets in metrics");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("the exposition parses");
    let sample = |metric: &str, labels: &[(&str, &str)]| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .unwrap_or_else(|| panic!("{metric} {labels:?} in {text}"))
    };
    let value = |metric: &str, labels: &[(&str, &str)]| match sample(metric, labels).value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
        ref other => panic!("{metric} is not a number: {other:?}"),
    };
    let create_job = [
        ("method", "POST"),
        ("route", "/api/v1/jobs"),
        ("status", "201"),
    ];
    assert_eq!(value("http_requests_total", &create_job), 1.0);
    assert!(matches!(
        sample("http_requests_total", &create_job).value,
        Value::Counter(_)
    ));

    // Latency is a real histogram: cumulative buckets ending at +Inf, a sum and a count.
    let Value::Histogram(buckets) = &sample("http_request_duration_seconds", &create_job).value
    else {
        panic!("http_request_duration_seconds is not a histogram: {text}");
    };
    assert!(buckets.len() > 5, "{buckets:?}");
    assert!(buckets
        .windows(2)
        .all(|w| w[0].count <= w[1].count && w[0].less_than < w[1].less_than));
    let last = buckets.last().expect("a bucket");
    assert_eq!((last.less_than, last.count), (f64::INFINITY, 1.0));
    assert_eq!(
        value("http_request_duration_seconds_count", &create_job),
        1.0
    );
    assert!(value("http_request_duration_seconds_sum", &create_job) > 0.0);

    assert_eq!(value("lora_jobs", &[("status", "draft")]), 1.0);
    assert_eq!(
        value("lora_training_files", &[("status", "completed")]),
        1.0
    );
    let database = if backend == Backend::Sqlite {
        "sqlite"
    } else {
        "postgres"
    };
    assert_eq!(value("lora_build_info", &[("database", database)]), 1.0);
    assert!(value("process_resident_memory_bytes", &[]) > 0.0);
    // A counter of whole seconds (the metrics crate's counters are integers).
    assert!(matches!(
        sample("process_cpu_seconds_total", &[]).value,
        Value::Counter(_)
    ));
    assert!(value("process_open_fds", &[]) > 0.0);
}
