//! Decoding with the KV cache gives the same logits as a full forward pass.

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;
use trainer::init::random_weights;
use trainer::model::KvCache;
use trainer::rng::Rng;
use trainer::{LoraConfig, Model, ModelConfig};

#[test]
fn cached_decoding_matches_the_full_forward_pass() -> Result<()> {
    let device = Device::Cpu;
    let config = ModelConfig::parse(
        r#"{"architectures": ["MistralForCausalLM"], "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6, "vocab_size": 32, "rope_theta": 10000.0}"#,
    )
    .expect("config");
    let vb = VarBuilder::from_tensors(
        random_weights(&config, 5, DType::F64, &device)?,
        DType::F64,
        &device,
    );
    let model = Model::new(
        &config,
        vb,
        &LoraConfig::default(),
        DType::F64,
        trainer::quantized::BaseQuant::None,
        &mut Rng::new(1),
    )?;
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
