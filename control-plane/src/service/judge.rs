//! The judge of emotional intelligence: an OpenAI-compatible chat-completions endpoint
//! the operator configures (`validation.judge`). Each generated reply is rated on the
//! spec's rubric (empathy, clarity, appropriateness, 0–10); the rubric, each request's
//! prompt and each raw answer are kept with the suite. Without a judge the suite is
//! skipped, and a judge that fails or times out fails the suite, never the validation.

use std::time::Duration;

use futures::StreamExt;
use protocol::validation::{Sample, SuiteReport, SuiteStatus};
use serde_json::{json, Value};

use crate::configuration::JudgeSettings;

pub const RUBRIC: &str = "You rate one reply of an AI assistant in a supportive conversation. \
Score it from 0 to 10 on three dimensions: empathy (it recognises and responds to the \
person's feelings), clarity (it is easy to follow and specific), appropriateness (tone, \
safety and scope fit the situation). Answer with JSON only, exactly in this form: \
{\"empathy\": <0-10>, \"clarity\": <0-10>, \"appropriateness\": <0-10>}";

const DIMENSIONS: [&str; 3] = ["empathy", "clarity", "appropriateness"];

fn judge_prompt(sample: &Sample) -> String {
    format!(
        "The person said:\n{}\n\nThe assistant replied:\n{}",
        sample.prompt, sample.response
    )
}

/// The three scores in a judge's answer: the first JSON object in it.
fn parse_scores(answer: &str) -> Result<[f64; 3], String> {
    let start = answer.find('{').ok_or("the answer holds no JSON object")?;
    let end = answer.rfind('}').ok_or("the answer holds no JSON object")?;
    let object: Value = serde_json::from_str(answer.get(start..=end).unwrap_or_default())
        .map_err(|e| format!("the answer's JSON does not parse: {e}"))?;
    let mut scores = [0.0; 3];
    for (slot, key) in scores.iter_mut().zip(DIMENSIONS) {
        let value = object
            .get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("the answer has no number \"{key}\""))?;
        if !(0.0..=10.0).contains(&value) {
            return Err(format!("\"{key}\" is {value}, outside 0–10"));
        }
        *slot = value;
    }
    Ok(scores)
}

async fn ask(
    http: &reqwest::Client,
    settings: &JudgeSettings,
    url: &str,
    sample: &Sample,
) -> Result<(String, [f64; 3]), String> {
    let body = json!({
        "model": settings.model,
        "temperature": 0,
        "messages": [
            {"role": "system", "content": RUBRIC},
            {"role": "user", "content": judge_prompt(sample)},
        ],
    });
    let mut request = http.post(url).json(&body);
    if let Ok(key) = std::env::var(&settings.api_key_env) {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.map_err(|e| e.to_string())?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("the judge answered {status}"));
    }
    let reply: Value = response.json().await.map_err(|e| e.to_string())?;
    let answer = reply
        .pointer("/choices/0/message/content")
        .and_then(Value::as_str)
        .ok_or("the judge's reply has no choices[0].message.content")?
        .to_owned();
    let scores = parse_scores(&answer)?;
    Ok((answer, scores))
}

/// Scores a suite awaiting the judge in place: completed with the rubric's means, skipped
/// without a judge, failed with the judge's error.
pub async fn score(settings: &JudgeSettings, report: &mut SuiteReport) {
    if report.status != SuiteStatus::AwaitingJudge {
        return;
    }
    let Some(base_url) = settings.base_url.as_deref() else {
        report.status = SuiteStatus::Skipped;
        report.reason = Some(
            "no judge model is configured (validation.judge.base_url): emotional intelligence is not scored"
                .into(),
        );
        return;
    };
    let url = format!("{}/chat/completions", base_url.trim_end_matches('/'));
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(settings.timeout_seconds.max(1)))
        .build()
    {
        Ok(http) => http,
        Err(error) => {
            report.status = SuiteStatus::Failed;
            report.reason = Some(format!("judge client: {error}"));
            return;
        }
    };
    // Owned inputs per request: the futures borrow nothing from the report.
    let requests: Vec<_> = report
        .samples
        .iter()
        .map(|sample| {
            let (http, settings, url, sample) =
                (http.clone(), settings.clone(), url.clone(), sample.clone());
            async move { ask(&http, &settings, &url, &sample).await }
        })
        .collect();
    let answers: Vec<Result<(String, [f64; 3]), String>> = futures::stream::iter(requests)
        .buffered(settings.concurrency.max(1))
        .collect()
        .await;
    let mut sums = [0.0; 3];
    for (sample, answer) in report.samples.iter_mut().zip(answers) {
        match answer {
            Ok((raw, scores)) => {
                for ((sum, key), value) in sums.iter_mut().zip(DIMENSIONS).zip(scores) {
                    *sum += value;
                    sample.figures.insert(key.into(), value);
                }
                sample.judge_answer = Some(raw);
            }
            Err(error) => {
                report.status = SuiteStatus::Failed;
                report.reason = Some(format!("judge at {url}: {error}"));
                return;
            }
        }
    }
    let count = report.samples.len().max(1) as f64;
    let means: Vec<f64> = sums.iter().map(|s| s / count).collect();
    let mean = means.iter().sum::<f64>() / 3.0;
    report.status = SuiteStatus::Completed;
    report.score = Some(10.0 * mean);
    report.figures = json!({
        "empathy": means[0], "clarity": means[1], "appropriateness": means[2], "mean": mean,
        "samples": report.samples.len(), "judge_model": settings.model, "rubric": RUBRIC,
        "prompt_format": judge_prompt(&Sample {
            prompt: "{prompt}".into(), response: "{reply}".into(), ..Sample::default()
        }),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_are_read_from_the_first_json_object() {
        assert_eq!(
            parse_scores("Sure! {\"empathy\": 8, \"clarity\": 7.5, \"appropriateness\": 9} done"),
            Ok([8.0, 7.5, 9.0])
        );
        assert!(parse_scores("no idea").is_err());
        assert!(
            parse_scores("{\"empathy\": 11, \"clarity\": 1, \"appropriateness\": 1}")
                .expect_err("out of range")
                .contains("outside")
        );
    }
}
