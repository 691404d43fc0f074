//! Training a tiny model made on the fly, end to end through the library.

use std::path::Path;

use trainer::init::{write_tiny_model, TinyModel};
use trainer::train::{train, Control, StepMetrics, TrainOptions};

fn write_dataset(path: &Path, count: usize) {
    let mut lines = String::new();
    for i in 0..count {
        let line = serde_json::json!({"messages": [
            {"role": "user", "content": format!("What is {i} plus one?")},
            {"role": "assistant", "content": format!("{} is the answer.", i + 1)},
        ]});
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    std::fs::write(path, lines).expect("dataset written");
}

#[derive(Default)]
struct Recorder {
    steps: Vec<StepMetrics>,
    stages: Vec<trainer::train::Stage>,
}

impl trainer::train::Observer for Recorder {
    fn stage(&mut self, stage: trainer::train::Stage) {
        self.stages.push(stage);
    }
    fn step(&mut self, metrics: &StepMetrics) {
        self.steps.push(metrics.clone());
    }
}

#[test]
fn a_tiny_model_learns_and_writes_a_peft_adapter() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model_dir = dir.path().join("model");
    write_tiny_model(&model_dir, &TinyModel::default()).expect("tiny model");
    let data = dir.path().join("data.jsonl");
    write_dataset(&data, 24);
    let options = TrainOptions {
        model: model_dir,
        data,
        out: dir.path().join("out"),
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        lr: 1e-2,
        max_steps: Some(30),
        batch_size: 4,
        grad_accum: 2,
        max_seq_len: 64,
        warmup_ratio: 0.1,
        val_split: 0.2,
        ..TrainOptions::default()
    };
    let mut recorder = Recorder::default();
    let summary = train(&options, &mut recorder, &Control::default()).expect("training runs");

    assert_eq!(summary.steps, 30);
    assert_eq!(
        (summary.train_examples, summary.validation_examples),
        (19, 5)
    );
    assert_eq!(recorder.steps.len(), 30);
    assert_eq!(
        recorder.stages.len(),
        4,
        "preprocessing, model loading, training, finalization"
    );
    let first = recorder.steps.first().expect("first step").loss;
    let last = recorder.steps.last().expect("last step").loss;
    assert!(last < first * 0.8, "loss should fall: {first} -> {last}");
    assert_eq!(
        recorder.steps[0].learning_rate, 0.0,
        "warmup starts at zero"
    );
    assert!(recorder
        .steps
        .iter()
        .all(|s| s.grad_norm.is_finite() && s.tokens_per_second > 0.0));
    assert!(summary.validation_loss.is_some_and(f64::is_finite));

    let out = dir.path().join("out");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics");
    assert_eq!(metrics.lines().count(), 30);
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).expect("config"),
    )
    .expect("json");
    assert_eq!(
        (config["peft_type"].as_str(), config["r"].as_u64()),
        (Some("LORA"), Some(4))
    );
    let tensors = candle_core::safetensors::load(
        out.join("adapter/adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .expect("adapter weights");
    assert_eq!(tensors.len(), 2 * 7 * 2);
    let a = &tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
    let b = &tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"];
    assert_eq!((a.dims(), b.dims()), (&[4, 64][..], &[64, 4][..]));
    assert!(out.join("summary.json").exists());
}

#[test]
fn a_bad_record_fails_at_once_naming_its_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model_dir = dir.path().join("model");
    write_tiny_model(&model_dir, &TinyModel::default()).expect("tiny model");
    let data = dir.path().join("data.jsonl");
    std::fs::write(
        &data,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
    )
    .expect("written");
    let options = TrainOptions {
        model: model_dir,
        data,
        out: dir.path().join("out"),
        ..TrainOptions::default()
    };
    let error = train(&options, &mut (), &Control::default()).expect_err("refused");
    assert!(
        error
            .to_string()
            .ends_with("data.jsonl: line 1: no assistant message"),
        "{error}"
    );
}
