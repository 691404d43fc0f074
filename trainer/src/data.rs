//! Training data: chat datasets read with the platform's one parser
//! ([`protocol::dataset`]), rendered with the model's chat template, tokenized, and masked
//! so that the loss counts assistant tokens only.

use std::path::Path;

use candle_core::{Device, Tensor};
use protocol::dataset::{self, Conversation, DatasetError, Limits};
use tokenizers::Tokenizer;
use trainer_kernels::Segments;

use crate::chat::{ChatTemplate, DataField};
use crate::error::{Result, TrainerError};
use crate::rng::Rng;

/// The model's tokenizer and chat template: turns a conversation into token ids.
pub struct TextEncoder {
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
}

/// One conversation, ready for training: position t of `input_ids` predicts `targets[t]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub targets: Vec<u32>,
    /// 1.0 where the target is an assistant token.
    pub loss_mask: Vec<f32>,
}

impl Example {
    pub fn loss_tokens(&self) -> usize {
        self.loss_mask.iter().filter(|m| **m > 0.0).count()
    }
}

/// A conversation as the model reads it.
pub struct Encoded {
    pub ids: Vec<u32>,
    /// Whether the loss counts each token.
    pub trained: Vec<bool>,
    /// Fields of the data the chat template does not render.
    pub ignored: Vec<DataField>,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct PreparedData {
    pub examples: Vec<Example>,
    /// Conversations cut to `max_seq_len` tokens.
    pub truncated: usize,
    /// Conversations left with no assistant token to learn from after truncation.
    pub dropped: usize,
    /// Fields of the data the chat template does not render, with how many conversations
    /// use each.
    pub ignored: std::collections::BTreeMap<DataField, usize>,
}

impl TextEncoder {
    pub fn from_model_dir(dir: &Path) -> Result<TextEncoder> {
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| TrainerError::Config {
            path: path.display().to_string(),
            message: format!("cannot load the tokenizer: {e}"),
        })?;
        Ok(TextEncoder {
            tokenizer,
            template: ChatTemplate::from_model_dir(dir)?,
        })
    }

    /// Token ids of `text` as the template wrote it: no special tokens are added beyond
    /// those in the text (as `apply_chat_template` tokenizes).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| TrainerError::Invalid(format!("tokenization failed: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The conversation's token ids, for each whether the loss counts it (the trained
    /// assistant turns of a chat, every token of a text record), and the fields of the
    /// data the model's template leaves out of its text.
    pub fn encode_conversation(&self, conversation: &Conversation) -> Result<Encoded> {
        if let Some(text) = &conversation.text {
            let ids = self.encode_text(&self.template.wrap_text(text))?;
            let trained = vec![true; ids.len()];
            return Ok(Encoded {
                ids,
                trained,
                ignored: Vec::new(),
            });
        }
        let (messages, tools) = (&conversation.messages, conversation.tools.as_deref());
        let (text, spans) = self.template.render_with_assistant_spans(messages, tools)?;
        let uses_extras = tools.is_some()
            || messages.iter().any(|m| {
                m.name.is_some()
                    || m.tool_calls.is_some()
                    || m.role == protocol::dataset::Role::Tool
            });
        let ignored = if uses_extras {
            self.template.ignored_fields(messages, tools, &text)?
        } else {
            Vec::new()
        };
        let encoding = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| TrainerError::Invalid(format!("tokenization failed: {e}")))?;
        let trained = encoding
            .get_offsets()
            .iter()
            .map(|(start, end)| {
                spans
                    .iter()
                    .any(|span| *start >= span.start && *start < span.end && end > start)
            })
            .collect();
        Ok(Encoded {
            ids: encoding.get_ids().to_vec(),
            trained,
            ignored,
        })
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| TrainerError::Invalid(format!("decoding failed: {e}")))
    }
}

/// Shifts a token sequence into an example, cut to `max_seq_len` tokens when given.
/// Returns the example and whether it was cut.
pub fn to_example(ids: &[u32], assistant: &[bool], max_seq_len: Option<usize>) -> (Example, bool) {
    let length = max_seq_len.map_or(ids.len(), |max| ids.len().min(max));
    let truncated = length < ids.len();
    let (ids, assistant) = (&ids[..length], &assistant[..length]);
    let example = Example {
        input_ids: ids[..length.saturating_sub(1)].to_vec(),
        targets: ids.get(1..).unwrap_or_default().to_vec(),
        loss_mask: assistant
            .iter()
            .skip(1)
            .map(|a| if *a { 1.0 } else { 0.0 })
            .collect(),
    };
    (example, truncated)
}

/// Reads, renders and tokenizes a dataset file. A bad record fails the whole load with
/// the parser's message naming its line.
pub fn load_examples(
    path: &Path,
    encoder: &TextEncoder,
    max_seq_len: Option<usize>,
) -> Result<PreparedData> {
    let file = std::fs::File::open(path).map_err(|source| TrainerError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let dataset_error = |error: DatasetError| TrainerError::Dataset {
        path: path.display().to_string(),
        message: error.to_string(),
    };
    let (_, records) = dataset::open(file, Limits::default()).map_err(dataset_error)?;
    let mut prepared = PreparedData::default();
    for record in records {
        let record = record.map_err(dataset_error)?;
        let at_line = |message: String| TrainerError::Dataset {
            path: path.display().to_string(),
            message: format!("line {}: {message}", record.line),
        };
        let encoded = encoder
            .encode_conversation(&record.conversation)
            .map_err(|e| at_line(e.to_string()))?;
        for field in encoded.ignored {
            if field.is_essential() {
                return Err(at_line(format!(
                    "the model's chat template does not render {}, so they cannot be trained \
                     on; use a model whose template supports tools",
                    field.as_str()
                )));
            }
            *prepared.ignored.entry(field).or_default() += 1;
        }
        let (example, truncated) = to_example(&encoded.ids, &encoded.trained, max_seq_len);
        prepared.truncated += usize::from(truncated);
        if example.loss_tokens() == 0 {
            prepared.dropped += 1;
            continue;
        }
        prepared.examples.push(example);
    }
    if prepared.examples.is_empty() {
        return Err(TrainerError::Dataset {
            path: path.display().to_string(),
            message: "no conversation has an assistant token to train on".into(),
        });
    }
    Ok(prepared)
}

/// Splits off a validation set: a seeded, shuffled `fraction` of the examples (at least
/// one when there are two or more). Returns (train, validation), each in input order.
pub fn split_validation<T>(examples: Vec<T>, fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    if fraction <= 0.0 || examples.len() < 2 {
        return (examples, Vec::new());
    }
    let mut order: Vec<usize> = (0..examples.len()).collect();
    Rng::new(seed ^ 0x005E_ED0F_5A11).shuffle(&mut order);
    let validation_count =
        ((examples.len() as f64 * fraction).round() as usize).clamp(1, examples.len() - 1);
    let mut is_validation = vec![false; examples.len()];
    for index in &order[..validation_count] {
        is_validation[*index] = true;
    }
    let (validation, train): (Vec<_>, Vec<_>) = examples
        .into_iter()
        .zip(is_validation)
        .partition(|(_, validation)| *validation);
    (
        train.into_iter().map(|(e, _)| e).collect(),
        validation.into_iter().map(|(e, _)| e).collect(),
    )
}

/// The order examples are visited in during `epoch`: a permutation fixed by the seed and
/// the epoch, so a resumed run can rebuild it from (seed, epoch) alone.
pub fn epoch_order(count: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..count).collect();
    Rng::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch as u64).shuffle(&mut order);
    order
}

/// The rows of one epoch, in the order steps take them: each row the indices of the
/// examples it holds. Unpacked, one example per row in [`epoch_order`]. Packed, the
/// examples go into rows of `capacity` tokens by first-fit decreasing (longest first,
/// equal lengths in the epoch's seeded order), and the rows are then shuffled by the seed
/// and epoch. Either way the plan is a function of (seed, epoch, data), so a resumed run
/// rebuilds it; and the number of rows is the same every epoch (first fit sees the same
/// lengths in the same order, ties aside).
pub fn epoch_rows(
    lengths: &[usize],
    packing: Option<usize>,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<usize>> {
    let order = epoch_order(lengths.len(), seed, epoch);
    let Some(capacity) = packing else {
        return order.into_iter().map(|index| vec![index]).collect();
    };
    let mut longest_first = order;
    longest_first.sort_by_key(|index| std::cmp::Reverse(lengths[*index]));
    let mut rows = first_fit(&longest_first, lengths, capacity);
    Rng::new(seed.wrapping_mul(0xA24B_AED4_963E_E407) ^ epoch as u64).shuffle(&mut rows);
    rows
}

/// First fit: each item into the first row with room for it, a new row when none has.
/// A max-tree over the rows' free space finds that row in O(log n); rows not yet opened
/// count as wholly free, so the first of them is the new row when no open one fits.
fn first_fit(items: &[usize], lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let leaves = items.len().next_power_of_two().max(1);
    let mut free = vec![capacity; 2 * leaves];
    let mut rows: Vec<Vec<usize>> = Vec::new();
    for &item in items {
        let need = lengths[item].min(capacity);
        let mut node = 1;
        while node < leaves {
            node = if free[2 * node] >= need {
                2 * node
            } else {
                2 * node + 1
            };
        }
        let row = node - leaves;
        if row == rows.len() {
            rows.push(Vec::new());
        }
        rows[row].push(item);
        free[node] -= need;
        while node > 1 {
            node /= 2;
            free[node] = free[2 * node].max(free[2 * node + 1]);
        }
    }
    rows
}

/// A padded batch on a device.
pub struct Batch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    /// Each row's sequences, on the host (the model's attention reads these, so it never
    /// reads the mask back from the device).
    pub segments: Segments,
    pub targets: Tensor,
    pub loss_mask: Tensor,
    /// Real (unpadded) tokens in the batch.
    pub tokens: usize,
    /// Token slots the batch computes: rows × the longest row.
    pub slots: usize,
    /// Tokens the loss counts.
    pub loss_tokens: usize,
}

/// One example per row, padded on the right to the longest.
pub fn make_batch(
    examples: &[&Example],
    pad_id: u32,
    device: &Device,
) -> candle_core::Result<Batch> {
    let rows: Vec<Vec<&Example>> = examples.iter().map(|example| vec![*example]).collect();
    make_packed_batch(&rows, pad_id, device)
}

/// Rows of examples placed back to back, each example its own sequence (positions from
/// 0, attending only within itself, its own loss mask), padded on the right to the
/// longest row.
pub fn make_packed_batch(
    rows: &[Vec<&Example>],
    pad_id: u32,
    device: &Device,
) -> candle_core::Result<Batch> {
    let row_length = |row: &Vec<&Example>| row.iter().map(|e| e.input_ids.len()).sum::<usize>();
    let length = rows.iter().map(row_length).max().unwrap_or(0).max(1);
    let capacity = rows.len() * length;
    let mut input_ids = Vec::with_capacity(capacity);
    let mut attention_mask = Vec::with_capacity(capacity);
    let mut targets = Vec::with_capacity(capacity);
    let mut loss_mask = Vec::with_capacity(capacity);
    for row in rows {
        for example in row {
            input_ids.extend_from_slice(&example.input_ids);
            targets.extend_from_slice(&example.targets);
            loss_mask.extend_from_slice(&example.loss_mask);
        }
        let (real, padding) = (row_length(row), length - row_length(row));
        input_ids.extend(std::iter::repeat_n(pad_id, padding));
        targets.extend(std::iter::repeat_n(pad_id, padding));
        loss_mask.extend(std::iter::repeat_n(0.0, padding));
        attention_mask
            .extend(std::iter::repeat_n(1u32, real).chain(std::iter::repeat_n(0, padding)));
    }
    let shape = (rows.len(), length);
    let examples = || rows.iter().flatten();
    Ok(Batch {
        input_ids: Tensor::from_vec(input_ids, shape, device)?,
        attention_mask: Tensor::from_vec(attention_mask, shape, device)?,
        segments: Segments::packed(
            rows.iter()
                .map(|row| row.iter().map(|e| e.input_ids.len()).collect())
                .collect(),
        ),
        targets: Tensor::from_vec(targets, shape, device)?,
        loss_mask: Tensor::from_vec(loss_mask, shape, device)?,
        tokens: examples().map(|e| e.input_ids.len()).sum(),
        slots: capacity,
        loss_tokens: examples().map(|e| e.loss_tokens()).sum(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_shift_and_truncate() {
        let (example, truncated) =
            to_example(&[1, 2, 3, 4, 5], &[false, false, true, true, true], Some(4));
        assert!(truncated);
        assert_eq!(example.input_ids, [1, 2, 3]);
        assert_eq!(example.targets, [2, 3, 4]);
        assert_eq!(example.loss_mask, [0.0, 1.0, 1.0]);
    }

    #[test]
    fn validation_split_is_seeded_and_disjoint() {
        let examples: Vec<Example> = (0..20)
            .map(|i| Example {
                input_ids: vec![i],
                targets: vec![i],
                loss_mask: vec![1.0],
            })
            .collect();
        let (train, validation) = split_validation(examples.clone(), 0.1, 42);
        assert_eq!((train.len(), validation.len()), (18, 2));
        assert_eq!(
            split_validation(examples, 0.1, 42).1,
            validation,
            "same seed, same split"
        );
        assert!(validation.iter().all(|v| !train.contains(v)));
        assert_ne!(epoch_order(20, 42, 0), epoch_order(20, 42, 1));
        assert_eq!(epoch_order(20, 42, 3), epoch_order(20, 42, 3));
    }

    #[test]
    fn packing_places_every_example_once_by_first_fit_decreasing() {
        let mut rng = Rng::new(5);
        let lengths: Vec<usize> = (0..300).map(|_| rng.uniform(1.0, 100.0) as usize).collect();
        let rows = epoch_rows(&lengths, Some(100), 7, 0);
        let mut placed: Vec<usize> = rows.iter().flatten().copied().collect();
        placed.sort_unstable();
        assert_eq!(
            placed,
            (0..300).collect::<Vec<_>>(),
            "each example exactly once"
        );
        let filled: Vec<usize> = rows
            .iter()
            .map(|row| row.iter().map(|i| lengths[*i]).sum())
            .collect();
        assert!(filled.iter().all(|f| *f <= 100), "{filled:?}");
        // First-fit decreasing needs at most 11/9 of the optimum (+ 6/9) rows.
        let lower_bound = lengths.iter().sum::<usize>().div_ceil(100);
        assert!(
            rows.len() * 9 <= lower_bound * 11 + 6,
            "{} rows for {lower_bound}",
            rows.len()
        );
        // A function of (seed, epoch, data): the same again, shuffled otherwise next epoch,
        // with as many rows.
        assert_eq!(epoch_rows(&lengths, Some(100), 7, 0), rows);
        let next = epoch_rows(&lengths, Some(100), 7, 1);
        assert_ne!(next, rows);
        assert_eq!(next.len(), rows.len());
        // Unpacked, the rows are the epoch's order.
        let unpacked: Vec<usize> = epoch_rows(&lengths, None, 7, 0)
            .into_iter()
            .flatten()
            .collect();
        assert_eq!(unpacked, epoch_order(300, 7, 0));
    }

    #[test]
    fn a_packed_batch_keeps_each_example_its_own_sequence() -> candle_core::Result<()> {
        let example = |ids: &[u32], mask: &[f32]| Example {
            input_ids: ids.to_vec(),
            targets: ids.iter().map(|i| i + 100).collect(),
            loss_mask: mask.to_vec(),
        };
        let (a, b, c) = (
            example(&[1, 2, 3], &[0.0, 1.0, 1.0]),
            example(&[4, 5], &[1.0, 0.0]),
            example(&[6], &[1.0]),
        );
        let batch = make_packed_batch(&[vec![&a, &b], vec![&c]], 0, &Device::Cpu)?;
        assert_eq!(
            batch.input_ids.to_vec2::<u32>()?,
            [[1, 2, 3, 4, 5], [6, 0, 0, 0, 0]]
        );
        assert_eq!(
            batch.targets.to_vec2::<u32>()?,
            [[101, 102, 103, 104, 105], [106, 0, 0, 0, 0]]
        );
        assert_eq!(
            batch.loss_mask.to_vec2::<f32>()?,
            [[0.0, 1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]]
        );
        assert_eq!(batch.segments, Segments::packed(vec![vec![3, 2], vec![1]]));
        assert_eq!((batch.tokens, batch.slots, batch.loss_tokens), (6, 10, 4));
        Ok(())
    }
}
