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
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
}

macro_rules! real {
    ($t:ty) => {
        impl Real for $t {
            fn of(x: f64) -> $t {
                x as $t
            }
            fn exp(self) -> $t {
                <$t>::exp(self)
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

real!(f32);
real!(f64);

/// A tensor's entries as a vector of `T` (a copy; the backward passes read through it).
pub(crate) fn values<T: Real>(tensor: &candle_core::Tensor) -> candle_core::Result<Vec<T>> {
    tensor
        .contiguous()?
        .flatten_all()?
        .to_dtype(T::DTYPE)?
        .to_vec1::<T>()
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
