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
    let model_dir = std::fs::canonicalize(dir.path().join("model")).expect("model dir");
    assert_eq!(
        config["base_model_name_or_path"].as_str(),
        Some(model_dir.to_str().expect("utf-8 path")),
        "the base model is named by its absolute path"
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

#[test]
fn ecosystem_chat_fields_shape_the_loss_mask() {
    use trainer::chat::DataField;
    use trainer::data::{load_examples, TextEncoder};

    let dir = tempfile::tempdir().expect("temp dir");
    let model_dir = dir.path().join("model");
    write_tiny_model(&model_dir, &TinyModel::default()).expect("tiny model");
    let encoder = TextEncoder::from_model_dir(&model_dir).expect("encoder");
    let chat = |weight: u8| {
        serde_json::json!({"messages": [
            {"role": "user", "content": "Hi", "name": "ada"},
            {"role": "assistant", "content": "Hello there", "weight": weight},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "B"},
        ]})
        .to_string()
    };
    let lines = [
        chat(0),
        chat(1),
        r#"{"text":"plain words"}"#.to_owned(),
        r#"{"prompt":"Q","completion":"A"}"#.to_owned(),
    ];
    let data = dir.path().join("data.jsonl");
    std::fs::write(&data, lines.join("\n")).expect("data");
    let prepared = load_examples(&data, &encoder, None).expect("loads");
    let loss_tokens: Vec<usize> = prepared.examples.iter().map(|e| e.loss_tokens()).collect();
    let turn = |text: &str| encoder.encode_text(text).expect("encodes").len();
    assert_eq!(
        loss_tokens[0],
        turn("B<|im_end|>"),
        "weight 0 keeps the first answer out of the loss; the span ends at <|im_end|>"
    );
    assert_eq!(
        loss_tokens[1],
        turn("Hello there<|im_end|>") + turn("B<|im_end|>")
    );
    let text = &prepared.examples[2];
    assert_eq!(
        text.loss_tokens(),
        text.targets.len(),
        "a text record trains on every token"
    );
    assert_eq!(loss_tokens[3], turn("A<|im_end|>"));
    assert_eq!(
        prepared.ignored.get(&DataField::Name),
        Some(&2),
        "ChatML leaves names out, and that is counted"
    );

    let tool_call = r#"{"messages":[{"role":"user","content":"Weather?"},{"role":"assistant","tool_calls":[{"id":"c","type":"function","function":{"name":"weather","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c","content":"sunny"},{"role":"assistant","content":"Sunny."}]}"#;
    std::fs::write(&data, format!("{}\n{tool_call}\n", lines[1])).expect("data");
    let error = load_examples(&data, &encoder, None).expect_err("ChatML cannot render tool calls");
    let message = error.to_string();
    assert!(
        message.contains("line 2") && message.contains("tool_calls"),
        "{message}"
    );
}

#[test]
#[cfg(not(feature = "cuda"))]
fn asking_a_cpu_build_for_cuda_says_so() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model_dir = dir.path().join("model");
    write_tiny_model(&model_dir, &TinyModel::default()).expect("tiny model");
    let data = dir.path().join("data.jsonl");
    write_dataset(&data, 4);
    let options = TrainOptions {
        model: model_dir,
        data,
        out: dir.path().join("out"),
        device: trainer::train::DeviceChoice::Cuda,
        ..TrainOptions::default()
    };
    let error = train(&options, &mut (), &Control::default()).expect_err("no CUDA here");
    assert!(
        error.to_string().contains("this build has no CUDA support"),
        "{error}"
    );
}

#[test]
fn bf16_base_weights_train_with_f32_adapters() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model_dir = dir.path().join("model");
    write_tiny_model(&model_dir, &TinyModel::default()).expect("tiny model");
    let data = dir.path().join("data.jsonl");
    write_dataset(&data, 16);
    let options = TrainOptions {
        model: model_dir,
        data,
        out: dir.path().join("out"),
        lr: 1e-2,
        max_steps: Some(12),
        batch_size: 4,
        val_split: 0.0,
        dtype: Some(trainer::train::Precision::Bf16),
        // Asked for, but the CPU has no fused ops in bf16: layers are built op by op, and
        // the summary says it did not checkpoint.
        gradient_checkpointing: true,
        ..TrainOptions::default()
    };
    let mut recorder = Recorder::default();
    let summary = train(&options, &mut recorder, &Control::default()).expect("trains in bf16");
    assert!(!summary.gradient_checkpointing);
    let (first, last) = (recorder.steps[0].loss, recorder.steps[11].loss);
    assert!(
        last.is_finite() && last < first,
        "loss falls in bf16: {first} -> {last}"
    );
    let tensors = candle_core::safetensors::load(
        dir.path().join("out/adapter/adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .expect("adapter");
    assert!(
        tensors
            .values()
            .all(|t| t.dtype() == candle_core::DType::F32),
        "adapters stay f32"
    );
}
