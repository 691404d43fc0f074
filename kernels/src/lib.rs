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

/// Whether CUDA kernels with a tensor-core version (the bf16 attention) may use it on GPUs
/// that have tensor cores: unless told here, yes unless `TRAINER_TENSOR_CORES=0` is in the
/// environment (read once). Saying no takes the per-thread kernels every GPU runs: the way
/// back should a tensor-core kernel misbehave on some GPU, and how `trainer kernel-check`
/// checks both. Returns whether they were allowed before.
pub fn allow_tensor_cores(allowed: bool) -> bool {
    let before = tensor_cores_allowed();
    TENSOR_CORES.store(
        if allowed { ALLOWED } else { REFUSED },
        std::sync::atomic::Ordering::Relaxed,
    );
    before
}

/// [`TENSOR_CORES`]: not yet decided (the environment decides at first use), allowed, or
/// refused.
const UNDECIDED: u8 = 0;
const ALLOWED: u8 = 1;
const REFUSED: u8 = 2;
static TENSOR_CORES: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(UNDECIDED);

fn tensor_cores_allowed() -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    match TENSOR_CORES.load(Relaxed) {
        ALLOWED => true,
        REFUSED => false,
        _ => {
            let allowed =
                std::env::var("TRAINER_TENSOR_CORES").map_or(true, |value| value.trim() != "0");
            // A racing `allow_tensor_cores` wins: it only replaces an undecided state.
            let decided = if allowed { ALLOWED } else { REFUSED };
            let _ = TENSOR_CORES.compare_exchange(UNDECIDED, decided, Relaxed, Relaxed);
            TENSOR_CORES.load(Relaxed) == ALLOWED
        }
    }
}

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
