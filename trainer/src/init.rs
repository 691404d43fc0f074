//! Random weights for a model of a given configuration: tiny models made on the fly for
//! tests, demos and `trainer init-model`.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};

use crate::config::ModelConfig;
use crate::rng::Rng;

/// Every weight a checkpoint of `config` holds, named as in the checkpoint. Projections
/// are drawn with standard deviation 1/sqrt(fan_in) and the embedding tables with 0.5, so
/// that a tiny random model has logits spread enough to learn from quickly (the final
/// RMSNorm caps the hidden state's scale, so small output weights would cap the logits).
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
        normal(&[vocab, hidden], 0.5, &mut rng)?,
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
                normal(&[out, input], 1.0 / (input as f64).sqrt(), &mut rng)?,
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
            normal(&[vocab, hidden], 0.5, &mut rng)?,
        );
    }
    Ok(weights)
}

/// The shape of a tiny model made on the fly.
#[derive(Debug, Clone)]
pub struct TinyModel {
    pub architecture: crate::config::Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub tie_word_embeddings: bool,
    pub seed: u64,
}

impl Default for TinyModel {
    fn default() -> Self {
        TinyModel {
            architecture: crate::config::Architecture::Llama,
            hidden_size: 64,
            intermediate_size: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            tie_word_embeddings: false,
            seed: 0,
        }
    }
}

/// Special tokens of the tiny tokenizer, after the 256 byte tokens.
const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// GPT-2's byte-to-character map used by byte-level BPE: printable bytes stand for
/// themselves, the rest are moved to code points from 256 up.
fn byte_level_alphabet() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0u32..256)
        .map(|b| {
            let code = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(code).unwrap_or('?')
        })
        .collect()
}

/// A byte-level BPE tokenizer with no merges (one token per byte) and ChatML's special
/// tokens, in the `tokenizer.json` format both `tokenizers` libraries read.
fn tiny_tokenizer_json() -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> = byte_level_alphabet()
        .into_iter()
        .enumerate()
        .map(|(id, c)| (c.to_string(), serde_json::json!(id)))
        .collect();
    let added: Vec<serde_json::Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, content)| {
            serde_json::json!({"id": 256 + i, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []}
    })
}

/// Writes a complete Hugging Face model directory with random weights: `config.json`,
/// `model.safetensors`, `tokenizer.json` and `tokenizer_config.json` (ChatML template).
pub fn write_tiny_model(
    dir: &std::path::Path,
    spec: &TinyModel,
) -> crate::error::Result<ModelConfig> {
    use crate::error::TrainerError;
    let io = |path: &std::path::Path| {
        let path = path.display().to_string();
        move |source| TrainerError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let vocab_size = 256 + SPECIAL_TOKENS.len();
    let config_json = serde_json::json!({
        "architectures": [spec.architecture.class_name()],
        "model_type": match spec.architecture {
            crate::config::Architecture::Llama => "llama",
            crate::config::Architecture::Mistral => "mistral",
            crate::config::Architecture::Qwen2 => "qwen2",
        },
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "hidden_act": "silu",
        "bos_token_id": null,
        "eos_token_id": 258,
        "pad_token_id": 256,
        "torch_dtype": "float32",
    });
    let config = ModelConfig::parse(&config_json.to_string()).map_err(TrainerError::Invalid)?;
    let write = |name: &str, text: String| -> crate::error::Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(io(&path))
    };
    write(
        "config.json",
        serde_json::to_string_pretty(&config_json).unwrap_or_default(),
    )?;
    write(
        "tokenizer.json",
        serde_json::to_string_pretty(&tiny_tokenizer_json()).unwrap_or_default(),
    )?;
    let tokenizer_config = serde_json::json!({
        "chat_template": crate::chat::CHATML,
        "bos_token": null,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    write(
        "tokenizer_config.json",
        serde_json::to_string_pretty(&tokenizer_config).unwrap_or_default(),
    )?;
    let weights = random_weights(&config, spec.seed, DType::F32, &Device::Cpu)?;
    let path = dir.join("model.safetensors");
    crate::tensor_file::save(&weights, &path)?;
    Ok(config)
}
