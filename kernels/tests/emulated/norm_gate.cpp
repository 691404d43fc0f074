// RMSNorm and SwiGLU (norm_gate.cu) run by the CPU emulator as `norm_gate_cuda.rs`
// launches them (RMSNorm: a block of 256 threads per row; SwiGLU: a grid-stride loop), in
// f32 and bf16, forward and backward, against the same formulas in f64: rows longer than a
// block and not a multiple of a warp. Prints a line per dtype; exits 1 if any is off.
#include "cuda_emulator.h"

#include "../../cuda/prelude.cuh"
#include "../../cuda/norm_gate.cu"

#include <cstdio>

#include "check.h"

namespace {

template <typename T>
struct Kernels {
    void (*norm_forward)(const T *, const T *, T *, u64, float);
    void (*norm_backward)(const T *, const T *, const T *, T *, u64, float);
    void (*gate_forward)(const T *, const T *, T *, u64, float);
    void (*gate_backward)(const T *, const T *, const T *, T *, u64, float);
};

template <typename T>
bool run(const char *name, const Kernels<T> &kernels, double tolerance) {
    const std::size_t rows = 3, n = 300;
    const float eps = 1e-5f;
    std::uint64_t seed = 5;
    const std::vector<T> x = check::random<T>(rows * n, 1.5, seed);
    const std::vector<T> w = check::random<T>(n, 1.0, seed);
    const std::vector<T> g = check::random<T>(rows * n, 1.0, seed);
    const std::vector<T> up = check::random<T>(rows * n, 1.0, seed);
    const T nan = check::narrow<T>(NAN);
    const u64 count = rows * n;
    // y, dx, swiglu(x, up) and its two gradients (gate = x), SwiGLU in fewer threads than
    // entries.
    const auto compute = [&] {
        std::vector<std::vector<T>> results = {std::vector<T>(rows * n, nan),
                                               std::vector<T>(rows * n, nan),
                                               std::vector<T>(count, nan),
                                               std::vector<T>(2 * count, nan)};
        emulator::launch(dim3(rows), dim3(256), [&] {
            kernels.norm_forward(x.data(), w.data(), results[0].data(), n, eps);
        });
        emulator::launch(dim3(rows), dim3(256), [&] {
            kernels.norm_backward(x.data(), w.data(), g.data(), results[1].data(), n, eps);
        });
        emulator::launch(dim3(2), dim3(128), [&] {
            kernels.gate_forward(x.data(), up.data(), results[2].data(), count, 0.0f);
        });
        emulator::launch(dim3(2), dim3(128), [&] {
            kernels.gate_backward(x.data(), up.data(), g.data(), results[3].data(), count, 0.0f);
        });
        return results;
    };
    const std::vector<std::vector<T>> results = compute();
    const std::vector<std::vector<T>> reverse = check::in_reverse(compute);
    bool ordered = true;
    for (std::size_t i = 0; i < results.size(); ++i)
        ordered &= check::same_bits(results[i], reverse[i]);
    const std::vector<T> &y = results[0], &dx = results[1];
    const std::vector<T> &gated = results[2], &both = results[3];
    std::vector<double> y_ref(rows * n), dx_ref(rows * n);
    std::vector<double> gated_ref(count), dgate(count), dup(count);
    for (std::size_t r = 0; r < rows; ++r) {
        double squares = 0.0, projection = 0.0;
        for (std::size_t c = 0; c < n; ++c) {
            const double v = check::widen(x[r * n + c]);
            squares += v * v;
            projection += check::widen(g[r * n + c]) * check::widen(w[c]) * v;
        }
        const double inverse = 1.0 / std::sqrt(squares / n + eps);
        for (std::size_t c = 0; c < n; ++c) {
            const double v = check::widen(x[r * n + c]), wc = check::widen(w[c]);
            y_ref[r * n + c] = v * inverse * wc;
            dx_ref[r * n + c] = check::widen(g[r * n + c]) * wc * inverse -
                                v * inverse * inverse * inverse * projection / n;
        }
    }
    for (std::size_t i = 0; i < count; ++i) {
        const double gate = check::widen(x[i]), u = check::widen(up[i]), dy = check::widen(g[i]);
        const double s = 1.0 / (1.0 + std::exp(-gate));
        gated_ref[i] = gate * s * u;
        dgate[i] = dy * u * s * (1.0 + gate * (1.0 - s));
        dup[i] = dy * gate * s;
    }
    const double errors[] = {check::worst(y, y_ref, 0, true), check::worst(dx, dx_ref, 0, true),
                             check::worst(gated, gated_ref, 0, true),
                             check::worst(both, dgate, 0, true),
                             check::worst(both, dup, count, true)};
    bool ok = ordered;
    for (double error : errors) ok &= error <= tolerance;
    std::printf("norm_gate %-4s (relative): rms_norm %.1e  its dx %.1e  swiglu %.1e  "
                "d gate %.1e  d up %.1e  %s\n",
                name, errors[0], errors[1], errors[2], errors[3], errors[4],
                check::verdict(ok, ordered));
    return ok;
}

}  // namespace

int main() {
    const Kernels<float> f32 = {rms_norm_forward_f32, rms_norm_backward_f32, swiglu_forward_f32,
                                swiglu_backward_f32};
    const Kernels<unsigned short> bf16 = {rms_norm_forward_bf16, rms_norm_backward_bf16,
                                          swiglu_forward_bf16, swiglu_backward_bf16};
    // Differences relative to the larger of 1 and the expected value: bf16 results are
    // rounded to within 2⁻⁸ of theirs.
    bool passed = run<float>("f32", f32, 2e-6);
    passed &= run<unsigned short>("bf16", bf16, 6e-3);
    return passed ? 0 : 1;
}
