//! The causal attention op on CUDA: the same online softmax, the same masks from positions,
//! row lengths and sequence bounds (packed rows), and the same recomputing backward as the CPU implementation in
//! `attention.rs`, with f32 arithmetic over f32 or bf16 tensors.
//!
//! One thread owns one query row (forward, dQ) or one key row (dK, dV, summed over the
//! query heads sharing it), and the rows it reads from the other side stream through
//! shared memory in tiles, so memory stays O(B·H·L·D) and no B·H·L² tensor exists. The
//! head dimension is a template constant (16, 32 or 64) so each row's vectors stay in
//! registers; other sizes keep the composed attention. In bf16 on GPUs with tensor cores
//! (compute capability 8.0 and up) the forward, dQ and dK/dV kernels are instead those of
//! `attention_mma.cu`: a warp per 16 rows, its products on tensor cores, the same inputs
//! and outputs (so `delta` and `sum_shares` serve both).
//!
//! The kernels' CUDA C lives in `kernels/cuda/`, where `tests/emulated_kernels.rs` also
//! compiles it for the CPU and runs it against attention in f64.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result};

use crate::segments::Bounds;

/// Head dimensions with a compiled kernel.
pub(crate) const HEAD_DIMS: [usize; 3] = [16, 32, 64];

/// Query rows per forward and dQ block; key rows per dK/dV block.
const QUERY_ROWS: u32 = 64;
const KEY_ROWS: u32 = 32;
/// Rows per tensor-core block, and its threads: four warps of 16 rows each.
const MMA_ROWS: u32 = 64;
const MMA_THREADS: u32 = 128;

/// The sizes of one call, as the kernels take them.
#[derive(Clone, Copy)]
pub(crate) struct Shape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub len: usize,
    pub dim: usize,
}

impl Shape {
    fn query_entries(&self) -> usize {
        self.batch * self.heads * self.len * self.dim
    }

    fn key_entries(&self) -> usize {
        self.batch * self.kv_heads * self.len * self.dim
    }

    fn rows(&self) -> usize {
        self.batch * self.heads * self.len
    }
}

/// Whether attention over tensors of `dtype` runs on tensor cores on `device`: bf16, on a
/// GPU that has them, where they are allowed ([`crate::allow_tensor_cores`]).
pub(crate) fn tensor_cores(device: &candle_core::CudaDevice, dtype: DType) -> Result<bool> {
    Ok(dtype == DType::BF16 && crate::cuda::bf16_tensor_cores(device)?)
}

/// The kernels' name suffix for `q` (dtype and head dimension), and whether they are the
/// tensor-core ones.
fn family(q: &CudaStorage, dim: usize) -> Result<(String, bool)> {
    Ok((suffix(q.dtype(), dim)?, tensor_cores(&q.device, q.dtype())?))
}

fn suffix(dtype: DType, dim: usize) -> Result<String> {
    let name = match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        other => candle_core::bail!("causal attention on CUDA takes f32 or bf16, not {other:?}"),
    };
    if !HEAD_DIMS.contains(&dim) {
        candle_core::bail!("causal attention on CUDA: no kernel for head dimension {dim}");
    }
    Ok(format!("{name}_{dim}"))
}

fn contiguous_range(layout: &Layout) -> Result<std::ops::Range<usize>> {
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("causal attention: an input is not contiguous".into())
    })?;
    Ok(start..end)
}

/// What the kernels read of which keys each query sees, on the device.
struct Visibility {
    /// Each row's real length, clamped to the sequence (B entries).
    lengths: CudaSlice<u32>,
    /// Each position's first visible key (B·L entries).
    starts: CudaSlice<u32>,
    /// One past the last query that sees each key (B·L entries).
    ends: CudaSlice<u32>,
}

fn upload_visibility(
    device: &candle_core::CudaDevice,
    (lengths, bounds): (&[usize], &Bounds),
    shape: Shape,
) -> Result<Visibility> {
    let lengths: Vec<u32> = (0..shape.batch)
        .map(|b| lengths.get(b).copied().unwrap_or(0).min(shape.len) as u32)
        .collect();
    let positions = shape.batch * shape.len;
    if bounds.starts.len() != positions || bounds.ends.len() != positions {
        candle_core::bail!(
            "causal attention: bounds for {} positions, not {positions}",
            bounds.starts.len()
        );
    }
    Ok(Visibility {
        lengths: device.clone_htod(&lengths)?,
        starts: device.clone_htod(&bounds.starts)?,
        ends: device.clone_htod(&bounds.ends)?,
    })
}

/// Blocks of `threads` threads covering `rows` rows `per_block` at a time, times
/// `blocks_y`.
fn grid(rows: usize, (per_block, threads): (u32, u32), blocks_y: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((rows as u32).div_ceil(per_block), blocks_y as u32, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Rows and threads per block of the forward and dQ kernels, and of dK/dV's: a thread
/// per row, or on tensor cores a warp per 16 rows.
fn blocks(tensor_cores: bool) -> [(u32, u32); 2] {
    if tensor_cores {
        [(MMA_ROWS, MMA_THREADS); 2]
    } else {
        [(QUERY_ROWS, QUERY_ROWS), (KEY_ROWS, KEY_ROWS)]
    }
}

/// A kernel of the family `blocks` chose, `attention_{kernel}_{name}` or its tensor-core
/// twin, loaded on `device`. (A macro: candle does not export the loaded function's type.)
macro_rules! load_kernel {
    ($device:expr, $kernel:expr, ($name:expr, $tensor_cores:expr)) => {{
        let (infix, module, program) = if $tensor_cores {
            (
                "_mma",
                "trainer_kernels_attention_mma",
                &TENSOR_CORE_PROGRAM,
            )
        } else {
            ("", "trainer_kernels_attention", &PROGRAM)
        };
        $device.get_or_load_custom_func(
            &format!("attention_{}{infix}_{}", $kernel, $name),
            module,
            &program.ptx()?,
        )
    }};
}

/// The forward pass: the output (in the inputs' type) and each query row's logsumexp.
#[allow(unsafe_code)]
pub(crate) fn forward(
    (q, q_layout): (&CudaStorage, &Layout),
    (k, k_layout): (&CudaStorage, &Layout),
    (v, v_layout): (&CudaStorage, &Layout),
    visibility: (&[usize], &Bounds),
    scale: f64,
    shape: Shape,
) -> Result<(CudaStorage, CudaSlice<f32>)> {
    fn launch<T: CudaDType + DeviceRepr>(
        inputs: [(&CudaStorage, std::ops::Range<usize>); 3],
        visibility: (&[usize], &Bounds),
        scale: f32,
        shape: Shape,
        (name, tensor_cores): (&str, bool),
    ) -> Result<(CudaStorage, CudaSlice<f32>)> {
        let device = inputs[0].0.device.clone();
        let function = load_kernel!(device, "forward", (name, tensor_cores))?;
        let [q, k, v] = inputs.map(|(storage, range)| (storage, range));
        let q = q.0.as_cuda_slice::<T>()?.slice(q.1);
        let k = k.0.as_cuda_slice::<T>()?.slice(k.1);
        let v = v.0.as_cuda_slice::<T>()?.slice(v.1);
        let visibility = upload_visibility(&device, visibility, shape)?;
        // SAFETY: every output entry and every logsumexp is written by the kernel (one
        // thread, or on tensor cores one quad of lanes, per query row) before anything
        // reads it.
        let out = unsafe { device.alloc::<T>(shape.query_entries())? };
        // SAFETY: as above.
        let logsumexp = unsafe { device.alloc::<f32>(shape.rows())? };
        let (heads, kv_heads, len) = (shape.heads as i32, shape.kv_heads as i32, shape.len as i32);
        let mut builder = function.builder();
        builder.arg(&q);
        builder.arg(&k);
        builder.arg(&v);
        builder.arg(&out);
        builder.arg(&logsumexp);
        builder.arg(&visibility.lengths);
        builder.arg(&visibility.starts);
        builder.arg(&heads);
        builder.arg(&kv_heads);
        builder.arg(&len);
        builder.arg(&scale);
        let config = grid(
            shape.len,
            blocks(tensor_cores)[0],
            shape.batch * shape.heads,
        );
        // SAFETY: q holds B·H·L·D entries and k, v B·KV·L·D (checked by the caller), the
        // outputs were sized from the same shape, lengths holds B entries and starts B·L.
        unsafe { builder.launch(config) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, device), logsumexp))
    }

    let (name, tensor_cores) = family(q, shape.dim)?;
    let kernels = (name.as_str(), tensor_cores);
    let inputs = [
        (q, contiguous_range(q_layout)?),
        (k, contiguous_range(k_layout)?),
        (v, contiguous_range(v_layout)?),
    ];
    let scale = scale as f32;
    match q.dtype() {
        DType::F32 => launch::<f32>(inputs, visibility, scale, shape, kernels),
        _ => launch::<half::bf16>(inputs, visibility, scale, shape, kernels),
    }
}

/// What the backward reads besides q, k and v: the forward's output and logsumexp, and
/// the output's gradient (all contiguous).
pub(crate) struct Saved<'a> {
    pub out: (&'a CudaStorage, &'a Layout),
    pub grad: (&'a CudaStorage, &'a Layout),
    pub logsumexp: &'a CudaSlice<f32>,
}

/// The gradients of q, k and v in one buffer, in that order (the inputs' type).
#[allow(unsafe_code)]
pub(crate) fn backward(
    (q, q_layout): (&CudaStorage, &Layout),
    (k, k_layout): (&CudaStorage, &Layout),
    (v, v_layout): (&CudaStorage, &Layout),
    saved: Saved<'_>,
    visibility: (&[usize], &Bounds),
    scale: f64,
    shape: Shape,
) -> Result<CudaStorage> {
    fn launch<T: CudaDType + DeviceRepr>(
        inputs: [(&CudaStorage, std::ops::Range<usize>); 5],
        logsumexp: &CudaSlice<f32>,
        visibility: (&[usize], &Bounds),
        scale: f32,
        shape: Shape,
        (name, tensor_cores): (&str, bool),
    ) -> Result<CudaStorage> {
        let device = inputs[0].0.device.clone();
        let view = |i: usize| -> Result<_> {
            let (storage, range) = &inputs[i];
            Ok(storage.as_cuda_slice::<T>()?.slice(range.clone()))
        };
        let (q, k, v, out, grad) = (view(0)?, view(1)?, view(2)?, view(3)?, view(4)?);
        let visibility = upload_visibility(&device, visibility, shape)?;
        let (heads, kv_heads, len) = (shape.heads as i32, shape.kv_heads as i32, shape.len as i32);
        let rows = shape.rows() as u64;

        // Each row's Σ dO·O, which every probability's gradient subtracts.
        // SAFETY: the kernel writes every row's entry before the others read it.
        let delta = unsafe { device.alloc::<f32>(shape.rows())? };
        let function = load_kernel!(device, "delta", (name, false))?;
        let mut builder = function.builder();
        builder.arg(&out);
        builder.arg(&grad);
        builder.arg(&delta);
        builder.arg(&rows);
        // SAFETY: out and grad hold `rows` rows of D entries, delta `rows` entries.
        unsafe { builder.launch(LaunchConfig::for_num_elems(rows as u32)) }.w()?;

        let (nq, nk) = (shape.query_entries(), shape.key_entries());
        let group = shape.heads / shape.kv_heads;
        // SAFETY: dQ's kernel writes every query row; the group sum every dK and dV entry.
        let mut gradients = unsafe { device.alloc::<T>(nq + 2 * nk)? };
        // Each query head's share of dK and dV, in f32, summed over the group afterwards.
        // SAFETY: every (head, key row) pair of the grid writes its share.
        let shares = unsafe { device.alloc::<f32>(group * 2 * nk)? };
        let (mut dq, mut dkv) = gradients.split_at_mut(nq);

        // dQ over the query rows; dK and dV over the key rows, and the query heads.
        let [query_blocks, key_blocks] = blocks(tensor_cores);
        let kernels = [
            (
                "grad_q",
                grid(shape.len, query_blocks, shape.batch * shape.heads),
            ),
            ("grad_kv", {
                let mut config = grid(shape.len, key_blocks, shape.batch * shape.kv_heads);
                config.grid_dim.2 = group as u32;
                config
            }),
        ];
        for (kernel, config) in kernels {
            let function = load_kernel!(device, kernel, (name, tensor_cores))?;
            let mut builder = function.builder();
            builder.arg(&q);
            builder.arg(&k);
            builder.arg(&v);
            builder.arg(&grad);
            builder.arg(logsumexp);
            builder.arg(&delta);
            builder.arg(&visibility.lengths);
            // dQ reads each query's first key; dK and dV each key's last query.
            if kernel == "grad_q" {
                builder.arg(&visibility.starts);
            } else {
                builder.arg(&visibility.ends);
            }
            builder.arg(&heads);
            builder.arg(&kv_heads);
            builder.arg(&len);
            builder.arg(&scale);
            if kernel == "grad_q" {
                builder.arg(&mut dq);
            } else {
                builder.arg(&shares);
            }
            // SAFETY: the sizes are those of the forward; dQ holds B·H·L·D entries, the
            // shares group·2·B·KV·L·D.
            unsafe { builder.launch(config) }.w()?;
        }
        let function = load_kernel!(device, "sum_shares", (name, false))?;
        let mut builder = function.builder();
        let (entries, members) = ((2 * nk) as u64, group as i32);
        builder.arg(&shares);
        builder.arg(&mut dkv);
        builder.arg(&entries);
        builder.arg(&members);
        // SAFETY: shares holds `members` runs of `entries` floats, dkv `entries` entries.
        unsafe { builder.launch(LaunchConfig::for_num_elems(entries as u32)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(gradients, device))
    }

    let (name, tensor_cores) = family(q, shape.dim)?;
    let kernels = (name.as_str(), tensor_cores);
    let inputs = [
        (q, contiguous_range(q_layout)?),
        (k, contiguous_range(k_layout)?),
        (v, contiguous_range(v_layout)?),
        (saved.out.0, contiguous_range(saved.out.1)?),
        (saved.grad.0, contiguous_range(saved.grad.1)?),
    ];
    let scale = scale as f32;
    let saved = saved.logsumexp;
    match q.dtype() {
        DType::F32 => launch::<f32>(inputs, saved, visibility, scale, shape, kernels),
        _ => launch::<half::bf16>(inputs, saved, visibility, scale, shape, kernels),
    }
}

/// The kernels. Row `i` of batch row `b` sees keys `starts[b·L + i] ≤ j < min(i + 1,
/// length[b])`, and key `j` is seen by queries `j ≤ i < ends[b·L + j]` (its sequence's
/// end); a row that sees none outputs 0 and has logsumexp −∞.
const SOURCE: &str = crate::cuda::cuda_source!("../cuda/attention.cu");

static PROGRAM: crate::cuda::Program = crate::cuda::Program::new(SOURCE);

/// The forward on tensor cores (bf16 only): the same inputs, output and logsumexp.
const TENSOR_CORE_SOURCE: &str = crate::cuda::cuda_source!("../cuda/attention_mma.cu");

static TENSOR_CORE_PROGRAM: crate::cuda::Program =
    crate::cuda::Program::for_arch(TENSOR_CORE_SOURCE, "compute_80");
