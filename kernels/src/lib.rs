//! The trainer's fused ops, each one candle custom op with its own backward, kept apart
//! from the trainer so that code which is fast rather than obvious (and, with CUDA
//! kernels, `unsafe`) lives in one small place, compiled optimised even in debug builds.

pub mod attention;

pub use attention::causal_attention;
