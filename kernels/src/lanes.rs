//! Reductions over a slice in eight independent partial results, one per SIMD lane: a
//! single running sum or maximum is a chain the compiler may not reorder, so it stays
//! scalar, while eight partials fill one register (f32 under AVX2, see `vectorized`).
//! The partials combine in a fixed order, so a result is the same on every run.

use crate::real::Real;

const LANES: usize = 8;

/// `Σ aᵢ`.
#[inline(always)]
pub(crate) fn sum<T: Real>(a: &[T]) -> T {
    let lanes = a.chunks_exact(LANES);
    let tail = lanes
        .remainder()
        .iter()
        .fold(T::default(), |sum, x| sum + *x);
    let mut partial = [T::default(); LANES];
    for x in lanes {
        for (p, x) in partial.iter_mut().zip(x) {
            *p += *x;
        }
    }
    partial.iter().fold(tail, |sum, p| sum + *p)
}

/// `Σ aᵢbᵢ`.
#[inline(always)]
pub(crate) fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let (a_lanes, b_lanes) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail = a_lanes
        .remainder()
        .iter()
        .zip(b_lanes.remainder())
        .fold(T::default(), |sum, (x, y)| sum + *x * *y);
    let mut partial = [T::default(); LANES];
    for (x, y) in a_lanes.zip(b_lanes) {
        for ((p, x), y) in partial.iter_mut().zip(x).zip(y) {
            *p += *x * *y;
        }
    }
    partial.iter().fold(tail, |sum, p| sum + *p)
}

/// `Σ aᵢbᵢcᵢ`, the products taken left to right.
#[inline(always)]
pub(crate) fn dot3<T: Real>(a: &[T], b: &[T], c: &[T]) -> T {
    let (a_lanes, b_lanes, c_lanes) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    let tail = a_lanes
        .remainder()
        .iter()
        .zip(b_lanes.remainder())
        .zip(c_lanes.remainder())
        .fold(T::default(), |sum, ((x, y), z)| sum + *x * *y * *z);
    let mut partial = [T::default(); LANES];
    for ((x, y), z) in a_lanes.zip(b_lanes).zip(c_lanes) {
        for (((p, x), y), z) in partial.iter_mut().zip(x).zip(y).zip(z) {
            *p += *x * *y * *z;
        }
    }
    partial.iter().fold(tail, |sum, p| sum + *p)
}

/// The largest of `a` and `floor` (NaNs are passed over).
#[inline(always)]
pub(crate) fn max<T: Real>(a: &[T], floor: T) -> T {
    let larger = |m: T, x: T| if x > m { x } else { m };
    let lanes = a.chunks_exact(LANES);
    let tail = lanes.remainder().iter().fold(floor, |m, x| larger(m, *x));
    let mut partial = [floor; LANES];
    for x in lanes {
        for (p, x) in partial.iter_mut().zip(x) {
            *p = larger(*p, *x);
        }
    }
    partial.iter().fold(tail, |m, p| larger(m, *p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_reduction_equals_the_plain_loop_over_every_tail_length() {
        for len in 0..=3 * LANES + 5 {
            let a: Vec<f64> = (0..len).map(|i| (i as f64 * 0.37).sin()).collect();
            let b: Vec<f64> = (0..len).map(|i| (i as f64 * 0.91).cos()).collect();
            let c: Vec<f64> = (0..len).map(|i| 1.0 + i as f64 / 7.0).collect();
            let close = |x: f64, y: f64| (x - y).abs() <= 1e-12 * (1.0 + y.abs());
            assert!(close(sum(&a), a.iter().sum()));
            let plain_dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!(close(dot(&a, &b), plain_dot));
            let plain_dot3: f64 = a.iter().zip(&b).zip(&c).map(|((x, y), z)| x * y * z).sum();
            assert!(close(dot3(&a, &b, &c), plain_dot3));
            let plain_max = a.iter().fold(f64::NEG_INFINITY, |m, x| m.max(*x));
            assert_eq!(max(&a, f64::NEG_INFINITY), plain_max);
        }
    }
}
