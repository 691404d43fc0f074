//! The CUDA C kernels under `kernels/cuda/`, compiled for the CPU with a C++ compiler and
//! run by the emulator in `tests/emulated/` (blocks one at a time, threads as fibers that
//! meet at barriers, warp shuffles and tensor-core products from the PTX fragment
//! layouts), each against a reference in f64. This is how kernels are tested where no GPU
//! is: the CUDA build compiles them, `trainer kernel-check` runs them on a GPU host.

use std::path::Path;
use std::process::Command;

/// Compiles `tests/emulated/<harness>.cpp` and runs it; its output is printed, and a
/// failed compile or a harness that reports a mismatch fails the test.
fn run_harness(harness: &str) {
    let directory = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emulated");
    let binary = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("emulated-{harness}"));
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let compiled = Command::new(&compiler)
        .args(["-std=c++20", "-O2", "-Wall", "-Wno-unknown-pragmas", "-o"])
        .arg(&binary)
        .arg(directory.join(format!("{harness}.cpp")))
        .output()
        .unwrap_or_else(|error| panic!("running the C++ compiler `{compiler}`: {error}"));
    assert!(
        compiled.status.success(),
        "compiling tests/emulated/{harness}.cpp:\n{}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    let ran = Command::new(&binary)
        .output()
        .unwrap_or_else(|error| panic!("running {}: {error}", binary.display()));
    let report = String::from_utf8_lossy(&ran.stdout);
    println!("{report}");
    assert!(
        ran.status.success(),
        "tests/emulated/{harness}.cpp reports a kernel off its reference:\n{report}{}",
        String::from_utf8_lossy(&ran.stderr)
    );
}

#[test]
fn the_attention_kernels_match_attention_and_its_gradients_in_f64_when_emulated() {
    run_harness("attention");
}

#[test]
fn the_loss_kernels_match_cross_entropy_and_its_gradient_in_f64_when_emulated() {
    run_harness("cross_entropy");
}

#[test]
fn the_rms_norm_and_swiglu_kernels_match_their_formulas_in_f64_when_emulated() {
    run_harness("norm_gate");
}

#[test]
fn the_rotary_kernel_matches_rotation_in_f64_when_emulated() {
    run_harness("rope");
}
