//! The CUDA C kernels under `kernels/cuda/`, compiled for the CPU with a C++ compiler and
//! run by the emulator in `tests/emulated/` (blocks one at a time, threads as fibers that
//! meet at barriers, warp shuffles and tensor-core products from the PTX fragment
//! layouts), each against a reference in f64 (dropout: against the CPU op, bit for bit).
//! This is how kernels are tested where no GPU is: the CUDA build compiles them,
//! `trainer kernel-check` runs them on a GPU host.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use candle_core::{DType, Device, Tensor};

/// Compiles `tests/emulated/<harness>.cpp` and runs it with `input` on its stdin; its
/// output is printed, and a failed compile or a harness that reports a mismatch fails
/// the test.
fn run_harness(harness: &str, input: &[u8]) {
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
    let mut child = Command::new(&binary)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("running {}: {error}", binary.display()));
    // A harness that reads nothing may exit before taking it all: a broken pipe is its
    // verdict to give, not ours.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input);
    }
    let ran = child
        .wait_with_output()
        .unwrap_or_else(|error| panic!("waiting for {}: {error}", binary.display()));
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
    run_harness("attention", &[]);
}

#[test]
fn the_loss_kernels_match_cross_entropy_and_its_gradient_in_f64_when_emulated() {
    run_harness("cross_entropy", &[]);
}

#[test]
fn the_rms_norm_and_swiglu_kernels_match_their_formulas_in_f64_when_emulated() {
    run_harness("norm_gate", &[]);
}

#[test]
fn the_rotary_kernel_matches_rotation_in_f64_when_emulated() {
    run_harness("rope", &[]);
}

#[test]
fn the_adamw_kernel_matches_pytorchs_update_in_f64_when_emulated() {
    run_harness("adamw", &[]);
}

/// The dropout kernel, given what the CUDA launch gives it, must reproduce the CPU op's
/// output bit for bit (f32, and bf16 rounded the same way): the cases are made here with
/// the CPU op, streams near both ends of the 64-bit range, every entry at several keep
/// probabilities.
#[test]
fn the_dropout_kernel_draws_the_cpus_masks_when_emulated() -> candle_core::Result<()> {
    let count = 4_099;
    let values: Vec<f32> = (0..count).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
    let x = Tensor::from_vec(values, count, &Device::Cpu)?;
    let mut cases = String::new();
    for (stream, keep) in [
        (0, 0.9),
        (0x1234_5678_9ABC_DEF0, 0.5),
        (u64::MAX - 3, 1.0 / 3.0),
        (42, 1.0),
    ] {
        let (stream, threshold, scale) =
            trainer_kernels::Dropout::new(stream, keep)?.kernel_arguments();
        for dtype in [DType::F32, DType::BF16] {
            let x = x.to_dtype(dtype)?;
            let y = trainer_kernels::dropout(&x, stream, keep)?;
            let name = if dtype == DType::BF16 { "bf16" } else { "f32" };
            let (x_bits, y_bits) = (bits(&x)?, bits(&y)?);
            cases += &format!(
                "{name} {count} {stream} {threshold} {:x}\n{}\n{}\n",
                scale.to_bits(),
                x_bits.join(" "),
                y_bits.join(" ")
            );
        }
    }
    run_harness("dropout", cases.as_bytes());
    Ok(())
}

/// Each entry's bits in hex: f32, or bf16.
fn bits(t: &Tensor) -> candle_core::Result<Vec<String>> {
    Ok(match t.dtype() {
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .map(|v| format!("{:x}", v.to_bits()))
            .collect(),
        _ => t
            .to_vec1::<f32>()?
            .iter()
            .map(|v| format!("{:x}", v.to_bits()))
            .collect(),
    })
}
