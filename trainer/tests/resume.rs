//! A run interrupted after a checkpoint and resumed from it reproduces the uninterrupted
//! run exactly (CPU, f32): same losses at every step, same final adapter; with examples
//! packed into rows and one per row.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use trainer::init::{write_tiny_model, TinyModel};
mod common;

use common::{metrics, StopAfter};
use trainer::train::{train, Control, TrainOptions};

fn write_dataset(path: &Path) {
    let lines: String = (0..24)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": format!("Double {i}?")},
                {"role": "assistant", "content": format!("{}.", 2 * i)}
            ]})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(path, lines).expect("dataset");
}

fn adapter(out: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(out.join("adapter/adapter_model.safetensors"), &Device::Cpu)
        .expect("adapter")
}

#[test]
fn resuming_reproduces_the_uninterrupted_run() {
    resumes_exactly(false);
}

/// Packed, the rows are rebuilt from (seed, epoch, data): ten steps here run through
/// several epochs of packed rows.
#[test]
fn resuming_a_packed_run_reproduces_it() {
    resumes_exactly(true);
}

fn resumes_exactly(packing: bool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = dir.path().join("model");
    write_tiny_model(&model, &TinyModel::default()).expect("model");
    let data = dir.path().join("data.jsonl");
    write_dataset(&data);
    let options = TrainOptions {
        model,
        data,
        rank: 4,
        alpha: 8.0,
        dropout: 0.1, // the resumed run must draw the same dropout masks
        lr: 5e-3,
        max_steps: Some(10),
        batch_size: 4,
        grad_accum: 2,
        max_seq_len: 64,
        checkpoint_every: Some(4),
        eval_every: Some(5),
        packing,
        ..TrainOptions::default()
    };

    let uninterrupted = TrainOptions {
        out: dir.path().join("a"),
        ..options.clone()
    };
    train(&uninterrupted, &mut (), &Control::default()).expect("uninterrupted run");

    let interrupted = TrainOptions {
        out: dir.path().join("b"),
        ..options.clone()
    };
    let control = Control::default();
    let summary = train(
        &interrupted,
        &mut StopAfter {
            control: &control,
            at: 6,
        },
        &control,
    )
    .expect("first part");
    assert!(summary.cancelled);
    assert_eq!(summary.steps, 6);
    let checkpoint = interrupted.out.join("checkpoints/step-4");
    assert!(checkpoint.join("manifest.json").exists());

    // The resumed part computes its activations again in the backward (the same
    // gradients, so not part of the run's maths): it resumes, and to the same result.
    let resumed = TrainOptions {
        resume_from: Some(checkpoint.clone()),
        gradient_checkpointing: true,
        ..interrupted.clone()
    };
    let summary = train(&resumed, &mut (), &Control::default()).expect("resumed run");
    assert_eq!(summary.steps, 10);
    assert!(summary.gradient_checkpointing);

    let (expected, actual) = (metrics(&uninterrupted.out), metrics(&resumed.out));
    let steps: Vec<usize> = actual.iter().map(|m| m.step).collect();
    assert_eq!(
        steps,
        (1..=10).collect::<Vec<_>>(),
        "every step once, none repeated or missing"
    );
    for (e, a) in expected.iter().zip(&actual) {
        assert!(
            (e.loss - a.loss).abs() <= 1e-6,
            "step {}: loss {} vs {}",
            e.step,
            e.loss,
            a.loss
        );
        assert_eq!(e.learning_rate, a.learning_rate);
        match (e.validation_loss, a.validation_loss) {
            (Some(x), Some(y)) => assert!((x - y).abs() <= 1e-6),
            (x, y) => assert_eq!(x.is_some(), y.is_some()),
        }
    }
    let (expected, actual) = (adapter(&uninterrupted.out), adapter(&resumed.out));
    assert_eq!(expected.len(), actual.len());
    for (name, tensor) in &expected {
        let difference = (tensor - &actual[name])
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("difference");
        assert!(difference <= 1e-6, "{name} differs by {difference}");
    }

    // A resume with other settings or a damaged checkpoint is refused, naming why.
    for other in [
        TrainOptions {
            lr: 1e-3,
            ..resumed.clone()
        },
        TrainOptions {
            packing: !packing,
            ..resumed.clone()
        },
    ] {
        let error = train(&other, &mut (), &Control::default()).expect_err("refused");
        assert!(
            error.to_string().contains("different configuration"),
            "{error}"
        );
    }
    let optimizer = checkpoint.join("optimizer.safetensors");
    let mut bytes = std::fs::read(&optimizer).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xFF;
    std::fs::write(&optimizer, bytes).expect("write");
    let error = train(&resumed, &mut (), &Control::default()).expect_err("refused");
    assert!(
        error
            .to_string()
            .contains("optimizer.safetensors is corrupt"),
        "{error}"
    );
}
