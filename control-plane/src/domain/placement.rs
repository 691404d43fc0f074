//! Which queued job an agent may take: capacity (an on-demand job never lands on a
//! spot host, which can be reclaimed), labels the job requires, and memory.

use std::collections::BTreeMap;

use protocol::agent::{Capacity, Heartbeat};

use super::{GpuType, Hyperparameters};

/// Parameters (in billions) read from a model name such as `Qwen2.5-0.5B-Instruct`,
/// `SmolLM2-135M` or `Llama-3.1-8B`; `None` when the name does not say.
pub fn parameters_billions(base_model: &str) -> Option<f64> {
    let name = base_model.rsplit('/').next().unwrap_or(base_model);
    name.split(['-', '_'])
        .filter_map(|part| {
            let lower = part.to_ascii_lowercase();
            let (number, scale) = if let Some(n) = lower.strip_suffix('b') {
                (n, 1.0)
            } else if let Some(n) = lower.strip_suffix('m') {
                (n, 1e-3)
            } else {
                return None;
            };
            number
                .parse::<f64>()
                .ok()
                .filter(|n| *n > 0.0)
                .map(|n| n * scale)
        })
        .next_back()
}

/// Parameters (in billions) of a Llama-family model from its `config.json`: embeddings,
/// attention with grouped K/V, the gated MLP, norms and an untied head. `None` when a
/// field is missing.
pub fn parameters_from_config(config: &serde_json::Value) -> Option<f64> {
    let field = |name: &str| config.get(name)?.as_f64().filter(|v| *v > 0.0);
    let hidden = field("hidden_size")?;
    let layers = field("num_hidden_layers")?;
    let vocab = field("vocab_size")?;
    let intermediate = field("intermediate_size")?;
    let heads = field("num_attention_heads")?;
    let kv_heads = field("num_key_value_heads").unwrap_or(heads);
    let head_dim = field("head_dim").unwrap_or(hidden / heads);
    let attention = 2.0 * hidden * heads * head_dim + 2.0 * hidden * kv_heads * head_dim;
    let per_layer = attention + 3.0 * hidden * intermediate + 2.0 * hidden;
    let tied = config
        .get("tie_word_embeddings")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    let embeddings = vocab * hidden * if tied { 1.0 } else { 2.0 };
    Some((layers * per_layer + embeddings + hidden) / 1e9)
}

/// The share of a Llama-family model's weights in its decoder projections, the part a
/// quantized base holds in a block format (72% for Qwen2.5-0.5B, 79% for Llama-3.2-1B,
/// 87% for Llama-3.1-8B; the rest is embeddings and head, kept in bf16). The low end, so
/// that a quantized estimate errs high.
const PROJECTION_SHARE: f64 = 0.72;

/// What gradient checkpointing leaves of the activations: a layer keeps only its two
/// halves' inputs and its attention's output until the backward (the rest is computed
/// again there), so about a third, erring high (`trainer bench` on the CPU: peak memory,
/// weights included, 27–58% lower with it).
const CHECKPOINTED_ACTIVATIONS: f64 = 1.0 / 3.0;

/// GPU memory a LoRA run needs, in GiB: base weights (bf16, or the projections in their
/// quantized format) with 20% workspace, plus activations that grow with tokens per
/// micro-batch and model width (roughly sqrt of size), less with gradient checkpointing.
/// A heuristic: an underestimate ends in an out-of-memory retry with half the micro-batch.
pub fn estimated_memory_gib(base_model: &str, hyperparameters: &Hyperparameters) -> Option<f64> {
    let billions = parameters_billions(base_model)?;
    let bytes_per_weight = match hyperparameters.base_quant.bytes_per_weight() {
        Some(quantized) => PROJECTION_SHARE * quantized + (1.0 - PROJECTION_SHARE) * 2.0,
        None => 2.0,
    };
    let weights = billions * bytes_per_weight * 1.2;
    let tokens = f64::from(hyperparameters.batch_size) * f64::from(hyperparameters.max_seq_len);
    let mut activations = tokens * 0.25e-3 * billions.sqrt().max(0.3);
    if hyperparameters.gradient_checkpointing {
        activations *= CHECKPOINTED_ACTIVATIONS;
    }
    Some(weights + activations)
}

/// Why an agent cannot take a job, or `None` when it can.
pub fn unfit_reason(
    gpu_type: Option<GpuType>,
    required_labels: &BTreeMap<String, String>,
    memory_gib: Option<f64>,
    agent: &Heartbeat,
) -> Option<String> {
    if gpu_type == Some(GpuType::Ondemand) && agent.capacity == Capacity::Spot {
        return Some("an on-demand job does not run on a spot host".into());
    }
    for (key, value) in required_labels {
        if agent.labels.get(key) != Some(value) {
            return Some(format!("needs label {key}={value}"));
        }
    }
    let needed = memory_gib?;
    let free_gib = match agent.gpus.iter().map(|g| g.memory_free_mb()).max() {
        Some(mb) => mb as f64 / 1024.0,
        None => {
            agent
                .host
                .memory_total_mb
                .saturating_sub(agent.host.memory_used_mb) as f64
                / 1024.0
        }
    };
    (free_gib < needed)
        .then(|| format!("needs ~{needed:.1} GiB, the agent has {free_gib:.1} GiB free"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::agent::{BaseQuant, GpuTelemetry};

    #[test]
    fn reads_sizes_from_model_names() {
        assert_eq!(parameters_billions("Qwen/Qwen2.5-0.5B-Instruct"), Some(0.5));
        assert_eq!(parameters_billions("meta-llama/Llama-3.1-8B"), Some(8.0));
        assert_eq!(
            parameters_billions("HuggingFaceTB/SmolLM2-135M-Instruct"),
            Some(0.135)
        );
        assert_eq!(parameters_billions("/models/tiny"), None);
    }

    #[test]
    fn counts_parameters_from_a_config() {
        // Llama-3.2-1B's config: 1,235,814,400 parameters (tied embeddings).
        let config = serde_json::json!({
            "hidden_size": 2048, "num_hidden_layers": 16, "vocab_size": 128256,
            "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 64, "tie_word_embeddings": true,
        });
        let billions = parameters_from_config(&config).expect("a full config");
        assert!((billions * 1e9 - 1_235_814_400.0).abs() < 1.0, "{billions}");
        assert_eq!(
            parameters_from_config(&serde_json::json!({"hidden_size": 64})),
            None
        );
    }

    /// A job's hyperparameters with nothing set.
    fn defaults() -> Hyperparameters {
        crate::domain::hyperparameters::resolve(
            &serde_json::Map::new(),
            &serde_json::Map::new(),
            &crate::configuration::Limits::default(),
        )
        .expect("defaults are valid")
    }

    #[test]
    fn a_quantized_base_fits_where_a_bf16_one_does_not() {
        let mut hyperparameters = defaults();
        hyperparameters.batch_size = 1;
        hyperparameters.max_seq_len = 512;
        let bf16 = estimated_memory_gib("Qwen2.5-14B", &hyperparameters).expect("sized");
        hyperparameters.base_quant = BaseQuant::Q8_0;
        let q8_0 = estimated_memory_gib("Qwen2.5-14B", &hyperparameters).expect("sized");
        hyperparameters.base_quant = BaseQuant::Q4k;
        let q4k = estimated_memory_gib("Qwen2.5-14B", &hyperparameters).expect("sized");
        assert!(q4k < q8_0 && q8_0 < bf16, "{q4k} < {q8_0} < {bf16}");
        assert!(bf16 > 24.0 && q4k < 24.0, "bf16 {bf16} GiB, q4k {q4k} GiB");
    }

    #[test]
    fn gradient_checkpointing_needs_less_memory_for_long_sequences() {
        let mut hyperparameters = defaults();
        hyperparameters.batch_size = 8;
        hyperparameters.max_seq_len = 4096;
        let kept = estimated_memory_gib("Llama-3.1-8B", &hyperparameters).expect("sized");
        hyperparameters.gradient_checkpointing = true;
        let checkpointed = estimated_memory_gib("Llama-3.1-8B", &hyperparameters).expect("sized");
        // The weights (8B in bf16, with workspace: 19.2 GiB) stay; the activations shrink.
        assert!(
            checkpointed < kept && checkpointed > 19.2,
            "{checkpointed} < {kept}"
        );
    }

    #[test]
    fn on_demand_jobs_stay_off_spot_hosts_and_memory_must_fit() {
        let mut agent = Heartbeat {
            capacity: Capacity::Spot,
            gpus: vec![GpuTelemetry {
                memory_total_mb: 24 * 1024,
                memory_used_mb: 0,
                ..GpuTelemetry::default()
            }],
            ..Heartbeat::default()
        };
        let labels = BTreeMap::new();
        assert!(unfit_reason(Some(GpuType::Ondemand), &labels, None, &agent).is_some());
        assert!(unfit_reason(Some(GpuType::Spot), &labels, Some(20.0), &agent).is_none());
        assert!(unfit_reason(Some(GpuType::Spot), &labels, Some(30.0), &agent).is_some());
        agent.capacity = Capacity::Ondemand;
        assert!(unfit_reason(Some(GpuType::Ondemand), &labels, None, &agent).is_none());
        let needs_zone = BTreeMap::from([("zone".to_owned(), "a".to_owned())]);
        assert!(unfit_reason(None, &needs_zone, None, &agent).is_some());
        agent.labels.insert("zone".into(), "a".into());
        assert!(unfit_reason(None, &needs_zone, None, &agent).is_none());
    }
}
