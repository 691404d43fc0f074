//! LoRA as PEFT defines it: `y = W x + (alpha / r) · B A dropout(x)`, A of shape (r, in)
//! initialised uniform in ±1/sqrt(in) (PEFT's `kaiming_uniform_(a=sqrt(5))`), B of shape
//! (out, r) initialised to zeros, scale `alpha / r` (`alpha / sqrt(r)` with rsLoRA).

use candle_core::{DType, Device, Result, Tensor, Var};

use crate::rng::{module_id, DropoutKey, Rng};

use protocol::LORA_TARGET_MODULES;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: LORA_TARGET_MODULES.iter().map(|m| m.to_string()).collect(),
            use_rslora: false,
        }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    pub fn targets(&self, module: &str) -> bool {
        self.target_modules.iter().any(|m| m == module)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.rank == 0 {
            return Err("rank must be at least 1".into());
        }
        if self.alpha.is_nan() || self.alpha <= 0.0 {
            return Err("lora_alpha must be positive".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err("lora_dropout must be in [0, 1)".into());
        }
        if self.target_modules.is_empty() {
            return Err("target_modules is empty".into());
        }
        if let Some(unknown) = self
            .target_modules
            .iter()
            .find(|m| !LORA_TARGET_MODULES.contains(&m.as_str()))
        {
            return Err(format!(
                "unknown target module {unknown:?}; known: {}",
                LORA_TARGET_MODULES.join(", ")
            ));
        }
        Ok(())
    }
}

/// The trainable pair of one projection. Kept in f32 (or f64 for gradient checks) whatever
/// the base model's dtype.
#[derive(Clone)]
pub struct LoraAdapter {
    pub a: Var,
    pub b: Var,
    scale: f64,
    dropout: f64,
    /// Its part of every dropout mask's key.
    module: u64,
}

impl LoraAdapter {
    /// An adapter for the module named `name` (its weights' prefix).
    pub fn new(
        name: &str,
        (in_features, out_features): (usize, usize),
        config: &LoraConfig,
        dtype: DType,
        device: &Device,
        rng: &mut Rng,
    ) -> Result<LoraAdapter> {
        let bound = 1.0 / (in_features as f64).sqrt();
        let values: Vec<f64> = (0..config.rank * in_features)
            .map(|_| rng.uniform(-bound, bound))
            .collect();
        let a = Tensor::from_vec(values, (config.rank, in_features), device)?.to_dtype(dtype)?;
        let b = Tensor::zeros((out_features, config.rank), dtype, device)?;
        Ok(LoraAdapter {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scale: config.scale(),
            dropout: config.dropout,
            module: module_id(name),
        })
    }

    /// The projection with its adapter, `x·Wᵀ + scale · B A dropout(x)`, as one op
    /// ([`crate::fused_lora`]): each node of a composed version would cost passes over
    /// the activations and a gradient add. The matmuls run in `x`'s dtype (bf16 on CUDA)
    /// against the f32 master weights, whose gradients come back in f32. `dropout` keys the
    /// masks; `None` means evaluation (no dropout).
    pub fn project(
        &self,
        x: &Tensor,
        weight: &crate::frozen::FrozenWeight,
        dropout: Option<DropoutKey>,
    ) -> Result<Tensor> {
        let x = x.contiguous()?;
        let op = self.op(weight, x.dtype(), dropout)?;
        x.apply_op3(self.a.as_tensor(), self.b.as_tensor(), op)
    }

    /// [`LoraAdapter::project`]'s op for inputs of `dtype` (contiguous), for an op over a
    /// whole block that applies it without a graph node and runs its `bwd` itself (with A
    /// and B as its second and third operands).
    pub fn op(
        &self,
        weight: &crate::frozen::FrozenWeight,
        dtype: candle_core::DType,
        dropout: Option<DropoutKey>,
    ) -> Result<crate::fused_lora::LoraLinear> {
        let mask = match dropout {
            Some(key) if self.dropout > 0.0 => Some((key.stream(self.module), 1.0 - self.dropout)),
            _ => None,
        };
        crate::fused_lora::lora_linear_op(weight, dtype, self.scale, mask)
    }
}
