//! A matrix inside a slice, and gemm's product of such matrices behind safe calls that
//! check every element they touch lies inside its slice.

use crate::real::Real;

/// A matrix inside a slice: `rows × cols`, element (r, c) at `r·row_stride + c·col_stride`.
pub(crate) struct Matrix<S> {
    pub(crate) data: S,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) row_stride: usize,
    pub(crate) col_stride: usize,
}

impl<S> Matrix<S> {
    /// Row-major: rows one after another, `cols` apart.
    pub(crate) fn rows(data: S, rows: usize, cols: usize) -> Self {
        Matrix {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The same elements read as the transpose.
    pub(crate) fn t(self) -> Self {
        Matrix {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            data: self.data,
        }
    }

    /// Whether every element lies inside a slice of `len` elements.
    fn fits(&self, len: usize) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride < len
    }
}

/// Which threads one product runs on.
#[derive(Clone, Copy)]
pub(crate) enum Threads {
    /// The calling thread: for products inside tasks that already fill the cores.
    One,
    /// The current rayon pool.
    Pool,
}

impl Threads {
    fn parallelism(self) -> gemm::Parallelism {
        match self {
            Threads::One => gemm::Parallelism::None,
            // 0: as many threads as the current pool has.
            Threads::Pool => gemm::Parallelism::Rayon(0),
        }
    }
}

/// `dst = dst·keep + scale·lhs·rhs` (`keep` 0 or 1).
#[allow(unsafe_code)]
pub(crate) fn matmul<T: Real>(
    dst: Matrix<&mut [T]>,
    lhs: Matrix<&[T]>,
    rhs: Matrix<&[T]>,
    keep: bool,
    scale: T,
    threads: Threads,
) {
    assert!(
        lhs.rows == dst.rows
            && rhs.rows == lhs.cols
            && rhs.cols == dst.cols
            && dst.fits(dst.data.len())
            && lhs.fits(lhs.data.len())
            && rhs.fits(rhs.data.len()),
        "matrix product out of shape"
    );
    let strides = (dst.row_stride, dst.col_stride);
    // SAFETY: the assertion above puts every element gemm reads or writes inside the three
    // slices, and `dst` is borrowed mutably, so it overlaps neither input.
    unsafe {
        gemm_at(
            dst.data.as_mut_ptr(),
            strides,
            keep,
            &lhs,
            &rhs,
            scale,
            threads,
        )
    }
}

/// `lhs·rhs` as a new row-major matrix. gemm writes every entry without reading any, so
/// the buffer is not zero-filled first (a pass over the output that candle's matmul makes).
#[allow(unsafe_code)]
pub(crate) fn product<T: Real>(lhs: Matrix<&[T]>, rhs: Matrix<&[T]>, threads: Threads) -> Vec<T> {
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
    if k == 0 {
        return vec![T::default(); m * n];
    }
    assert!(
        rhs.rows == k && lhs.fits(lhs.data.len()) && rhs.fits(rhs.data.len()),
        "matrix product out of shape"
    );
    let mut out: Vec<T> = Vec::with_capacity(m * n);
    // SAFETY: the destination is the vector's m·n reserved entries, row-major; with `keep`
    // false and k ≥ 1 gemm writes each of them once and reads none, so all m·n are
    // initialised when `set_len` runs. The inputs lie inside their slices (asserted).
    unsafe {
        gemm_at(
            out.as_mut_ptr(),
            (n, 1),
            false,
            &lhs,
            &rhs,
            T::of(1.0),
            threads,
        );
        out.set_len(m * n);
    }
    out
}

/// gemm's `dst = dst·keep + scale·lhs·rhs` for a destination given by its first element
/// and (row, column) strides; its size is lhs's rows by rhs's columns.
///
/// # Safety
/// Every destination element must be valid for writes (and, with `keep`, initialised and
/// valid for reads), overlap neither input, and every input element lie inside its slice.
#[allow(unsafe_code)]
unsafe fn gemm_at<T: Real>(
    dst: *mut T,
    (row_stride, col_stride): (usize, usize),
    keep: bool,
    lhs: &Matrix<&[T]>,
    rhs: &Matrix<&[T]>,
    scale: T,
    threads: Threads,
) {
    // SAFETY: the caller's contract is gemm's.
    unsafe {
        gemm::gemm(
            lhs.rows,
            rhs.cols,
            lhs.cols,
            dst,
            col_stride as isize,
            row_stride as isize,
            keep,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            if keep { T::of(1.0) } else { T::of(0.0) },
            scale,
            false,
            false,
            false,
            threads.parallelism(),
        );
    }
}
