//! The CUDA kernels are CUDA C compiled with NVRTC at their first use (NVRTC ships with
//! every CUDA runtime, and with torch), so building needs no `nvcc` and the same binary
//! runs on any GPU the driver supports; candle then keeps the loaded module per device.

use candle_core::cuda_backend::cudarc::nvrtc;

/// A kernel module's CUDA C: the definitions every module shares (`prelude.cuh`: `u64`,
/// `to_bf16`, and `load` and `store` of f32 and bf16 entries as f32), then the module's file
/// under `kernels/cuda/` (where the emulated-kernel tests also compile them for the CPU).
macro_rules! cuda_source {
    ($path:literal) => {
        concat!(include_str!("../cuda/prelude.cuh"), include_str!($path))
    };
}
use candle_core::Result;
pub(crate) use cuda_source;
use std::sync::OnceLock;

/// One module's CUDA C source and its PTX, compiled once per process; a failure is kept
/// and reported again.
pub(crate) struct Program {
    source: &'static str,
    /// The virtual architecture it needs (`compute_80` for tensor-core instructions);
    /// NVRTC's default otherwise.
    arch: Option<&'static str>,
    ptx: OnceLock<std::result::Result<String, String>>,
}

impl Program {
    pub(crate) const fn new(source: &'static str) -> Program {
        Program {
            source,
            arch: None,
            ptx: OnceLock::new(),
        }
    }

    /// A program for GPUs of `arch` and newer only: the caller checks the device first.
    pub(crate) const fn for_arch(source: &'static str, arch: &'static str) -> Program {
        Program {
            source,
            arch: Some(arch),
            ptx: OnceLock::new(),
        }
    }

    pub(crate) fn ptx(&self) -> Result<String> {
        self.ptx
            .get_or_init(|| {
                let options = nvrtc::CompileOptions {
                    arch: self.arch,
                    ..Default::default()
                };
                nvrtc::compile_ptx_with_opts(self.source, options)
                    .map(|ptx| ptx.to_src())
                    .map_err(|error| format!("compiling a trainer kernel with NVRTC: {error}"))
            })
            .clone()
            .map_err(candle_core::Error::Msg)
    }
}

/// Whether bf16 kernels use tensor cores (`mma.sync`) on `device`: it has them (compute
/// capability 8.0 and up) and they are allowed ([`crate::allow_tensor_cores`]).
pub(crate) fn bf16_tensor_cores(device: &candle_core::CudaDevice) -> Result<bool> {
    use candle_core::cuda_backend::WrapErr;
    if !crate::tensor_cores_allowed() {
        return Ok(false);
    }
    let (major, _) = device.cuda_stream().context().compute_capability().w()?;
    Ok(major >= 8)
}

/// An op over three tensors that only CUDA tensors reach (a backward, a loss step): it
/// names itself and says what it does on the GPU; [`OnCuda`] makes it a candle op.
pub(crate) trait CudaOp3 {
    fn name(&self) -> &'static str;

    fn cuda_fwd(
        &self,
        a: (&candle_core::CudaStorage, &candle_core::Layout),
        b: (&candle_core::CudaStorage, &candle_core::Layout),
        c: (&candle_core::CudaStorage, &candle_core::Layout),
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)>;
}

/// A [`CudaOp3`] as a candle op, refusing CPU tensors.
pub(crate) struct OnCuda<T>(pub T);

impl<T: CudaOp3 + Send + Sync> candle_core::CustomOp3 for OnCuda<T> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("{}: a CUDA op was given CPU tensors", self.0.name())
    }

    fn cuda_fwd(
        &self,
        a: &candle_core::CudaStorage,
        a_layout: &candle_core::Layout,
        b: &candle_core::CudaStorage,
        b_layout: &candle_core::Layout,
        c: &candle_core::CudaStorage,
        c_layout: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        self.0.cuda_fwd((a, a_layout), (b, b_layout), (c, c_layout))
    }
}
