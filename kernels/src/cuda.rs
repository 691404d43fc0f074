//! The CUDA kernels are CUDA C compiled with NVRTC at their first use (NVRTC ships with
//! every CUDA runtime, and with torch), so building needs no `nvcc` and the same binary
//! runs on any GPU the driver supports; candle then keeps the loaded module per device.

use candle_core::cuda_backend::cudarc::nvrtc;

/// A kernel module's CUDA C after the definitions every module shares: `u64`, and `load`
/// and `store` of f32 and bf16 entries as f32.
macro_rules! cuda_source {
    ($source:literal) => {
        concat!(
            r#"typedef unsigned long long u64;

/* bf16 travels as its bits: widened to f32 exactly, and rounded back to nearest even (as
   the `half` crate does on the CPU), so no header is needed. */
__device__ __forceinline__ float load(const float *p, u64 i) { return p[i]; }
__device__ __forceinline__ float load(const unsigned short *p, u64 i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ void store(float *p, u64 i, float x) { p[i] = x; }
__device__ __forceinline__ void store(unsigned short *p, u64 i, float x) {
    const unsigned int bits = __float_as_uint(x);
    p[i] = x != x ? (unsigned short)((bits >> 16) | 0x40)
                  : (unsigned short)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}
"#,
            $source
        )
    };
}
use candle_core::Result;
pub(crate) use cuda_source;
use std::sync::OnceLock;

/// One module's CUDA C source and its PTX, compiled once per process; a failure is kept
/// and reported again.
pub(crate) struct Program {
    source: &'static str,
    ptx: OnceLock<std::result::Result<String, String>>,
}

impl Program {
    pub(crate) const fn new(source: &'static str) -> Program {
        Program {
            source,
            ptx: OnceLock::new(),
        }
    }

    pub(crate) fn ptx(&self) -> Result<String> {
        self.ptx
            .get_or_init(|| {
                nvrtc::compile_ptx(self.source)
                    .map(|ptx| ptx.to_src())
                    .map_err(|error| format!("compiling a trainer kernel with NVRTC: {error}"))
            })
            .clone()
            .map_err(candle_core::Error::Msg)
    }
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
