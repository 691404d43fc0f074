//! The CUDA kernels are CUDA C compiled with NVRTC at their first use (NVRTC ships with
//! every CUDA runtime, and with torch), so building needs no `nvcc` and the same binary
//! runs on any GPU the driver supports; candle then keeps the loaded module per device.

use candle_core::cuda_backend::cudarc::nvrtc;
use candle_core::Result;
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
