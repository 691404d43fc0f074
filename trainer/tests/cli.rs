//! The `trainer` binary end to end: init-model, train, eval (with and without the
//! adapter), generate, validate.

use std::process::Command;

fn run(args: &[&str]) -> (String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .output()
        .expect("trainer runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "trainer {args:?} failed: {stderr}");
    (String::from_utf8_lossy(&output.stdout).into_owned(), stderr)
}

/// The trainer's stderr for a command that must fail.
fn refused(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .output()
        .expect("trainer runs");
    assert!(!output.status.success(), "trainer {args:?} succeeded");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn init_train_eval_generate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = |name: &str| dir.path().join(name).display().to_string();
    run(&[
        "init-model",
        "--out",
        &path("model"),
        "--architecture",
        "qwen2",
        "--tie-word-embeddings",
    ]);
    let lines: String = (0..30)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("Say hello {i}")},
                {"role": "assistant", "content": format!("Hello number {i}!")}
            ]})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(path("data.jsonl"), lines).expect("data");
    let recipe = format!(
        "model = {:?}\ndata = {:?}\nlr = 0.01\nbatch_size = 4\n",
        path("model"),
        path("data.jsonl")
    );
    std::fs::write(path("recipe.toml"), recipe).expect("recipe");

    let (stdout, stderr) = run(&[
        "train",
        "--config",
        &path("recipe.toml"),
        "--out",
        &path("out"),
        "--max-steps",
        "15",
    ]);
    assert!(stderr.contains("15/15 loss"), "progress bar: {stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).expect("summary JSON");
    assert_eq!(summary["steps"], 15);

    let eval = |adapter: bool| -> serde_json::Value {
        let (model, data, adapter_dir) = (path("model"), path("data.jsonl"), path("out/adapter"));
        let mut args = vec!["eval", "--model", model.as_str(), "--data", data.as_str()];
        if adapter {
            args.extend(["--adapter", adapter_dir.as_str()]);
        }
        serde_json::from_str(&run(&args).0).expect("eval JSON")
    };
    let (base, tuned) = (eval(false), eval(true));
    assert!(
        tuned["loss"].as_f64() < base["loss"].as_f64(),
        "the adapter helps: {base} vs {tuned}"
    );
    assert!(tuned["loss_all_tokens"]
        .as_f64()
        .is_some_and(f64::is_finite));
    assert_eq!(base["tokens"], tuned["tokens"]);

    // The merged model scores what base + adapter scores.
    run(&[
        "merge",
        "--model",
        &path("model"),
        "--adapter",
        &path("out/adapter"),
        "--out",
        &path("merged"),
    ]);
    let (merged, _) = run(&[
        "eval",
        "--model",
        &path("merged"),
        "--data",
        &path("data.jsonl"),
    ]);
    let merged: serde_json::Value = serde_json::from_str(&merged).expect("eval JSON");
    let (tuned_loss, merged_loss) = (
        tuned["loss_all_tokens"].as_f64().unwrap_or(f64::NAN),
        merged["loss_all_tokens"].as_f64().unwrap_or(f64::NAN),
    );
    assert!(
        (tuned_loss - merged_loss).abs() <= 1e-5 * tuned_loss.abs(),
        "merged {merged_loss} vs adapter {tuned_loss}"
    );
    assert!(std::path::Path::new(&path("merged/tokenizer.json")).exists());

    let (answer, _) = run(&[
        "generate",
        "--model",
        &path("model"),
        "--adapter",
        &path("out/adapter"),
        "--prompt",
        "Say hello 3",
        "--temperature",
        "0",
        "--max-new-tokens",
        "16",
    ]);
    assert!(!answer.trim().is_empty());

    // Validation suites on the same adapter: perplexity agrees with eval.
    let (validated, _) = run(&[
        "validate",
        "--model",
        &path("model"),
        "--adapter",
        &path("out/adapter"),
        "--data",
        &path("data.jsonl"),
        "--suites",
        "perplexity,stop_behaviour",
        "--max-samples",
        "2",
        "--max-new-tokens",
        "8",
    ]);
    let validated: serde_json::Value = serde_json::from_str(&validated).expect("validate JSON");
    assert_eq!(
        validated["adapter"][0]["figures"]["adapter"]["loss"],
        tuned["loss"]
    );
    assert_eq!(validated["adapter"][1]["suite"], "stop_behaviour");
    assert_eq!(
        validated["examples"]["generated_lines"],
        serde_json::json!([1, 2])
    );
}

#[test]
fn bench_prints_one_json_line_of_figures() {
    let (stdout, _) = run(&[
        "bench",
        "--device",
        "cpu",
        "--shape",
        "tiny",
        "--steps",
        "2",
        "--seq",
        "32",
        "--batch",
        "2",
        "--rank",
        "4",
        "--peak-tflops",
        "1",
    ]);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let report: serde_json::Value = serde_json::from_str(lines[0]).expect("JSON");
    for field in [
        "tokens_per_second",
        "forward_ms",
        "backward_ms",
        "optimizer_ms",
        "mfu",
    ] {
        assert!(
            report[field].as_f64().is_some_and(|v| v > 0.0),
            "{field}: {report}"
        );
    }
    assert!(report["peak_memory_bytes"].as_u64().is_some_and(|v| v > 0));
    assert_eq!(report["attention"], "cpu", "{report}");
    assert_eq!(report["block_ops"], true, "{report}");
    assert_eq!(report["gradient_checkpointing"], false, "{report}");
    // 4·N + 6·N_lora + 6·layers·seq·q_dim for the tiny shape (hidden 64, 2 layers, 4 heads
    // of 16, 2 KV heads, intermediate 128, vocab 512, rank 4 on all 7 projections).
    let frozen = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128) + 64 * 512;
    let lora = 2 * 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3);
    let attention = 6 * 2 * 32 * 64;
    assert_eq!(report["frozen_parameters"], frozen);
    assert_eq!(report["lora_parameters"], lora);
    assert_eq!(
        report["flops_per_token"].as_f64(),
        Some((4 * frozen + 6 * lora + attention) as f64)
    );
    assert!(refused(&["bench", "--shape", "gpt-5"]).contains("unknown shape \"gpt-5\""));
}

#[test]
fn bench_trains_with_lora_dropout_and_refuses_a_probability_of_one() {
    let args = [
        "bench", "--shape", "tiny", "--steps", "2", "--seq", "32", "--rank", "4",
    ];
    let (stdout, _) = run(&[&args[..], &["--lora-dropout", "0.1"]].concat());
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON");
    assert_eq!(report["lora_dropout"].as_f64(), Some(0.1), "{report}");
    assert!(report["tokens_per_second"]
        .as_f64()
        .is_some_and(|v| v > 0.0));
    let stderr = refused(&[&args[..], &["--lora-dropout", "1"]].concat());
    assert!(
        stderr.contains("lora_dropout must be in [0, 1)"),
        "{stderr}"
    );
}

/// The GPU host's one script, rehearsed on CPU with this build: parity CPU against CPU and
/// the tiny bench, its table written.
#[test]
fn the_gpu_check_rehearses_on_cpu() {
    let out = tempfile::tempdir().expect("temp dir");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gpu-check");
    let output = Command::new("bash")
        .arg(script)
        .arg("--dry-run")
        .env("TRAINER", env!("CARGO_BIN_EXE_trainer"))
        .env("OUT", out.path())
        .output()
        .expect("gpu-check runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let parity: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("parity.json")).expect("parity.json"),
    )
    .expect("parity JSON");
    assert_eq!(parity["passed"], true, "{parity}");
    // Generation (the validation suites' replies) on the "device" and the CPU: here both
    // are the CPU, so every reply is the same.
    let generation: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("generation.json")).expect("generation.json"),
    )
    .expect("generation JSON");
    assert_eq!(generation["complete"], true, "{generation}");
    assert_eq!(
        generation["identical_on_the_device"], generation["replies"],
        "{generation}"
    );
    let table = std::fs::read_to_string(out.path().join("table.md")).expect("table.md");
    assert!(
        table.lines().any(|l| l.starts_with("| tiny | 64 × 2 |")),
        "{table}"
    );
    // The memory table: the plain run, a q4k base, and gradient checkpointing.
    for row in [
        "| tiny | f32 | False |",
        "| tiny | q4k | False |",
        "| tiny | f32 | True |",
    ] {
        assert!(table.lines().any(|l| l.starts_with(row)), "{row}: {table}");
    }
}

/// A trainer that fails as a GPU's kernels might: each word in `STAND_IN_FAILS` names a
/// failure (`tensor-core-kernels`: the kernel check fails unless TRAINER_TENSOR_CORES=0;
/// `tensor-core-bench`: a bench does; `block-ops`: training on the "device" does unless
/// TRAINER_BLOCK_OPS=0; `kernels`: the kernel check always does). Otherwise this build.
fn failing_trainer(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("failing-trainer");
    let script = r#"#!/usr/bin/env bash
fails=" ${STAND_IN_FAILS:-} "
refuse() { echo "stand-in: $1" >&2; exit 1; }
tensor_cores_on() { [[ "${TRAINER_TENSOR_CORES:-1}" != 0 ]]; }
case "$1" in
  kernel-check)
    [[ $fails == *" kernels "* ]] && refuse "adamw differs from the CPU"
    [[ $fails == *" tensor-core-kernels "* ]] && tensor_cores_on && refuse "causal_attention_bf16 differs from the CPU" ;;
  bench)
    [[ $fails == *" tensor-core-bench "* && "$*" != *--describe* ]] && tensor_cores_on && refuse "an illegal memory access" ;;
  train)
    [[ $fails == *" block-ops "* && "$*" != *parity/cpu* && "${TRAINER_BLOCK_OPS:-1}" != 0 ]] && refuse "gradients differ" ;;
esac
exec REAL "$@"
"#
    .replace("REAL", env!("CARGO_BIN_EXE_trainer"));
    std::fs::write(&path, script).expect("stand-in written");
    let mode = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    std::fs::set_permissions(&path, mode).expect("stand-in made executable");
    path
}

/// `scripts/gpu-check --dry-run` with the failing stand-in: whether it passed, its log
/// and its table.
fn gpu_check_failing(fails: &str) -> (bool, String, String) {
    let out = tempfile::tempdir().expect("temp dir");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gpu-check");
    let output = Command::new("bash")
        .arg(script)
        .arg("--dry-run")
        .env("TRAINER", failing_trainer(out.path()))
        .env("STAND_IN_FAILS", fails)
        .env("OUT", out.path())
        .output()
        .expect("gpu-check runs");
    let read = |name: &str| std::fs::read_to_string(out.path().join(name)).unwrap_or_default();
    let environment = read("environment.sh");
    let log = format!("{}\n{environment}", String::from_utf8_lossy(&output.stderr));
    (output.status.success(), log, read("table.md"))
}

/// Device time is scarce: a failure with a way back takes it, says so in the log, atop
/// the table and in the environment scripts/gpu-profile reads, and the check goes on.
#[test]
fn the_gpu_check_falls_back_where_it_can() {
    let (passed, log, table) = gpu_check_failing("tensor-core-kernels block-ops");
    assert!(passed, "{log}");
    for variable in ["TRAINER_TENSOR_CORES=0", "TRAINER_BLOCK_OPS=0"] {
        assert!(
            log.contains(&format!("falling back to {variable}")),
            "{log}"
        );
        assert!(log.contains(&format!("export {variable}")), "{log}");
        assert!(
            table.contains(&format!("Fell back to {variable}")),
            "{table}"
        );
    }
    assert!(log.contains("causal_attention_bf16 differs"), "{log}");
    assert!(log.contains("gradients differ"), "{log}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("| tiny | 64 × 2 | ") && !l.contains("failed")),
        "{table}"
    );

    let (passed, log, table) = gpu_check_failing("tensor-core-bench");
    assert!(passed, "{log}");
    assert!(
        table.starts_with("Fell back to TRAINER_TENSOR_CORES=0 (the tiny bench failed"),
        "{table}"
    );
    assert!(!log.contains("TRAINER_BLOCK_OPS"), "{log}");

    let (passed, log, _) = gpu_check_failing("kernels");
    assert!(
        !passed,
        "a kernel check failing either way ends the check: {log}"
    );
    assert!(log.contains("FAILED: kernel check"), "{log}");
}

/// Attention keeps no L² tensor: from seq 512 to 2048 (4×) the memory a tiny-width
/// model's step needs grows about 4×, where scores and probabilities kept for the
/// backward would make it 16×.
#[test]
fn peak_memory_grows_linearly_with_the_sequence() {
    let peak = |seq: usize| -> f64 {
        let (stdout, _) = run(&[
            "bench",
            "--shape",
            "tiny",
            "--seq",
            &seq.to_string(),
            "--batch",
            "1",
            "--steps",
            "1",
            "--rank",
            "4",
        ]);
        let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON");
        report["peak_memory_bytes"].as_f64().expect("peak memory")
    };
    let baseline = peak(64);
    let (short, long) = (peak(512) - baseline, peak(2048) - baseline);
    assert!(short > 0.0, "seq 512 needs memory beyond the baseline");
    let growth = long / short;
    assert!(growth < 8.0, "4× the sequence took {growth:.1}× the memory");
}
