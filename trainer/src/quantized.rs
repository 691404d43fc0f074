//! Frozen base weights held in GGUF block formats (QLoRA-style training on a quantized
//! base): `--base-quant q4k|q8_0|none`.
//!
//! A quantized weight is kept as row tiles, each a candle `QTensor` of at most
//! [`TILE_WEIGHTS`] weights. The frozen-linear products dequantize one tile at a time, in
//! the forward (`x·Wᵀ`, a column block of the output per tile) and in the backward (`g·W`,
//! summed over tiles), so the full-precision weight is never held: at most one tile of it
//! (16 MiB in f32) is alive. LoRA weights and the optimizer stay f32; only the frozen
//! projections of the decoder layers are quantized, as in QLoRA (embeddings, norms and
//! the language model head stay in the base dtype).

use std::fmt;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

/// Weights per dequantized tile: bounds the transient full-precision memory of a product
/// (16 MiB in f32) while keeping each tile's matmul large enough to run at speed.
pub const TILE_WEIGHTS: usize = 1 << 22;

/// How the frozen projections are held: the job's setting, one definition with the wire.
pub use protocol::agent::BaseQuant;

/// The block format for a projection with `in_features` inputs under `quant`: its own, a
/// fallback when its blocks do not tile a row, or `None` (kept in the base dtype).
pub fn block_format(quant: BaseQuant, in_features: usize) -> Option<GgmlDType> {
    let candidates: &[GgmlDType] = match quant {
        BaseQuant::None => &[],
        BaseQuant::Q8_0 => &[GgmlDType::Q8_0],
        BaseQuant::Q4k => &[GgmlDType::Q4K, GgmlDType::Q5_0],
    };
    candidates
        .iter()
        .copied()
        .find(|format| in_features.is_multiple_of(format.block_size()))
}

/// A frozen (out, in) weight as row tiles in one block format.
#[derive(Clone)]
pub struct QuantizedWeight {
    /// Each tile's first output row and its blocks, (rows, in).
    tiles: Arc<[(usize, QTensor)]>,
    out_features: usize,
    in_features: usize,
    format: GgmlDType,
    device: Device,
}

impl QuantizedWeight {
    /// Quantizes `weight` (out, in) into `format` on `device`, a tile at a time. The
    /// blocks are computed on the CPU (candle quantizes there on every backend).
    pub fn new(weight: &Tensor, format: GgmlDType, device: &Device) -> Result<QuantizedWeight> {
        let (out_features, in_features) = weight.dims2()?;
        let rows_per_tile = (TILE_WEIGHTS / in_features.max(1)).clamp(1, out_features.max(1));
        Self::tiled(weight, format, device, rows_per_tile)
    }

    /// As [`QuantizedWeight::new`] with `rows_per_tile` output rows a tile.
    pub fn tiled(
        weight: &Tensor,
        format: GgmlDType,
        device: &Device,
        rows_per_tile: usize,
    ) -> Result<QuantizedWeight> {
        let (out_features, in_features) = weight.dims2()?;
        if !in_features.is_multiple_of(format.block_size()) || rows_per_tile == 0 {
            candle_core::bail!(
                "cannot quantize a weight of {in_features} inputs to {} (blocks of {})",
                format_name(format),
                format.block_size()
            );
        }
        let weight = weight.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let tiles = (0..out_features)
            .step_by(rows_per_tile)
            .map(|first| {
                let rows = rows_per_tile.min(out_features - first);
                // A storage of its own: candle's quantizer reads the whole storage of its
                // source, whatever the view's offset.
                let values = weight
                    .narrow(0, first, rows)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let tile = Tensor::from_vec(values, (rows, in_features), &Device::Cpu)?;
                Ok((first, QTensor::quantize_onto(&tile, format, device)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(QuantizedWeight {
            tiles: tiles.into(),
            out_features,
            in_features,
            format,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> Device {
        self.device.clone()
    }

    pub fn format(&self) -> GgmlDType {
        self.format
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    /// Bytes the blocks take on the device.
    pub fn bytes(&self) -> usize {
        self.tiles
            .iter()
            .map(|(_, tile)| tile.storage_size_in_bytes())
            .sum()
    }

    /// The tiles in order: each one's first output row, and its weights dequantized to
    /// `dtype`, computed when the iterator reaches it.
    pub fn dequantized_tiles(
        &self,
        dtype: DType,
    ) -> impl Iterator<Item = Result<(usize, Tensor)>> + '_ {
        self.tiles.iter().map(move |(first, tile)| {
            let weights = tile.dequantize(&self.device)?.to_dtype(dtype)?;
            Ok((*first, weights))
        })
    }

    /// The whole weight dequantized: for tests and checks only, never in training.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        let tiles = self
            .dequantized_tiles(dtype)
            .map(|tile| tile.map(|(_, weights)| weights))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&tiles, 0)
    }
}

impl fmt::Debug for QuantizedWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "QuantizedWeight({}×{} {:?} in {} tiles)",
            self.out_features,
            self.in_features,
            self.format,
            self.tiles.len()
        )
    }
}

/// What quantizing the base did: formats used, and bytes before and after.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QuantizationReport {
    pub base_quant: BaseQuant,
    /// Projections quantized, by format name (`q4k`, `q5_0`, `q8_0`).
    pub projections: std::collections::BTreeMap<String, usize>,
    /// Projections kept in the base dtype (input width not a multiple of any block).
    pub dense_projections: usize,
    /// The projections' bytes in the base dtype, and as held.
    pub dense_bytes: u64,
    pub held_bytes: u64,
}

impl QuantizationReport {
    /// One line for logs and events.
    pub fn message(&self) -> String {
        let formats = self
            .projections
            .iter()
            .map(|(format, count)| format!("{count} in {format}"))
            .collect::<Vec<_>>()
            .join(", ");
        let dense = if self.dense_projections > 0 {
            format!(", {} kept dense", self.dense_projections)
        } else {
            String::new()
        };
        format!(
            "Base weights quantized to {} ({formats}{dense}): projections take {} instead of {}",
            self.base_quant,
            human_bytes(self.held_bytes),
            human_bytes(self.dense_bytes),
        )
    }
}

fn human_bytes(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if bytes as f64 >= 1024.0 * MIB {
        format!("{:.2} GiB", bytes as f64 / (1024.0 * MIB))
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB)
    }
}

/// The name of a block format as llama.cpp spells it in lower case.
pub fn format_name(format: GgmlDType) -> String {
    format!("{format:?}").to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for name in BaseQuant::NAMES {
            let quant: BaseQuant = name.parse().expect("known name");
            assert_eq!(quant.to_string(), name);
            let json = serde_json::to_string(&quant).expect("serializes");
            assert_eq!(json, format!("\"{name}\""));
        }
        let error = "q3k".parse::<BaseQuant>().expect_err("unknown");
        assert!(error.contains("none, q8_0, q4k"), "{error}");
    }

    #[test]
    fn q4k_falls_back_to_q5_0_where_super_blocks_do_not_tile_a_row() {
        assert_eq!(block_format(BaseQuant::Q4k, 512), Some(GgmlDType::Q4K));
        assert_eq!(block_format(BaseQuant::Q4k, 896), Some(GgmlDType::Q5_0));
        assert_eq!(block_format(BaseQuant::Q4k, 100), None);
        assert_eq!(block_format(BaseQuant::Q8_0, 96), Some(GgmlDType::Q8_0));
        assert_eq!(block_format(BaseQuant::None, 512), None);
    }

    /// The sizes the scheduler's estimate assumes are candle's blocks: 144 bytes per 256
    /// weights, 34 per 32.
    #[test]
    fn the_wire_sizes_are_the_block_formats_sizes() {
        for quant in [BaseQuant::Q8_0, BaseQuant::Q4k] {
            let format = block_format(quant, 256).expect("a block format");
            assert_eq!(
                quant.bytes_per_weight(),
                Some(format.type_size() as f64 / format.block_size() as f64),
                "{quant}"
            );
        }
        assert_eq!(BaseQuant::None.bytes_per_weight(), None);
    }

    #[test]
    fn tiles_dequantize_back_to_the_weight_within_the_format_error() -> Result<()> {
        let device = Device::Cpu;
        // Several tiles: 40 rows of 2^17 weights with tiles of 32 rows.
        let weight = Tensor::randn(0f32, 0.02, (40, 1 << 17), &device)?;
        for (format, tolerance) in [(GgmlDType::Q8_0, 0.01), (GgmlDType::Q4K, 0.1)] {
            let quantized = QuantizedWeight::new(&weight, format, &device)?;
            assert_eq!(quantized.tiles.len(), 2);
            let back = quantized.dequantize(DType::F32)?;
            let relative = ((&back - &weight)?.sqr()?.sum_all()?.to_scalar::<f32>()?
                / weight.sqr()?.sum_all()?.to_scalar::<f32>()?)
            .sqrt();
            assert!(
                relative < tolerance,
                "{format:?}: relative error {relative}"
            );
            assert!(quantized.bytes() < weight.elem_count() * 4 / 3);
        }
        Ok(())
    }
}
