//! A validation run as a report file: JSON (everything), CSV (one row per metric) or PDF
//! (scorecard, figures per suite, gates, recommendations and before/after samples),
//! written with `pdf-writer`, no external program.

use pdf_writer::{Content, Name, Pdf, Rect, Ref, Str};
use protocol::validation::SuiteReport;
use serde_json::{json, Value};

use crate::db::jobs::Job;
use crate::db::validations::ValidationRun;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Pdf,
    Csv,
    Json,
}

impl Format {
    pub fn parse(name: &str) -> Option<Format> {
        match name {
            "pdf" => Some(Format::Pdf),
            "csv" => Some(Format::Csv),
            "json" => Some(Format::Json),
            _ => None,
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Format::Pdf => "pdf",
            Format::Csv => "csv",
            Format::Json => "json",
        }
    }

    pub fn mime_type(self) -> &'static str {
        match self {
            Format::Pdf => "application/pdf",
            Format::Csv => "text/csv",
            Format::Json => "application/json",
        }
    }
}

pub fn render(format: Format, run: &ValidationRun, job: &Job) -> Vec<u8> {
    match format {
        Format::Json => json_report(run, job),
        Format::Csv => csv_report(run, job),
        Format::Pdf => pdf_report(run, job),
    }
}

fn json_report(run: &ValidationRun, job: &Job) -> Vec<u8> {
    let document = json!({
        "job": {"id": job.id, "name": job.name, "base_model": job.base_model},
        "validation": run,
    });
    serde_json::to_vec_pretty(&document).unwrap_or_default()
}

/// Every number in `value`, with its dotted path (`length_ratio.p50`).
pub fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, f64)>) {
    match value {
        Value::Number(n) => {
            if let Some(v) = n.as_f64() {
                out.push((prefix.to_owned(), v));
            }
        }
        Value::Object(map) => {
            for (key, inner) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&path, inner, out);
            }
        }
        _ => {}
    }
}

fn suite_metrics(report: &SuiteReport) -> Vec<(String, f64)> {
    let mut metrics = Vec::new();
    if let Some(score) = report.score {
        metrics.push(("score".to_owned(), score));
    }
    flatten("", &report.figures, &mut metrics);
    metrics
}

fn csv_report(run: &ValidationRun, job: &Job) -> Vec<u8> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    let _ = writer.write_record([
        "validation_id",
        "job_name",
        "subject",
        "suite",
        "metric",
        "value",
    ]);
    let mut row = |subject: &str, suite: &str, metric: &str, value: String| {
        let id = run.id.to_string();
        let _ = writer.write_record([id.as_str(), &job.name, subject, suite, metric, &value]);
    };
    if let Some(verdict) = run.overall_status.0 {
        row("adapter", "overall", "verdict", verdict.as_str().into());
    }
    if let Some(score) = run.overall_score {
        row("adapter", "overall", "overall_score", score.to_string());
    }
    for report in run.reports() {
        row(
            "adapter",
            report.suite.as_str(),
            "status",
            report.status.as_str().into(),
        );
        for (metric, value) in suite_metrics(report) {
            row("adapter", report.suite.as_str(), &metric, value.to_string());
        }
    }
    for report in run.baseline_results.iter().flat_map(|b| b.0.iter()) {
        for (metric, value) in suite_metrics(report) {
            row(
                "baseline",
                report.suite.as_str(),
                &metric,
                value.to_string(),
            );
        }
    }
    for gate in run.gate_results.iter().flat_map(|g| g.0.iter()) {
        let value = gate.value.map(|v| v.to_string()).unwrap_or_default();
        row("adapter", "gate", &gate.gate, value);
    }
    writer.into_inner().unwrap_or_default()
}

/// The report's lines of text, each with its font size.
fn pdf_lines(run: &ValidationRun, job: &Job) -> Vec<(f32, String)> {
    let mut lines = vec![
        (18.0, "Quality validation report".to_owned()),
        (11.0, format!("Job: {} ({})", job.name, job.id)),
        (11.0, format!("Base model: {}", job.base_model)),
        (
            11.0,
            format!("Validation: {}  status: {}", run.id, run.status.as_str()),
        ),
    ];
    if let Some(at) = run.validation_completed_at {
        lines.push((
            11.0,
            format!("Completed: {}", at.format("%Y-%m-%d %H:%M UTC")),
        ));
    }
    let verdict = run.overall_status.0.map_or("-", |v| v.label());
    let score = run
        .overall_score
        .map_or("-".to_owned(), |s| format!("{s:.1}"));
    lines.push((
        14.0,
        format!("Verdict: {verdict}   Overall score: {score} / 100"),
    ));
    if let Some(error) = &run.error_message {
        lines.push((11.0, format!("Failed: {error}")));
    }
    for report in run.reports() {
        lines.push((13.0, String::new()));
        let score = report.score.map_or("-".to_owned(), |s| format!("{s:.1}"));
        lines.push((
            13.0,
            format!(
                "{}: {} (score {score})",
                report.suite.title(),
                report.status.as_str()
            ),
        ));
        if let Some(reason) = &report.reason {
            lines.push((10.0, format!("  {reason}")));
        }
        for (metric, value) in suite_metrics(report)
            .into_iter()
            .filter(|(m, _)| m != "score")
        {
            lines.push((10.0, format!("  {metric}: {value:.4}")));
        }
        for sample in report.samples.iter().take(2) {
            lines.push((10.0, format!("  Prompt: {}", sample.prompt)));
            lines.push((10.0, format!("  Reply: {}", sample.response)));
        }
    }
    lines.push((13.0, String::new()));
    lines.push((13.0, "Gates".to_owned()));
    for gate in run.gate_results.iter().flat_map(|g| g.0.iter()) {
        let value = gate.value.map_or("-".to_owned(), |v| format!("{v:.3}"));
        lines.push((
            10.0,
            format!(
                "  {}: {value} (pass >= {}, warn >= {}): {:?}{}",
                gate.gate,
                gate.threshold.pass,
                gate.threshold.warn,
                gate.outcome,
                gate.note
                    .as_deref()
                    .map(|n| format!(" - {n}"))
                    .unwrap_or_default()
            ),
        ));
    }
    lines.push((13.0, "Recommendations".to_owned()));
    for recommendation in run.recommendations.iter().flat_map(|r| r.0.iter()) {
        lines.push((
            10.0,
            format!("  [{}] {}", recommendation.figure, recommendation.message),
        ));
    }
    if let Some(comparison) = run.comparison.as_ref().and_then(|c| c.0.as_object()) {
        lines.push((13.0, "Before / after (baseline / this adapter)".to_owned()));
        for (suite, figures) in comparison {
            let delta = figures["score_delta"]
                .as_f64()
                .map_or("-".to_owned(), |d| format!("{d:+.1}"));
            lines.push((10.0, format!("  {suite}: score delta {delta}")));
            for pair in figures["samples"].as_array().into_iter().flatten().take(2) {
                lines.push((
                    10.0,
                    format!("    Prompt: {}", pair["prompt"].as_str().unwrap_or("")),
                ));
                lines.push((
                    10.0,
                    format!("    Before: {}", pair["before"].as_str().unwrap_or("")),
                ));
                lines.push((
                    10.0,
                    format!("    After: {}", pair["after"].as_str().unwrap_or("")),
                ));
            }
        }
    }
    lines
}

/// Text in the standard fonts' WinAnsi encoding: Latin-1 as is, a few common marks
/// spelled out, anything else as `?`.
fn win_ansi(text: &str) -> Vec<u8> {
    text.chars()
        .map(|c| match c {
            '\u{2013}' | '\u{2014}' => b'-',
            '\u{2018}' | '\u{2019}' => b'\'',
            '\u{201C}' | '\u{201D}' => b'"',
            '\u{00B7}' => b'.',
            c if (c as u32) < 0x7F && !c.is_control() => c as u8,
            c if (0xA0..=0xFF).contains(&(c as u32)) => c as u32 as u8,
            _ => b'?',
        })
        .collect()
}

/// Splits a line so that each piece fits the page at its font size.
fn wrap(text: &str, size: f32) -> Vec<String> {
    let width = (480.0 / (size * 0.5)) as usize;
    let mut out = Vec::new();
    let mut line = String::new();
    for word in text.split(' ') {
        if !line.is_empty() && line.chars().count() + word.chars().count() + 1 > width {
            out.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    out.push(line);
    out
}

fn pdf_report(run: &ValidationRun, job: &Job) -> Vec<u8> {
    const TOP: f32 = 800.0;
    const BOTTOM: f32 = 50.0;
    let mut pages: Vec<Vec<(f32, f32, String)>> = vec![Vec::new()];
    let mut y = TOP;
    for (size, text) in pdf_lines(run, job) {
        for piece in wrap(&text, size) {
            let step = size * 1.45;
            if y - step < BOTTOM {
                pages.push(Vec::new());
                y = TOP;
            }
            y -= step;
            if let Some(page) = pages.last_mut() {
                page.push((size, y, piece));
            }
        }
    }
    let catalog = Ref::new(1);
    let tree = Ref::new(2);
    let font = Ref::new(3);
    let font_name = Name(b"F1");
    let page_ids: Vec<Ref> = (0..pages.len())
        .map(|i| Ref::new(4 + 2 * i as i32))
        .collect();
    let mut pdf = Pdf::new();
    pdf.catalog(catalog).pages(tree);
    pdf.pages(tree)
        .kids(page_ids.iter().copied())
        .count(pages.len() as i32);
    pdf.type1_font(font)
        .base_font(Name(b"Helvetica"))
        .encoding_predefined(Name(b"WinAnsiEncoding"));
    for (page_id, lines) in page_ids.iter().zip(&pages) {
        let content_id = Ref::new(page_id.get() + 1);
        let mut page = pdf.page(*page_id);
        page.media_box(Rect::new(0.0, 0.0, 595.0, 842.0))
            .parent(tree)
            .contents(content_id);
        page.resources().fonts().pair(font_name, font);
        drop(page);
        let mut content = Content::new();
        for (size, y, text) in lines {
            content.begin_text();
            content.set_font(font_name, *size);
            content.next_line(50.0, *y);
            content.show(Str(&win_ansi(text)));
            content.end_text();
        }
        pdf.stream(content_id, &content.finish());
    }
    pdf.finish()
}
