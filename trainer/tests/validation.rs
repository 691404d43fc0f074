//! The validation suites on a tiny model made on the fly: perplexity equals `trainer
//! eval`, the base model retains everything against itself, and stop behaviour tells a
//! model that ends its turn from one that does not.

use std::path::Path;

use candle_core::Device;
use protocol::validation::{Suite, SuiteStatus};
use trainer::data::TextEncoder;
use trainer::evaluation::{evaluate_each, evaluate_examples, evaluate_file, load_for_inference};
use trainer::init::{write_tiny_model, TinyModel};
use trainer::train::{train, Control, DeviceChoice, TrainOptions};
use trainer::validation::{answer_prompts, retention, run, ValidationOptions};

fn write_dataset(path: &Path, count: usize) {
    let mut lines = String::new();
    for i in 0..count {
        let persona = if i % 2 == 0 { "calm" } else { "anxious" };
        let line = serde_json::json!({
            "messages": [
                {"role": "user", "content": format!("Code {i}?")},
                {"role": "assistant", "content": "OK."},
            ],
            "metadata": {"persona": persona, "emotional_arc": "steady"},
        });
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    std::fs::write(path, lines).expect("dataset written");
}

struct Quiet;
impl trainer::train::Observer for Quiet {}

#[test]
fn suites_measure_the_models() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = dir.path().join("model");
    write_tiny_model(&model, &TinyModel::default()).expect("tiny model");
    let data = dir.path().join("data.jsonl");
    write_dataset(&data, 16);
    // Short replies learnt well: the adapter ends its turn after "OK.".
    let options = TrainOptions {
        model: model.clone(),
        data: data.clone(),
        out: dir.path().join("out"),
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        lr: 3e-2,
        epochs: 15,
        batch_size: 8,
        grad_accum: 1,
        max_seq_len: 64,
        warmup_ratio: 0.0,
        val_split: 0.0,
        ..TrainOptions::default()
    };
    train(&options, &mut Quiet, &Control::default()).expect("training runs");
    let adapter = dir.path().join("out").join("adapter");

    let results = run(
        &ValidationOptions {
            model: model.clone(),
            adapter: adapter.clone(),
            baseline: None,
            data: data.clone(),
            split: None,
            training_data: data.clone(),
            suites: vec![
                Suite::Perplexity,
                Suite::StopBehaviour,
                Suite::VoiceConsistency,
            ],
            max_samples: 4,
            max_new_tokens: 12,
            max_seq_len: Some(64),
            retention_prompts: None,
            cache_dir: None,
            device: DeviceChoice::Cpu,
        },
        &mut (),
    )
    .expect("validation runs");
    assert_eq!(results.examples.lines.len(), 16);
    assert_eq!(results.examples.generated_lines, [1, 2, 3, 4]);

    // Perplexity equals `trainer eval` on the same examples, base and adapter.
    let perplexity = &results.adapter[0];
    assert_eq!(perplexity.suite, Suite::Perplexity);
    let base_eval = evaluate_file(&model, None, &data, Some(64), 4).expect("base eval");
    let adapter_eval = evaluate_file(&model, Some(&adapter), &data, Some(64), 4).expect("eval");
    let figure = |path: &str| perplexity.figures.pointer(path).and_then(|v| v.as_f64());
    assert!((figure("/base/loss").expect("base loss") - base_eval.loss).abs() < 1e-6);
    assert!((figure("/adapter/loss").expect("adapter loss") - adapter_eval.loss).abs() < 1e-6);
    assert!(
        figure("/improvement_pct").expect("improvement") > 50.0,
        "{}",
        perplexity.figures
    );

    // The trained adapter ends its turns; the random base model never does.
    let stop = &results.adapter[1];
    assert_eq!(stop.figure("stop_rate"), Some(1.0), "{}", stop.figures);
    let encoder = TextEncoder::from_model_dir(&model).expect("encoder");
    let base = load_for_inference(&model, None, &Device::Cpu).expect("base model");
    let prompts: Vec<String> = (1..=4).map(|i| format!("Code {i}?")).collect();
    let base_answers = answer_prompts(&base, &encoder, &prompts, 12, &mut ()).expect("answers");
    assert!(
        base_answers.iter().all(|a| !a.stopped),
        "the random model stopped"
    );

    let voice = &results.adapter[2];
    assert_eq!(voice.status, SuiteStatus::Completed);
    assert_eq!(voice.figure("chrf"), Some(100.0), "{}", voice.figures);
    assert!(voice.figures["by_persona"]["calm"]["samples"].as_u64() == Some(2));

    // The base model against itself keeps everything.
    let itself = retention(&base, &base, &encoder, &base_answers, 12).expect("retention");
    assert_eq!(itself.score, Some(100.0), "{}", itself.figures);
    let tuned = load_for_inference(&model, Some(&adapter), &Device::Cpu).expect("adapter model");
    let changed = retention(&base, &tuned, &encoder, &base_answers, 12).expect("retention");
    assert!(changed.score.expect("score") < 100.0, "{}", changed.figures);

    // The figures per example, computed four examples a batch (rows of two lengths,
    // padded), equal each example's alone.
    let prepared = trainer::data::load_examples(&data, &encoder, Some(64)).expect("examples");
    let each = evaluate_each(&tuned, &encoder, &prepared.examples, 4).expect("each");
    assert_eq!(each.len(), 16);
    for (i, (example, report)) in prepared.examples.iter().zip(&each).enumerate() {
        let single = std::slice::from_ref(example);
        let alone = evaluate_examples(&tuned, &encoder, single, 1).expect("alone");
        assert_eq!(
            (report.tokens, report.tokens_all),
            (alone.tokens, alone.tokens_all)
        );
        assert!(
            (report.loss - alone.loss).abs() < 1e-5,
            "{i}: {report:?} {alone:?}"
        );
        assert!(
            (report.loss_all_tokens - alone.loss_all_tokens).abs() < 1e-5,
            "{i}"
        );
        assert_eq!(report.token_accuracy, alone.token_accuracy, "{i}");
    }
}
