//! The fused ops' CPU loops compiled again for wider vector units, chosen at run time.
//!
//! The crate is built for baseline x86-64, where loops vectorise 4 floats wide (SSE2), and
//! the release binaries must run on any x86-64 host. gemm picks its kernels at run time
//! the same way; without this the ops' own loops (softmax numerators, SwiGLU, RMSNorm,
//! rotary, AdamW) ran at a half or a quarter of the width the CPU has.

/// About how many entries one parallel task of an elementwise op takes: enough that the
/// task and the width dispatch below cost little beside its loop (a rotary task per
/// 64-entry row had cost more than the row), few enough that both cores share the work.
pub(crate) const TASK_ENTRIES: usize = 1 << 12;

/// Runs `work`, inlined into a copy compiled with AVX-512 (16 floats wide) or with AVX2
/// and FMA (8 wide), the widest the CPU has, else as it is. Only what inlines into `work`
/// gains the wider registers: mark the closure and the helpers its loops call
/// `#[inline(always)]`. The results do not change: Rust never fuses a product and a sum
/// into an FMA, nor reorders a floating-point sum, unless the code asks for it.
#[inline(always)]
#[allow(unsafe_code)]
pub(crate) fn vectorized<R>(work: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512() {
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
            fn widest<R>(work: impl FnOnce() -> R) -> R {
                work()
            }
            // SAFETY: the CPU has the features `widest` is compiled for (checked just above).
            return unsafe { widest(work) };
        }
        if avx2_and_fma() {
            #[target_feature(enable = "avx2,fma")]
            fn wide<R>(work: impl FnOnce() -> R) -> R {
                work()
            }
            // SAFETY: the CPU has the features `wide` is compiled for (checked just above).
            return unsafe { wide(work) };
        }
    }
    work()
}

/// Whether the CPU has the AVX-512 subsets the widest copy uses, and AVX2 and FMA (std
/// caches the answers after the first call).
#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512dq")
        && std::is_x86_feature_detected!("avx512vl")
        && avx2_and_fma()
}

/// Whether the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
fn avx2_and_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wide_copy_computes_what_the_plain_one_does() {
        let values: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) / 7.0).collect();
        let run = || -> Vec<f32> {
            values
                .iter()
                .map(|x| crate::real::exp_f32(*x) * x + 1.0)
                .collect()
        };
        assert_eq!(vectorized(run), run());
    }
}
