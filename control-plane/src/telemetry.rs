//! Logging setup and the counters `/metrics` reports: requests per route, and status
//! changes refused by the state machine.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Mutex;

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

/// (method, route, status)
type RouteKey = (String, String, u16);

/// Request counts and total seconds per (method, route, status).
#[derive(Default)]
pub struct RequestMetrics {
    requests: Mutex<BTreeMap<RouteKey, (u64, f64)>>,
    /// Status changes the control plane attempted against the state machine, by origin.
    refused_transitions: Mutex<BTreeMap<String, u64>>,
}

impl RequestMetrics {
    pub fn record(&self, method: String, route: String, status: u16, seconds: f64) {
        let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        let entry = requests.entry((method, route, status)).or_default();
        entry.0 += 1;
        entry.1 += seconds;
    }

    pub fn count_refused_transition(&self, origin: &str) {
        let mut refused = self
            .refused_transitions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *refused.entry(origin.to_owned()).or_default() += 1;
    }

    pub fn refused_transitions(&self) -> BTreeMap<String, u64> {
        self.refused_transitions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every (method, route, status) with its count and total seconds.
    pub fn snapshot(&self) -> BTreeMap<RouteKey, (u64, f64)> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
