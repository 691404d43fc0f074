//! `trainer export --format gguf` writes what llama.cpp's gguf-py reads back as a LoRA
//! adapter: its keys, llama.cpp's tensor names and shapes, and values equal to the
//! safetensors adapter (with q and k's `lora_b` rows permuted for Llama-style models, as
//! `convert_lora_to_gguf.py` does).
//!
//! Needs a Python with the `gguf` and `safetensors` packages in `LORA_HF_PYTHON`;
//! `scripts/test` makes one (scripts/hf-reference-env) and runs this test.

use std::process::Command;

fn trainer(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .output()
        .expect("trainer runs");
    assert!(
        output.status.success(),
        "trainer {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A trained adapter (nonzero A and B) on a fresh tiny model of `architecture`.
fn trained_adapter(dir: &std::path::Path, architecture: &str) -> (String, String) {
    let path = |name: &str| dir.join(name).display().to_string();
    trainer(&[
        "init-model",
        "--out",
        &path("model"),
        "--architecture",
        architecture,
        "--heads",
        "4",
        "--kv-heads",
        "2",
    ]);
    let lines: String = (0..12)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("Name {i}")},
                {"role": "assistant", "content": format!("Number {i}.")}
            ]})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(path("data.jsonl"), lines).expect("data");
    trainer(&[
        "train",
        "--model",
        &path("model"),
        "--data",
        &path("data.jsonl"),
        "--out",
        &path("out"),
        "--max-steps",
        "4",
        "--lr",
        "0.01",
    ]);
    (path("model"), path("out/adapter"))
}

#[test]
#[ignore = "needs gguf-py: scripts/test provides it"]
fn gguf_py_reads_the_exported_adapter() {
    let python = std::env::var("LORA_HF_PYTHON").expect("LORA_HF_PYTHON: run through scripts/test");
    let reader = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/parity/gguf_read.py"
    );
    for (architecture, gguf_architecture, permuted) in
        [("llama", "llama", "1"), ("qwen2", "qwen2", "0")]
    {
        let dir = tempfile::tempdir().expect("temp dir");
        let (_, adapter) = trained_adapter(dir.path(), architecture);
        for (dtype, type_name, tolerance) in [
            ("f32", "F32", 0.0),
            ("f16", "F16", 1e-3),
            ("bf16", "BF16", 1e-2),
        ] {
            let out = dir.path().join(format!("adapter-{dtype}.gguf"));
            let out = out.display().to_string();
            // The base model comes from the adapter's base_model_name_or_path.
            let written: serde_json::Value = serde_json::from_str(&trainer(&[
                "export",
                "--adapter",
                &adapter,
                "--format",
                "gguf",
                "--out",
                &out,
                "--dtype",
                dtype,
            ]))
            .expect("export JSON");
            assert_eq!(written["architecture"], gguf_architecture);
            let output = Command::new(&python)
                .args([reader, &out, &adapter, "4", "2", permuted])
                .output()
                .expect("python runs");
            assert!(
                output.status.success(),
                "gguf_read.py: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let read: serde_json::Value =
                serde_json::from_slice(&output.stdout).expect("reader JSON");
            let metadata = &read["metadata"];
            assert_eq!(
                metadata["general.architecture"], gguf_architecture,
                "{read}"
            );
            assert_eq!(metadata["general.type"], "adapter");
            assert_eq!(metadata["adapter.type"], "lora");
            assert_eq!(metadata["adapter.lora.alpha"], 16.0, "{read}");
            // Every tensor of the adapter is there under llama.cpp's name and none else.
            let names: Vec<&String> = read["tensors"]
                .as_object()
                .expect("tensors")
                .keys()
                .collect();
            let mut names: Vec<String> = names.into_iter().cloned().collect();
            names.sort();
            let expected: Vec<String> = read["expected"]
                .as_array()
                .expect("expected")
                .iter()
                .map(|n| n.as_str().expect("name").to_owned())
                .collect();
            assert_eq!(names, expected);
            assert_eq!(names.len(), 2 * 7 * 2, "2 layers × 7 projections × A and B");
            // GGUF lists dimensions innermost first: q's A is [in, rank], B [rank, out].
            let q_a = &read["tensors"]["blk.0.attn_q.weight.lora_a"];
            let q_b = &read["tensors"]["blk.0.attn_q.weight.lora_b"];
            let k_b = &read["tensors"]["blk.0.attn_k.weight.lora_b"];
            assert_eq!(q_a["shape"], serde_json::json!([64, 8]), "{read}");
            assert_eq!(q_b["shape"], serde_json::json!([8, 64]));
            assert_eq!(k_b["shape"], serde_json::json!([8, 32]));
            assert_eq!(q_a["type"], type_name);
            let difference = read["max_abs_difference"].as_f64().expect("difference");
            assert!(
                difference <= tolerance,
                "{architecture} {dtype}: values differ by {difference}"
            );
        }
    }
}

#[test]
fn an_adapter_with_other_tensors_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (model, adapter) = trained_adapter(dir.path(), "llama");
    let weights = std::path::Path::new(&adapter).join("adapter_model.safetensors");
    let mut tensors =
        candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).expect("adapter");
    tensors.insert(
        "base_model.model.lm_head.lora_A.weight".into(),
        candle_core::Tensor::zeros((8, 64), candle_core::DType::F32, &candle_core::Device::Cpu)
            .expect("tensor"),
    );
    candle_core::safetensors::save(&tensors, &weights).expect("save");
    let out = dir.path().join("adapter.gguf");
    let output = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args([
            "export",
            "--adapter",
            &adapter,
            "--format",
            "gguf",
            "--model",
            &model,
        ])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("trainer runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("base_model.model.lm_head.lora_A.weight"),
        "{stderr}"
    );
    assert!(!out.exists(), "nothing written");
}
