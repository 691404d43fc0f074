//! `config.json` of a Hugging Face model, in the classic hub style (`rope_theta`,
//! `rope_scaling`, `torch_dtype`) and the transformers 5 style (`rope_parameters`,
//! `dtype`). A missing key takes the default transformers gives it for that architecture;
//! a key we cannot honour (an unknown RoPE type, an activation other than SiLU) is
//! refused by name rather than ignored.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Result, TrainerError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub const SUPPORTED: [&'static str; 3] =
        ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

    fn from_class(name: &str) -> Option<Architecture> {
        match name {
            "LlamaForCausalLM" => Some(Architecture::Llama),
            "MistralForCausalLM" => Some(Architecture::Mistral),
            "Qwen2ForCausalLM" => Some(Architecture::Qwen2),
            _ => None,
        }
    }

    fn from_model_type(name: &str) -> Option<Architecture> {
        match name {
            "llama" => Some(Architecture::Llama),
            "mistral" => Some(Architecture::Mistral),
            "qwen2" => Some(Architecture::Qwen2),
            _ => None,
        }
    }

    pub fn class_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// How rotary frequencies are adjusted for long contexts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's piecewise frequency scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Attention window, when the model uses sliding-window attention.
    pub sliding_window: Option<usize>,
    /// The dtype the weights were saved in (`torch_dtype` or `dtype`), for information.
    pub saved_dtype: Option<String>,
}

#[derive(Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    vocab_size: Option<usize>,
    max_position_embeddings: Option<usize>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(|source| TrainerError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|message| TrainerError::Config {
            path: path.display().to_string(),
            message,
        })
    }

    pub fn parse(text: &str) -> std::result::Result<ModelConfig, String> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        let architecture = match (&raw.architectures, &raw.model_type) {
            (Some(classes), _) if !classes.is_empty() => {
                let class = &classes[0];
                Architecture::from_class(class).ok_or_else(|| {
                    format!(
                        "unsupported architecture {class}; supported: {}",
                        Architecture::SUPPORTED.join(", ")
                    )
                })?
            }
            (_, Some(model_type)) => {
                Architecture::from_model_type(model_type).ok_or_else(|| {
                    format!("unsupported model_type {model_type}; supported: llama, mistral, qwen2")
                })?
            }
            _ => return Err("neither \"architectures\" nor \"model_type\" is given".into()),
        };
        let required = |value: Option<usize>, key: &str| {
            value
                .filter(|v| *v > 0)
                .ok_or_else(|| format!("\"{key}\" is missing or zero"))
        };
        let hidden_size = required(raw.hidden_size, "hidden_size")?;
        let num_attention_heads = required(raw.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"
            ));
        }
        let head_dim = match raw.head_dim {
            Some(dim) => dim,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => return Err(
                "hidden_size is not a multiple of num_attention_heads and head_dim is not given"
                    .into(),
            ),
        };
        if head_dim % 2 != 0 {
            return Err(format!(
                "head_dim {head_dim} must be even for rotary embeddings"
            ));
        }
        let rms_norm_eps = raw.rms_norm_eps.ok_or("\"rms_norm_eps\" is missing")?;
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(format!("hidden_act {act:?} is not supported; only silu"));
            }
        }
        let (rope_theta, rope_scaling) = rope(&raw)?;
        let sliding_window = match architecture {
            Architecture::Mistral => raw.sliding_window,
            Architecture::Qwen2 if raw.use_sliding_window == Some(true) => raw.sliding_window,
            _ => None,
        };
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Llama => {
                let bias = raw.attention_bias.unwrap_or(false);
                (bias, bias)
            }
            Architecture::Qwen2 => (true, false),
            Architecture::Mistral => (false, false),
        };
        Ok(ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: required(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers: required(raw.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            vocab_size: required(raw.vocab_size, "vocab_size")?,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: architecture == Architecture::Llama && raw.mlp_bias.unwrap_or(false),
            sliding_window,
            saved_dtype: raw.dtype.or(raw.torch_dtype),
        })
    }
}

impl ModelConfig {
    /// Sequences longer than a sliding attention window would need windowed attention,
    /// which this model code does not implement: refuse them rather than train wrongly.
    pub fn check_sequence_length(&self, length: usize) -> std::result::Result<(), String> {
        match self.sliding_window {
            Some(window) if length > window => Err(format!(
                "this model uses sliding-window attention over {window} tokens, which the trainer does not \
                 implement; use sequences of at most {window} tokens (max_seq_len {length} is longer)"
            )),
            _ => Ok(()),
        }
    }
}

/// RoPE base and scaling from `rope_parameters` (transformers 5) or `rope_theta` and
/// `rope_scaling` (classic).
fn rope(raw: &RawConfig) -> std::result::Result<(f64, RopeScaling), String> {
    let parameters = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
    let theta = raw
        .rope_parameters
        .as_ref()
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64)
        .or(raw.rope_theta)
        .ok_or("\"rope_theta\" is missing (neither rope_theta nor rope_parameters.rope_theta)")?;
    let Some(parameters) = parameters.filter(|p| !p.is_null()) else {
        return Ok((theta, RopeScaling::None));
    };
    let kind = parameters
        .get("rope_type")
        .or_else(|| parameters.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let number = |key: &str| {
        parameters
            .get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("rope scaling {kind:?} needs \"{key}\""))
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: number("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_max_position_embeddings: number("original_max_position_embeddings")?,
        },
        other => {
            return Err(format!(
                "rope scaling type {other:?} is not supported (supported: default, linear, llama3)"
            ))
        }
    };
    Ok((theta, scaling))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "rms_norm_eps": 1e-05, "vocab_size": 49152, "max_position_embeddings": 8192,
        "rope_theta": 100000, "rope_scaling": null, "tie_word_embeddings": true,
        "hidden_act": "silu", "torch_dtype": "bfloat16"
    }"#;

    #[test]
    fn classic_llama_config() {
        let config = ModelConfig::parse(SMOLLM).expect("valid");
        assert_eq!(config.architecture, Architecture::Llama);
        assert_eq!((config.head_dim, config.num_key_value_heads), (64, 3));
        assert_eq!(config.rope_theta, 100000.0);
        assert!(config.tie_word_embeddings && !config.qkv_bias);
        assert_eq!(config.saved_dtype.as_deref(), Some("bfloat16"));
    }

    #[test]
    fn transformers5_style_with_llama3_scaling() {
        let text = r#"{
            "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "rms_norm_eps": 1e-5, "vocab_size": 100,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "sliding_window": null, "dtype": "bfloat16"
        }"#;
        let config = ModelConfig::parse(text).expect("valid");
        assert_eq!(config.rope_theta, 500000.0);
        assert!(
            matches!(config.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 32.0)
        );
        assert_eq!(
            config.num_key_value_heads, 4,
            "defaults to the number of heads"
        );
    }

    #[test]
    fn sequences_longer_than_a_sliding_window_are_refused() {
        let text = SMOLLM
            .replace("LlamaForCausalLM", "MistralForCausalLM")
            .replace("\"rope_scaling\": null", "\"sliding_window\": 4096");
        let config = ModelConfig::parse(&text).expect("valid");
        assert!(config.check_sequence_length(4096).is_ok());
        assert!(config
            .check_sequence_length(4097)
            .expect_err("refused")
            .contains("sliding-window attention over 4096"));
    }

    #[test]
    fn qwen2_has_qkv_biases() {
        let text = SMOLLM.replace("LlamaForCausalLM", "Qwen2ForCausalLM");
        let config = ModelConfig::parse(&text).expect("valid");
        assert!(config.qkv_bias && !config.o_bias);
    }

    #[test]
    fn what_we_cannot_honour_is_refused_by_name() {
        let cases = [
            (
                SMOLLM.replace("LlamaForCausalLM", "GPT2LMHeadModel"),
                "unsupported architecture GPT2LMHeadModel",
            ),
            (
                SMOLLM.replace("\"silu\"", "\"gelu\""),
                "hidden_act \"gelu\" is not supported",
            ),
            (
                SMOLLM.replace(
                    "\"rope_scaling\": null",
                    "\"rope_scaling\": {\"type\": \"yarn\", \"factor\": 4}",
                ),
                "rope scaling type \"yarn\"",
            ),
            (
                SMOLLM.replace("\"rope_theta\": 100000,", ""),
                "\"rope_theta\" is missing",
            ),
            (
                SMOLLM.replace("\"rms_norm_eps\": 1e-05,", ""),
                "\"rms_norm_eps\" is missing",
            ),
        ];
        for (text, expected) in cases {
            let error = ModelConfig::parse(&text).expect_err("refused");
            assert!(error.contains(expected), "{error}");
        }
    }
}
