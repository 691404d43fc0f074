//! Logging setup and what `/metrics` reports.

use std::collections::{BTreeSet, HashMap};
use std::io::IsTerminal;
use std::sync::Mutex;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use tracing_subscriber::EnvFilter;

/// Logs to stderr; `RUST_LOG` overrides the default level (info).
pub fn init() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in log files or collectors.
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Request latency buckets, in seconds: from a cached read to a slow upload.
const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// What `/metrics` reports, in Prometheus' text format: requests by route and status (a
/// counter and a latency histogram), status changes the state machine refused, gauges the
/// caller sets when scraped, and the process' CPU, memory, threads and file descriptors.
/// Each control plane has its own recorder, so two in one process (tests) stay apart.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    process: metrics_process::Collector,
    /// The label values each gauge has been set for, so one that vanished reads 0.
    gauge_labels: Mutex<HashMap<&'static str, BTreeSet<String>>>,
}

impl Metrics {
    /// `database` names the backend in `lora_build_info`.
    pub fn new(database: &'static str) -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("http_request_duration_seconds".into()),
                &LATENCY_BUCKETS,
            )
            .expect("the latency buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        let process = metrics_process::Collector::default();
        let metrics = Metrics {
            recorder,
            handle,
            process,
            gauge_labels: Mutex::default(),
        };
        metrics.with_recorder(|| {
            metrics.process.describe();
            describe_counter!("http_requests_total", "HTTP requests answered.");
            describe_histogram!(
                "http_request_duration_seconds",
                Unit::Seconds,
                "Time spent answering HTTP requests."
            );
            describe_counter!(
                "lora_refused_status_changes_total",
                "Job status changes the control plane attempted against the state machine."
            );
            describe_counter!(
                "lora_validations_total",
                "Validation runs ended, by outcome (completed, failed)."
            );
            describe_counter!(
                "lora_validation_suites_total",
                "Suites of ended validation runs, by suite and status (completed, skipped, failed)."
            );
            describe_gauge!("lora_build_info", "Version and database backend.");
            gauge!("lora_build_info", "version" => env!("CARGO_PKG_VERSION"), "database" => database)
                .set(1.0);
        });
        metrics
    }

    fn with_recorder<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.recorder, f)
    }

    pub fn record_request(&self, method: String, route: String, status: u16, seconds: f64) {
        self.with_recorder(|| {
            let labels = [
                ("method", method),
                ("route", route),
                ("status", status.to_string()),
            ];
            counter!("http_requests_total", &labels).increment(1);
            histogram!("http_request_duration_seconds", &labels).record(seconds);
        });
    }

    pub fn count_refused_transition(&self, origin: &str) {
        self.with_recorder(|| {
            counter!("lora_refused_status_changes_total", "origin" => origin.to_owned())
                .increment(1);
        });
    }

    /// A budget alert sent; `threshold` is the percent crossed (100: the amount itself).
    pub fn count_budget_alert(&self, threshold: f64) {
        let kind = if threshold >= 100.0 {
            "cap"
        } else {
            "threshold"
        };
        self.with_recorder(|| {
            counter!("lora_budget_alerts_total", "kind" => kind).increment(1);
        });
    }

    /// A `stop_at_cap` budget at its amount stopped a running job.
    pub fn count_budget_stop(&self) {
        self.with_recorder(|| {
            counter!("lora_budget_stops_total").increment(1);
        });
    }

    /// A budget alert's webhook ended: `sent` or `failed` (after its retries).
    pub fn count_budget_webhook(&self, outcome: &'static str) {
        self.with_recorder(|| {
            counter!("lora_budget_webhooks_total", "outcome" => outcome).increment(1);
        });
    }

    /// A validation run ended: `completed` or `failed`; and each suite in it that was
    /// `skipped` or `failed`.
    pub fn count_validation(&self, outcome: &'static str, suites: &[(String, &'static str)]) {
        self.with_recorder(|| {
            counter!("lora_validations_total", "outcome" => outcome).increment(1);
            for (suite, status) in suites {
                counter!("lora_validation_suites_total", "suite" => suite.clone(), "status" => *status)
                    .increment(1);
            }
        });
    }

    /// Sets gauge `name` for each `(label value, count)`, the label named `label`; label
    /// values set before and missing now read 0.
    pub fn set_gauges(
        &self,
        name: &'static str,
        help: &'static str,
        label: &'static str,
        counts: &[(String, f64)],
    ) {
        let mut known = self.gauge_labels.lock().unwrap_or_else(|e| e.into_inner());
        let seen = known.entry(name).or_default();
        self.with_recorder(|| {
            describe_gauge!(name, help);
            for stale in seen.iter().filter(|v| !counts.iter().any(|(c, _)| c == *v)) {
                gauge!(name, label => stale.clone()).set(0.0);
            }
            for (value, count) in counts {
                gauge!(name, label => value.clone()).set(*count);
            }
        });
        seen.extend(counts.iter().map(|(value, _)| value.clone()));
    }

    /// The exposition, with the process' figures read now.
    pub fn render(&self) -> String {
        self.with_recorder(|| self.process.collect());
        self.handle.render()
    }

    /// Folds recorded histogram samples into their buckets; run it every few seconds so
    /// memory stays flat between scrapes.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }
}
