//! Quality validation's rules: which suites and gates a request may name, how a gate
//! judges a figure, the verdict, the overall score and the recommendations. Pure
//! functions of the suites' reports, so every rule is tested without a model.

use protocol::validation::{Suite, SuiteReport, SuiteStatus};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::FieldError;
pub use crate::configuration::{default_gates, Gates, Threshold};

/// What a validation ends in (spec §4.2.9 `validation_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    ProductionReady,
    ReviewRequired,
    Blocked,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::ProductionReady => "production_ready",
            Verdict::ReviewRequired => "review_required",
            Verdict::Blocked => "blocked",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Verdict::ProductionReady => "Production ready",
            Verdict::ReviewRequired => "Review required",
            Verdict::Blocked => "Blocked",
        }
    }
}

impl TryFrom<String> for Verdict {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        [
            Verdict::ProductionReady,
            Verdict::ReviewRequired,
            Verdict::Blocked,
        ]
        .into_iter()
        .find(|v| v.as_str() == value)
        .ok_or_else(|| format!("unknown verdict {value:?}"))
    }
}

/// The gates there are: each reads one figure of one suite.
pub const GATES: [(&str, Suite, &str); 5] = [
    (
        "perplexity_improvement_pct",
        Suite::Perplexity,
        "relative perplexity improvement over the base model, in %",
    ),
    (
        "knowledge_retention",
        Suite::KnowledgeRetention,
        "knowledge retention score (0–100)",
    ),
    (
        "voice_consistency",
        Suite::VoiceConsistency,
        "voice consistency score (0–100)",
    ),
    (
        "stop_rate",
        Suite::StopBehaviour,
        "share of replies that end their turn (0–1)",
    ),
    (
        "emotional_intelligence",
        Suite::EmotionalIntelligence,
        "judge's mean rubric score (0–10)",
    ),
];

/// The figure a gate reads from its suite's report.
fn gate_figure(gate: &str, report: &SuiteReport) -> Option<f64> {
    match gate {
        "perplexity_improvement_pct" => report.figure("improvement_pct"),
        "stop_rate" => report.figure("stop_rate"),
        "emotional_intelligence" => report.figure("mean"),
        _ => report.score,
    }
}

/// Parses `names` into suites (each at most once), naming an unknown one.
pub fn parse_suites(names: &[String], field: &str) -> Result<Vec<Suite>, Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut suites = Vec::new();
    for (i, name) in names.iter().enumerate() {
        match name.parse::<Suite>() {
            Ok(suite) if !suites.contains(&suite) => suites.push(suite),
            Ok(_) => {}
            Err(message) => errors.push(FieldError::new(format!("{field}[{i}]"), message)),
        }
    }
    if suites.is_empty() && errors.is_empty() {
        errors.push(FieldError::new(field, "name at least one test suite"));
    }
    if errors.is_empty() {
        suites.sort();
        Ok(suites)
    } else {
        Err(errors)
    }
}

/// Applies gate overrides (`{"stop_rate": 0.9}` or `{"stop_rate": {"pass": 0.9, "warn":
/// 0.5}}`) on top of `gates`, naming each unknown gate or bad value.
pub fn apply_gate_overrides(
    gates: &mut Gates,
    overrides: &Map<String, Value>,
    field: &str,
) -> Result<(), Vec<FieldError>> {
    let mut errors = Vec::new();
    for (name, value) in overrides {
        let at = format!("{field}.{name}");
        if !GATES.iter().any(|(gate, _, _)| gate == name) {
            let names: Vec<&str> = GATES.iter().map(|(gate, _, _)| *gate).collect();
            errors.push(FieldError::new(
                at,
                format!("unknown gate; expected one of {}", names.join(", ")),
            ));
            continue;
        }
        let threshold = match value {
            Value::Number(n) => n.as_f64().map(|pass| Threshold { pass, warn: pass }),
            Value::Object(fields) => {
                let number = |key: &str| fields.get(key).and_then(Value::as_f64);
                let unknown = fields
                    .keys()
                    .find(|k| !matches!(k.as_str(), "pass" | "warn"));
                match (number("pass"), number("warn"), unknown) {
                    (Some(pass), warn, None) => Some(Threshold {
                        pass,
                        warn: warn.unwrap_or(pass),
                    }),
                    _ => None,
                }
            }
            _ => None,
        };
        match threshold {
            Some(t) if t.pass.is_finite() && t.warn.is_finite() && t.warn <= t.pass => {
                gates.insert(name.clone(), t);
            }
            Some(_) => errors.push(FieldError::new(
                at,
                "warn must be a finite number no greater than pass",
            )),
            None => errors.push(FieldError::new(
                at,
                "must be a number (the pass threshold) or {\"pass\": number, \"warn\": number}",
            )),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GateOutcome {
    Pass,
    Warn,
    Fail,
}

/// One gate's judgement of one figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GateResult {
    pub gate: String,
    #[schema(value_type = String)]
    pub suite: Suite,
    pub value: Option<f64>,
    pub threshold: Threshold,
    pub outcome: GateOutcome,
    /// Why, when the figure is missing (suite skipped or failed).
    pub note: Option<String>,
}

/// Judges each gate whose suite ran: a completed suite by its figure; a skipped one
/// warns; a failed one fails.
pub fn judge_gates(gates: &Gates, reports: &[SuiteReport]) -> Vec<GateResult> {
    let mut results = Vec::new();
    for (gate, suite, _) in GATES {
        let (Some(threshold), Some(report)) =
            (gates.get(gate), reports.iter().find(|r| r.suite == suite))
        else {
            continue;
        };
        let value = gate_figure(gate, report);
        let (outcome, note) = match (report.status, value) {
            (SuiteStatus::Completed, Some(v)) if v >= threshold.pass => (GateOutcome::Pass, None),
            (SuiteStatus::Completed, Some(v)) if v >= threshold.warn => (GateOutcome::Warn, None),
            (SuiteStatus::Completed, Some(_)) => (GateOutcome::Fail, None),
            (SuiteStatus::Skipped, _) => (
                GateOutcome::Warn,
                Some(format!(
                    "suite skipped: {}",
                    report.reason.as_deref().unwrap_or("no reason given")
                )),
            ),
            _ => (
                GateOutcome::Fail,
                Some(format!(
                    "suite failed: {}",
                    report.reason.as_deref().unwrap_or("no figure")
                )),
            ),
        };
        results.push(GateResult {
            gate: gate.to_owned(),
            suite,
            value,
            threshold: *threshold,
            outcome,
            note,
        });
    }
    results
}

/// Any failed gate blocks; any warning (a skipped suite included) asks for a review.
pub fn verdict(gates: &[GateResult], reports: &[SuiteReport]) -> Verdict {
    let failed_suite = reports.iter().any(|r| r.status == SuiteStatus::Failed);
    let skipped_suite = reports.iter().any(|r| r.status == SuiteStatus::Skipped);
    if failed_suite || gates.iter().any(|g| g.outcome == GateOutcome::Fail) {
        Verdict::Blocked
    } else if skipped_suite || gates.iter().any(|g| g.outcome == GateOutcome::Warn) {
        Verdict::ReviewRequired
    } else {
        Verdict::ProductionReady
    }
}

/// Each suite's weight in the overall score.
pub fn suite_weight(suite: Suite) -> f64 {
    match suite {
        Suite::Perplexity | Suite::KnowledgeRetention => 0.25,
        Suite::VoiceConsistency | Suite::EmotionalIntelligence => 0.2,
        Suite::StopBehaviour => 0.1,
    }
}

/// The weighted mean of the completed suites' scores (weights renormalised over them).
pub fn overall_score(reports: &[SuiteReport]) -> Option<f64> {
    let scored: Vec<(f64, f64)> = reports
        .iter()
        .filter(|r| r.status == SuiteStatus::Completed)
        .filter_map(|r| r.score.map(|s| (suite_weight(r.suite), s)))
        .collect();
    let weights: f64 = scored.iter().map(|(w, _)| w).sum();
    (weights > 0.0).then(|| scored.iter().map(|(w, s)| w * s).sum::<f64>() / weights)
}

/// A recommendation and the figure that triggered it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Recommendation {
    #[schema(value_type = String)]
    pub suite: Suite,
    pub figure: String,
    pub value: Option<f64>,
    pub message: String,
}

/// Rules over the figures; each names the figure it read.
pub fn recommendations(reports: &[SuiteReport]) -> Vec<Recommendation> {
    let mut out = Vec::new();
    let mut add = |suite, figure: &str, value: Option<f64>, message: String| {
        out.push(Recommendation {
            suite,
            figure: figure.to_owned(),
            value,
            message,
        })
    };
    for report in reports {
        match (report.suite, report.status) {
            (suite, SuiteStatus::Failed) => add(
                suite,
                "status",
                None,
                format!(
                    "{} failed: {}; run it again once fixed",
                    suite.title(),
                    report.reason.as_deref().unwrap_or("unknown error")
                ),
            ),
            (Suite::EmotionalIntelligence, SuiteStatus::Skipped) => add(
                Suite::EmotionalIntelligence,
                "status",
                None,
                "emotional intelligence was not scored: configure a judge \
                 (validation.judge.base_url) to score it"
                    .into(),
            ),
            (Suite::Perplexity, SuiteStatus::Completed) => {
                let improvement = report.figure("improvement_pct");
                match improvement {
                    Some(v) if v < 0.0 => add(
                        Suite::Perplexity,
                        "improvement_pct",
                        improvement,
                        format!("perplexity got {:.1}% worse than the base model's: check the data, or lower the learning rate", -v),
                    ),
                    Some(v) if v < 5.0 => add(
                        Suite::Perplexity,
                        "improvement_pct",
                        improvement,
                        format!("perplexity improved only {v:.1}%: train for more epochs or raise the rank"),
                    ),
                    _ => {}
                }
            }
            (Suite::KnowledgeRetention, SuiteStatus::Completed) => {
                let change = report.figure("relative_loss_change_pct");
                if let Some(v) = change.filter(|v| *v > 10.0) {
                    add(
                        Suite::KnowledgeRetention,
                        "relative_loss_change_pct",
                        change,
                        format!("retention fell {v:.0}% (loss on the base model's answers rose): fewer epochs or a lower learning rate"),
                    );
                }
            }
            (Suite::StopBehaviour, SuiteStatus::Completed) => {
                let rate = report.figure("stop_rate");
                if let Some(v) = rate.filter(|v| *v < 0.95) {
                    add(
                        Suite::StopBehaviour,
                        "stop_rate",
                        rate,
                        format!("{:.0}% of replies never ended their turn: check that the chat template ends assistant turns with its end-of-turn token and that training data replies are complete", 100.0 * (1.0 - v)),
                    );
                }
            }
            (Suite::VoiceConsistency, SuiteStatus::Completed) => {
                let ratio = report
                    .figures
                    .pointer("/length_ratio/p50")
                    .and_then(Value::as_f64);
                match ratio {
                    Some(v) if v > 1.5 => add(
                        Suite::VoiceConsistency,
                        "length_ratio.p50",
                        ratio,
                        format!("replies run {v:.1}× longer than the references: train on more examples of the target length"),
                    ),
                    Some(v) if v < 0.5 => add(
                        Suite::VoiceConsistency,
                        "length_ratio.p50",
                        ratio,
                        format!("replies are {v:.1}× as long as the references: train for more epochs on complete replies"),
                    ),
                    _ => {}
                }
                let chrf = report.figure("chrf");
                if let Some(v) = chrf.filter(|v| *v < 20.0) {
                    add(
                        Suite::VoiceConsistency,
                        "chrf",
                        chrf,
                        format!("replies share little wording with the references (chrF {v:.1}): more epochs or more examples in this voice"),
                    );
                }
            }
            (Suite::EmotionalIntelligence, SuiteStatus::Completed) => {
                let mean = report.figure("mean");
                if let Some(v) = mean.filter(|v| *v < 6.0) {
                    add(
                        Suite::EmotionalIntelligence,
                        "mean",
                        mean,
                        format!("the judge rated replies {v:.1}/10 on average: add examples that acknowledge feelings before advising"),
                    );
                }
            }
            _ => {}
        }
    }
    out
}

/// Per-suite deltas (adapter − baseline) and before/after samples.
pub fn comparison(adapter: &[SuiteReport], baseline: &[SuiteReport], samples: usize) -> Value {
    let mut suites = Map::new();
    for report in adapter {
        let Some(before) = baseline.iter().find(|b| b.suite == report.suite) else {
            continue;
        };
        let mut figures = Map::new();
        if let (Value::Object(after_figures), Value::Object(before_figures)) =
            (&report.figures, &before.figures)
        {
            for (key, value) in after_figures {
                if let (Some(a), Some(b)) = (
                    value.as_f64(),
                    before_figures.get(key).and_then(Value::as_f64),
                ) {
                    figures.insert(
                        key.clone(),
                        json!({"adapter": a, "baseline": b, "delta": a - b}),
                    );
                }
            }
        }
        let pairs: Vec<Value> = report
            .samples
            .iter()
            .zip(&before.samples)
            .take(samples)
            .map(|(after, before)| {
                json!({"prompt": after.prompt, "reference": after.reference,
                       "before": before.response, "after": after.response})
            })
            .collect();
        suites.insert(
            report.suite.as_str().to_owned(),
            json!({
                "adapter_score": report.score, "baseline_score": before.score,
                "score_delta": report.score.zip(before.score).map(|(a, b)| a - b),
                "figures": figures, "samples": pairs,
            }),
        );
    }
    Value::Object(suites)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(
        suite: Suite,
        status: SuiteStatus,
        score: Option<f64>,
        figures: Value,
    ) -> SuiteReport {
        SuiteReport {
            suite,
            status,
            score,
            figures,
            samples: Vec::new(),
            reason: None,
        }
    }

    #[test]
    fn gates_give_each_verdict() {
        let reports = vec![
            report(
                Suite::StopBehaviour,
                SuiteStatus::Completed,
                Some(90.0),
                json!({"stop_rate": 0.9}),
            ),
            report(
                Suite::Perplexity,
                SuiteStatus::Completed,
                Some(40.0),
                json!({"improvement_pct": 30.0}),
            ),
        ];
        let mut gates = default_gates();
        let mut set = |overrides: Value| {
            let Value::Object(map) = overrides else {
                unreachable!()
            };
            apply_gate_overrides(&mut gates, &map, "gates").expect("valid");
            let results = judge_gates(&gates, &reports);
            verdict(&results, &reports)
        };
        assert_eq!(set(json!({"stop_rate": 0.85})), Verdict::ProductionReady);
        assert_eq!(
            set(json!({"stop_rate": {"pass": 0.95, "warn": 0.5}})),
            Verdict::ReviewRequired
        );
        assert_eq!(
            set(json!({"stop_rate": {"pass": 0.99, "warn": 0.95}})),
            Verdict::Blocked
        );
    }

    #[test]
    fn a_skipped_suite_asks_for_review_and_a_failed_one_blocks() {
        let gates = default_gates();
        let skipped = vec![SuiteReport::skipped(
            Suite::EmotionalIntelligence,
            "no judge",
        )];
        let results = judge_gates(&gates, &skipped);
        assert_eq!(results[0].outcome, GateOutcome::Warn);
        assert_eq!(verdict(&results, &skipped), Verdict::ReviewRequired);
        let mut failed = skipped.clone();
        failed[0].status = SuiteStatus::Failed;
        assert_eq!(
            verdict(&judge_gates(&gates, &failed), &failed),
            Verdict::Blocked
        );
    }

    #[test]
    fn bad_gates_and_suites_are_named() {
        let mut gates = default_gates();
        let Value::Object(map) =
            json!({"bogus": 1, "stop_rate": {"pass": 0.5, "warn": 0.9}, "voice_consistency": "x"})
        else {
            unreachable!()
        };
        let errors = apply_gate_overrides(&mut gates, &map, "gates").expect_err("invalid");
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["gates.bogus", "gates.stop_rate", "gates.voice_consistency"]
        );
        let errors = parse_suites(&["perplexity".into(), "vibes".into()], "test_suites")
            .expect_err("unknown");
        assert_eq!(errors[0].field, "test_suites[1]");
        assert!(errors[0].message.contains("vibes"), "{}", errors[0].message);
    }

    #[test]
    fn overall_score_is_the_weighted_mean_of_completed_suites() {
        let reports = vec![
            report(
                Suite::Perplexity,
                SuiteStatus::Completed,
                Some(80.0),
                json!({}),
            ),
            report(
                Suite::StopBehaviour,
                SuiteStatus::Completed,
                Some(20.0),
                json!({}),
            ),
            SuiteReport::skipped(Suite::EmotionalIntelligence, "no judge"),
        ];
        // (0.25 · 80 + 0.1 · 20) / 0.35
        let expected = (0.25 * 80.0 + 0.1 * 20.0) / 0.35;
        assert!((overall_score(&reports).expect("score") - expected).abs() < 1e-12);
    }

    #[test]
    fn recommendations_name_their_figure() {
        let reports = vec![report(
            Suite::KnowledgeRetention,
            SuiteStatus::Completed,
            Some(50.0),
            json!({"relative_loss_change_pct": 14.0}),
        )];
        let found = recommendations(&reports);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].figure, "relative_loss_change_pct");
        assert!(
            found[0].message.starts_with("retention fell 14%"),
            "{}",
            found[0].message
        );
    }
}
