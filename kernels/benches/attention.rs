//! The CPU attention op alone, forward and backward, on one shape.
//!
//!   cargo bench -p trainer-kernels --bench attention -- [batch heads kv_heads len dim runs]
//!
//! Prints one JSON line: the best and median milliseconds of each pass over `runs` runs on
//! a pool of as many threads as the machine has, as training runs it (a step runs inside
//! the pool). `scripts/bench-trainer --attention` puts it beside PyTorch's SDPA.

use candle_core::{Device, Result, Tensor};
use std::time::Instant;
use trainer_kernels::attention::causal_attention_op;
use trainer_kernels::Segments;

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let get = |i: usize, default: usize| args.get(i).copied().unwrap_or(default);
    let (batch, heads, kv_heads, len, dim, runs) = (
        get(0, 1),
        get(1, 4),
        get(2, 4),
        get(3, 1024),
        get(4, 64),
        get(5, 30).max(1),
    );
    let device = Device::Cpu;
    let q = Tensor::randn(0f32, 1.0, (batch, heads, len, dim), &device)?;
    let k = Tensor::randn(0f32, 1.0, (batch, kv_heads, len, dim), &device)?;
    let v = Tensor::randn(0f32, 1.0, (batch, kv_heads, len, dim), &device)?;
    let grad = Tensor::randn(0f32, 1.0, (batch, heads, len, dim), &device)?;
    let segments = Segments::unpacked(&vec![len; batch]);
    let scale = 1.0 / (dim as f64).sqrt();
    let pool = rayon::ThreadPoolBuilder::new()
        .build()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let (mut forward, mut backward) = (Vec::new(), Vec::new());
    pool.install(|| -> Result<()> {
        // One run more than timed: the first allocates.
        for run in 0..=runs {
            let (op, [q, k, v]) = causal_attention_op(&q, &k, &v, &segments, scale)?;
            let started = Instant::now();
            let out = q.apply_op3_no_bwd(&k, &v, &op)?;
            let forward_done = Instant::now();
            op.input_gradients(&q, &k, &v, &out, &grad)?;
            if run > 0 {
                forward.push((forward_done - started).as_secs_f64() * 1e3);
                backward.push(forward_done.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok(())
    })?;
    let summary = |times: &mut Vec<f64>| {
        times.sort_by(f64::total_cmp);
        (times[0], times[times.len() / 2])
    };
    let ((forward_best, forward_median), (backward_best, backward_median)) =
        (summary(&mut forward), summary(&mut backward));
    println!(
        "{{\"forward_best_ms\":{forward_best:.3},\"forward_median_ms\":{forward_median:.3},\
         \"backward_best_ms\":{backward_best:.3},\"backward_median_ms\":{backward_median:.3}}}"
    );
    Ok(())
}
