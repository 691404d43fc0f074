//! The KV cache of generation.
//!
//! Each layer's keys and values live in buffers with room to spare (the capacity doubles
//! when full), so a step writes only its own keys and values, and the attention
//! ([`super::composed_attention`]) reads the filled part in place. Concatenating the cache
//! with each step's keys, transposing them into a copy and repeating them for
//! grouped-query heads had copied the whole cache three times a step: 42% of a batch of
//! replies' time on the CPU, more than the products.

use candle_core::{Result, Tensor};

/// Keys and values of the positions seen so far, per layer, for the rows generated
/// together. A row's prompt may be right-aligned: its first `padding[row]` positions are
/// then padding that no query sees. Its positions still count from the batch's first:
/// rotary embeddings make a score depend only on how far a key is from its query.
#[derive(Default)]
pub struct KvCache {
    pub(super) layers: Vec<Option<LayerCache>>,
    pub(super) position: usize,
    pub(super) padding: Vec<usize>,
}

impl KvCache {
    /// A cache for rows whose prompts are left-padded by `padding[row]` tokens.
    pub fn left_padded(padding: Vec<usize>) -> KvCache {
        KvCache {
            padding,
            ..KvCache::default()
        }
    }
}

/// One layer's keys and values: (batch, kv_heads, capacity, head_dim) buffers whose first
/// `len` positions are filled.
#[derive(Clone)]
pub(super) struct LayerCache {
    pub(super) k: Tensor,
    pub(super) v: Tensor,
    len: usize,
}

impl LayerCache {
    /// Appends `k` and `v` (batch, kv_heads, new, head_dim) to `slot` and returns every
    /// key and value so far, as views of its buffers. Kept detached: no backward runs
    /// through generation, and a graph would hold every step's activations.
    pub(super) fn append(
        slot: &mut Option<LayerCache>,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (k, v) = (k.detach().contiguous()?, v.detach().contiguous()?);
        let len = slot.as_ref().map_or(0, |cache| cache.len);
        let filled = len + k.dim(2)?;
        let cache = match slot.take() {
            Some(cache) if cache.k.dim(2)? >= filled => cache,
            old => {
                // Room for as many again: appending stays a copy of the step alone.
                let capacity = filled.next_power_of_two();
                let grown = |old: Option<&Tensor>, like: &Tensor| -> Result<Tensor> {
                    let (batch, heads, _, dim) = like.dims4()?;
                    let buffer =
                        Tensor::zeros((batch, heads, capacity, dim), like.dtype(), like.device())?;
                    if let Some(old) = old.filter(|_| len > 0) {
                        buffer.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                    }
                    Ok(buffer)
                };
                LayerCache {
                    k: grown(old.as_ref().map(|cache| &cache.k), &k)?,
                    v: grown(old.as_ref().map(|cache| &cache.v), &v)?,
                    len,
                }
            }
        };
        cache.k.slice_set(&k, 2, len)?;
        cache.v.slice_set(&v, 2, len)?;
        let filled_k = cache.k.narrow(2, 0, filled)?;
        let filled_v = cache.v.narrow(2, 0, filled)?;
        *slot = Some(LayerCache {
            len: filled,
            ..cache
        });
        Ok((filled_k, filled_v))
    }
}
