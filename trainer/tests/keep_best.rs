//! Keep-best and early stopping: the adapter of the best evaluation, a stop once the
//! validation loss plateaus, and both kept across an interruption and resume.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use trainer::init::{write_tiny_model, TinyModel};
mod common;

use common::{metrics, StopAfter};
use trainer::train::{train, Control, StepMetrics, TrainOptions};

/// Conversations whose answers all say `answer`.
fn write_dataset(path: &Path, answer: &str) {
    let lines: String = (0..32)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("Is {i} even?")},
                {"role": "assistant", "content": format!("{answer}, {i}.")}
            ]})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(path, lines).expect("dataset");
}

/// Options on a fresh tiny model, evaluating after every step. Training answers "Yes",
/// validation "No": the validation loss first falls (the chat format is shared), then
/// climbs as "Yes" is learnt, so its best is mid-run.
fn options(dir: &Path) -> TrainOptions {
    let model = dir.join("model");
    write_tiny_model(&model, &TinyModel::default()).expect("model");
    let (data, val_data) = (dir.join("data.jsonl"), dir.join("validation.jsonl"));
    write_dataset(&data, "Yes");
    write_dataset(&val_data, "No");
    TrainOptions {
        model,
        data,
        val_data: Some(val_data),
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        lr: 0.05,
        max_steps: Some(14),
        batch_size: 8,
        max_seq_len: 64,
        eval_every: Some(1),
        checkpoint_every: Some(1),
        // The plateau is crafted for eight conversations a step; packed, a step would
        // hold them all and overshoot it.
        packing: false,
        ..TrainOptions::default()
    }
}

fn weights(path: &Path) -> HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .expect("weights")
        .into_iter()
        .map(|(name, tensor): (String, Tensor)| {
            let values = tensor
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .expect("values");
            (name, values)
        })
        .collect()
}

/// The step with the lowest validation loss (the first of equals).
fn best_step(metrics: &[StepMetrics]) -> usize {
    let mut best: Option<(usize, f64)> = None;
    for m in metrics {
        if let Some(loss) = m.validation_loss {
            if best.is_none_or(|(_, b)| loss < b) {
                best = Some((m.step, loss));
            }
        }
    }
    best.expect("evaluations").0
}

#[test]
fn early_stopping_stops_on_a_plateau() {
    let dir = tempfile::tempdir().expect("temp dir");
    // No evaluation can improve by 100 nats: after the first, the loss has plateaued.
    let options = TrainOptions {
        out: dir.path().join("out"),
        early_stopping_patience: Some(2),
        early_stopping_min_delta: 100.0,
        ..options(dir.path())
    };
    let summary = train(&options, &mut (), &Control::default()).expect("run");
    assert_eq!(
        summary.steps, 3,
        "the first evaluation, then two without improvement"
    );
    assert_eq!(summary.best_step, Some(best_step(&metrics(&options.out))));
    assert_eq!(
        summary.adapter_step, 3,
        "without keep-best the last step's adapter"
    );
    let reason = summary.stopped_early.expect("stopped early");
    assert!(reason.contains("Stopped early after step 3"), "{reason}");
    assert_eq!(metrics(&options.out).len(), 3);
}

#[test]
fn keep_best_returns_the_adapter_of_the_best_evaluation() {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = TrainOptions {
        out: dir.path().join("out"),
        keep_best: true,
        ..options(dir.path())
    };
    let summary = train(&options, &mut (), &Control::default()).expect("run");
    let best = best_step(&metrics(&options.out));
    assert!(
        best < summary.steps,
        "the crafted run peaks mid-run: best at {best}"
    );
    assert_eq!(summary.best_step, Some(best));
    assert_eq!(summary.adapter_step, best);
    let kept = weights(&options.out.join("adapter/adapter_model.safetensors"));
    let at_best = weights(
        &options
            .out
            .join(format!("checkpoints/step-{best}/adapter_model.safetensors")),
    );
    assert_eq!(kept, at_best, "the adapter is the best step's weights");
    let last = weights(&options.out.join(format!(
        "checkpoints/step-{}/adapter_model.safetensors",
        summary.steps
    )));
    assert_ne!(kept, last);
}

#[test]
fn a_resumed_run_keeps_its_best_so_far_and_its_patience() {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = TrainOptions {
        keep_best: true,
        early_stopping_patience: Some(3),
        ..options(dir.path())
    };
    let uninterrupted = TrainOptions {
        out: dir.path().join("a"),
        ..options.clone()
    };
    let expected = train(&uninterrupted, &mut (), &Control::default()).expect("uninterrupted");
    let best = expected.best_step.expect("a best step");
    assert!(
        expected.stopped_early.is_some(),
        "the crafted run stops early: {expected:?}"
    );
    // Interrupted after the best step, with patience partly spent, and resumed.
    let interrupted = TrainOptions {
        out: dir.path().join("b"),
        ..options.clone()
    };
    let control = Control::default();
    let stop_at = best + 1;
    train(
        &interrupted,
        &mut StopAfter {
            control: &control,
            at: stop_at,
        },
        &control,
    )
    .expect("first part");
    let resumed = TrainOptions {
        resume_from: Some(interrupted.out.join(format!("checkpoints/step-{stop_at}"))),
        ..interrupted.clone()
    };
    let actual = train(&resumed, &mut (), &Control::default()).expect("resumed");
    assert_eq!(actual.steps, expected.steps, "stopped at the same step");
    assert_eq!(actual.best_step, expected.best_step);
    assert_eq!(actual.stopped_early, expected.stopped_early);
    assert_eq!(actual.adapter_step, best);
    let (kept, expected_weights) = (
        weights(&resumed.out.join("adapter/adapter_model.safetensors")),
        weights(&uninterrupted.out.join("adapter/adapter_model.safetensors")),
    );
    for (name, values) in &expected_weights {
        let difference = values
            .iter()
            .zip(&kept[name])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(difference <= 1e-6, "{name} differs by {difference}");
    }
}
