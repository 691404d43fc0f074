//! The trainer's fused ops, each one candle custom op with its own backward, kept apart
//! from the trainer so that code which is fast rather than obvious (and the CUDA kernels,
//! `unsafe` to launch) lives in one small place, compiled optimised even in debug builds.

pub mod adamw;
pub mod attention;
#[cfg(feature = "cuda")]
mod attention_cuda;
#[cfg(feature = "cuda")]
pub mod cross_entropy_cuda;
#[cfg(feature = "cuda")]
mod cuda;
pub mod dropout;
mod lanes;
mod matrix;
#[cfg(feature = "cuda")]
mod norm_gate_cuda;
pub mod product;
mod real;
pub mod rms_norm;
pub mod rope;
pub mod segments;
pub mod swiglu;
mod vectorized;

pub use adamw::{adamw_step, AdamWStep};
pub use attention::causal_attention;
pub use dropout::{dropout, Dropout, KeptMask};
pub use rms_norm::rms_norm;
pub use rope::rope_heads_major;
pub use segments::Segments;
pub use swiglu::swiglu;

/// Whether the fused RMSNorm, SwiGLU and rotary ops run for tensors of `dtype` on
/// `device`: on the CPU in f32 or f64, on CUDA in f32 or bf16.
pub fn fused_ops_run(device: &candle_core::Device, dtype: candle_core::DType) -> bool {
    use candle_core::DType;
    match device {
        candle_core::Device::Cpu => matches!(dtype, DType::F32 | DType::F64),
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) => matches!(dtype, DType::F32 | DType::BF16),
        _ => false,
    }
}
