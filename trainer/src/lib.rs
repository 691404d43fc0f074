//! LoRA fine-tuning of Llama-family causal language models on candle.
//!
//! The model code is our own, built only from operations whose backward pass works
//! (design notes: several fused candle ops drop gradients), and the frozen base weights
//! enter the graph through [`frozen`] operations that give their input a gradient but
//! compute and keep none for the weight.

pub mod bench;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod evaluation;
pub mod frozen;
pub mod fused_lora;
pub mod gguf;
pub mod hub;
pub mod init;
pub mod kernel_check;
pub mod loader;
pub mod lora;
pub mod merge;
pub mod model;
pub mod optim;
pub mod peft;
pub mod quantized;
pub mod rng;
pub mod tensor_file;
pub mod train;
pub mod validation;

pub use config::{Architecture, ModelConfig};
pub use error::TrainerError;
pub use lora::LoraConfig;
pub use model::Model;
