//! The `trainer` binary end to end: init-model, train, eval (with and without the
//! adapter), generate.

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
}
