//! The trainer's and the agent's global allocator, mimalloc, and how long it keeps memory
//! that was freed.
//!
//! Training allocates and frees the same activations every step. mimalloc hands freed
//! memory back to the OS after its `purge_delay` (1 s by default), and a CPU step that
//! takes longer than that page-faults every activation in again, each page zeroed by the
//! kernel (2 MiB at a time with transparent huge pages): 25,000–57,000 faults in six steps
//! of a 512-wide model, 650 when freed memory is kept 10 s. [`keep_freed_memory`] sets that
//! longer delay; memory a program stops using still goes back to the OS, only later.

pub use mimalloc::MiMalloc;

use libmimalloc_sys::{mi_option_set, mi_option_t};

/// `mi_option_purge_delay` in mimalloc.h (v3): milliseconds before freed memory is
/// returned to the OS. The Rust bindings leave it unnamed "for stability reasons"; the
/// test below reads mimalloc's documented default through it.
const PURGE_DELAY: mi_option_t = 15;

/// How long freed memory stays mapped for reuse while a program trains: longer than a
/// step takes on the CPU at the sizes a CPU trains.
const TRAINING_PURGE_DELAY_MS: i64 = 10_000;

/// The environment variable mimalloc reads the delay from; when an operator sets it, it wins.
const PURGE_DELAY_VARIABLE: &str = "MIMALLOC_PURGE_DELAY";

/// Keeps freed memory for [`TRAINING_PURGE_DELAY_MS`] before returning it to the OS,
/// unless [`PURGE_DELAY_VARIABLE`] sets the delay. Call it first thing in `main`, before
/// the program starts threads: mimalloc's option table is not synchronised.
#[allow(unsafe_code)]
pub fn keep_freed_memory() {
    if std::env::var_os(PURGE_DELAY_VARIABLE).is_some() {
        return;
    }
    // SAFETY: `PURGE_DELAY` is a valid option index (below `_mi_option_last`); the program
    // has no other thread yet that could read the option while it is written.
    unsafe { mi_option_set(PURGE_DELAY, TRAINING_PURGE_DELAY_MS as std::os::raw::c_long) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libmimalloc_sys::mi_option_get;

    /// mimalloc's current purge delay in milliseconds (negative: never).
    #[allow(unsafe_code)]
    #[allow(clippy::useless_conversion)] // `c_long` is 64 bits here, 32 on Windows.
    fn purge_delay_ms() -> i64 {
        // SAFETY: reads one entry of mimalloc's option table, a valid index.
        i64::from(unsafe { mi_option_get(PURGE_DELAY) })
    }

    /// One test, so no other test thread touches the option table while it is written.
    #[test]
    fn the_purge_delay_starts_at_mimallocs_default_and_training_lengthens_it() {
        if std::env::var_os(PURGE_DELAY_VARIABLE).is_some() {
            return;
        }
        assert_eq!(
            purge_delay_ms(),
            1_000,
            "mimalloc v3's documented purge_delay"
        );
        keep_freed_memory();
        assert_eq!(purge_delay_ms(), TRAINING_PURGE_DELAY_MS);
    }
}
