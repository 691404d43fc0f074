//! Training throughput and memory on CPU for random models of a few sizes.
//!
//!   cargo bench -p trainer --bench train -- [hidden layers seq_len batch steps]
//!
//! Prints one row per run: parameters, tokens/s, peak RSS, and the bytes the gradient
//! store holds after a backward pass next to the bytes of the frozen weights; frozen
//! weights contribute none (LoRA gradients plus a few first-layer activations remain).
//! `scripts/bench-trainer` runs the matrix.

use std::collections::HashSet;

use candle_core::{DType, Device, Tensor};
use trainer::init::{write_tiny_model, TinyModel};
use trainer::rng::Rng;
use trainer::train::{train, Control, TrainOptions};
use trainer::LoraConfig;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let get = |i: usize, default: usize| args.get(i).copied().unwrap_or(default);
    let (hidden, layers, seq_len, batch, steps) =
        (get(0, 256), get(1, 4), get(2, 256), get(3, 4), get(4, 10));

    let dir = tempfile::tempdir().expect("temp dir");
    let spec = TinyModel {
        hidden_size: hidden,
        intermediate_size: hidden * 8 / 3,
        layers,
        heads: (hidden / 64).max(1),
        kv_heads: (hidden / 128).max(1),
        ..TinyModel::default()
    };
    let config = write_tiny_model(&dir.path().join("model"), &spec).expect("model");
    // Conversations long enough to fill seq_len byte-level tokens.
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(seq_len / 40 + 1);
    let lines: String = (0..batch * (steps + 2))
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("{i}: {}", &text[..seq_len / 3])},
                {"role": "assistant", "content": &text[..seq_len]}
            ]})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(dir.path().join("data.jsonl"), lines).expect("data");

    let options = TrainOptions {
        model: dir.path().join("model"),
        data: dir.path().join("data.jsonl"),
        out: dir.path().join("out"),
        max_steps: Some(steps),
        batch_size: batch,
        max_seq_len: seq_len,
        val_split: 0.0,
        ..TrainOptions::default()
    };
    let summary = train(&options, &mut (), &Control::default()).expect("training");

    // One forward/backward on a fresh model to weigh the gradient store.
    let (_, model) = trainer::loader::load_model(
        &options.model,
        &LoraConfig::default(),
        (DType::F32, trainer::quantized::BaseQuant::None),
        DType::F32,
        &Device::Cpu,
        &mut Rng::new(1),
    )
    .expect("model");
    let ids = Tensor::zeros((batch, seq_len), DType::U32, &Device::Cpu).expect("ids");
    let mask = Tensor::ones((batch, seq_len), DType::F32, &Device::Cpu).expect("mask");
    let loss = model.loss(&ids, None, &ids, &mask, None).expect("loss");
    let grads = loss.backward().expect("backward");
    let lora: HashSet<_> = model
        .lora_parameters()
        .values()
        .map(|v| v.as_tensor().id())
        .collect();
    let (mut lora_bytes, mut other_bytes) = (0usize, 0usize);
    for id in grads.get_ids() {
        let bytes = grads.get_id(*id).map_or(0, |t| t.elem_count() * 4);
        if lora.contains(id) {
            lora_bytes += bytes;
        } else {
            other_bytes += bytes;
        }
    }
    let parameters = config.vocab_size * hidden * 2
        + layers * (4 * hidden * hidden + 3 * hidden * spec.intermediate_size);
    let mib = |bytes: f64| bytes / 1048576.0;
    println!(
        "| {hidden:>6} | {layers:>6} | {:>8.1}M | {seq_len:>7} | {batch:>5} | {:>9.0} | {:>9.1} | {:>12.1} | {:>10.2} | {:>11.2} |",
        parameters as f64 / 1e6,
        summary.tokens_per_second,
        mib(summary.peak_memory_bytes.unwrap_or(0) as f64),
        mib(parameters as f64 * 4.0),
        mib(lora_bytes as f64),
        mib(other_bytes as f64),
    );
}
