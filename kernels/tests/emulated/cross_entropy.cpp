// The loss kernels (cross_entropy.cu) run by the CPU emulator as `cross_entropy_cuda.rs`
// launches them (a block of 256 threads per row), in f32 and bf16, against the loss and
// its gradient in f64: a vocabulary that is not a multiple of the block, targets at both
// ends, masked and half-weighted rows. Prints a line per dtype; exits 1 if any is off.
#include "cuda_emulator.h"

#include "../../cuda/prelude.cuh"
#include "../../cuda/cross_entropy.cu"

#include <cstdio>

#include "check.h"

namespace {

template <typename T>
bool run(const char *name,
         void (*rows_kernel)(const T *, const unsigned int *, const float *, float *, u64, u64),
         void (*gradient_kernel)(const T *, const unsigned int *, const float *, const float *,
                                 T *, u64, u64),
         double tolerance) {
    const std::size_t rows = 5, vocab = 1000;
    std::uint64_t seed = 3;
    const std::vector<T> logits = check::random<T>(rows * vocab, 3.0, seed);
    const std::vector<unsigned int> targets = {0, 999, 17, 500, 3};
    const std::vector<float> mask = {1.0f, 0.0f, 1.0f, 0.5f, 1.0f};
    const auto compute = [&] {
        std::vector<float> statistics(2 * rows, NAN);
        std::vector<T> gradient(rows * vocab, check::narrow<T>(NAN));
        emulator::launch(dim3(rows), dim3(256), [&] {
            rows_kernel(logits.data(), targets.data(), mask.data(), statistics.data(), rows,
                        vocab);
        });
        emulator::launch(dim3(rows), dim3(256), [&] {
            gradient_kernel(logits.data(), targets.data(), mask.data(), statistics.data(),
                            gradient.data(), rows, vocab);
        });
        return std::make_pair(statistics, gradient);
    };
    const auto [statistics, gradient] = compute();
    const auto reverse = check::in_reverse(compute);
    const bool ordered = check::same_bits(statistics, reverse.first) &&
                         check::same_bits(gradient, reverse.second);
    std::vector<double> lse(rows), loss(rows), expected_gradient(rows * vocab);
    for (std::size_t r = 0; r < rows; ++r) {
        double max = -INFINITY, sum = 0.0;
        const auto logit = [&](std::size_t c) { return check::widen(logits[r * vocab + c]); };
        for (std::size_t c = 0; c < vocab; ++c) max = std::max(max, logit(c));
        for (std::size_t c = 0; c < vocab; ++c) sum += std::exp(logit(c) - max);
        lse[r] = max + std::log(sum);
        loss[r] = mask[r] * (lse[r] - check::widen(logits[r * vocab + targets[r]]));
        for (std::size_t c = 0; c < vocab; ++c) {
            const double p = std::exp(check::widen(logits[r * vocab + c]) - lse[r]);
            expected_gradient[r * vocab + c] = mask[r] * (p - (c == targets[r] ? 1.0 : 0.0));
        }
    }
    const double errors[] = {check::worst(statistics, lse), check::worst(statistics, loss, rows),
                             check::worst(gradient, expected_gradient)};
    const bool ok = ordered && errors[0] <= 1e-5 && errors[1] <= 1e-5 && errors[2] <= tolerance;
    std::printf("cross_entropy %-4s: logsumexp %.1e  loss %.1e  gradient %.1e  %s\n", name,
                errors[0], errors[1], errors[2],
                check::verdict(ok, ordered));
    return ok;
}

}  // namespace

int main() {
    // The gradient is stored in the logits' type: bf16 rounds probabilities up to 1 by
    // at most 2⁻⁹.
    bool passed = run<float>("f32", cross_entropy_rows_f32, cross_entropy_gradient_f32, 1e-6);
    passed &= run<unsigned short>("bf16", cross_entropy_rows_bf16, cross_entropy_gradient_bf16,
                                  2.5e-3);
    return passed ? 0 : 1;
}
