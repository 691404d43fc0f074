//! Llama-family decoder (Llama 2/3, TinyLlama, SmolLM, Mistral, Qwen2) with LoRA adapters,
//! in the candle-transformers style: weights named as in the checkpoint through
//! `VarBuilder::pp`, `fn new(cfg, vb)`, `forward`.
//!
//! Every operation here has a working backward pass: RMSNorm, softmax and rotary
//! embeddings are written out from differentiable primitives (candle's fused versions
//! drop gradients), and frozen weights enter through [`crate::frozen`].

use std::collections::BTreeMap;

use candle_core::{DType, Device, Result, Tensor, Var, D};
use candle_nn::VarBuilder;

use crate::config::{ModelConfig, RopeScaling};
use crate::frozen::{self, FrozenWeight};
use crate::lora::{LoraAdapter, LoraConfig};
use crate::quantized::{BaseQuant, QuantizationReport, QuantizedWeight};
use crate::rng::{DropoutKey, Rng};
pub use trainer_kernels::Segments;

mod block;
mod cache;

pub use cache::KvCache;

/// The dtype that sums, softmaxes and losses run in for tensors of `dtype`: f64 for f64,
/// else f32 (bf16 and f16 lose too much there).
fn wide_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Added to the attention scores of masked positions: far below any real score, yet finite
/// so that no row of the softmax becomes NaN.
const MASKED: f64 = -1e9;

/// What building the layers needs besides their weights: the adapters to add, and how to
/// hold the frozen projections. Collects what quantization did.
struct Build<'a> {
    lora: &'a LoraConfig,
    lora_dtype: DType,
    base_quant: BaseQuant,
    rng: &'a mut Rng,
    report: QuantizationReport,
}

/// A frozen projection, with its LoRA adapter when the module is targeted.
#[derive(Clone)]
struct Projection {
    weight: FrozenWeight,
    bias: Option<Tensor>,
    lora: Option<LoraAdapter>,
}

impl Projection {
    fn new(
        vb: &VarBuilder,
        name: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
        build: &mut Build,
    ) -> Result<Projection> {
        let vb = vb.pp(name);
        let shape = (out_features, in_features);
        let weight = match crate::quantized::block_format(build.base_quant, in_features) {
            // Read in f32 on the host and quantized tile by tile onto the device: the
            // full-precision weight never reaches the device.
            Some(format) => {
                let host = vb.clone().set_device(Device::Cpu).set_dtype(DType::F32);
                let weight =
                    QuantizedWeight::new(&host.get(shape, "weight")?, format, vb.device())?;
                *build
                    .report
                    .projections
                    .entry(crate::quantized::format_name(format))
                    .or_default() += 1;
                build.report.held_bytes += weight.bytes() as u64;
                FrozenWeight::Quantized(weight)
            }
            None => {
                if !build.base_quant.is_none() {
                    build.report.dense_projections += 1;
                }
                let weight = vb.get(shape, "weight")?;
                build.report.held_bytes +=
                    (weight.elem_count() * weight.dtype().size_in_bytes()) as u64;
                FrozenWeight::Dense(weight)
            }
        };
        build.report.dense_bytes +=
            (out_features * in_features * vb.dtype().size_in_bytes()) as u64;
        let bias = if bias {
            Some(vb.get(out_features, "bias")?)
        } else {
            None
        };
        let lora = if build.lora.targets(name) {
            Some(LoraAdapter::new(
                &vb.prefix(),
                (in_features, out_features),
                build.lora,
                build.lora_dtype,
                vb.device(),
                build.rng,
            )?)
        } else {
            None
        };
        Ok(Projection { weight, bias, lora })
    }

    fn forward(&self, x: &Tensor, dropout: Option<DropoutKey>) -> Result<Tensor> {
        let y = match &self.lora {
            Some(lora) => lora.project(x, &self.weight, dropout)?,
            None => frozen::frozen_linear(x, &self.weight)?,
        };
        match &self.bias {
            Some(bias) => frozen::shift(&y, bias),
            None => Ok(y),
        }
    }
}

/// Whether `x` takes the fused RMSNorm, SwiGLU and rotary ops of `trainer-kernels` (the
/// CPU in f32 or f64, CUDA in f32 or bf16). Elsewhere those ops are composed.
fn fused_on(x: &Tensor) -> bool {
    trainer_kernels::fused_ops_run(x.device(), x.dtype())
}

/// `x / sqrt(mean(x²) + eps) · weight`, normalised in f32 or wider.
#[derive(Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(vb: VarBuilder, size: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if fused_on(x) {
            return trainer_kernels::rms_norm(x, &self.weight, self.eps);
        }
        let dtype = x.dtype();
        let wide = wide_dtype(dtype);
        let x = x.to_dtype(wide)?;
        let rms = x
            .sqr()?
            .mean_keepdim(D::Minus1)?
            .affine(1.0, self.eps)?
            .sqrt()?;
        let normed = x.broadcast_div(&rms)?.to_dtype(dtype)?;
        frozen::scale(&normed, &self.weight)
    }
}

/// Rotary position embedding tables for positions `offset..offset + len`: (len, dim),
/// or (batch, len, dim) when each row has its own positions (packed rows).
#[derive(Clone)]
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

/// The tables for positions `0..n` in the dtype and on the device last asked for, shared by
/// a model's clones: each forward reads its positions' rows as views instead of computing
/// L·D sines and cosines on the host again (about 1% of a CPU training step at seq 1,024,
/// on the step's thread while the pool's other worker waited; on a GPU, an upload per step
/// too).
#[derive(Clone, Default)]
struct RotaryCache(std::sync::Arc<std::sync::Mutex<Option<Rotary>>>);

impl RotaryCache {
    /// The tables for positions `offset..offset + len`. Computed again when the cache holds
    /// too few positions or another dtype or device, up to the next multiple of 256: a
    /// reply asks for one more position at a time.
    fn tables(
        &self,
        config: &ModelConfig,
        (offset, len): (usize, usize),
        dtype: DType,
        device: &Device,
    ) -> Result<Rotary> {
        let mut cached = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("the rotary tables' lock is poisoned".into()))?;
        let fits = |tables: &Rotary| {
            tables.cos.dtype() == dtype
                && tables.cos.device().same_device(device)
                && tables.cos.dim(0).is_ok_and(|n| n >= offset + len)
        };
        let tables = match cached.as_ref().filter(|tables| fits(tables)) {
            Some(tables) => tables,
            None => {
                let positions = (offset + len).next_multiple_of(256);
                cached.insert(Rotary::new(config, positions, dtype, device)?)
            }
        };
        Ok(Rotary {
            cos: tables.cos.narrow(0, offset, len)?,
            sin: tables.sin.narrow(0, offset, len)?,
        })
    }
}

impl Rotary {
    /// The tables for positions `0..len`.
    fn new(config: &ModelConfig, len: usize, dtype: DType, device: &Device) -> Result<Rotary> {
        let dim = config.head_dim;
        let mut inverse_frequencies: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / config.rope_theta.powf((2 * i) as f64 / dim as f64))
            .collect();
        let mut position_scale = 1.0;
        match config.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => position_scale = 1.0 / factor,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let low_wavelength = original_max_position_embeddings / low_freq_factor;
                let high_wavelength = original_max_position_embeddings / high_freq_factor;
                for frequency in &mut inverse_frequencies {
                    let wavelength = 2.0 * std::f64::consts::PI / *frequency;
                    if wavelength > low_wavelength {
                        *frequency /= factor;
                    } else if wavelength >= high_wavelength {
                        let smooth = (original_max_position_embeddings / wavelength
                            - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *frequency = (1.0 - smooth) * *frequency / factor + smooth * *frequency;
                    }
                }
            }
        }
        let mut cos = Vec::with_capacity(len * dim);
        let mut sin = Vec::with_capacity(len * dim);
        for position in 0..len {
            let position = position as f64 * position_scale;
            // Each frequency appears twice, as in `torch.cat((freqs, freqs), dim=-1)`.
            for _ in 0..2 {
                for frequency in &inverse_frequencies {
                    let angle = position * frequency;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        Ok(Rotary {
            cos: Tensor::from_vec(cos, (len, dim), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (len, dim), device)?.to_dtype(dtype)?,
        })
    }

    /// Each row's own tables, for positions that restart with every sequence of a packed
    /// row: these tables' rows gathered by position (all below `len`).
    fn per_row(&self, segments: &Segments) -> Result<Rotary> {
        let (len, dim) = self.cos.dims2()?;
        let positions = segments.positions(len);
        let positions = Tensor::from_vec(positions, segments.rows() * len, self.cos.device())?;
        let gather = |table: &Tensor| -> Result<Tensor> {
            table
                .index_select(&positions, 0)?
                .reshape((segments.rows(), len, dim))
        };
        Ok(Rotary {
            cos: gather(&self.cos)?,
            sin: gather(&self.sin)?,
        })
    }

    /// A projection's output (batch, len, heads · head_dim) split into heads and rotated:
    /// (batch, heads, len, head_dim). One op does both where it runs (fewer graph nodes,
    /// each a pass over q or k).
    fn heads(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let (batch, len, width) = x.dims3()?;
        let x = x.reshape((batch, len, heads, width / heads.max(1)))?;
        if fused_on(&x) {
            trainer_kernels::rope_heads_major(&x, &self.cos, &self.sin)
        } else {
            self.apply(&x.transpose(1, 2)?)
        }
    }

    /// `x · cos + rotate_half(x) · sin` for `x` of shape (batch, heads, len, head_dim).
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let half = x.dim(D::Minus1)? / 2;
        let first = x.narrow(D::Minus1, 0, half)?;
        let second = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&second.neg()?, &first], D::Minus1)?;
        // Per-row tables (batch, len, dim) broadcast over the heads.
        let (cos, sin) = match self.cos.rank() {
            3 => (self.cos.unsqueeze(1)?, self.sin.unsqueeze(1)?),
            _ => (self.cos.clone(), self.sin.clone()),
        };
        frozen::scale(x, &cos)? + frozen::scale(&rotated, &sin)?
    }
}

#[derive(Clone)]
struct Attention {
    q_proj: Projection,
    k_proj: Projection,
    v_proj: Projection,
    o_proj: Projection,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(config: &ModelConfig, vb: VarBuilder, build: &mut Build) -> Result<Attention> {
        let (hidden, heads, kv_heads, head_dim) = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        );
        let bias = config.qkv_bias;
        Ok(Attention {
            q_proj: Projection::new(&vb, "q_proj", hidden, heads * head_dim, bias, build)?,
            k_proj: Projection::new(&vb, "k_proj", hidden, kv_heads * head_dim, bias, build)?,
            v_proj: Projection::new(&vb, "v_proj", hidden, kv_heads * head_dim, bias, build)?,
            o_proj: Projection::new(
                &vb,
                "o_proj",
                heads * head_dim,
                hidden,
                config.o_bias,
                build,
            )?,
            heads,
            kv_heads,
            head_dim,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        visibility: &Visibility,
        dropout: Option<DropoutKey>,
        cache: Option<&mut Option<cache::LayerCache>>,
    ) -> Result<Tensor> {
        let (batch, len, _) = x.dims3()?;
        // Heads-major and contiguous: every attention below reads v in place.
        let split = |t: Tensor, heads: usize| -> Result<Tensor> {
            t.reshape((batch, len, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = rotary.heads(&self.q_proj.forward(x, dropout)?, self.heads)?;
        let k = rotary.heads(&self.k_proj.forward(x, dropout)?, self.kv_heads)?;
        let v = split(self.v_proj.forward(x, dropout)?, self.kv_heads)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let (k, v) = match cache {
            Some(slot) => cache::LayerCache::append(slot, &k, &v)?,
            None => (k, v),
        };
        let bias = match visibility {
            Visibility::Segments(segments) => {
                let out = trainer_kernels::causal_attention(&q, &k, &v, segments, scale)?
                    .transpose(1, 2)?
                    .reshape((batch, len, self.heads * self.head_dim))?;
                return self.o_proj.forward(&out, dropout);
            }
            Visibility::Bias(bias) => Some(*bias),
            Visibility::All => None,
        };
        let out = composed_attention(&q, (&k, &v), bias, scale)?;
        self.o_proj.forward(&out, dropout)
    }
}

#[derive(Clone)]
struct Mlp {
    gate_proj: Projection,
    up_proj: Projection,
    down_proj: Projection,
}

impl Mlp {
    fn new(config: &ModelConfig, vb: VarBuilder, build: &mut Build) -> Result<Mlp> {
        let (hidden, inner, bias) = (
            config.hidden_size,
            config.intermediate_size,
            config.mlp_bias,
        );
        Ok(Mlp {
            gate_proj: Projection::new(&vb, "gate_proj", hidden, inner, bias, build)?,
            up_proj: Projection::new(&vb, "up_proj", hidden, inner, bias, build)?,
            down_proj: Projection::new(&vb, "down_proj", inner, hidden, bias, build)?,
        })
    }

    fn forward(&self, x: &Tensor, dropout: Option<DropoutKey>) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x, dropout)?;
        let up = self.up_proj.forward(x, dropout)?;
        let gated = if fused_on(&gate) {
            trainer_kernels::swiglu(&gate, &up)?
        } else {
            (gate.silu()? * up)?
        };
        self.down_proj.forward(&gated, dropout)
    }
}

#[derive(Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// A decoder layer's projections by their names under the layer (as PEFT names them).
const PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

impl DecoderLayer {
    /// The layer's projections, in [`PROJECTIONS`]' order.
    fn projections_mut(&mut self) -> [&mut Projection; 7] {
        let (attention, mlp) = (&mut self.self_attn, &mut self.mlp);
        [
            &mut attention.q_proj,
            &mut attention.k_proj,
            &mut attention.v_proj,
            &mut attention.o_proj,
            &mut mlp.gate_proj,
            &mut mlp.up_proj,
            &mut mlp.down_proj,
        ]
    }

    /// The same, to read.
    fn projections(&self) -> [&Projection; 7] {
        let (attention, mlp) = (&self.self_attn, &self.mlp);
        [
            &attention.q_proj,
            &attention.k_proj,
            &attention.v_proj,
            &attention.o_proj,
            &mlp.gate_proj,
            &mlp.up_proj,
            &mlp.down_proj,
        ]
    }

    fn new(config: &ModelConfig, vb: VarBuilder, build: &mut Build) -> Result<DecoderLayer> {
        Ok(DecoderLayer {
            input_layernorm: RmsNorm::new(
                vb.pp("input_layernorm"),
                config.hidden_size,
                config.rms_norm_eps,
            )?,
            self_attn: Attention::new(config, vb.pp("self_attn"), build)?,
            post_attention_layernorm: RmsNorm::new(
                vb.pp("post_attention_layernorm"),
                config.hidden_size,
                config.rms_norm_eps,
            )?,
            mlp: Mlp::new(config, vb.pp("mlp"), build)?,
        })
    }

    /// The layer over `x`; with `graph` in blocks (which [`Model::block_ops`] allows), each
    /// half is one graph node ([`block`]) over whole sequences (no cache), else a node per
    /// op.
    fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        visibility: &Visibility,
        dropout: Option<DropoutKey>,
        cache: Option<&mut Option<cache::LayerCache>>,
        graph: Graph,
    ) -> Result<Tensor> {
        if let (Graph::Blocks(keep), Visibility::Segments(segments), None) =
            (graph, visibility, &cache)
        {
            let x = self.self_attn.block(
                &self.input_layernorm,
                x,
                (rotary, segments),
                dropout,
                keep,
            )?;
            return self
                .mlp
                .block(&self.post_attention_layernorm, &x, dropout, keep);
        }
        let normed = self.input_layernorm.forward(x)?;
        let attended = self
            .self_attn
            .forward(&normed, rotary, visibility, dropout, cache)?;
        let x = (x + attended)?;
        let transformed = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?, dropout)?;
        x + transformed
    }
}

#[derive(Clone)]
pub struct Model {
    config: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Tensor,
    projections: QuantizationReport,
    /// Whether each half layer is one graph node ([`block`]): yes unless
    /// `TRAINER_BLOCK_OPS=0` is in the environment or [`Model::set_block_ops`] says no.
    blocks: bool,
    /// Whether those nodes run their forward again in the backward instead of keeping
    /// its activations ([`Model::set_gradient_checkpointing`]).
    checkpoint: bool,
    rotary: RotaryCache,
}

/// How a decoder layer is put into the autograd graph.
#[derive(Debug, Clone, Copy)]
enum Graph {
    /// A node per op.
    OpByOp,
    /// A node per half layer ([`block`]), keeping this much for its backward.
    Blocks(block::Keep),
}

impl Model {
    /// Builds the model from checkpoint weights in `vb` and adds fresh LoRA adapters
    /// (drawn from `rng`) in `lora_dtype`. With a `base_quant`, the decoder layers' frozen
    /// projections are held in that block format ([`crate::quantized`]).
    pub fn new(
        config: &ModelConfig,
        vb: VarBuilder,
        lora: &LoraConfig,
        lora_dtype: DType,
        base_quant: BaseQuant,
        rng: &mut Rng,
    ) -> Result<Model> {
        let model_vb = vb.pp("model");
        let embed_tokens = model_vb
            .pp("embed_tokens")
            .get((config.vocab_size, config.hidden_size), "weight")?;
        let mut build = Build {
            lora,
            lora_dtype,
            base_quant,
            rng,
            report: QuantizationReport {
                base_quant,
                ..QuantizationReport::default()
            },
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::new(config, model_vb.pp("layers").pp(i), &mut build))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(model_vb.pp("norm"), config.hidden_size, config.rms_norm_eps)?;
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            vb.pp("lm_head")
                .get((config.vocab_size, config.hidden_size), "weight")?
        };
        Ok(Model {
            config: config.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            projections: build.report,
            blocks: std::env::var("TRAINER_BLOCK_OPS").map_or(true, |value| value.trim() != "0"),
            checkpoint: false,
            rotary: RotaryCache::default(),
        })
    }

    /// How the layers go into the graph; `inference`: no backward will run.
    fn graph(&self, inference: bool) -> Graph {
        match (self.block_ops(), inference, self.checkpoint) {
            (false, _, _) => Graph::OpByOp,
            (true, true, _) => Graph::Blocks(block::Keep::Nothing),
            (true, false, true) => Graph::Blocks(block::Keep::Recompute),
            (true, false, false) => Graph::Blocks(block::Keep::Passes),
        }
    }

    /// Gradient checkpointing: each half layer keeps only its input (and the attention's
    /// output) for the backward, which runs what it reads of the forward again (the same
    /// dropout masks, the same gradients), for about two thirds of a forward more a step.
    /// Applies where the block ops run (see
    /// [`Model::gradient_checkpointing`]).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.checkpoint = on;
    }

    /// Whether training checkpoints: asked for, and the block ops running.
    pub fn gradient_checkpointing(&self) -> bool {
        self.checkpoint && self.block_ops()
    }

    /// Whether each half of a decoder layer is one graph node with a hand-written backward
    /// ([`block`]) or a node per op (the reference the block ops are checked against).
    pub fn set_block_ops(&mut self, on: bool) {
        self.blocks = on;
    }

    /// Whether training builds each half layer as one node: asked for (the default), and
    /// its fused ops and the attention op all running for this model's dtype and device
    /// (not on the CPU in bf16, nor at a head size CUDA has no attention kernels for);
    /// otherwise layers are built op by op.
    pub fn block_ops(&self) -> bool {
        let (device, dtype) = (self.embed_tokens.device(), self.embed_tokens.dtype());
        self.blocks
            && trainer_kernels::fused_ops_run(device, dtype)
            && trainer_kernels::attention::supported(device, dtype, self.config.head_dim)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// What quantizing the base did, when it is quantized.
    pub fn quantization(&self) -> Option<&QuantizationReport> {
        Some(&self.projections).filter(|report| !report.base_quant.is_none())
    }

    /// How the decoder layers' frozen projections are held, and their bytes.
    pub fn projection_report(&self) -> &QuantizationReport {
        &self.projections
    }

    /// Logits of shape (batch, len, vocab) for `input_ids` (batch, len). `segments` gives
    /// each row's sequences (one, then right padding whose keys are hidden; or several
    /// packed, each attending within itself with positions from 0; `None`: one sequence
    /// filling each row). They come from the host, so nothing is read back from the
    /// device. `dropout` keys the LoRA dropout masks during training; `None` evaluates.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        segments: Option<&Segments>,
        dropout: Option<DropoutKey>,
    ) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, segments, dropout)?;
        frozen::linear(&hidden, &self.lm_head)
    }

    /// [`Model::forward`] for evaluation: no dropout, and no gradient (not even the LoRA
    /// weights'), so a layer's activations are freed as soon as its output exists rather
    /// than held for a backward that will not run.
    pub fn forward_inference(
        &self,
        input_ids: &Tensor,
        segments: Option<&Segments>,
    ) -> Result<Tensor> {
        let hidden = self.hidden(input_ids, segments, None, true)?;
        frozen::linear(&hidden, &self.lm_head)
    }

    /// The final hidden states (batch, len, hidden), after the last norm: what the language
    /// model head turns into logits.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        segments: Option<&Segments>,
        dropout: Option<DropoutKey>,
    ) -> Result<Tensor> {
        self.hidden(input_ids, segments, dropout, false)
    }

    /// [`Model::hidden_states`]; `inference`: no backward will run.
    fn hidden(
        &self,
        input_ids: &Tensor,
        segments: Option<&Segments>,
        dropout: Option<DropoutKey>,
        inference: bool,
    ) -> Result<Tensor> {
        let (batch, len) = input_ids.dims2()?;
        if let Some(segments) = segments.filter(|s| s.rows() != batch) {
            candle_core::bail!("{batch} rows of input but segments for {}", segments.rows());
        }
        let device = input_ids.device();
        // Token embeddings of a frozen table: nothing upstream needs a gradient.
        let mut x = self
            .embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .detach();
        x = x.reshape((batch, len, self.config.hidden_size))?;
        let wide = wide_dtype(x.dtype());
        let mut rotary = self
            .rotary
            .tables(&self.config, (0, len), x.dtype(), device)?;
        if let Some(segments) = segments.filter(|s| s.is_packed()) {
            rotary = rotary.per_row(segments)?;
        }
        // Where the attention op runs (the CPU; CUDA at the head sizes it has kernels for),
        // it needs no L² mask; elsewhere attention is composed from matmuls and a softmax
        // over a causal, padding and sequence bias.
        let (bias, full);
        let visibility =
            if trainer_kernels::attention::supported(device, x.dtype(), self.config.head_dim) {
                full = Segments::unpacked(&vec![len; batch]);
                Visibility::Segments(segments.unwrap_or(&full))
            } else {
                bias = attention_bias(0, len, len, segments, wide, device)?;
                Visibility::Bias(&bias)
            };
        for layer in &self.layers {
            x = layer.forward(
                &x,
                &rotary,
                &visibility,
                dropout,
                None,
                self.graph(inference),
            )?;
            if inference {
                // Built op by op, a layer is still graph nodes over the LoRA weights:
                // detached, its activations go once the next layer has read its output.
                x = x.detach();
            }
        }
        self.norm.forward(&x)
    }

    /// The language model head (vocab, hidden): frozen, and the embedding table when tied.
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// Logits of each row's last position (batch, vocab) for `input_ids` (batch, len)
    /// following what `cache` holds; the new keys and values are appended to it. For
    /// generation.
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (batch, len) = input_ids.dims2()?;
        let device = input_ids.device();
        let mut x = self
            .embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?;
        x = x.reshape((batch, len, self.config.hidden_size))?;
        let wide = wide_dtype(x.dtype());
        let past = cache.position;
        let padded = cache.padding.iter().any(|padding| *padding > 0);
        if padded && cache.padding.len() != batch {
            candle_core::bail!(
                "{batch} rows of input but padding for {}",
                cache.padding.len()
            );
        }
        let rotary = self
            .rotary
            .tables(&self.config, (past, len), x.dtype(), device)?;
        // New queries see every cached key and, among themselves, the earlier ones; where
        // rows are left-padded, not their padding.
        let bias = if padded {
            Some(left_padded_bias(past, len, &cache.padding, wide, device)?)
        } else if len > 1 {
            Some(attention_bias(past, len, past + len, None, wide, device)?)
        } else {
            None
        };
        let visibility = match &bias {
            Some(bias) => Visibility::Bias(bias),
            None => Visibility::All,
        };
        if cache.layers.len() != self.layers.len() {
            cache.layers = vec![None; self.layers.len()];
        }
        // No backward runs through generation: each layer's output is detached, so the
        // LoRA weights' graph behind it goes as soon as the next layer has read it.
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer
                .forward(
                    &x,
                    &rotary,
                    &visibility,
                    None,
                    Some(layer_cache),
                    Graph::OpByOp,
                )?
                .detach();
        }
        cache.position += len;
        let last = self.norm.forward(&x.narrow(1, len - 1, 1)?)?;
        Ok(frozen::linear(&last, &self.lm_head)?.squeeze(1)?.detach())
    }

    /// Mean cross-entropy of predicting `targets` (batch, len), counting only positions
    /// where `loss_mask` (batch, len) is 1; computed on the device, nothing read back, and a
    /// chunk of tokens at a time (see [`chunked_token_loss`]).
    pub fn loss(
        &self,
        input_ids: &Tensor,
        segments: Option<&Segments>,
        targets: &Tensor,
        loss_mask: &Tensor,
        dropout: Option<DropoutKey>,
    ) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, segments, dropout)?;
        let logits_per_chunk = if hidden.device().is_cpu() {
            LOSS_CHUNK_LOGITS
        } else {
            LOSS_CHUNK_LOGITS_GPU
        };
        let chunk_tokens = (logits_per_chunk / self.config.vocab_size.max(1)).max(1);
        chunked_token_loss(&hidden, &self.lm_head, targets, loss_mask, chunk_tokens)
    }

    /// This model's frozen weights, shared rather than copied, with new LoRA adapters
    /// where `lora` targets (in `dtype`, initialised as training would; none elsewhere):
    /// another subject beside a loaded base, as validation measures an adapter against
    /// its base, without a second copy of the base's weights.
    pub fn with_adapters(&self, lora: &LoraConfig, dtype: DType, rng: &mut Rng) -> Result<Model> {
        let mut model = self.clone();
        for (i, layer) in model.layers.iter_mut().enumerate() {
            for (name, projection) in PROJECTIONS.into_iter().zip(layer.projections_mut()) {
                let module = name.rsplit('.').next().unwrap_or(name);
                projection.lora = if lora.targets(module) {
                    let (out_features, in_features) = projection.weight.dims()?;
                    Some(LoraAdapter::new(
                        &format!("model.layers.{i}.{name}"),
                        (in_features, out_features),
                        lora,
                        dtype,
                        &projection.weight.device(),
                        rng,
                    )?)
                } else {
                    None
                };
            }
        }
        Ok(model)
    }

    /// The LoRA parameters by PEFT name (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).
    pub fn lora_parameters(&self) -> BTreeMap<String, Var> {
        let mut parameters = BTreeMap::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for (name, projection) in PROJECTIONS.into_iter().zip(layer.projections()) {
                if let Some(lora) = &projection.lora {
                    let prefix = format!("base_model.model.model.layers.{i}.{name}");
                    parameters.insert(format!("{prefix}.lora_A.weight"), lora.a.clone());
                    parameters.insert(format!("{prefix}.lora_B.weight"), lora.b.clone());
                }
            }
        }
        parameters
    }
}

/// Which keys each query may see.
enum Visibility<'a> {
    /// Causal, within each sequence of each row: the attention op.
    Segments(&'a Segments),
    /// An additive bias (B or 1, 1, queries, keys) of 0 or `MASKED`.
    Bias(&'a Tensor),
    /// Every key (one new token after a cache).
    All,
}

/// Additive attention bias (batch or 1, 1, queries, keys) for queries at positions
/// `first_query..first_query + queries` over keys `0..keys`: 0 where the key is not later
/// than the query, is not padding (past its row's sequences) and is of the query's
/// sequence, [`MASKED`] elsewhere. Built on the device from positions and sequence ids,
/// so no L² tensor crosses from the host.
fn attention_bias(
    first_query: usize,
    queries: usize,
    keys: usize,
    segments: Option<&Segments>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let key_positions = Tensor::arange(0u32, keys as u32, device)?.reshape((1, keys))?;
    let query_positions =
        Tensor::arange(first_query as u32, (first_query + queries) as u32, device)?
            .reshape((queries, 1))?;
    let mut visible = key_positions
        .broadcast_le(&query_positions)?
        .to_dtype(dtype)?
        .reshape((1, 1, queries, keys))?;
    if let Some(segments) = segments {
        let batch = segments.rows();
        let lengths: Vec<u32> = segments.lengths().iter().map(|l| *l as u32).collect();
        let lengths = Tensor::from_vec(lengths, (batch, 1), device)?;
        let real = key_positions.broadcast_lt(&lengths)?.to_dtype(dtype)?;
        visible = visible.broadcast_mul(&real.reshape((batch, 1, 1, keys))?)?;
        if segments.is_packed() {
            if first_query != 0 || queries != keys {
                candle_core::bail!("packed rows attend without a cache");
            }
            let ids = Tensor::from_vec(segments.sequence_ids(keys), (batch, keys), device)?;
            let same = ids
                .reshape((batch, 1, keys, 1))?
                .broadcast_eq(&ids.reshape((batch, 1, 1, keys))?)?
                .to_dtype(dtype)?;
            visible = visible.broadcast_mul(&same)?;
        }
    }
    // 1 ↦ 0 and 0 ↦ MASKED, exactly.
    visible.affine(-MASKED, MASKED)
}

/// `softmax(q·kᵀ·scale + bias)·v` from candle ops, for queries q (batch, heads, len,
/// head_dim) over keys and values k, v (batch, kv_heads, keys, head_dim), read in place
/// (views of the KV cache included; the keys transposed as a view); `bias` (batch or 1, 1,
/// len, keys) is added to every head's scores. Returns (batch, len, heads · head_dim).
/// Where the attention op does not run, and over the KV cache.
fn composed_attention(
    q: &Tensor,
    (k, v): (&Tensor, &Tensor),
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (batch, heads, len, dim) = q.dims4()?;
    let (kv_heads, keys) = (k.dim(1)?, k.dim(2)?);
    let groups = heads / kv_heads.max(1);
    let dtype = q.dtype();
    let wide = wide_dtype(dtype);
    // Query head h reads key/value head h / groups: a key/value head's query heads are
    // consecutive, so they are rows of one product with its keys.
    let q = q
        .contiguous()?
        .reshape((batch, kv_heads, groups * len, dim))?;
    let scores = q.matmul(&k.t()?)?.affine(scale, 0.0)?.to_dtype(wide)?;
    let scores = match bias {
        // A constant of the graph: `frozen::shift` gives it no gradient.
        Some(bias) => frozen::shift(
            &scores.reshape((batch, kv_heads, groups, len, keys))?,
            &bias.unsqueeze(2)?,
        )?
        .reshape((batch, kv_heads, groups * len, keys))?,
        None => scores,
    };
    let probabilities = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(dtype)?;
    probabilities
        .matmul(v)?
        .reshape((batch, heads, len, dim))?
        .transpose(1, 2)?
        .reshape((batch, len, heads * dim))
}

/// The additive bias (batch, 1, queries, keys) for queries at `first_query`.. over rows
/// left-padded by `padding[row]`: a query sees the keys up to itself but not its row's
/// padding (a padding query sees itself, so that no row of scores is all masked).
fn left_padded_bias(
    first_query: usize,
    queries: usize,
    padding: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let keys = first_query + queries;
    let mut bias = Vec::with_capacity(padding.len() * queries * keys);
    for &padding in padding {
        for query in first_query..keys {
            bias.extend((0..keys).map(|key| {
                let visible = key <= query && (key >= padding || key == query);
                if visible {
                    0.0
                } else {
                    MASKED
                }
            }));
        }
    }
    Tensor::from_vec(bias, (padding.len(), 1, queries, keys), device)?.to_dtype(dtype)
}

/// Token-weighted mean cross-entropy over the positions where `mask` is 1.
pub fn token_loss(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let losses = token_losses(logits, targets)?;
    let (batch, len) = losses.dims2()?;
    let losses = losses.reshape(batch * len)?;
    let mask = mask.to_dtype(losses.dtype())?.reshape(batch * len)?;
    // The count stays on the device (reading it back would stall a GPU every micro-batch),
    // a constant of the graph: `frozen::scale` gives it no gradient.
    let inverse_count = mask.sum_all()?.maximum(1.0)?.recip()?;
    let total = frozen::scale(&losses, &mask)?.sum_all()?;
    frozen::scale(&total, &inverse_count)
}

/// Each position's cross-entropy, the negative log-likelihood of its target: (batch, len)
/// for logits (batch, len, vocab), in f32 (f64 for f64 logits).
pub fn token_losses(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (batch, len, vocab) = logits.dims3()?;
    let wide = wide_dtype(logits.dtype());
    let logits = logits.to_dtype(wide)?.reshape((batch * len, vocab))?;
    let log_probabilities = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let targets = targets.to_dtype(DType::U32)?.reshape((batch * len, 1))?;
    log_probabilities
        .gather(&targets, 1)?
        .reshape((batch, len))?
        .neg()
}

/// How many logits the training loss holds at once: its chunks have this many ÷ the
/// vocabulary tokens (128 at a 128k vocabulary: 64 MiB of f32 logits per chunk).
const LOSS_CHUNK_LOGITS: usize = 1 << 24;

/// The same on a GPU, where a chunk's matmul needs rows to fill the device: 1,046 tokens at
/// a 128k vocabulary, 256 MiB of bf16 logits and as much for their gradient.
const LOSS_CHUNK_LOGITS_GPU: usize = 1 << 27;

/// [`token_loss`] of the logits `hidden · lm_headᵀ`, computed `chunk_tokens` tokens at a
/// time, so at most a chunk's logits exist at once: peak memory O(chunk · vocab), not
/// O(batch · len · vocab). The logsumexp is taken in f32 (f64 for f64 inputs).
///
/// The head is frozen, so the loss's only gradient is the one for `hidden`. Each chunk's
/// part, `(softmax − onehot(target)) · lm_head` for the counted positions, is computed
/// while the chunk's logits are at hand, and the returned loss carries the whole gradient
/// through a term of value exactly zero, `s − detach(s)` with `s = Σ hidden ⊙ gradient`:
/// the backward pass costs one element-wise product and keeps no logits.
pub fn chunked_token_loss(
    hidden: &Tensor,
    lm_head: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
    chunk_tokens: usize,
) -> Result<Tensor> {
    let (batch, len, width) = hidden.dims3()?;
    let count = batch * len;
    let wide = wide_dtype(hidden.dtype());
    let flat = hidden.reshape((count, width))?;
    let constant = flat.detach();
    let head = lm_head.to_dtype(hidden.dtype())?;
    let targets = targets.to_dtype(DType::U32)?.reshape((count, 1))?;
    let mask = mask.to_dtype(wide)?.reshape((count, 1))?;
    let inverse_count = mask.sum_all()?.maximum(1.0)?.recip()?;
    let mut total: Option<Tensor> = None;
    let mut gradients = Vec::with_capacity(count.div_ceil(chunk_tokens.max(1)));
    for start in (0..count).step_by(chunk_tokens.max(1)) {
        let size = chunk_tokens.min(count - start);
        let logits = frozen::linear(&constant.narrow(0, start, size)?, &head)?;
        let (targets, mask) = (
            targets.narrow(0, start, size)?,
            mask.narrow(0, start, size)?,
        );
        let (chunk_total, gradient_of_logits) = chunk_loss(&logits, &targets, &mask, wide)?;
        total = Some(match total.take() {
            Some(total) => (total + chunk_total)?,
            None => chunk_total,
        });
        gradients.push(gradient_of_logits.to_dtype(hidden.dtype())?.matmul(&head)?);
    }
    let Some(total) = total else {
        candle_core::bail!("a loss over no tokens");
    };
    let loss = (total * &inverse_count)?;
    let gradient = Tensor::cat(&gradients, 0)?
        .broadcast_mul(&inverse_count.to_dtype(hidden.dtype())?)?
        .detach();
    let carrier = frozen::scale(&flat, &gradient)?.sum_all()?.to_dtype(wide)?;
    let zero = (&carrier - carrier.detach())?;
    loss.detach() + zero
}

/// One chunk's masked negative log-likelihood sum and its logits' gradient
/// `(softmax − onehot(target)) · mask`, for logits (rows × vocab), targets (rows, 1) and
/// mask (rows, 1) in `wide`. On CUDA (f32 arithmetic) two kernels do it over the logits
/// as they are, instead of a dozen f32 passes; the gradient then comes in their dtype.
fn chunk_loss(
    logits: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
    wide: DType,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() && wide == DType::F32 {
        use trainer_kernels::cross_entropy_cuda as fused;
        let (targets, mask) = (targets.flatten_all()?, mask.flatten_all()?);
        let rows = fused::cross_entropy_rows(logits, &targets, &mask)?;
        let total = rows
            .narrow(0, targets.elem_count(), targets.elem_count())?
            .sum_all()?;
        let gradient = fused::cross_entropy_gradient(logits, &targets, &mask, &rows)?;
        return Ok((total, gradient));
    }
    let logits = logits.to_dtype(wide)?;
    let shifted = logits.broadcast_sub(&logits.max_keepdim(1)?)?;
    let exp = shifted.exp()?;
    let sum = exp.sum_keepdim(1)?;
    let negative_log_likelihood = (sum.log()? - shifted.gather(targets, 1)?)?;
    let total = (negative_log_likelihood * mask)?.sum_all()?;
    let gradient =
        exp.broadcast_div(&sum)?
            .broadcast_mul(mask)?
            .scatter_add(targets, &mask.neg()?, 1)?;
    Ok((total, gradient))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two layers, four query heads over two key/value heads of 4 dimensions.
    fn tiny_config() -> Result<ModelConfig> {
        ModelConfig::parse(
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 16,
                "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": 32,
                "rope_theta": 10000.0}"#,
        )
        .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    /// Generation keeps no graph over the LoRA weights: not in its logits, not in the
    /// cached keys and values (which would otherwise hold every earlier step's).
    #[test]
    fn generation_keeps_no_graph() -> Result<()> {
        let device = Device::Cpu;
        let config = tiny_config()?;
        let weights = crate::init::random_weights(&config, 5, DType::F32, &device)?;
        let vb = candle_nn::VarBuilder::from_tensors(weights, DType::F32, &device);
        let lora = crate::LoraConfig::default();
        let mut rng = crate::rng::Rng::new(1);
        let model = Model::new(&config, vb, &lora, DType::F32, BaseQuant::None, &mut rng)?;
        let mut cache = KvCache::default();
        let prompt = Tensor::new(&[[3u32, 14, 15]], &device)?;
        let mut logits = vec![model.forward_cached(&prompt, &mut cache)?];
        for token in [9u32, 2] {
            logits.push(model.forward_cached(&Tensor::new(&[[token]], &device)?, &mut cache)?);
        }
        assert!(logits.iter().all(|l| !l.track_op()), "logits keep a graph");
        for (layer, kept) in cache.layers.iter().enumerate() {
            let Some(kept) = kept else {
                panic!("layer {layer} cached nothing");
            };
            assert!(
                !kept.k.track_op() && !kept.v.track_op(),
                "layer {layer}'s cache keeps a graph"
            );
        }
        Ok(())
    }

    /// Tables read from the cache are those of their positions, before and after it grows
    /// past its first 256 positions, and after a change of dtype.
    #[test]
    fn cached_rotary_tables_are_their_positions_tables() -> Result<()> {
        let device = Device::Cpu;
        let config = tiny_config()?;
        let whole = Rotary::new(&config, 305, DType::F64, &device)?;
        let cache = RotaryCache::default();
        for (offset, len, dtype) in [
            (0, 10, DType::F64),
            (300, 5, DType::F64),
            (3, 4, DType::F64),
            (7, 2, DType::F32),
        ] {
            let tables = cache.tables(&config, (offset, len), dtype, &device)?;
            for (table, expected) in [(&tables.cos, &whole.cos), (&tables.sin, &whole.sin)] {
                let expected = expected.narrow(0, offset, len)?.to_dtype(dtype)?;
                let gap = (table.to_dtype(DType::F64)? - expected.to_dtype(DType::F64)?)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f64>()?;
                assert_eq!(
                    gap,
                    0.0,
                    "positions {offset}..{} in {dtype:?}",
                    offset + len
                );
            }
        }
        Ok(())
    }

    /// The bias built on the device from positions: causal, padding hidden, and for cached
    /// generation every earlier key visible.
    #[test]
    fn the_attention_bias_is_causal_and_hides_padding() -> Result<()> {
        let device = Device::Cpu;
        let segments = Segments::unpacked(&[4, 2]);
        let bias: Vec<Vec<Vec<f32>>> =
            attention_bias(0, 4, 4, Some(&segments), DType::F32, &device)?
                .squeeze(1)?
                .to_vec3()?;
        let lengths = [4, 2];
        for (row, length) in bias.iter().zip(lengths) {
            for (query, keys) in row.iter().enumerate() {
                for (key, value) in keys.iter().enumerate() {
                    let visible = key <= query && key < length;
                    let expected = if visible { 0.0 } else { MASKED as f32 };
                    assert_eq!(*value, expected, "length {length}, {query} → {key}");
                }
            }
        }
        // Two new queries after three cached positions see keys 0..=3 and 0..=4.
        let cached: Vec<Vec<f32>> = attention_bias(3, 2, 5, None, DType::F32, &device)?
            .squeeze(0)?
            .squeeze(0)?
            .to_vec2()?;
        let masked = MASKED as f32;
        assert_eq!(cached, vec![vec![0.0, 0.0, 0.0, 0.0, masked], vec![0.0; 5]]);
        Ok(())
    }
}
