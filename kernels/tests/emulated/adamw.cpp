// The fused AdamW update (adamw.cu) run by the CPU emulator over the flat buffer
// (parameters, first moments, second moments) against PyTorch's AdamW computed here in
// f64 from its definition: bias-corrected moments, decoupled weight decay, the gradient
// clipped first. The kernel's constants are made as `kernels/src/adamw.rs` makes them.
// Prints a line per case; exits 1 if any is off.
#include "cuda_emulator.h"

#include "../../cuda/prelude.cuh"
#include "../../cuda/adamw.cu"

#include <cstdio>

#include "check.h"

namespace {

struct Step {
    double learning_rate, beta1, beta2, eps, weight_decay, clip;
    int t;
};

bool run(const Step &step) {
    const std::size_t n = 1000;
    std::uint64_t seed = 17 + step.t;
    // Moments as a run would have them: m of either sign, v positive.
    std::vector<float> state = check::random<float>(3 * n, 1.0, seed);
    for (std::size_t i = 0; i < n; ++i) {
        state[n + i] *= 0.1f;
        state[2 * n + i] = state[2 * n + i] * state[2 * n + i] * 0.01f;
    }
    const std::vector<float> gradient = check::random<float>(n, 0.5, seed);
    const float clip = (float)step.clip;
    const double t = step.t;
    const float step_size =
        (float)(step.learning_rate / (1.0 - std::pow(step.beta1, t)));
    const float inverse_root_correction = (float)(1.0 / std::sqrt(1.0 - std::pow(step.beta2, t)));
    const float decay = (float)(1.0 - step.learning_rate * step.weight_decay);
    const auto compute = [&] {
        std::vector<float> updated = state;
        emulator::launch(dim3(2), dim3(128), [&] {
            adamw_f32(n, updated.data(), gradient.data(), &clip, (float)step.beta1,
                      (float)step.beta2, step_size, inverse_root_correction, (float)step.eps,
                      decay);
        });
        return updated;
    };
    const std::vector<float> updated = compute();
    const bool ordered = check::same_bits(updated, check::in_reverse(compute));
    std::vector<double> expected(3 * n);
    for (std::size_t i = 0; i < n; ++i) {
        const double g = (double)gradient[i] * clip;
        const double m = step.beta1 * state[n + i] + (1.0 - step.beta1) * g;
        const double v = step.beta2 * state[2 * n + i] + (1.0 - step.beta2) * g * g;
        const double m_hat = m / (1.0 - std::pow(step.beta1, t));
        const double v_hat = v / (1.0 - std::pow(step.beta2, t));
        const double p = state[i] * (1.0 - step.learning_rate * step.weight_decay);
        expected[i] = p - step.learning_rate * m_hat / (std::sqrt(v_hat) + step.eps);
        expected[n + i] = m;
        expected[2 * n + i] = v;
    }
    const double error = check::worst(updated, expected, 0, true);
    const bool ok = ordered && error <= 1e-6;
    std::printf("adamw t %3d lr %g decay %g clip %g: %.1e  %s\n", step.t, step.learning_rate,
                step.weight_decay, step.clip, error, check::verdict(ok, ordered));
    return ok;
}

}  // namespace

int main() {
    bool passed = true;
    for (const Step &step : {Step{1e-3, 0.9, 0.999, 1e-8, 0.0, 1.0, 1},
                             Step{2e-4, 0.9, 0.999, 1e-8, 0.1, 0.5, 10},
                             Step{1e-2, 0.8, 0.99, 1e-6, 0.01, 0.25, 500}}) {
        passed &= run(step);
    }
    return passed ? 0 : 1;
}
