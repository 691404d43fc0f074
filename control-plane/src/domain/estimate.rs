//! A job's duration before it runs: the tokens it trains on × epochs ÷ the throughput it
//! will reach. Each part says what it rests on: token counts are estimated from
//! characters (the control plane has no tokenizer), and throughput is measured on earlier
//! runs of the same base model and GPU, or modelled from FLOPs, or (for a model whose size
//! its name does not tell) taken from the preset's duration table.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use protocol::dataset::Conversation;
use serde::{Deserialize, Serialize};

/// How token counts are estimated, shown with every count.
pub const TOKEN_METHOD: &str =
    "estimated as characters / 4 + 4 per message (no tokenizer), each conversation cut at max_seq_len";

/// The sequence lengths a file's truncated token sums are kept for; others interpolate.
pub const TOKEN_CAPS: [i64; 9] = [128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768];

/// A conversation's tokens, estimated: a quarter of its characters, plus the few tokens a
/// chat template adds around each message.
pub fn estimated_tokens(conversation: &Conversation) -> i64 {
    let quarter = |text: &str| (text.chars().count() as i64 + 3) / 4;
    let json_quarter =
        |value: &[serde_json::Value]| serde_json::to_string(value).map_or(0, |text| quarter(&text));
    let messages: i64 = conversation
        .messages
        .iter()
        .map(|m| quarter(&m.content) + m.tool_calls.as_deref().map_or(0, json_quarter) + 4)
        .sum();
    let tools = conversation.tools.as_deref().map_or(0, json_quarter);
    messages + tools + conversation.text.as_deref().map_or(0, quarter)
}

/// A training file's token counts: the total, and the sum with each conversation cut at
/// each of [`TOKEN_CAPS`], which is what training at that `max_seq_len` sees.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenCounts {
    pub total: i64,
    /// Cap (as a string key) → the sum of min(tokens, cap) over conversations.
    pub truncated: BTreeMap<String, i64>,
}

impl TokenCounts {
    pub fn add(&mut self, tokens: i64) {
        self.total += tokens;
        for cap in TOKEN_CAPS {
            *self.truncated.entry(cap.to_string()).or_default() += tokens.min(cap);
        }
    }

    fn at_cap(&self, cap: i64) -> i64 {
        self.truncated
            .get(&cap.to_string())
            .copied()
            .unwrap_or(self.total)
    }

    /// Tokens an epoch trains on at `max_seq_len`: exact at a kept cap, else interpolated
    /// between the caps around it (the sum is piecewise linear and concave in the cap, so
    /// this errs low by less than the gap between neighbours).
    pub fn per_epoch(&self, max_seq_len: i64) -> i64 {
        let max_seq_len = max_seq_len.max(1);
        let mut lower = (0, 0);
        for cap in TOKEN_CAPS {
            let sum = self.at_cap(cap);
            if cap == max_seq_len {
                return sum;
            }
            if cap > max_seq_len {
                let share = (max_seq_len - lower.0) as f64 / (cap - lower.0) as f64;
                return lower.1 + ((sum - lower.1) as f64 * share).round() as i64;
            }
            lower = (cap, sum);
        }
        // Past the largest cap only conversations longer than it gain, up to the total.
        self.total
    }
}

/// A run's duration and cost before it runs, with what they rest on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Estimate {
    /// Tokens one epoch trains on (see `token_method`), the epochs, and their product.
    pub tokens_per_epoch: i64,
    pub epochs: u32,
    pub total_tokens: i64,
    pub token_method: String,
    pub throughput: Throughput,
    pub duration_hours_min: f64,
    pub duration_hours_max: f64,
    /// The GPU's hourly price for the capacity chosen.
    pub hourly_rate: f64,
    pub cost_min: f64,
    pub cost_max: f64,
    pub gpu_model: String,
    pub gpu_type: super::GpuType,
    /// When the queue ahead of it is expected to clear, and when it would then finish.
    pub estimated_start_time: DateTime<Utc>,
    pub completion_earliest: DateTime<Utc>,
    pub completion_latest: DateTime<Utc>,
}

/// What an estimate's throughput rests on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum Throughput {
    /// The median tokens/s of the latest completed attempts of the same base model on the
    /// same GPU model; the range spans their middle half.
    Measured {
        tokens_per_second: f64,
        samples: usize,
        slowest_quartile: f64,
        fastest_quartile: f64,
    },
    /// The GPU's peak FLOP/s × an assumed utilisation ÷ FLOPs per token (4 × parameters:
    /// forward and the backward through the frozen base, 6 × with gradient checkpointing,
    /// whose backward runs the forward again; LoRA's and attention's terms are left out).
    /// The range is half to twice the result.
    Modelled {
        tokens_per_second: f64,
        flops_per_token: f64,
        peak_tflops: f64,
        assumed_utilization: f64,
    },
    /// No measurement, and no size to model from: the preset's duration table, scaled by
    /// conversations and epochs.
    Preset,
}

/// FLOPs a parameter a token with gradient checkpointing: 2 forward, 2 backward (a frozen
/// base: input gradients only), and the forward run again for the backward, which makes
/// only what the backward reads: the q, k, v, gate and up projections, about half the
/// weights' products (Llama-3.2-1B 52%, Qwen2.5-0.5B 47%; no attention, no o or down
/// projection, no head).
const CHECKPOINTED_FLOPS_PER_PARAMETER: f64 = 5.0;

impl Throughput {
    /// From the tokens/s of earlier attempts, newest first; `None` without any.
    pub fn measured(samples: &[f64]) -> Option<Throughput> {
        let mut sorted: Vec<f64> = samples
            .iter()
            .copied()
            .filter(|s| s.is_finite() && *s > 0.0)
            .collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let quantile = |q: f64| {
            let position = q * (sorted.len() - 1) as f64;
            let (low, high) = (position.floor() as usize, position.ceil() as usize);
            sorted[low] + (sorted[high] - sorted[low]) * (position - low as f64)
        };
        Some(Throughput::Measured {
            tokens_per_second: quantile(0.5),
            samples: sorted.len(),
            slowest_quartile: quantile(0.25),
            fastest_quartile: quantile(0.75),
        })
    }

    /// From the base model's size (read from its name) and the GPU's peak, for a run that
    /// does or does not checkpoint; `None` when the size or the peak is unknown.
    pub fn modelled(
        parameters_billions: Option<f64>,
        peak_tflops: Option<f64>,
        assumed_utilization: f64,
        gradient_checkpointing: bool,
    ) -> Option<Throughput> {
        let passes = if gradient_checkpointing {
            CHECKPOINTED_FLOPS_PER_PARAMETER
        } else {
            4.0
        };
        let flops_per_token = passes * parameters_billions? * 1e9;
        let peak_tflops = peak_tflops.filter(|p| *p > 0.0)?;
        Some(Throughput::Modelled {
            tokens_per_second: peak_tflops * 1e12 * assumed_utilization / flops_per_token,
            flops_per_token,
            peak_tflops,
            assumed_utilization,
        })
    }

    /// One line on what the estimate rests on, for events and pages.
    pub fn describe(&self) -> String {
        match self {
            Throughput::Measured {
                tokens_per_second,
                samples,
                ..
            } => format!(
                "measured: {tokens_per_second:.0} tokens/s, the median of {samples} completed run{}",
                if *samples == 1 { "" } else { "s" }
            ),
            Throughput::Modelled {
                tokens_per_second,
                assumed_utilization,
                peak_tflops,
                ..
            } => format!(
                "modelled: {tokens_per_second:.0} tokens/s at an assumed {:.0}% of {peak_tflops:.0} TFLOP/s",
                assumed_utilization * 100.0
            ),
            Throughput::Preset => "from the preset's duration table".to_owned(),
        }
    }

    /// Hours (shortest, longest) to train `tokens`; `None` for [`Throughput::Preset`].
    pub fn hours(&self, tokens: i64) -> Option<(f64, f64)> {
        let hours = |tokens_per_second: f64| tokens as f64 / tokens_per_second.max(1e-9) / 3600.0;
        match self {
            Throughput::Measured {
                tokens_per_second,
                slowest_quartile,
                fastest_quartile,
                ..
            } => {
                // At least ±10% around the median, however alike the samples are.
                let fast = fastest_quartile.max(tokens_per_second * 1.1);
                let slow = slowest_quartile.min(tokens_per_second * 0.9);
                Some((hours(fast), hours(slow)))
            }
            Throughput::Modelled {
                tokens_per_second, ..
            } => Some((
                hours(tokens_per_second * 2.0),
                hours(tokens_per_second * 0.5),
            )),
            Throughput::Preset => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_sums_are_exact_at_caps_and_interpolated_between() {
        let mut counts = TokenCounts::default();
        for tokens in [100, 300, 5000] {
            counts.add(tokens);
        }
        assert_eq!(counts.total, 5400);
        assert_eq!(counts.per_epoch(256), 100 + 256 + 256);
        assert_eq!(counts.per_epoch(512), 100 + 300 + 512);
        // 384 lies halfway between 256 and 512: 612 and 912 average to 762 (exact: 784).
        assert_eq!(counts.per_epoch(384), 762);
        assert_eq!(counts.per_epoch(64), 178);
        assert_eq!(counts.per_epoch(40_000), 5400);
    }

    #[test]
    fn a_conversation_s_tokens_count_its_characters_and_messages() {
        let conversation = Conversation::chat(
            serde_json::from_value(serde_json::json!([
                {"role": "user", "content": "abcdefgh"},
                {"role": "assistant", "content": "abcd"}
            ]))
            .expect("messages"),
        );
        assert_eq!(estimated_tokens(&conversation), 2 + 4 + 1 + 4);
    }

    #[test]
    fn measured_throughput_is_the_median_with_its_middle_half() {
        let Some(Throughput::Measured {
            tokens_per_second,
            samples,
            slowest_quartile,
            fastest_quartile,
        }) = Throughput::measured(&[100.0, 300.0, 200.0, f64::NAN, 400.0, 500.0])
        else {
            panic!("measured");
        };
        assert_eq!((tokens_per_second, samples), (300.0, 5));
        assert_eq!((slowest_quartile, fastest_quartile), (200.0, 400.0));
        assert_eq!(Throughput::measured(&[]), None);
        let (short, long) = Throughput::measured(&[1000.0])
            .expect("one sample")
            .hours(3_600_000)
            .expect("hours");
        assert!((short - 1.0 / 1.1).abs() < 1e-9 && (long - 1.0 / 0.9).abs() < 1e-9);
    }

    #[test]
    fn modelled_throughput_needs_a_size_and_a_peak() {
        let Some(Throughput::Modelled {
            tokens_per_second, ..
        }) = Throughput::modelled(Some(1.0), Some(1000.0), 0.1, false)
        else {
            panic!("modelled");
        };
        assert!((tokens_per_second - 25_000.0).abs() < 1e-6);
        // Checkpointing runs half the forward again: 5 FLOPs a parameter, not 4.
        let Some(Throughput::Modelled {
            tokens_per_second, ..
        }) = Throughput::modelled(Some(1.0), Some(1000.0), 0.1, true)
        else {
            panic!("modelled");
        };
        assert!((tokens_per_second - 25_000.0 * 4.0 / 5.0).abs() < 1e-6);
        assert_eq!(Throughput::modelled(None, Some(1000.0), 0.1, false), None);
        assert_eq!(Throughput::modelled(Some(1.0), None, 0.1, false), None);
    }
}
