//! Training on a quantized frozen base (`--base-quant`): q8_0 tracks the full-precision
//! run closely, q4k trains, the adapter stays a PEFT adapter that loads on the
//! unquantized base, and the summary says how the base was held.

use std::path::Path;

use trainer::evaluation::evaluate_file;
use trainer::init::{write_tiny_model, TinyModel};
use trainer::quantized::BaseQuant;
use trainer::train::{train, Control, Summary, TrainOptions};
mod common;

use common::metrics;

/// How far q8_0's training losses may stray from the f32 run's, relative, step by step.
/// Measured: at most 0.76 % over these twenty steps (q4k: 9.7 %); the bound leaves room
/// for another platform's summation order.
const Q8_0_LOSS_TOLERANCE: f64 = 1.5e-2;

fn write_dataset(path: &Path) {
    let lines: String = (0..40)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("What is {i} plus {i}?")},
                {"role": "assistant", "content": format!("{} is the answer.", 2 * i)}
            ]})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(path, lines).expect("dataset");
}

fn run(dir: &Path, base_quant: BaseQuant) -> (Summary, Vec<f64>) {
    let out = dir.join(base_quant.to_string());
    let options = TrainOptions {
        model: dir.join("model"),
        data: dir.join("data.jsonl"),
        out: out.clone(),
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        lr: 1e-3,
        max_steps: Some(20),
        batch_size: 4,
        max_seq_len: 64,
        val_split: 0.2,
        base_quant,
        ..TrainOptions::default()
    };
    let summary = train(&options, &mut (), &Control::default()).expect("training");
    let losses = metrics(&out).iter().map(|m| m.loss).collect();
    (summary, losses)
}

#[test]
fn a_quantized_base_trains_and_q8_0_tracks_full_precision() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Rows of 256 and 512 inputs: every projection takes q4k's super-blocks of 256.
    let tiny = TinyModel {
        hidden_size: 256,
        intermediate_size: 512,
        ..TinyModel::default()
    };
    write_tiny_model(&dir.path().join("model"), &tiny).expect("model");
    write_dataset(&dir.path().join("data.jsonl"));

    let (full, full_losses) = run(dir.path(), BaseQuant::None);
    let (q8, q8_losses) = run(dir.path(), BaseQuant::Q8_0);
    let (q4, q4_losses) = run(dir.path(), BaseQuant::Q4k);
    assert!(full.quantization.is_none());

    let worst = |losses: &[f64]| {
        full_losses
            .iter()
            .zip(losses)
            .map(|(f, q)| (f - q).abs() / f)
            .fold(0.0, f64::max)
    };
    let (worst, worst_q4) = (worst(&q8_losses), worst(&q4_losses));
    eprintln!("against f32, worst relative loss difference: q8_0 {worst:.2e}, q4k {worst_q4:.2e}");
    eprintln!("losses f32 {full_losses:?}\nq8_0 {q8_losses:?}\nq4k {q4_losses:?}");
    assert!(worst < Q8_0_LOSS_TOLERANCE, "q8_0 strays {worst:.2e}");

    let (first, last) = (q4_losses[0], q4_losses[q4_losses.len() - 1]);
    assert!(last < 0.7 * first, "q4k does not train: {first} → {last}");

    for (summary, format, bits) in [(&q8, "q8_0", 8.5), (&q4, "q4k", 4.5)] {
        let report = summary
            .quantization
            .as_ref()
            .expect("a quantization report");
        // Two layers of seven projections, all in the asked format.
        assert_eq!(report.projections.get(format), Some(&14), "{report:?}");
        assert_eq!(report.dense_projections, 0);
        let ratio = report.held_bytes as f64 / report.dense_bytes as f64;
        assert!((ratio - bits / 32.0).abs() < 1e-3, "{format}: {ratio}");
    }

    // The adapters are plain PEFT adapters: they load on the unquantized base, where
    // the q8_0 one scores about as on its own base.
    let base = dir.path().join("model");
    let val = dir.path().join("data.jsonl");
    for (summary, name) in [(&q8, "q8_0"), (&q4, "q4k")] {
        let adapter = dir.path().join(name).join("adapter");
        let on_full = evaluate_file(&base, Some(&adapter), &val, Some(64), 8).expect("evaluates");
        eprintln!(
            "{name}: loss on the unquantized base {:.4} (validation on its own base {:?})",
            on_full.loss, summary.validation_loss
        );
        assert!(on_full.loss.is_finite());
        assert!(on_full.loss < full_losses[0], "{name}: the adapter helps");
    }
}
