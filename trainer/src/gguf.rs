//! Native GGUF export of a PEFT LoRA adapter, as llama.cpp loads it with `--lora`: the
//! file `convert_lora_to_gguf.py` writes for our adapters, without a Python toolchain.
//!
//! - Metadata: `general.architecture` (`llama` for Llama and Mistral, `qwen2`),
//!   `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha` (f32).
//! - Tensors: `blk.N.attn_q.weight.lora_a` (rank × in) and `….lora_b` (out × rank), in
//!   llama.cpp's names; GGUF lists dimensions innermost first, so they read `[in, rank]`
//!   and `[rank, out]` there.
//! - llama.cpp keeps Llama-style models' q and k rows permuted for its rotary layout; the
//!   converter permutes `lora_b` of q and k the same way, and so do we (Qwen2 keeps the
//!   Hugging Face layout).
//! - rsLoRA scales by alpha / sqrt(r); llama.cpp scales by alpha / r, so an rsLoRA adapter
//!   is written with alpha × sqrt(r) (the Python converter ignores `use_rslora`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::{Architecture, ModelConfig};
use crate::error::{Result, TrainerError};

const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
const ALIGNMENT: u64 = 32;

/// The element type of the exported tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufDtype {
    F32,
    F16,
    Bf16,
}

impl GgufDtype {
    pub fn parse(name: &str) -> Option<GgufDtype> {
        match name {
            "f32" => Some(GgufDtype::F32),
            "f16" => Some(GgufDtype::F16),
            "bf16" => Some(GgufDtype::Bf16),
            _ => None,
        }
    }

    /// ggml's type id.
    fn ggml_type(self) -> u32 {
        match self {
            GgufDtype::F32 => 0,
            GgufDtype::F16 => 1,
            GgufDtype::Bf16 => 30,
        }
    }

    /// `general.file_type` (llama.cpp's `LlamaFileType`).
    fn file_type(self) -> u32 {
        match self {
            GgufDtype::F32 => 0,
            GgufDtype::F16 => 1,
            GgufDtype::Bf16 => 32,
        }
    }

    fn bytes(self, tensor: &Tensor) -> Result<Vec<u8>> {
        let flat = tensor.flatten_all()?;
        Ok(match self {
            GgufDtype::F32 => flat
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            GgufDtype::F16 => flat
                .to_dtype(DType::F16)?
                .to_vec1::<half::f16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            GgufDtype::Bf16 => flat
                .to_dtype(DType::BF16)?
                .to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        })
    }
}

/// What an export wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GgufExport {
    pub architecture: &'static str,
    pub tensors: usize,
    pub alpha: f64,
    pub bytes: u64,
}

/// llama.cpp's name for a projection of a decoder layer.
fn block_tensor(module: &str) -> Option<&'static str> {
    Some(match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    })
}

/// `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` → (3, q_proj's GGUF
/// name, `lora_a`).
fn gguf_name(key: &str) -> Option<(usize, &'static str, &'static str)> {
    let rest = key.strip_prefix("base_model.model.model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, part) = if let Some(module) = rest.strip_suffix(".lora_A.weight") {
        (module, "lora_a")
    } else {
        (rest.strip_suffix(".lora_B.weight")?, "lora_b")
    };
    Some((layer.parse().ok()?, block_tensor(module)?, part))
}

/// Rows of q or k regrouped as llama.cpp's rotary expects: per head, the two halves of
/// the head dimension interleaved.
fn permute_rows(tensor: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, columns) = tensor.dims2()?;
    Ok(tensor
        .reshape((heads, 2, rows / heads / 2, columns))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, columns))?)
}

/// Writes the adapter in `adapter_dir` (PEFT format) as a GGUF LoRA adapter for the base
/// model whose `config.json` is in `model_dir`.
pub fn export_lora(
    adapter_dir: &Path,
    model_dir: &Path,
    out: &Path,
    dtype: GgufDtype,
) -> Result<GgufExport> {
    let lora = crate::peft::read_adapter_config(adapter_dir)?;
    let config = ModelConfig::from_file(&model_dir.join("config.json"))?;
    let weights = adapter_dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&weights, &Device::Cpu)?;
    let invalid = |message: String| TrainerError::Config {
        path: weights.display().to_string(),
        message,
    };
    let (architecture, permuted) = match config.architecture {
        Architecture::Llama | Architecture::Mistral => ("llama", true),
        Architecture::Qwen2 => ("qwen2", false),
    };
    let mut named = BTreeMap::new();
    for (key, tensor) in &tensors {
        let (layer, module, part) = gguf_name(key).ok_or_else(|| {
            invalid(format!(
                "{key}: not a LoRA projection of a decoder layer; llama.cpp adapters hold only those"
            ))
        })?;
        let tensor = match (permuted, module, part) {
            (true, "attn_q", "lora_b") => permute_rows(tensor, config.num_attention_heads)?,
            (true, "attn_k", "lora_b") => permute_rows(tensor, config.num_key_value_heads)?,
            _ => tensor.clone(),
        };
        let order = [
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ]
        .iter()
        .position(|m| *m == module)
        .unwrap_or(usize::MAX);
        named.insert(
            (layer, order, part),
            (format!("blk.{layer}.{module}.weight.{part}"), tensor),
        );
    }
    if named.is_empty() {
        return Err(invalid("the adapter holds no tensors".into()));
    }
    let alpha = if lora.use_rslora {
        lora.alpha * (lora.rank as f64).sqrt()
    } else {
        lora.alpha
    };
    let name = adapter_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "adapter".into());
    let mut header = Vec::new();
    let metadata: [(&str, Value); 7] = [
        ("general.architecture", Value::String(architecture.into())),
        ("general.type", Value::String("adapter".into())),
        ("general.name", Value::String(name)),
        ("general.file_type", Value::U32(dtype.file_type())),
        ("general.quantization_version", Value::U32(2)),
        ("adapter.type", Value::String("lora".into())),
        ("adapter.lora.alpha", Value::F32(alpha as f32)),
    ];
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&(named.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in &metadata {
        write_string(&mut header, key);
        value.write(&mut header);
    }
    let mut data = Vec::new();
    for (name, tensor) in named.values() {
        write_string(&mut header, name);
        let dims = tensor.dims();
        header.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for dim in dims.iter().rev() {
            header.extend_from_slice(&(*dim as u64).to_le_bytes());
        }
        header.extend_from_slice(&dtype.ggml_type().to_le_bytes());
        header.extend_from_slice(&(data.len() as u64).to_le_bytes());
        data.extend(dtype.bytes(tensor)?);
        pad(&mut data);
    }
    pad(&mut header);
    let io = |source| TrainerError::Io {
        path: out.display().to_string(),
        source,
    };
    let temporary = out.with_extension("gguf.partial");
    let mut file = std::fs::File::create(&temporary).map_err(io)?;
    file.write_all(&header).map_err(io)?;
    file.write_all(&data).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&temporary, out).map_err(io)?;
    Ok(GgufExport {
        architecture,
        tensors: named.len(),
        alpha,
        bytes: (header.len() + data.len()) as u64,
    })
}

enum Value {
    U32(u32),
    F32(f32),
    String(String),
}

impl Value {
    fn write(&self, out: &mut Vec<u8>) {
        // GGUF value types: UINT32 = 4, FLOAT32 = 6, STRING = 8.
        match self {
            Value::U32(v) => {
                out.extend_from_slice(&4u32.to_le_bytes());
                out.extend_from_slice(&v.to_le_bytes());
            }
            Value::F32(v) => {
                out.extend_from_slice(&6u32.to_le_bytes());
                out.extend_from_slice(&v.to_le_bytes());
            }
            Value::String(v) => {
                out.extend_from_slice(&8u32.to_le_bytes());
                write_string(out, v);
            }
        }
    }
}

fn write_string(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// Zero bytes up to the next multiple of the alignment.
fn pad(bytes: &mut Vec<u8>) {
    let padded = (bytes.len() as u64).div_ceil(ALIGNMENT) * ALIGNMENT;
    bytes.resize(padded as usize, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_peft_names_to_llama_cpp_names() {
        assert_eq!(
            gguf_name("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"),
            Some((3, "attn_q", "lora_a"))
        );
        assert_eq!(
            gguf_name("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"),
            Some((0, "ffn_down", "lora_b"))
        );
        assert_eq!(gguf_name("base_model.model.lm_head.lora_A.weight"), None);
    }

    #[test]
    fn permutes_rows_as_llama_cpp_does() {
        // Two heads of dimension 4: rows [h0: 0 1 2 3, h1: 4 5 6 7] become, per head, the
        // halves interleaved: [0 2 1 3, 4 6 5 7].
        let rows = Tensor::arange(0f32, 8.0, &Device::Cpu)
            .and_then(|t| t.reshape((8, 1)))
            .expect("rows");
        let permuted = permute_rows(&rows, 2).expect("permuted");
        let values: Vec<f32> = permuted
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("values");
        assert_eq!(values, [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
    }
}
