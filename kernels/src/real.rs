//! What the CPU implementations share: float arithmetic for f32 and f64, and reading
//! their inputs.

pub(crate) trait Real:
    Copy
    + Send
    + Sync
    + Default
    + PartialOrd
    + candle_core::WithDType
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + std::ops::MulAssign
    + std::ops::DivAssign
{
    fn of(x: f64) -> Self;
    fn exp(self) -> Self;
    /// `e^x` where the last few ulp do not matter (softmax numerators, sigmoids): for f32
    /// straight-line arithmetic the compiler vectorises ([`exp_f32`]), for f64 libm's.
    fn exp_fast(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
}

macro_rules! real {
    ($t:ty, $exp_fast:path) => {
        impl Real for $t {
            fn of(x: f64) -> $t {
                x as $t
            }
            fn exp(self) -> $t {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn exp_fast(self) -> $t {
                $exp_fast(self)
            }
            fn ln(self) -> $t {
                <$t>::ln(self)
            }
            fn sqrt(self) -> $t {
                <$t>::sqrt(self)
            }
        }
    };
}

real!(f32, exp_f32);
real!(f64, f64::exp);

/// `e^x` in f32 without a call or a branch, so that loops over slices vectorise: Cephes'
/// `expf` (x = n·ln 2 + r with |r| ≤ ln 2 / 2, `e^r` as 1 + r + r²·p(r) with p of degree
/// 5, `2^n` put into the exponent bits). Within 2 ulp of libm (tested on [−87, 88]); below
/// −87.3 about 1e−38 instead of 0 (a softmax numerator that small changes nothing); above
/// 88.3, 2e38.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    // 1.5·2²³: adding it rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.336_55, 88.3);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    // ln 2 in two parts, so that n·ln 2 is subtracted without rounding away r.
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let r2 = r * r;
    let poly = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e_r = poly * r2 + r + 1.0;
    // n's integer is the low bits of `shifted`'s pattern; (n + 127) << 23 is 2ⁿ's.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    e_r * f32::from_bits(n_bits.wrapping_add(127).wrapping_shl(23))
}

/// A tensor's entries as a vector of `T` (a copy; the backward passes read through it).
pub(crate) fn values<T: Real>(tensor: &candle_core::Tensor) -> candle_core::Result<Vec<T>> {
    tensor
        .contiguous()?
        .flatten_all()?
        .to_dtype(T::DTYPE)?
        .to_vec1::<T>()
}

/// Runs `f` on the tensors' entries, flat: borrowed from their storage where a tensor is
/// contiguous on the CPU in `T` (the backward passes' usual case), copied otherwise.
pub(crate) fn with_values<T: Real, R, const N: usize>(
    tensors: [&candle_core::Tensor; N],
    f: impl FnOnce([&[T]; N]) -> R,
) -> candle_core::Result<R> {
    use std::borrow::Cow;
    let guards = tensors.map(|tensor| tensor.storage_and_layout());
    let mut entries: Vec<Cow<[T]>> = Vec::with_capacity(N);
    for (tensor, (storage, layout)) in tensors.iter().zip(&guards) {
        let borrowed = match (&**storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(cpu), Some((start, end))) if tensor.dtype() == T::DTYPE => {
                cpu.as_slice::<T>()?.get(start..end)
            }
            _ => None,
        };
        entries.push(match borrowed {
            Some(slice) => Cow::Borrowed(slice),
            None => Cow::Owned(values(tensor)?),
        });
    }
    Ok(f(std::array::from_fn(|i| &*entries[i])))
}

/// The entries of a contiguous input, or an error naming `op`.
pub(crate) fn contiguous<'a, T>(
    data: &'a [T],
    layout: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op} needs contiguous inputs"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within 2 ulp of libm's `expf` on a fine grid over the range softmax and sigmoid use.
    #[test]
    fn exp_f32_is_within_two_ulp_of_libm() {
        let mut worst = 0.0f32;
        for i in 0..=1_750_000 {
            let x = -87.0 + i as f32 * 1e-4;
            let (ours, libm) = (exp_f32(x), x.exp());
            let ulp = f32::from_bits(libm.to_bits() + 1) - libm;
            worst = worst.max((ours - libm).abs() / ulp);
        }
        assert!(worst <= 2.0, "{worst} ulp");
        assert!(exp_f32(-1000.0) < 1e-37 && exp_f32(f32::NEG_INFINITY) < 1e-37);
        assert!(exp_f32(0.0) == 1.0);
    }
}
