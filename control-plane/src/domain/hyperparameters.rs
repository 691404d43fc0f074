//! Training hyperparameters: a preset's values, overridden field by field, then checked.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::configuration::Limits;

use protocol::agent::BaseQuant;
use protocol::LORA_TARGET_MODULES;

/// The one definition, shared with the agent, which hands it to the trainer.
pub use protocol::agent::Hyperparameters;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Builds hyperparameters from a preset's `parameters` with `overrides` applied on top.
/// Every problem is reported, each naming its field.
pub fn resolve(
    preset: &Map<String, Value>,
    overrides: &Map<String, Value>,
    limits: &Limits,
) -> Result<Hyperparameters, Vec<FieldError>> {
    let mut errors = Vec::new();
    for key in overrides.keys() {
        if !FIELDS.contains(&key.as_str()) {
            errors.push(FieldError::new(
                key.clone(),
                format!("unknown hyperparameter; known: {}", FIELDS.join(", ")),
            ));
        }
    }
    let get = |key: &str| {
        overrides
            .get(key)
            .or_else(|| preset.get(key))
            .filter(|v| !v.is_null())
    };
    let mut field = Field {
        errors: &mut errors,
    };

    let rank = field.integer(get("rank"), "rank", 16, 1, i64::from(limits.max_rank));
    let lora_alpha = field.number(get("lora_alpha"), "lora_alpha", 2.0 * rank as f64, |x| {
        (x > 0.0 && x <= 4096.0)
            .then_some(())
            .ok_or("must be greater than 0 and at most 4096")
    });
    let lora_dropout = field.number(get("lora_dropout"), "lora_dropout", 0.05, |x| {
        (0.0..1.0)
            .contains(&x)
            .then_some(())
            .ok_or("must be at least 0 and less than 1")
    });
    let learning_rate = field.number(get("learning_rate"), "learning_rate", 2e-4, |x| {
        (x > 0.0 && x <= 1.0)
            .then_some(())
            .ok_or("must be greater than 0 and at most 1")
    });
    let epochs = field.integer(get("epochs"), "epochs", 3, 1, i64::from(limits.max_epochs));
    let batch_size = field.integer(
        get("batch_size"),
        "batch_size",
        2,
        1,
        i64::from(limits.max_batch_size),
    );
    let gradient_accumulation_steps = field.integer(
        get("gradient_accumulation_steps"),
        "gradient_accumulation_steps",
        1,
        1,
        1024,
    );
    let max_seq_len = field.integer(
        get("max_seq_len"),
        "max_seq_len",
        2048,
        16,
        i64::from(limits.max_seq_len),
    );
    let warmup_ratio = field.number(get("warmup_ratio"), "warmup_ratio", 0.03, |x| {
        (0.0..=0.5)
            .contains(&x)
            .then_some(())
            .ok_or("must be between 0 and 0.5")
    });
    let target_modules = field.target_modules(get("target_modules"));
    let seed = field.integer(get("seed"), "seed", 42, 0, i64::MAX);
    let eval_every =
        get("eval_every").map(|v| field.integer(Some(v), "eval_every", 1, 1, 1_000_000));
    let early_stopping_patience = get("early_stopping_patience")
        .map(|v| field.integer(Some(v), "early_stopping_patience", 1, 1, 1_000));
    let early_stopping_min_delta = get("early_stopping_min_delta").map(|v| {
        field.number(Some(v), "early_stopping_min_delta", 0.0, |x| {
            (0.0..=100.0)
                .contains(&x)
                .then_some(())
                .ok_or("must be between 0 and 100")
        })
    });
    let keep_best = field.boolean(get("keep_best"), "keep_best", false);
    let packing = field.boolean(get("packing"), "packing", true);
    let base_quant = field.base_quant(get("base_quant"));
    let gradient_checkpointing = field.boolean(
        get("gradient_checkpointing"),
        "gradient_checkpointing",
        false,
    );

    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Hyperparameters {
        rank: rank as u32,
        lora_alpha,
        lora_dropout,
        learning_rate,
        epochs: epochs as u32,
        batch_size: batch_size as u32,
        gradient_accumulation_steps: gradient_accumulation_steps as u32,
        max_seq_len: max_seq_len as u32,
        warmup_ratio,
        target_modules,
        seed: seed as u64,
        eval_every: eval_every.map(|n| n as u32),
        early_stopping_patience: early_stopping_patience.map(|n| n as u32),
        early_stopping_min_delta,
        keep_best,
        packing,
        base_quant,
        gradient_checkpointing,
    })
}

const FIELDS: [&str; 18] = [
    "rank",
    "lora_alpha",
    "lora_dropout",
    "learning_rate",
    "epochs",
    "batch_size",
    "gradient_accumulation_steps",
    "max_seq_len",
    "warmup_ratio",
    "target_modules",
    "seed",
    "eval_every",
    "early_stopping_patience",
    "early_stopping_min_delta",
    "keep_best",
    "packing",
    "base_quant",
    "gradient_checkpointing",
];

struct Field<'a> {
    errors: &'a mut Vec<FieldError>,
}

impl Field<'_> {
    fn boolean(&mut self, value: Option<&Value>, name: &str, default: bool) -> bool {
        match value {
            None => default,
            Some(Value::Bool(value)) => *value,
            Some(_) => {
                self.errors
                    .push(FieldError::new(name, "must be true or false"));
                default
            }
        }
    }

    fn integer(
        &mut self,
        value: Option<&Value>,
        name: &str,
        default: i64,
        min: i64,
        max: i64,
    ) -> i64 {
        let Some(value) = value else { return default };
        match value.as_i64() {
            Some(n) if (min..=max).contains(&n) => n,
            Some(_) => {
                self.errors.push(FieldError::new(
                    name,
                    format!("must be between {min} and {max}"),
                ));
                default
            }
            None => {
                self.errors
                    .push(FieldError::new(name, "must be a whole number"));
                default
            }
        }
    }

    fn number(
        &mut self,
        value: Option<&Value>,
        name: &str,
        default: f64,
        check: impl Fn(f64) -> Result<(), &'static str>,
    ) -> f64 {
        let Some(value) = value else { return default };
        match value.as_f64() {
            Some(x) => match check(x) {
                Ok(()) => x,
                Err(message) => {
                    self.errors.push(FieldError::new(name, message));
                    default
                }
            },
            None => {
                self.errors.push(FieldError::new(name, "must be a number"));
                default
            }
        }
    }

    fn base_quant(&mut self, value: Option<&Value>) -> BaseQuant {
        let Some(value) = value else {
            return BaseQuant::None;
        };
        match value.as_str().map(str::parse::<BaseQuant>) {
            Some(Ok(quant)) => quant,
            _ => {
                self.errors.push(FieldError::new(
                    "base_quant",
                    format!("unknown {value}; known: {}", BaseQuant::NAMES.join(", ")),
                ));
                BaseQuant::None
            }
        }
    }

    fn target_modules(&mut self, value: Option<&Value>) -> Vec<String> {
        let all = || LORA_TARGET_MODULES.iter().map(|m| m.to_string()).collect();
        let Some(value) = value else { return all() };
        let Some(items) = value.as_array() else {
            self.errors.push(FieldError::new(
                "target_modules",
                "must be an array of module names",
            ));
            return all();
        };
        let mut modules: Vec<String> = Vec::new();
        for item in items {
            match item.as_str() {
                Some(name) if LORA_TARGET_MODULES.contains(&name) => {
                    if !modules.iter().any(|m| m == name) {
                        modules.push(name.to_owned());
                    }
                }
                _ => {
                    self.errors.push(FieldError::new(
                        "target_modules",
                        format!(
                            "unknown module {item}; known: {}",
                            LORA_TARGET_MODULES.join(", ")
                        ),
                    ));
                    return all();
                }
            }
        }
        if modules.is_empty() {
            self.errors.push(FieldError::new(
                "target_modules",
                "must name at least one module",
            ));
            return all();
        }
        modules
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn overrides_win_over_the_preset() {
        let preset = object(json!({"rank": 8, "learning_rate": 0.0001, "epochs": 2}));
        let resolved =
            resolve(&preset, &object(json!({"rank": 32})), &Limits::default()).expect("valid");
        assert_eq!(
            (resolved.rank, resolved.epochs, resolved.lora_alpha),
            (32, 2, 64.0)
        );
        assert_eq!(resolved.target_modules.len(), 7);
    }

    #[test]
    fn every_bad_field_is_named() {
        let overrides = object(json!({
            "rank": 0, "lora_dropout": 1.5, "learning_rate": "fast", "epochs": 2.5,
            "target_modules": ["q_proj", "lm_head"], "colour": "blue", "base_quant": "q3k",
            "gradient_checkpointing": "yes"
        }));
        let errors = resolve(&Map::new(), &overrides, &Limits::default()).expect_err("invalid");
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "colour",
                "rank",
                "lora_dropout",
                "learning_rate",
                "epochs",
                "target_modules",
                "base_quant",
                "gradient_checkpointing"
            ]
        );
        let quant = &errors[errors.len() - 2];
        assert_eq!(quant.message, "unknown \"q3k\"; known: none, q8_0, q4k");
    }

    #[test]
    fn the_base_is_held_as_asked_and_full_precision_by_default() {
        let limits = Limits::default();
        let default = resolve(&Map::new(), &Map::new(), &limits).expect("valid");
        assert_eq!(default.base_quant, BaseQuant::None);
        let quantized =
            resolve(&Map::new(), &object(json!({"base_quant": "q4k"})), &limits).expect("valid");
        assert_eq!(quantized.base_quant, BaseQuant::Q4k);
        let stored: Hyperparameters =
            serde_json::from_value(serde_json::to_value(&quantized).expect("serializes"))
                .expect("reads back");
        assert_eq!(stored.base_quant, BaseQuant::Q4k);
    }

    #[test]
    fn gradient_checkpointing_is_off_unless_asked_for() {
        let limits = Limits::default();
        let default = resolve(&Map::new(), &Map::new(), &limits).expect("valid");
        assert!(!default.gradient_checkpointing);
        // Off, it is left out of what is stored and sent, as jobs stored before it read.
        let stored = serde_json::to_value(&default).expect("serializes");
        assert!(stored.get("gradient_checkpointing").is_none(), "{stored}");
        let asked = object(json!({"gradient_checkpointing": true}));
        let on = resolve(&Map::new(), &asked, &limits).expect("valid");
        assert!(on.gradient_checkpointing);
    }

    #[test]
    fn limits_are_configurable() {
        let limits = Limits {
            max_rank: 64,
            ..Limits::default()
        };
        let errors = resolve(&Map::new(), &object(json!({"rank": 128})), &limits)
            .expect_err("over the limit");
        assert_eq!(
            errors,
            vec![FieldError::new("rank", "must be between 1 and 64")]
        );
    }
}
