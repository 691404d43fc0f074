//! Packed rows on a tiny f64 model: a packed step's loss and LoRA gradients equal the
//! unpacked ones over the same examples, and no token sees across a sequence boundary
//! (each packed sequence's logits are those it has alone, whatever its neighbours hold).

use std::collections::BTreeMap;

use candle_core::{Device, Result, Tensor};
use trainer::data::{make_batch, make_packed_batch, Batch, Example};
use trainer::rng::Rng;
use trainer::Model;

mod common;

/// Examples of mixed lengths, each with a loss mask over part of its tokens.
fn examples(rng: &mut Rng, lengths: &[usize]) -> Vec<Example> {
    lengths
        .iter()
        .map(|length| {
            let tokens: Vec<u32> = (0..=*length)
                .map(|_| (rng.next_u64() % 32) as u32)
                .collect();
            Example {
                input_ids: tokens[..*length].to_vec(),
                targets: tokens[1..].to_vec(),
                loss_mask: (0..*length)
                    .map(|i| if i >= length / 3 { 1.0 } else { 0.0 })
                    .collect(),
            }
        })
        .collect()
}

fn loss(model: &Model, batch: &Batch) -> Result<Tensor> {
    model.loss(
        &batch.input_ids,
        Some(&batch.segments),
        &batch.targets,
        &batch.loss_mask,
        None,
    )
}

fn gradients(model: &Model, loss: &Tensor) -> Result<BTreeMap<String, Vec<f64>>> {
    let grads = loss.backward()?;
    model
        .lora_parameters()
        .into_iter()
        .map(|(name, parameter)| {
            let gradient = grads.get(&parameter).expect("a LoRA gradient");
            Ok((name, gradient.flatten_all()?.to_vec1::<f64>()?))
        })
        .collect()
}

/// As the training loop accumulates: each micro-batch's mean loss weighted by its share
/// of the step's loss tokens.
fn step(model: &Model, batches: &[Batch]) -> Result<(f64, BTreeMap<String, Vec<f64>>)> {
    let total: usize = batches.iter().map(|b| b.loss_tokens).sum();
    let mut weighted = Vec::new();
    for batch in batches {
        weighted.push(loss(model, batch)?.affine(batch.loss_tokens as f64 / total as f64, 0.0)?);
    }
    let sum = weighted
        .into_iter()
        .reduce(|a, b| (a + b).expect("same shapes"))
        .expect("a micro-batch");
    Ok((sum.to_scalar::<f64>()?, gradients(model, &sum)?))
}

#[test]
fn a_packed_step_equals_the_unpacked_step_over_the_same_examples() -> Result<()> {
    for architecture in ["LlamaForCausalLM", "Qwen2ForCausalLM"] {
        let model = common::tiny_f64_model(architecture, false)?;
        let mut rng = Rng::new(3);
        let all = examples(&mut rng, &[9, 3, 6, 2, 7, 5, 4]);
        let refs: Vec<&Example> = all.iter().collect();
        // Unpacked: two micro-batches of padded rows.
        let unpacked = [
            make_batch(&refs[..4], 0, &Device::Cpu)?,
            make_batch(&refs[4..], 0, &Device::Cpu)?,
        ];
        // Packed: the same examples in three rows of up to 14 tokens (one padded), in two
        // micro-batches that split the examples differently.
        let packed = [
            make_packed_batch(&[vec![refs[0], refs[3], refs[1]]], 0, &Device::Cpu)?,
            make_packed_batch(
                &[vec![refs[4], refs[5]], vec![refs[2], refs[6]]],
                0,
                &Device::Cpu,
            )?,
        ];
        assert!(packed[1].slots > packed[1].tokens, "a padded packed row");
        let (expected_loss, expected) = step(&model, &unpacked)?;
        let (actual_loss, actual) = step(&model, &packed)?;
        assert!(
            (actual_loss - expected_loss).abs() <= 1e-5 * expected_loss.abs(),
            "{architecture}: loss {actual_loss} vs {expected_loss}"
        );
        for (name, e) in &expected {
            let a = &actual[name];
            let scale = e.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-12);
            let worst = a.iter().zip(e).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                worst <= 1e-5 * scale,
                "{architecture}: {name} differs by {worst} (scale {scale})"
            );
        }
    }
    Ok(())
}

#[test]
fn no_token_sees_across_a_sequence_boundary() -> Result<()> {
    let model = common::tiny_f64_model("LlamaForCausalLM", false)?;
    let mut rng = Rng::new(8);
    let [first, middle, last]: [Example; 3] = examples(&mut rng, &[5, 4, 6])
        .try_into()
        .expect("three examples");
    let mut changed = middle.clone();
    changed.input_ids = changed.input_ids.iter().map(|t| (t + 7) % 32).collect();
    let logits = |row: Vec<&Example>| -> Result<Vec<Vec<f64>>> {
        let batch = make_packed_batch(&[row], 0, &Device::Cpu)?;
        model
            .forward(&batch.input_ids, Some(&batch.segments), None)?
            .squeeze(0)?
            .to_vec2::<f64>()
    };
    let original = logits(vec![&first, &middle, &last])?;
    let perturbed = logits(vec![&first, &changed, &last])?;
    let close = |a: &[Vec<f64>], b: &[Vec<f64>]| {
        a.iter()
            .flatten()
            .zip(b.iter().flatten())
            .all(|(x, y)| (x - y).abs() <= 1e-12)
    };
    // The first (0..5) and last (9..15) sequences are untouched by the middle one.
    assert!(close(&original[..5], &perturbed[..5]), "before the change");
    assert!(close(&original[9..], &perturbed[9..]), "after the change");
    assert!(
        !close(&original[5..9], &perturbed[5..9]),
        "the change itself shows"
    );
    // And each sequence's logits are those it has alone: positions restart at 0.
    assert!(
        close(&original[9..], &logits(vec![&last])?),
        "the last, alone"
    );
    assert!(
        close(&original[5..9], &logits(vec![&middle])?),
        "the middle, alone"
    );
    Ok(())
}
