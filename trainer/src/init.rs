//! Random weights for a model of a given configuration: tiny models made on the fly for
//! tests, demos and `trainer init-model`.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};

use crate::config::ModelConfig;
use crate::rng::Rng;

/// Every weight a checkpoint of `config` holds, named as in the checkpoint, drawn from a
/// normal distribution with standard deviation 0.02 (norm weights are ones, biases small).
pub fn random_weights(
    config: &ModelConfig,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut rng = Rng::new(seed);
    let mut weights = HashMap::new();
    let normal = |shape: &[usize], std: f64, rng: &mut Rng| -> Result<Tensor> {
        let count = shape.iter().product();
        let values: Vec<f64> = (0..count).map(|_| rng.normal() * std).collect();
        Tensor::from_vec(values, shape, device)?.to_dtype(dtype)
    };
    let (hidden, inner, vocab) = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
    );
    let q_out = config.num_attention_heads * config.head_dim;
    let kv_out = config.num_key_value_heads * config.head_dim;
    weights.insert(
        "model.embed_tokens.weight".to_owned(),
        normal(&[vocab, hidden], 0.02, &mut rng)?,
    );
    for i in 0..config.num_hidden_layers {
        let prefix = format!("model.layers.{i}");
        let projections: [(&str, usize, usize, bool); 7] = [
            ("self_attn.q_proj", q_out, hidden, config.qkv_bias),
            ("self_attn.k_proj", kv_out, hidden, config.qkv_bias),
            ("self_attn.v_proj", kv_out, hidden, config.qkv_bias),
            ("self_attn.o_proj", hidden, q_out, config.o_bias),
            ("mlp.gate_proj", inner, hidden, config.mlp_bias),
            ("mlp.up_proj", inner, hidden, config.mlp_bias),
            ("mlp.down_proj", hidden, inner, config.mlp_bias),
        ];
        for (name, out, input, bias) in projections {
            weights.insert(
                format!("{prefix}.{name}.weight"),
                normal(&[out, input], 0.02, &mut rng)?,
            );
            if bias {
                weights.insert(
                    format!("{prefix}.{name}.bias"),
                    normal(&[out], 0.02, &mut rng)?,
                );
            }
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            let scale = normal(&[hidden], 0.1, &mut rng)?.affine(1.0, 1.0)?;
            weights.insert(format!("{prefix}.{norm}.weight"), scale);
        }
    }
    weights.insert(
        "model.norm.weight".to_owned(),
        Tensor::ones(hidden, dtype, device)?,
    );
    if !config.tie_word_embeddings {
        weights.insert(
            "lm_head.weight".to_owned(),
            normal(&[vocab, hidden], 0.02, &mut rng)?,
        );
    }
    Ok(weights)
}
