// The attention kernels (attention.cu: a thread per row; attention_mma.cu: tensor-core
// products), forward and backward as `attention_cuda.rs` launches them, run by the CPU
// emulator on bf16 inputs, against attention and its gradients computed here in f64 from
// the same bf16 values, over rows that are full, padded, packed (sequences crossing
// tiles) and empty, grouped query heads, and every head dimension with a kernel. Prints
// one line per case and implementation; exits 1 if any is off.
#include "cuda_emulator.h"

#include "../../cuda/prelude.cuh"
#include "../../cuda/attention.cu"
#include "../../cuda/attention_mma.cu"

#include <algorithm>
#include <cstdio>
#include <limits>

#include "check.h"

namespace {

struct Case {
    int heads, kv_heads, len, dim;
    std::vector<std::vector<int>> rows;  // each row's sequence lengths; the rest is padding
};

using Forward = void (*)(const unsigned short *, const unsigned short *, const unsigned short *,
                         unsigned short *, float *, const unsigned int *, const unsigned int *,
                         int, int, int, float);
using Delta = void (*)(const unsigned short *, const unsigned short *, float *, u64);
using GradQ = void (*)(const unsigned short *, const unsigned short *, const unsigned short *,
                       const unsigned short *, const float *, const float *,
                       const unsigned int *, const unsigned int *, int, int, int, float,
                       unsigned short *);
using GradKv = void (*)(const unsigned short *, const unsigned short *, const unsigned short *,
                        const unsigned short *, const float *, const float *,
                        const unsigned int *, const unsigned int *, int, int, int, float,
                        float *);
using SumShares = void (*)(const float *, unsigned short *, u64, int);

// One implementation's kernels for one head dimension, and the block sizes it launches.
struct Kernels {
    const char *name;
    Forward forward;
    unsigned int forward_threads;
    GradQ grad_q;
    unsigned int grad_q_threads;
    GradKv grad_kv;
    unsigned int kv_rows_per_block, grad_kv_threads;
    Delta delta;
    SumShares sum_shares;
};

#define KERNELS(D)                                                                         \
    Kernels{"scalar", attention_forward_bf16_##D, 64, attention_grad_q_bf16_##D, 64,        \
            attention_grad_kv_bf16_##D, 32, 32, attention_delta_bf16_##D,                  \
            attention_sum_shares_bf16_##D},                                                \
    Kernels {                                                                              \
        "tensor-core", attention_forward_mma_bf16_##D, 128, attention_grad_q_mma_bf16_##D,  \
            128, attention_grad_kv_mma_bf16_##D, 64, 128, attention_delta_bf16_##D,        \
            attention_sum_shares_bf16_##D                                                  \
    }

std::pair<Kernels, Kernels> kernels_for(int dim) {
    switch (dim) {
        case 16: return {KERNELS(16)};
        case 32: return {KERNELS(32)};
        default: return {KERNELS(64)};
    }
}

// Everything the op computes, as the kernels leave it (bf16 tensors as their bits).
struct Result {
    std::vector<unsigned short> out, dq, dkv;
    std::vector<float> lse;
};

struct Inputs {
    int batch;
    std::vector<unsigned short> q, k, v, upstream;
    std::vector<unsigned int> lengths, starts, ends;
    float scale;
};

Inputs make_inputs(const Case &c, std::uint64_t seed) {
    Inputs in;
    in.batch = (int)c.rows.size();
    const std::size_t queries = (std::size_t)in.batch * c.heads * c.len * c.dim;
    const std::size_t keys = (std::size_t)in.batch * c.kv_heads * c.len * c.dim;
    in.q = check::random<unsigned short>(queries, 1.0, seed);
    in.k = check::random<unsigned short>(keys, 1.0, seed);
    in.v = check::random<unsigned short>(keys, 1.0, seed);
    in.upstream = check::random<unsigned short>(queries, 1.0, seed);
    in.scale = 1.0f / std::sqrt((float)c.dim);
    // As `Segments::bounds`: a sequence's positions start where it starts and end where
    // it ends, the last one's (and the padding's) at the row's end.
    for (const auto &row : c.rows) {
        int start = 0, total = 0;
        for (std::size_t s = 0; s < row.size(); ++s) {
            const bool last = s + 1 == row.size();
            for (int i = 0; i < row[s]; ++i) {
                in.starts.push_back((unsigned int)start);
                in.ends.push_back((unsigned int)(last ? c.len : start + row[s]));
            }
            total += row[s];
            if (!last) start += row[s];
        }
        for (int i = total; i < c.len; ++i) {
            in.starts.push_back((unsigned int)start);
            in.ends.push_back((unsigned int)c.len);
        }
        in.lengths.push_back((unsigned int)total);
    }
    return in;
}

unsigned int blocks(std::size_t count, unsigned int per_block) {
    return (unsigned int)((count + per_block - 1) / per_block);
}

// A copy of `values` `offset` entries into a fresh buffer (whose start operator new
// aligns to 16 bytes): at offset 1 the tensor-core kernels' wide loads do not apply and
// they take their narrow ones.
struct Placed {
    std::vector<unsigned short> buffer;
    std::size_t offset;
    Placed(const std::vector<unsigned short> &values, std::size_t offset)
        : buffer(values.size() + offset), offset(offset) {
        std::copy(values.begin(), values.end(), buffer.begin() + offset);
    }
    const unsigned short *data() const { return buffer.data() + offset; }
};

// The forward and backward as `attention_cuda.rs` launches them, from inputs at 16-byte
// aligned addresses or not.
Result run(const Kernels &kernels, const Case &c, const Inputs &inputs, bool aligned) {
    const std::size_t offset = aligned ? 0 : 1;
    const Placed q(inputs.q, offset), k(inputs.k, offset), v(inputs.v, offset);
    const Placed upstream(inputs.upstream, offset);
    const struct {
        const unsigned short *q, *k, *v, *upstream;
    } in = {q.data(), k.data(), v.data(), upstream.data()};
    const auto &lengths = inputs.lengths, &starts = inputs.starts, &ends = inputs.ends;
    const int batch = inputs.batch;
    const float scale = inputs.scale;
    Result r;
    const std::size_t rows = (std::size_t)batch * c.heads * c.len;
    const std::size_t key_entries = (std::size_t)batch * c.kv_heads * c.len * c.dim;
    const int group = c.heads / c.kv_heads;
    // NaN bits and NaN: an entry no thread writes shows as a mismatch.
    r.out.assign(rows * c.dim, 0xffff);
    r.dq.assign(rows * c.dim, 0xffff);
    r.dkv.assign(2 * key_entries, 0xffff);
    r.lse.assign(rows, std::numeric_limits<float>::quiet_NaN());
    std::vector<float> delta(rows, NAN), shares(group * 2 * key_entries, NAN);
    const dim3 query_grid(blocks(c.len, 64), (unsigned int)(batch * c.heads));
    emulator::launch(query_grid, dim3(kernels.forward_threads), [&] {
        kernels.forward(in.q, in.k, in.v, r.out.data(), r.lse.data(),
                        lengths.data(), starts.data(), c.heads, c.kv_heads, c.len,
                        scale);
    });
    emulator::launch(dim3(blocks(rows, 64)), dim3(64), [&] {
        kernels.delta(r.out.data(), in.upstream, delta.data(), rows);
    });
    emulator::launch(query_grid, dim3(kernels.grad_q_threads), [&] {
        kernels.grad_q(in.q, in.k, in.v, in.upstream,
                       r.lse.data(), delta.data(), lengths.data(), starts.data(),
                       c.heads, c.kv_heads, c.len, scale, r.dq.data());
    });
    const dim3 key_grid(blocks(c.len, kernels.kv_rows_per_block),
                        (unsigned int)(batch * c.kv_heads), (unsigned int)group);
    emulator::launch(key_grid, dim3(kernels.grad_kv_threads), [&] {
        kernels.grad_kv(in.q, in.k, in.v, in.upstream,
                        r.lse.data(), delta.data(), lengths.data(), ends.data(),
                        c.heads, c.kv_heads, c.len, scale, shares.data());
    });
    emulator::launch(dim3(4), dim3(64), [&] {
        kernels.sum_shares(shares.data(), r.dkv.data(), 2 * key_entries, group);
    });
    return r;
}

// Attention and its gradients in f64 from the same bf16 inputs.
struct Reference {
    std::vector<double> out, lse, dq, dk, dv;
};

Reference reference(const Case &c, const Inputs &in) {
    Reference ref;
    const std::size_t rows = (std::size_t)in.batch * c.heads * c.len;
    const std::size_t key_entries = (std::size_t)in.batch * c.kv_heads * c.len * c.dim;
    ref.out.assign(rows * c.dim, 0.0);
    ref.dq.assign(rows * c.dim, 0.0);
    ref.lse.assign(rows, -INFINITY);
    ref.dk.assign(key_entries, 0.0);
    ref.dv.assign(key_entries, 0.0);
    const int group = c.heads / c.kv_heads, dim = c.dim;
    for (int b = 0; b < in.batch; ++b) {
        for (int h = 0; h < c.heads; ++h) {
            const std::size_t kv = ((std::size_t)b * c.kv_heads + h / group) * c.len;
            for (int i = 0; i < c.len; ++i) {
                const std::size_t row = ((std::size_t)b * c.heads + h) * c.len + i;
                const int first = (int)in.starts[(std::size_t)b * c.len + i];
                const int visible = std::min(i + 1, (int)in.lengths[b]);
                if (first >= visible) continue;
                const auto q = [&](int d) { return check::widen(in.q[row * dim + d]); };
                const auto up = [&](int d) { return check::widen(in.upstream[row * dim + d]); };
                const auto key = [&](int j, int d) {
                    return check::widen(in.k[(kv + j) * dim + d]);
                };
                const auto value = [&](int j, int d) {
                    return check::widen(in.v[(kv + j) * dim + d]);
                };
                std::vector<double> p, dp;
                double max = -INFINITY;
                for (int j = first; j < visible; ++j) {
                    double score = 0.0, gradient = 0.0;
                    for (int d = 0; d < dim; ++d) {
                        score += q(d) * key(j, d);
                        gradient += up(d) * value(j, d);
                    }
                    p.push_back(score * in.scale);
                    dp.push_back(gradient);
                    max = std::max(max, p.back());
                }
                double sum = 0.0;
                for (double &x : p) sum += (x = std::exp(x - max));
                double delta = 0.0;
                for (std::size_t n = 0; n < p.size(); ++n) delta += (p[n] /= sum) * dp[n];
                ref.lse[row] = max + std::log(sum);
                for (int j = first; j < visible; ++j) {
                    const double pj = p[j - first], ds = pj * (dp[j - first] - delta) * in.scale;
                    for (int d = 0; d < dim; ++d) {
                        ref.out[row * dim + d] += pj * value(j, d);
                        ref.dq[row * dim + d] += ds * key(j, d);
                        ref.dk[(kv + j) * dim + d] += ds * q(d);
                        ref.dv[(kv + j) * dim + d] += pj * up(d);
                    }
                }
            }
        }
    }
    return ref;
}

}  // namespace

int main() {
    const Case cases[] = {
        // A full row, a padded one, one packed with three sequences across both tiles.
        {4, 2, 100, 64, {{100}, {61}, {30, 45, 20}}},
        // Three tiles of keys and queries; an empty row.
        {2, 1, 130, 32, {{130}, {5, 70, 40}, {}}},
        {2, 2, 70, 16, {{70}, {1, 33, 17}}},
        // Sequences starting 7 past a column block's start and 7 short of one: the edges
        // of the blocks whose products the tensor-core kernels skip.
        {2, 1, 130, 64, {{7, 100, 20}, {23, 60, 40}}},
    };
    // Differences relative to the larger of 1 and the expected value (the logsumexp's
    // absolute): outputs and gradients are bf16 (rounded to within 2⁻⁸), gradients
    // subtract nearly equal terms, and the tensor-core kernels round probabilities and
    // their gradients to bf16 before the products that follow.
    const double tolerance = 3e-2, lse_tolerance = 1e-3;
    bool passed = true;
    std::uint64_t seed = 1;
    for (const Case &c : cases) {
        const Inputs in = make_inputs(c, seed++);
        const Reference ref = reference(c, in);
        const auto [scalar, tensor_cores] = kernels_for(c.dim);
        const std::pair<Kernels, bool> runs[] = {
            {scalar, true}, {tensor_cores, true}, {tensor_cores, false}};
        for (const auto &[kernels, aligned] : runs) {
            const Result r = run(kernels, c, in, aligned);
            const Result reverse = check::in_reverse([&] { return run(kernels, c, in, aligned); });
            const bool ordered = check::same_bits(r.out, reverse.out) &&
                                 check::same_bits(r.lse, reverse.lse) &&
                                 check::same_bits(r.dq, reverse.dq) &&
                                 check::same_bits(r.dkv, reverse.dkv);
            const double errors[] = {check::worst(r.out, ref.out, 0, true),
                                     check::worst(r.lse, ref.lse),
                                     check::worst(r.dq, ref.dq, 0, true),
                                     check::worst(r.dkv, ref.dk, 0, true),
                                     check::worst(r.dkv, ref.dv, ref.dk.size(), true)};
            const bool ok = ordered && errors[0] <= tolerance && errors[1] <= lse_tolerance &&
                            errors[2] <= tolerance && errors[3] <= tolerance &&
                            errors[4] <= tolerance;
            passed &= ok;
            std::printf("%-11s %-9s dim %2d len %3d: out %.1e  lse %.1e  dq %.1e  dk %.1e  "
                        "dv %.1e  %s\n",
                        kernels.name, aligned ? "aligned" : "unaligned", c.dim, c.len, errors[0],
                        errors[1], errors[2], errors[3], errors[4],
                        check::verdict(ok, ordered));
        }
    }
    return passed ? 0 : 1;
}
