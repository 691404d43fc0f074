//! Decoding with the KV cache gives the same logits as a full forward pass.

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;
use trainer::init::random_weights;
use trainer::model::KvCache;
use trainer::rng::Rng;
use trainer::{LoraConfig, Model, ModelConfig};

/// A two-layer Mistral (grouped-query attention) in f64.
fn model(device: &Device) -> Result<Model> {
    let config = ModelConfig::parse(
        r#"{"architectures": ["MistralForCausalLM"], "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6, "vocab_size": 32, "rope_theta": 10000.0}"#,
    )
    .expect("config");
    let vb = VarBuilder::from_tensors(
        random_weights(&config, 5, DType::F64, device)?,
        DType::F64,
        device,
    );
    Model::new(
        &config,
        vb,
        &LoraConfig::default(),
        DType::F64,
        trainer::quantized::BaseQuant::None,
        &mut Rng::new(1),
    )
}

/// Rows generated together, their prompts right-aligned, give each row the logits it gets
/// alone: the left padding is seen by no query, and positions count from each row's
/// first real token.
#[test]
fn left_padded_rows_decode_as_they_do_alone() -> Result<()> {
    let device = Device::Cpu;
    let model = model(&device)?;
    let prompts: [&[u32]; 3] = [&[3, 14, 15], &[9, 2, 6, 5, 3], &[7]];
    let steps: [[u32; 3]; 3] = [[4, 1, 8], [11, 12, 13], [2, 2, 30]];
    let alone = |row: usize| -> Result<Vec<Tensor>> {
        let mut cache = KvCache::default();
        let prompt = Tensor::new(prompts[row], &device)?.unsqueeze(0)?;
        let mut logits = vec![model.forward_cached(&prompt, &mut cache)?];
        for step in &steps {
            let token = Tensor::new(&[[step[row]]], &device)?;
            logits.push(model.forward_cached(&token, &mut cache)?);
        }
        Ok(logits)
    };
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let padding: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    // Padding tokens that are not zero: what they hold must not matter.
    let padded: Vec<u32> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(31, longest - p.len()).chain(p.iter().copied()))
        .collect();
    let mut cache = KvCache::left_padded(padding);
    let input = Tensor::from_vec(padded, (prompts.len(), longest), &device)?;
    let mut together = vec![model.forward_cached(&input, &mut cache)?];
    for step in &steps {
        let tokens = Tensor::from_vec(step.to_vec(), (prompts.len(), 1), &device)?;
        together.push(model.forward_cached(&tokens, &mut cache)?);
    }
    for row in 0..prompts.len() {
        for (step, (alone, together)) in alone(row)?.iter().zip(&together).enumerate() {
            let difference = (alone.squeeze(0)? - together.get(row)?)?
                .abs()?
                .max(0)?
                .to_scalar::<f64>()?;
            assert!(difference < 1e-12, "row {row}, step {step}: {difference}");
        }
    }
    Ok(())
}

#[test]
fn cached_decoding_matches_the_full_forward_pass() -> Result<()> {
    let device = Device::Cpu;
    let model = model(&device)?;
    let tokens = [3u32, 14, 15, 9, 2, 6];
    let full = model.forward(&Tensor::new(&[tokens], &device)?, None, None)?;

    let mut cache = KvCache::default();
    let mut pieces = vec![model.forward_cached(
        &Tensor::new(&tokens[..3], &device)?.unsqueeze(0)?,
        &mut cache,
    )?];
    for token in &tokens[3..] {
        pieces.push(model.forward_cached(&Tensor::new(&[[*token]], &device)?, &mut cache)?);
    }
    for (i, cached) in pieces.iter().enumerate() {
        let position = 2 + i;
        let expected = full.narrow(1, position, 1)?.squeeze(1)?;
        let difference = (cached - &expected)?
            .abs()?
            .max(D::Minus1)?
            .max(0)?
            .to_scalar::<f64>()?;
        assert!(difference < 1e-10, "position {position}: {difference}");
    }
    Ok(())
}
