//! Helpers the trainer's integration tests share.

use std::path::Path;

use trainer::train::{Control, Observer, StepMetrics};

/// Cancels the run once it has finished step `at`, as a lost host would stop it.
pub struct StopAfter<'a> {
    pub control: &'a Control,
    pub at: usize,
}

impl Observer for StopAfter<'_> {
    fn step(&mut self, metrics: &StepMetrics) {
        if metrics.step == self.at {
            self.control.cancel();
        }
    }
}

/// The run's `metrics.jsonl`, a line per step.
pub fn metrics(out: &Path) -> Vec<StepMetrics> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .map(|line| serde_json::from_str(line).expect("metrics line"))
        .collect()
}
