//! The CUDA kernels are CUDA C compiled with NVRTC at their first use (NVRTC ships with
//! every CUDA runtime, and with torch), so building needs no `nvcc` and the same binary
//! runs on any GPU the driver supports; candle then keeps the loaded module per device.

use candle_core::cuda_backend::cudarc::nvrtc;
use candle_core::Result;
use std::sync::OnceLock;

/// The PTX of `source`, compiled once per process; a failure is kept and reported again.
pub(crate) fn compiled(
    cache: &'static OnceLock<std::result::Result<String, String>>,
    source: &'static str,
) -> Result<String> {
    cache
        .get_or_init(|| {
            nvrtc::compile_ptx(source)
                .map(|ptx| ptx.to_src())
                .map_err(|error| format!("compiling a trainer kernel with NVRTC: {error}"))
        })
        .clone()
        .map_err(candle_core::Error::Msg)
}
