//! `trainer eval` agrees with Hugging Face transformers (and peft for adapters) on
//! `loss_all_tokens`, to 1e-4 relative in f32, for each supported architecture.
//!
//! Needs a Python with torch, transformers and peft in `LORA_HF_PYTHON`;
//! `scripts/test` makes one (scripts/hf-reference-env) and runs this test.

use std::path::Path;
use std::process::Command;

fn run(program: &str, args: &[&str]) -> serde_json::Value {
    let output = Command::new(program)
        .args(args)
        .output()
        .expect("process runs");
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The JSON report is the last thing on stdout; anything before it is chatter.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let json = &stdout[stdout.find('{').unwrap_or(0)..];
    serde_json::from_str(json).unwrap_or_else(|e| panic!("JSON from {program}: {e}: {stdout}"))
}

fn loss_all_tokens(value: &serde_json::Value) -> f64 {
    value["loss_all_tokens"].as_f64().expect("loss_all_tokens")
}

#[test]
#[ignore = "needs transformers and peft: scripts/test provides them"]
fn eval_matches_transformers_and_peft() {
    let python = std::env::var("LORA_HF_PYTHON").expect("LORA_HF_PYTHON: run through scripts/test");
    let reference = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/parity/hf_eval.py");
    let trainer = env!("CARGO_BIN_EXE_trainer");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = |name: &str| dir.path().join(name).display().to_string();
    let lines: String = (0..6)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": format!("Hi {i}, héllo wörld")},
                {"role": "assistant", "content": format!("Hello {i}! ünïcode ✓")},
                {"role": "user", "content": "And again?"},
                {"role": "assistant", "content": "Again."}
            ]})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(path("data.jsonl"), lines).expect("data");

    for (name, extra) in [
        ("llama", vec!["--architecture", "llama"]),
        (
            "qwen2",
            vec!["--architecture", "qwen2", "--tie-word-embeddings"],
        ),
        (
            "mistral",
            vec!["--architecture", "mistral", "--kv-heads", "1"],
        ),
    ] {
        let model = path(name);
        let mut args = vec!["init-model", "--out", model.as_str()];
        args.extend(extra);
        Command::new(trainer)
            .args(&args)
            .output()
            .expect("init-model");
        let ours = run(
            trainer,
            &["eval", "--model", &model, "--data", &path("data.jsonl")],
        );
        let theirs = run(&python, &[reference, &model, &path("data.jsonl")]);
        assert_eq!(
            ours["tokens_all"], theirs["tokens_all"],
            "{name}: same tokenization"
        );
        let (a, b) = (loss_all_tokens(&ours), loss_all_tokens(&theirs));
        assert!(
            (a - b).abs() / b.abs() < 1e-4,
            "{name}: ours {a} vs transformers {b}"
        );

        let out = path(&format!("{name}-run"));
        let trained = Command::new(trainer)
            .args([
                "train",
                "--model",
                &model,
                "--data",
                &path("data.jsonl"),
                "--out",
                &out,
            ])
            .args([
                "--max-steps",
                "6",
                "--lr",
                "1e-2",
                "--batch-size",
                "2",
                "--val-split",
                "0",
                "--rank",
                "4",
            ])
            .output()
            .expect("train");
        assert!(
            trained.status.success(),
            "{}",
            String::from_utf8_lossy(&trained.stderr)
        );
        let adapter = Path::new(&out).join("adapter").display().to_string();
        let ours = run(
            trainer,
            &[
                "eval",
                "--model",
                &model,
                "--adapter",
                &adapter,
                "--data",
                &path("data.jsonl"),
            ],
        );
        let theirs = run(&python, &[reference, &model, &path("data.jsonl"), &adapter]);
        let (a, b) = (loss_all_tokens(&ours), loss_all_tokens(&theirs));
        assert!(
            (a - b).abs() / b.abs() < 1e-4,
            "{name} + adapter: ours {a} vs transformers + peft {b}"
        );
    }
}
