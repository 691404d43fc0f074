pub mod agent;
pub mod dataset;
pub mod validation;

/// The projections of a Llama-family decoder layer that LoRA can target, as PEFT names
/// them: attention (q, k, v, o) and MLP (gate, up, down).
pub const LORA_TARGET_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];
