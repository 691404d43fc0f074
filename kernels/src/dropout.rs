//! Dropout with counter-based masks: entry `i` of a stream is kept when a SplitMix64 hash
//! of `stream + i·φ` falls below `keep`, a pure function of (stream, index). The mask is
//! drawn where the tensor lives (the same bits on the CPU and in the CUDA kernel). On a
//! GPU it is never stored and the backward pass draws it again; on the CPU, where the hash
//! costs more than reading a bit, an op may keep it as one bit per entry ([`KeptMask`]).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The 64-bit golden ratio, SplitMix64's increment.
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function (Steele, Lea, Flood 2014): a bijective mix of 64 bits.
pub fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `x ⊙ mask` with the mask of `stream` (see [`mask`]): each entry is kept, scaled by
/// `1 / keep`, with probability `keep`, else zeroed. f32, f64 and bf16 (computed in
/// f32 and rounded to nearest even, on either device).
pub fn dropout(x: &Tensor, stream: u64, keep: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Dropout::new(stream, keep)?)
}

/// The first `count` multipliers of `stream`: `1 / keep` or 0. What [`dropout`] applies.
pub fn mask(stream: u64, count: usize, keep: f64) -> Vec<f32> {
    let rule = Rule::new(stream, keep);
    (0..count as u64)
        .map(|index| {
            if rule.keeps(index) {
                rule.scale as f32
            } else {
                0.0
            }
        })
        .collect()
}

/// The op [`dropout`] applies, for ops that drop out part of their input inside their
/// own forward (its `cpu_fwd` and `cuda_fwd` work on storages).
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    stream: u64,
    keep: f64,
}

impl Dropout {
    /// The mask of `stream` keeping each entry with probability `keep`, in (0, 1].
    pub fn new(stream: u64, keep: f64) -> Result<Dropout> {
        if !(keep > 0.0 && keep <= 1.0) {
            candle_core::bail!("dropout: keep probability {keep} is not in (0, 1]");
        }
        Ok(Dropout { stream, keep })
    }

    /// What the CUDA kernel is given besides its tensors: the stream, the integer
    /// threshold a draw's top 53 bits must fall below, and the scale of kept entries.
    pub fn kernel_arguments(&self) -> (u64, u64, f32) {
        let rule = Rule::new(self.stream, self.keep);
        (rule.stream, rule.threshold, rule.scale as f32)
    }

    /// The mask's first `count` entries as bits, drawn on the CPU.
    pub fn draw(&self, count: usize) -> KeptMask {
        let rule = Rule::new(self.stream, self.keep);
        let words = (0..count.div_ceil(64))
            .into_par_iter()
            .with_min_len(1 << 8)
            .map(|word| {
                let first = word * 64;
                (0..64.min(count - first)).fold(0u64, |bits, bit| {
                    bits | u64::from(rule.keeps((first + bit) as u64)) << bit
                })
            })
            .collect();
        KeptMask {
            words,
            count,
            scale: rule.scale,
        }
    }
}

/// Which entries survive, in integers: a draw's top 53 bits `u` give the uniform
/// `u / 2⁵³`, which is below `keep` exactly when `u < ⌈keep · 2⁵³⌉`.
#[derive(Debug, Clone, Copy)]
struct Rule {
    stream: u64,
    threshold: u64,
    scale: f64,
}

impl Rule {
    fn new(stream: u64, keep: f64) -> Rule {
        Rule {
            stream,
            threshold: (keep * (1u64 << 53) as f64).ceil() as u64,
            scale: 1.0 / keep,
        }
    }

    fn keeps(&self, index: u64) -> bool {
        splitmix64(self.stream.wrapping_add(index.wrapping_mul(GOLDEN))) >> 11 < self.threshold
    }
}

/// A mask drawn once on the CPU and kept as one bit per entry (1/32 of an f32 tensor), for
/// an op that applies it again in its backward pass rather than hashing every entry again.
#[derive(Debug, Clone)]
pub struct KeptMask {
    words: Vec<u64>,
    count: usize,
    scale: f64,
}

impl KeptMask {
    /// Entry `i` of `input` times the mask's multiplier `i`: `1 / keep` or 0. f32, f64 and
    /// bf16 (computed in f32 and rounded to nearest even, as [`dropout`] does).
    pub fn apply(&self, storage: &CpuStorage, layout: &Layout) -> Result<CpuStorage> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("dropout: input is not contiguous".into()))?;
        if end - start != self.count {
            candle_core::bail!(
                "dropout: a mask of {} entries applied to {}",
                self.count,
                end - start
            );
        }
        let (scale, wide) = (self.scale as f32, self.scale);
        Ok(match storage {
            CpuStorage::F32(data) => {
                CpuStorage::F32(self.multiply(&data[start..end], (scale, 0.0), |x, m| x * m))
            }
            CpuStorage::F64(data) => {
                CpuStorage::F64(self.multiply(&data[start..end], (wide, 0.0), |x, m| x * m))
            }
            CpuStorage::BF16(data) => {
                CpuStorage::BF16(self.multiply(&data[start..end], (scale, 0.0), |x, m| {
                    half::bf16::from_f32(x.to_f32() * m)
                }))
            }
            other => candle_core::bail!("dropout: {:?} is not supported", other.dtype()),
        })
    }

    /// `multiply(x, m)` for each entry and its multiplier `m`, `kept` or `dropped`. Eight
    /// entries at a time take their eight multipliers from a table indexed by the mask's
    /// byte, so the loop runs as wide vector products rather than a bit test per entry.
    fn multiply<T, M, U>(&self, input: &[T], (kept, dropped): (M, M), multiply: U) -> Vec<T>
    where
        T: Copy + Send + Sync,
        M: Copy + Send + Sync,
        U: Fn(T, M) -> T + Send + Sync,
    {
        const WORDS_PER_TASK: usize = 256;
        let table: Vec<[M; 8]> = (0..256usize)
            .map(|byte| {
                std::array::from_fn(|bit| if byte >> bit & 1 != 0 { kept } else { dropped })
            })
            .collect();
        let mut output = input.to_vec();
        output
            .par_chunks_mut(64 * WORDS_PER_TASK)
            .zip(self.words.par_chunks(WORDS_PER_TASK))
            .for_each(|(entries, words)| {
                crate::vectorized::vectorized(
                    #[inline(always)]
                    || {
                        let bytes = words.iter().flat_map(|word| word.to_le_bytes());
                        for (eight, byte) in entries.chunks_mut(8).zip(bytes) {
                            for (x, m) in eight.iter_mut().zip(&table[usize::from(byte)]) {
                                *x = multiply(*x, *m);
                            }
                        }
                    },
                )
            });
        output
    }
}

/// [`KeptMask::apply`] as an op on a contiguous CPU tensor, without a backward.
impl CustomOp1 for KeptMask {
    fn name(&self) -> &'static str {
        "kept-dropout-mask"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((self.apply(storage, layout)?, layout.shape().clone()))
    }
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "counter-dropout"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let mask = self.draw(layout.shape().elem_count());
        Ok((mask.apply(storage, layout)?, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    #[allow(unsafe_code)]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;

        use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
        use candle_core::cuda_backend::CudaDType;
        use candle_core::DType;

        /// Launches `name` over the `T` entries `start..end` of `storage`.
        fn launch<T: CudaDType + DeviceRepr>(
            name: &str,
            storage: &candle_core::CudaStorage,
            (start, end): (usize, usize),
            (stream, threshold, scale): (u64, u64, f32),
        ) -> Result<candle_core::CudaStorage> {
            let device = storage.device.clone();
            let function =
                device.get_or_load_custom_func(name, "trainer_kernels_dropout", &PROGRAM.ptx()?)?;
            let input = storage.as_cuda_slice::<T>()?.slice(start..end);
            let count = (end - start) as u64;
            // SAFETY: every entry is written by the kernel before it is read.
            let output = unsafe { device.alloc::<T>(end - start)? };
            let mut builder = function.builder();
            builder.arg(&count);
            builder.arg(&stream);
            builder.arg(&threshold);
            builder.arg(&scale);
            builder.arg(&input);
            builder.arg(&output);
            // SAFETY: the kernel reads and writes `count` entries of `T`'s size.
            unsafe { builder.launch(LaunchConfig::for_num_elems(count as u32)) }.w()?;
            Ok(candle_core::CudaStorage::wrap_cuda_slice(output, device))
        }

        let range = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("dropout: input is not contiguous".into()))?;
        let arguments = self.kernel_arguments();
        let output = match storage.dtype() {
            DType::F32 => launch::<f32>("dropout_f32", storage, range, arguments)?,
            DType::BF16 => launch::<half::bf16>("dropout_bf16", storage, range, arguments)?,
            other => candle_core::bail!("dropout: {other:?} is not supported on CUDA"),
        };
        Ok((output, layout.shape().clone()))
    }

    /// The mask is its own derivative: the gradient is dropped out by the same stream.
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1(*self)?))
    }
}

/// The CUDA kernel: the same hash and threshold as [`Rule::keeps`].
#[cfg(feature = "cuda")]
const SOURCE: &str = crate::cuda::cuda_source!("../cuda/dropout.cu");

#[cfg(feature = "cuda")]
static PROGRAM: crate::cuda::Program = crate::cuda::Program::new(SOURCE);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The integer threshold keeps exactly the entries whose uniform `u / 2⁵³` is below
    /// `keep`, the floating-point rule it replaces.
    #[test]
    fn the_integer_rule_is_the_uniform_rule() {
        for keep in [0.9, 0.5, 0.1, 1.0 / 3.0] {
            let rule = Rule::new(77, keep);
            for index in 0..20_000u64 {
                let draw = splitmix64(77u64.wrapping_add(index.wrapping_mul(GOLDEN)));
                let uniform = (draw >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
                assert_eq!(
                    rule.keeps(index),
                    uniform < keep,
                    "keep {keep}, index {index}"
                );
            }
        }
    }

    #[test]
    fn the_op_applies_the_mask_and_its_gradient_is_the_same_mask() -> Result<()> {
        let device = Device::Cpu;
        let values: Vec<f64> = (0..5_000).map(|i| 1.0 + i as f64).collect();
        let x = candle_core::Var::from_vec(values.clone(), (50, 100), &device)?;
        let y = dropout(x.as_tensor(), 1234, 0.8)?;
        let expected = mask(1234, 5_000, 0.8);
        let dropped: Vec<f64> = y.flatten_all()?.to_vec1()?;
        for ((y, x), m) in dropped.iter().zip(&values).zip(&expected) {
            assert!((y - x * f64::from(*m)).abs() <= 1e-9 * x, "{y} vs {x}·{m}");
        }
        let kept = expected.iter().filter(|m| **m > 0.0).count() as f64 / 5_000.0;
        assert!((kept - 0.8).abs() < 0.03, "kept {kept}");
        let gradient: Vec<f64> = y
            .sum_all()?
            .backward()?
            .get(&x)
            .expect("grad")
            .flatten_all()?
            .to_vec1()?;
        for (g, m) in gradient.iter().zip(&expected) {
            assert!((g - f64::from(*m)).abs() < 1e-6, "{g} vs {m}");
        }
        assert_eq!(y.dtype(), candle_core::DType::F64);
        Ok(())
    }

    /// A mask kept as bits gives the multipliers [`mask`] draws, at lengths that end
    /// inside a byte, a word and a parallel task, and refuses a tensor of another length.
    #[test]
    fn a_kept_mask_gives_the_drawn_multipliers() -> Result<()> {
        let op = Dropout::new(4321, 0.9)?;
        for count in [1, 7, 63, 64, 65, 64 * 256 + 77] {
            let values: Vec<f32> = (0..count).map(|i| 1.0 + i as f32).collect();
            let x = Tensor::from_vec(values.clone(), count, &Device::Cpu)?;
            let dropped: Vec<f32> = x.apply_op1_no_bwd(&op.draw(count))?.to_vec1()?;
            for ((y, x), m) in dropped.iter().zip(&values).zip(mask(4321, count, 0.9)) {
                assert_eq!(*y, x * m, "{count} entries");
            }
        }
        let error = Tensor::zeros(10, candle_core::DType::F32, &Device::Cpu)?
            .apply_op1_no_bwd(&op.draw(9))
            .expect_err("a mask of 9 entries on 10");
        assert!(
            error
                .to_string()
                .contains("a mask of 9 entries applied to 10"),
            "{error}"
        );
        Ok(())
    }

    /// bf16 takes the same mask, the product rounded once.
    #[test]
    fn bf16_takes_the_same_mask() -> Result<()> {
        let device = Device::Cpu;
        let values: Vec<f32> = (0..4_096).map(|i| 0.5 + i as f32 / 7.0).collect();
        let x = Tensor::from_vec(values.clone(), 4_096, &device)?;
        let wide: Vec<f32> = dropout(&x, 99, 0.7)?.to_vec1()?;
        let narrow: Vec<f32> = dropout(&x.to_dtype(candle_core::DType::BF16)?, 99, 0.7)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()?;
        for ((w, n), x) in wide.iter().zip(&narrow).zip(&values) {
            assert_eq!(*w == 0.0, *n == 0.0, "{x}: the same entries are dropped");
            assert!((w - n).abs() <= w.abs() / 64.0, "{w} vs {n}");
        }
        Ok(())
    }
}
