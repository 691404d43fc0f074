//! The model's backward pass, checked against finite differences on a tiny f64 model; its
//! block ops (a half layer as one node), against the op-by-op graph; the chunked loss,
//! against the loss over the whole logits; and the promise that frozen weights get no
//! gradient at all.

use std::collections::HashSet;

use candle_core::{Device, Result, Tensor, Var};
use trainer::model::{chunked_token_loss, token_loss, Segments};
use trainer::rng::DropoutKey;
use trainer::{LoraConfig, Model};

mod common;

struct Fixture {
    model: Model,
    input_ids: Tensor,
    segments: Segments,
    targets: Tensor,
    loss_mask: Tensor,
}

fn fixture(architecture: &str, tie: bool) -> Result<Fixture> {
    let device = Device::Cpu;
    let model = common::tiny_f64_model(architecture, tie)?;
    let input_ids = Tensor::new(&[[1u32, 5, 9, 3, 7, 2], [4, 8, 15, 16, 0, 0]], &device)?;
    // The second row is padded after four tokens.
    let segments = Segments::unpacked(&[6, 4]);
    let targets = Tensor::new(&[[5u32, 9, 3, 7, 2, 0], [8, 15, 16, 23, 0, 0]], &device)?;
    let loss_mask = Tensor::new(
        &[[0f64, 1., 1., 1., 1., 0.], [0., 0., 1., 1., 0., 0.]],
        &device,
    )?;
    Ok(Fixture {
        model,
        input_ids,
        segments,
        targets,
        loss_mask,
    })
}

impl Fixture {
    fn loss(&self) -> Result<Tensor> {
        self.model.loss(
            &self.input_ids,
            Some(&self.segments),
            &self.targets,
            &self.loss_mask,
            None,
        )
    }
}

fn set_entry(var: &Var, index: usize, value: f64) -> Result<()> {
    let mut values: Vec<f64> = var.as_tensor().flatten_all()?.to_vec1()?;
    values[index] = value;
    var.set(&Tensor::from_vec(values, var.shape(), var.device())?)
}

fn check_gradients(architecture: &str, tie: bool) -> Result<()> {
    let fixture = fixture(architecture, tie)?;
    let grads = fixture.loss()?.backward()?;
    let parameters = fixture.model.lora_parameters();
    assert_eq!(
        parameters.len(),
        2 * 7 * 2,
        "A and B for 7 projections in 2 layers"
    );

    let eps = 1e-5;
    let mut worst: f64 = 0.0;
    for (name, parameter) in &parameters {
        let analytic: Vec<f64> = grads
            .get(parameter)
            .expect("LoRA gradient")
            .flatten_all()?
            .to_vec1()?;
        let original: Vec<f64> = parameter.as_tensor().flatten_all()?.to_vec1()?;
        // Three entries per parameter: first, middle, last.
        for index in [0, original.len() / 2, original.len() - 1] {
            set_entry(parameter, index, original[index] + eps)?;
            let plus = fixture.loss()?.to_scalar::<f64>()?;
            set_entry(parameter, index, original[index] - eps)?;
            let minus = fixture.loss()?.to_scalar::<f64>()?;
            set_entry(parameter, index, original[index])?;
            let numeric = (plus - minus) / (2.0 * eps);
            // Relative error, with a floor so entries with a tiny gradient are judged absolutely.
            let error = (numeric - analytic[index]).abs()
                / (numeric.abs() + analytic[index].abs()).max(1e-4);
            assert!(
                error < 1e-6,
                "{name}[{index}]: autograd {} vs finite difference {numeric} (relative error {error:e})",
                analytic[index]
            );
            worst = worst.max(error);
        }
    }
    eprintln!("{architecture}: worst relative error {worst:e}");
    Ok(())
}

#[test]
fn llama_gradients_match_finite_differences() -> Result<()> {
    check_gradients("LlamaForCausalLM", false)
}

#[test]
fn qwen2_gradients_match_finite_differences_with_biases_and_tied_embeddings() -> Result<()> {
    check_gradients("Qwen2ForCausalLM", true)
}

/// A half layer as one graph node with a hand-written backward gives the loss and every
/// LoRA gradient of the graph built op by op, and so does it with gradient checkpointing
/// (the forward run again in the backward): with LoRA dropout, with padded and packed
/// rows, with biases and tied embeddings, and with projections LoRA leaves frozen.
#[test]
fn block_ops_equal_the_op_by_op_graph() -> Result<()> {
    let dropout = Some(DropoutKey {
        seed: 7,
        step: 3,
        micro_batch: 1,
    });
    let padded = Segments::unpacked(&[6, 4]);
    let packed = Segments::packed(vec![vec![2, 4], vec![3, 1]]);
    let cases = [
        ("LlamaForCausalLM", false, &padded, LoraConfig::default()),
        ("Qwen2ForCausalLM", true, &packed, LoraConfig::default()),
        (
            "LlamaForCausalLM",
            false,
            &packed,
            LoraConfig {
                target_modules: vec!["q_proj".into(), "v_proj".into(), "up_proj".into()],
                ..LoraConfig::default()
            },
        ),
    ];
    for (architecture, tie, segments, lora) in cases {
        let lora = LoraConfig {
            rank: 2,
            alpha: 4.0,
            dropout: 0.25,
            ..lora
        };
        let mut model = common::tiny_f64_model_with(architecture, tie, &lora)?;
        let fixture = fixture(architecture, tie)?;
        let loss_and_gradients = |model: &Model| -> Result<(f64, Vec<Vec<f64>>)> {
            let loss = model.loss(
                &fixture.input_ids,
                Some(segments),
                &fixture.targets,
                &fixture.loss_mask,
                dropout,
            )?;
            let grads = loss.backward()?;
            let gradients = model
                .lora_parameters()
                .values()
                .map(|parameter| {
                    grads
                        .get(parameter)
                        .expect("LoRA gradient")
                        .flatten_all()?
                        .to_vec1()
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((loss.to_scalar()?, gradients))
        };
        model.set_block_ops(false);
        let (reference_loss, reference) = loss_and_gradients(&model)?;
        let names: Vec<String> = model.lora_parameters().into_keys().collect();
        assert!(!names.is_empty());
        model.set_block_ops(true);
        for checkpoint in [false, true] {
            model.set_gradient_checkpointing(checkpoint);
            assert_eq!(model.gradient_checkpointing(), checkpoint);
            let (loss, gradients) = loss_and_gradients(&model)?;
            let case = format!("{architecture}, checkpointing {checkpoint}");
            assert!(
                (loss - reference_loss).abs() <= 1e-12,
                "{case}: loss {loss} vs {reference_loss}"
            );
            for ((name, actual), expected) in names.iter().zip(&gradients).zip(&reference) {
                let scale = expected.iter().fold(0f64, |m, e| m.max(e.abs()));
                assert!(scale > 0.0, "{case}: {name} has a zero gradient");
                for (a, e) in actual.iter().zip(expected) {
                    assert!(
                        (a - e).abs() <= 1e-12 * scale.max(1.0),
                        "{case}: {name}: {a} vs {e}"
                    );
                }
            }
        }
    }
    Ok(())
}

/// The inference forward gives the forward's logits, and nothing to differentiate: no
/// LoRA weight gets a gradient through it, whichever way layers are built.
#[test]
fn the_inference_forward_equals_the_forward_and_keeps_no_graph() -> Result<()> {
    let mut fixture = fixture("Qwen2ForCausalLM", true)?;
    for blocks in [true, false] {
        fixture.model.set_block_ops(blocks);
        let model = &fixture.model;
        let segments = Some(&fixture.segments);
        let logits = model.forward(&fixture.input_ids, segments, None)?;
        let inferred = model.forward_inference(&fixture.input_ids, segments)?;
        let difference = (&logits - &inferred)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(difference <= 1e-12, "blocks {blocks}: {difference}");
        let grads = inferred.sum_all()?.backward()?;
        for (name, parameter) in model.lora_parameters() {
            assert!(
                grads.get(&parameter).is_none(),
                "blocks {blocks}: {name} has a gradient"
            );
        }
    }
    Ok(())
}

/// The chunked loss gives the loss and the LoRA gradients of `token_loss` over the whole
/// logits, whatever the chunk size: one token, a chunk that does not divide the batch's
/// 12 tokens, exactly all of them, more than all of them.
#[test]
fn the_chunked_loss_equals_the_loss_over_all_logits() -> Result<()> {
    let fixture = fixture("Qwen2ForCausalLM", true)?;
    let model = &fixture.model;
    let logits = model.forward(&fixture.input_ids, Some(&fixture.segments), None)?;
    let reference = token_loss(&logits, &fixture.targets, &fixture.loss_mask)?;
    let reference_grads = reference.backward()?;
    let reference = reference.to_scalar::<f64>()?;
    for chunk_tokens in [1, 5, 12, 100] {
        let hidden = model.hidden_states(&fixture.input_ids, Some(&fixture.segments), None)?;
        let loss = chunked_token_loss(
            &hidden,
            model.lm_head(),
            &fixture.targets,
            &fixture.loss_mask,
            chunk_tokens,
        )?;
        let grads = loss.backward()?;
        let loss = loss.to_scalar::<f64>()?;
        assert!(
            (loss - reference).abs() < 1e-12,
            "chunks of {chunk_tokens}: loss {loss} vs {reference}"
        );
        for (name, parameter) in model.lora_parameters() {
            let expected: Vec<f64> = reference_grads
                .get(&parameter)
                .expect("reference gradient")
                .flatten_all()?
                .to_vec1()?;
            let actual: Vec<f64> = grads
                .get(&parameter)
                .expect("chunked gradient")
                .flatten_all()?
                .to_vec1()?;
            for (a, e) in actual.iter().zip(&expected) {
                assert!(
                    (a - e).abs() <= 1e-12 * e.abs().max(1.0),
                    "chunks of {chunk_tokens}: {name}: {a} vs {e}"
                );
            }
        }
    }
    Ok(())
}

/// After backward, the gradient store holds the LoRA parameters' gradients and, besides
/// them, only activation-shaped leftovers from the first layer (where the input is the
/// constant embedding output, candle's `add` still hands the constant side a gradient)
/// and the loss's own scalars. No frozen weight has a gradient computed or kept.
#[test]
fn frozen_weights_get_no_gradient() -> Result<()> {
    let fixture = fixture("LlamaForCausalLM", false)?;
    let grads = fixture.loss()?.backward()?;
    let kept: HashSet<_> = grads.get_ids().copied().collect();
    let lora: HashSet<_> = fixture
        .model
        .lora_parameters()
        .values()
        .map(|v| v.as_tensor().id())
        .collect();
    assert!(lora.is_subset(&kept), "every LoRA parameter has a gradient");
    let (batch, len) = fixture.input_ids.dims2()?;
    for id in kept.difference(&lora) {
        let dims = grads.get_id(*id).expect("kept").dims().to_vec();
        let activation = dims.starts_with(&[batch, len])
            || dims.first() == Some(&(batch * len))
            || dims.is_empty();
        assert!(
            activation,
            "a gradient of shape {dims:?} is kept: a frozen weight's?"
        );
    }
    Ok(())
}
