//! The trainer's fused ops, each one candle custom op with its own backward, kept apart
//! from the trainer so that code which is fast rather than obvious (and the CUDA kernels,
//! `unsafe` to launch) lives in one small place, compiled optimised even in debug builds.

pub mod adamw;
pub mod attention;
#[cfg(feature = "cuda")]
mod cuda;
pub mod dropout;
mod real;
pub mod rms_norm;
pub mod swiglu;

pub use adamw::{adamw_step, AdamWStep};
pub use attention::causal_attention;
pub use dropout::dropout;
pub use rms_norm::rms_norm;
pub use swiglu::swiglu;
