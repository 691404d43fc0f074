//! Each half of a decoder layer, `x + attention(norm(x))` and `x + mlp(norm(x))`, as one
//! autograd node with a hand-written backward (Unsloth's one op per block).
//!
//! candle's backward gives every input of every node a zero-filled gradient and adds the
//! node's contribution into it (`GradStore::or_insert`, then `add`): four passes over an
//! activation-sized tensor per edge of the graph, views included. Built op by op, a layer
//! has about twenty such edges (the norms, seven projections, two rotations, the views
//! around the attention, the attention, SwiGLU, two residual sums); on an H200 their
//! zero fills and adds were 11% of a step's kernel time (2026-12-04 profile). Here the
//! same fused ops run without graph nodes, each kept with what its backward reads, and the
//! block's backward calls their backwards in reverse order: a gradient is summed only
//! where a tensor really feeds several ops (the normed input of q, k and v; of gate and
//! up). The graph keeps one node per half layer, over the residual stream and the half's
//! LoRA parameters (flattened and concatenated, small).
//!
//! Each pass keeps only what its backward reads (the ops' `gradients` methods say what
//! that is): not the projections' outputs, not the rotations' inputs, not the branch's
//! output once it is added, all of which the op-by-op graph holds until the step ends.
//!
//! With gradient checkpointing a node keeps none of its passes, only its input (the
//! graph holds it anyway) and what running its forward again takes (the layer's weights,
//! shared, not copied); its backward runs the forward again first. Dropout masks are a
//! function of their key, so the second forward draws the same ones and the gradients are
//! the same, and a layer's activations are freed as soon as its output is made. The
//! second forward makes only what the backward reads: the attention block also keeps the
//! attention's output (a hidden-sized tensor) and logsumexps, so neither the attention nor
//! the o projection runs again, and the MLP's down projection (whose input its backward
//! makes) does not either. On a Llama-3.2-1B layer that is 40 of the 61 million weights'
//! products and no attention: a step costs about two thirds of a forward more.

use candle_core::op::Add;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, Var};
use std::sync::{Arc, Mutex};
use trainer_kernels::attention::{causal_attention_op, CausalAttention};
use trainer_kernels::rms_norm::{rms_norm_op, RmsNorm as RmsNormOp};
use trainer_kernels::rope::{rope_heads_major_op, Rope};
use trainer_kernels::swiglu::{swiglu_op, SwiGlu};
use trainer_kernels::Segments;

use super::{Attention, Mlp, Projection, RmsNorm, Rotary};
use crate::frozen::{self, FrozenLinear, OnBackend};
use crate::fused_lora::LoraLinear;
use crate::rng::DropoutKey;

/// RMSNorm's forward, holding what its backward reads: its input and scale.
struct NormPass {
    op: RmsNormOp,
    x: Tensor,
    weight: Tensor,
}

impl NormPass {
    fn run(norm: &RmsNorm, x: &Tensor) -> Result<(NormPass, Tensor)> {
        let (op, [x, weight]) = rms_norm_op(&x.detach(), &norm.weight, norm.eps)?;
        let normed = x.apply_op2_no_bwd(&weight, &op)?;
        Ok((NormPass { op, x, weight }, normed))
    }

    fn backward(&self, grad: &Tensor) -> Result<Tensor> {
        self.op.input_gradient(&self.x, &self.weight, grad)
    }
}

/// One projection's forward, holding what its backward reads besides its input (which
/// the branch holds, shared or recomputed): with LoRA, A and B (and the op, which may keep
/// its dropout mask); a frozen weight needs only the op. A bias (frozen) adds nothing to
/// the backward.
enum ProjectionPass {
    Lora {
        op: LoraLinear,
        a: Tensor,
        b: Tensor,
    },
    Frozen(FrozenLinear),
}

impl ProjectionPass {
    /// What the projection's backward needs for inputs of `dtype`, without running its
    /// forward: a forward run again for the backward skips a projection whose output only
    /// the residual sum read (the gradients draw the same dropout mask from its key).
    fn new(
        projection: &Projection,
        dtype: DType,
        dropout: Option<DropoutKey>,
    ) -> Result<ProjectionPass> {
        Ok(match &projection.lora {
            Some(lora) => ProjectionPass::Lora {
                op: lora.op(&projection.weight, dtype, dropout)?,
                a: lora.a.as_tensor().detach(),
                b: lora.b.as_tensor().detach(),
            },
            None => ProjectionPass::Frozen(frozen::frozen_linear_op(&projection.weight, dtype)?),
        })
    }

    /// The projection of `x`, bias included, and what its backward needs.
    fn run(
        projection: &Projection,
        x: &Tensor,
        dropout: Option<DropoutKey>,
    ) -> Result<(ProjectionPass, Tensor)> {
        let x = x.contiguous()?;
        let pass = ProjectionPass::new(projection, x.dtype(), dropout)?;
        let y = match &pass {
            ProjectionPass::Lora { op, a, b } => x.apply_op3_no_bwd(a, b, op)?,
            ProjectionPass::Frozen(op) => x.apply_op1_no_bwd(op)?,
        };
        let y = match &projection.bias {
            Some(bias) => frozen::shift(&y, bias)?,
            None => y,
        };
        Ok((pass, y))
    }

    /// The gradient of the input `x`, and A's and B's (flattened) when the projection has
    /// LoRA.
    fn backward(&self, x: &Tensor, grad: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        match self {
            ProjectionPass::Lora { op, a, b } => {
                let (dx, da, db) = op.gradients(&x.contiguous()?, a, b, grad)?;
                Ok((dx, vec![da.flatten_all()?, db.flatten_all()?]))
            }
            ProjectionPass::Frozen(op) => Ok((op.input_gradient(grad)?, Vec::new())),
        }
    }
}

/// The LoRA parameters of `projections`, A then B of each in turn: the order of the
/// gradients their passes return.
fn lora_of<'a>(projections: &[&'a Projection]) -> Vec<&'a Var> {
    projections
        .iter()
        .filter_map(|projection| projection.lora.as_ref())
        .flat_map(|lora| [&lora.a, &lora.b])
        .collect()
}

/// The backward of a half layer's branch (what is added to the residual stream).
trait Branch: Send + Sync + 'static {
    const NAME: &'static str;

    /// The gradient of the half layer's input through the branch (not through the
    /// residual), and its LoRA parameters' gradients, flattened, in [`lora_of`]'s order.
    fn backward(&self, grad: &Tensor) -> Result<(Tensor, Vec<Tensor>)>;
}

/// A branch's forward run again from the half layer's input, for its backward: only what
/// the backward reads, not the branch's output.
type Recompute<B> = Box<dyn Fn(&Tensor) -> Result<B> + Send + Sync>;

/// What a half layer's node holds for its backward.
enum Held<B> {
    /// The forward's passes.
    Passes(B),
    /// A way to run the forward again (gradient checkpointing).
    Recompute(Recompute<B>),
}

/// What a half layer keeps for its backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Keep {
    /// The forward's passes.
    Passes,
    /// The way to run the forward again (gradient checkpointing), and the attention's
    /// output.
    Recompute,
    /// Nothing: no backward will run (inference), so the layer is no graph node and its
    /// passes are freed as soon as its output exists.
    Nothing,
}

/// `x + output` for a half layer that keeps `keep` of `branch` for its backward;
/// `recompute` takes what it keeps of the first forward's branch.
fn half_layer<B: Branch>(
    x: &Tensor,
    (branch, output): (B, Option<Tensor>),
    keep: Keep,
    recompute: impl FnOnce(B) -> Recompute<B>,
    lora: &[&Var],
) -> Result<Tensor> {
    let Some(output) = output else {
        candle_core::bail!("{}: the first forward made no output", B::NAME);
    };
    let held = match keep {
        Keep::Passes => Held::Passes(branch),
        Keep::Recompute => Held::Recompute(recompute(branch)),
        Keep::Nothing => {
            drop(branch);
            return x + output;
        }
    };
    residual(x, held, output, lora)
}

/// `x + branch` as one graph node over (x, the branch's LoRA parameters flattened and
/// concatenated), whose backward is the branch's.
struct Residual<B> {
    held: Held<B>,
    /// The branch's output, computed before the node was made; the forward takes it,
    /// so it is freed once added.
    output: Mutex<Option<Tensor>>,
}

impl<B: Branch> Residual<B> {
    fn forward<S: OnBackend>(&self, x: &S, x_layout: &Layout) -> Result<(S, Shape)> {
        let output = self.output.lock().ok().and_then(|mut output| output.take());
        let Some(output) = output else {
            candle_core::bail!("{}: the forward ran twice", B::NAME);
        };
        let (output, output_layout) = output.storage_and_layout();
        let sum = x.binary_impl::<Add>(S::of(&output)?, x_layout, output_layout)?;
        Ok((sum, x_layout.shape().clone()))
    }
}

impl<B: Branch> CustomOp2 for Residual<B> {
    fn name(&self) -> &'static str {
        B::NAME
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward(x, x_layout)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.forward(x, x_layout)
    }

    fn bwd(
        &self,
        x: &Tensor,
        parameters: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (through, lora) = match &self.held {
            Held::Passes(branch) => branch.backward(grad)?,
            Held::Recompute(forward) => forward(&x.detach())?.backward(grad)?,
        };
        let dx = (grad + through)?;
        let d_parameters = if lora.is_empty() {
            None
        } else {
            Some(Tensor::cat(&lora, 0)?.to_dtype(parameters.dtype())?)
        };
        Ok((Some(dx), d_parameters))
    }
}

/// `x + output` as one node, `branch` its backward; `lora` the branch's LoRA parameters in
/// the order its backward returns their gradients.
fn residual<B: Branch>(x: &Tensor, held: Held<B>, output: Tensor, lora: &[&Var]) -> Result<Tensor> {
    let parameters = if lora.is_empty() {
        // Nothing to train in this half: the node still carries x's gradient. (One
        // element, not none: CUDA refuses to allocate zero bytes.)
        Tensor::zeros(1, DType::F32, x.device())?
    } else {
        let flat = lora
            .iter()
            .map(|var| var.as_tensor().flatten_all())
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&flat, 0)?
    };
    let x = x.contiguous()?;
    let output = Mutex::new(Some(output));
    x.apply_op2(&parameters, Residual { held, output })
}

/// The attention op's forward, holding what its backward reads: q, k and v as it read
/// them, and its output.
struct AttentionPass {
    op: Arc<CausalAttention>,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
}

/// The attention half's branch: `o_proj(attention(rope(q), rope(k), v))` over the normed
/// input's projections.
struct AttentionBranch {
    norm: NormPass,
    /// The input of q, k and v.
    normed: Tensor,
    q: ProjectionPass,
    k: ProjectionPass,
    v: ProjectionPass,
    q_rope: Rope,
    k_rope: Rope,
    attention: AttentionPass,
    /// The o projection, whose input (the attention's output as (B, L, H·D)) is copied
    /// again from the attention's in the backward rather than kept beside it: a pass over
    /// a hidden-sized tensor, against holding a second copy a layer until the backward.
    o: ProjectionPass,
}

/// The attention's output (B, H, L, D) as the o projection reads it, (B, L, H·D).
fn merge_heads(out: &Tensor) -> Result<Tensor> {
    let (batch, heads, len, dim) = out.dims4()?;
    out.transpose(1, 2)?.reshape((batch, len, heads * dim))
}

impl Branch for AttentionBranch {
    const NAME: &'static str = "attention-block";

    /// Each gradient is dropped once used: they are activation-sized, and the
    /// op-by-op graph would hold no more of them at once.
    fn backward(&self, grad: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let AttentionPass { op, q, k, v, out } = &self.attention;
        let (batch, heads, len, dim) = q.dims4()?;
        let kv_heads = k.dim(1)?;
        let (d_out, o_lora) = self.o.backward(&merge_heads(out)?, grad)?;
        let d_out = d_out.reshape((batch, len, heads, dim))?.transpose(1, 2)?;
        let (dq, dk, dv) = op.input_gradients(q, k, v, out, &d_out)?;
        drop(d_out);
        // Back from heads-major (B, H, L, D) to the projections' (B, L, H·D), and on
        // through them to the normed input, which all three read.
        let dq = self
            .q_rope
            .input_gradient(&dq)?
            .reshape((batch, len, heads * dim))?;
        let (d_normed, q_lora) = self.q.backward(&self.normed, &dq)?;
        drop(dq);
        let dk = self
            .k_rope
            .input_gradient(&dk)?
            .reshape((batch, len, kv_heads * dim))?;
        let (dn_k, k_lora) = self.k.backward(&self.normed, &dk)?;
        drop(dk);
        let d_normed = (d_normed + dn_k)?;
        let dv = dv.transpose(1, 2)?.reshape((batch, len, kv_heads * dim))?;
        let (dn_v, v_lora) = self.v.backward(&self.normed, &dv)?;
        drop(dv);
        let d_normed = (d_normed + dn_v)?;
        let dx = self.norm.backward(&d_normed)?;
        Ok((dx, [q_lora, k_lora, v_lora, o_lora].concat()))
    }
}

/// What a checkpointed attention block keeps of its first forward besides its input: the
/// attention's output and its op, which holds each query row's logsumexp. The forward run
/// again for the backward then makes q, k and v but runs neither the attention, the one
/// part of a layer whose cost grows with the square of the sequence, nor the o
/// projection; it costs a hidden-sized tensor a layer (and B·H·L logsumexps), beside the
/// two half layers' inputs the checkpoints hold anyway.
struct AttentionOutput {
    op: Arc<CausalAttention>,
    out: Tensor,
}

impl Attention {
    /// `x + attention(norm(x))` as one node ([`AttentionBranch`]) keeping `keep` for its
    /// backward, for whole sequences seen through `segments`.
    pub(super) fn block(
        &self,
        norm: &RmsNorm,
        x: &Tensor,
        (rotary, segments): (&Rotary, &Segments),
        dropout: Option<DropoutKey>,
        keep: Keep,
    ) -> Result<Tensor> {
        let branch = self.branch(norm, x, (rotary, segments), dropout, None)?;
        let recompute = |first: AttentionBranch| -> Recompute<AttentionBranch> {
            let kept = AttentionOutput {
                op: first.attention.op,
                out: first.attention.out,
            };
            let (attention, norm) = (self.clone(), norm.clone());
            let (rotary, segments) = (rotary.clone(), segments.clone());
            Box::new(move |x| {
                let again = Some(&kept);
                Ok(attention
                    .branch(&norm, x, (&rotary, &segments), dropout, again)?
                    .0)
            })
        };
        let lora = lora_of(&[&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj]);
        half_layer(x, branch, keep, recompute, &lora)
    }

    /// The attention branch's passes and its output; run again for the backward (`again`:
    /// what the first forward kept), only the passes.
    fn branch(
        &self,
        norm: &RmsNorm,
        x: &Tensor,
        (rotary, segments): (&Rotary, &Segments),
        dropout: Option<DropoutKey>,
        again: Option<&AttentionOutput>,
    ) -> Result<(AttentionBranch, Option<Tensor>)> {
        let (batch, len, _) = x.dims3()?;
        let (norm_pass, normed) = NormPass::run(norm, x)?;
        let (q_pass, q_out) = ProjectionPass::run(&self.q_proj, &normed, dropout)?;
        let (k_pass, k_out) = ProjectionPass::run(&self.k_proj, &normed, dropout)?;
        let (v_pass, v_out) = ProjectionPass::run(&self.v_proj, &normed, dropout)?;
        let heads_major = |out: Tensor, heads: usize| -> Result<(Rope, Tensor)> {
            let out = out.reshape((batch, len, heads, self.head_dim))?;
            let (op, out) = rope_heads_major_op(&out, &rotary.cos, &rotary.sin)?;
            let rotated = out.apply_op1_no_bwd(&op)?;
            Ok((op, rotated))
        };
        let (q_rope, q_heads) = heads_major(q_out, self.heads)?;
        let (k_rope, k_heads) = heads_major(k_out, self.kv_heads)?;
        let v_heads = v_out
            .reshape((batch, len, self.kv_heads, self.head_dim))?
            .transpose(1, 2)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let (op, [q, k, v]) = causal_attention_op(&q_heads, &k_heads, &v_heads, segments, scale)?;
        drop((q_heads, k_heads, v_heads));
        let (op, out) = match again {
            Some(kept) => (kept.op.clone(), kept.out.clone()),
            None => {
                let out = q.apply_op3_no_bwd(&k, &v, &op)?;
                (Arc::new(op), out)
            }
        };
        let (o_pass, output) = match again {
            Some(_) => (
                ProjectionPass::new(&self.o_proj, out.dtype(), dropout)?,
                None,
            ),
            None => {
                let merged = merge_heads(&out)?;
                let (pass, output) = ProjectionPass::run(&self.o_proj, &merged, dropout)?;
                (pass, Some(output))
            }
        };
        let branch = AttentionBranch {
            norm: norm_pass,
            normed,
            q: q_pass,
            k: k_pass,
            v: v_pass,
            q_rope,
            k_rope,
            attention: AttentionPass { op, q, k, v, out },
            o: o_pass,
        };
        Ok((branch, output))
    }
}

/// The MLP half's branch: `down_proj(silu(gate_proj(n)) · up_proj(n))` over the normed
/// input `n`. The down projection's input is computed again in the backward rather than
/// kept: one pass over the gate and up outputs, which are kept anyway, against holding an
/// intermediate-sized tensor a layer from the forward to the backward (as Unsloth does).
struct MlpBranch {
    norm: NormPass,
    /// The input of gate and up.
    normed: Tensor,
    gate: ProjectionPass,
    up: ProjectionPass,
    swiglu: SwiGlu,
    /// The gate's and the up projection's outputs, which SwiGLU reads.
    gate_out: Tensor,
    up_out: Tensor,
    down: ProjectionPass,
}

impl Branch for MlpBranch {
    const NAME: &'static str = "mlp-block";

    fn backward(&self, grad: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let gated = self.gate_out.apply_op2_no_bwd(&self.up_out, &self.swiglu)?;
        let (d_gated, down_lora) = self.down.backward(&gated, grad)?;
        drop(gated);
        let (d_gate, d_up) = self
            .swiglu
            .gradients(&self.gate_out, &self.up_out, &d_gated)?;
        drop(d_gated);
        let (d_normed, gate_lora) = self.gate.backward(&self.normed, &d_gate)?;
        drop(d_gate);
        let (dn_up, up_lora) = self.up.backward(&self.normed, &d_up)?;
        drop(d_up);
        let dx = self.norm.backward(&(d_normed + dn_up)?)?;
        Ok((dx, [gate_lora, up_lora, down_lora].concat()))
    }
}

impl Mlp {
    /// `x + mlp(norm(x))` as one node ([`MlpBranch`]) keeping `keep` for its backward.
    pub(super) fn block(
        &self,
        norm: &RmsNorm,
        x: &Tensor,
        dropout: Option<DropoutKey>,
        keep: Keep,
    ) -> Result<Tensor> {
        let branch = self.branch(norm, x, dropout, false)?;
        let recompute = |first: MlpBranch| -> Recompute<MlpBranch> {
            drop(first);
            let (mlp, norm) = (self.clone(), norm.clone());
            Box::new(move |x| Ok(mlp.branch(&norm, x, dropout, true)?.0))
        };
        let lora = lora_of(&[&self.gate_proj, &self.up_proj, &self.down_proj]);
        half_layer(x, branch, keep, recompute, &lora)
    }

    /// The MLP branch's passes and its output; run `again` for the backward, only the
    /// passes: neither SwiGLU nor the down projection, whose input the backward makes
    /// itself.
    fn branch(
        &self,
        norm: &RmsNorm,
        x: &Tensor,
        dropout: Option<DropoutKey>,
        again: bool,
    ) -> Result<(MlpBranch, Option<Tensor>)> {
        let (norm_pass, normed) = NormPass::run(norm, x)?;
        let (gate, gate_out) = ProjectionPass::run(&self.gate_proj, &normed, dropout)?;
        let (up, up_out) = ProjectionPass::run(&self.up_proj, &normed, dropout)?;
        let (swiglu, [gate_out, up_out]) = swiglu_op(&gate_out, &up_out)?;
        let (down, output) = if again {
            let down = ProjectionPass::new(&self.down_proj, gate_out.dtype(), dropout)?;
            (down, None)
        } else {
            let gated = gate_out.apply_op2_no_bwd(&up_out, &swiglu)?;
            let (down, output) = ProjectionPass::run(&self.down_proj, &gated, dropout)?;
            (down, Some(output))
        };
        let branch = MlpBranch {
            norm: norm_pass,
            normed,
            gate,
            up,
            swiglu,
            gate_out,
            up_out,
            down,
        };
        Ok((branch, output))
    }
}
