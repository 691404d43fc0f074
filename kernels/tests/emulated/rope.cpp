// The rotary kernel (rope.cu) run by the CPU emulator in f32 and bf16, both ways between
// the (B, L, H, D) and (B, H, L, D) layouts, with one table for every row and with a table
// per row (packed rows restart positions), forward (sign 1) and inverse (sign −1): each
// pair of dimensions (d, d + D/2) of every head rotated by its position's angle, computed
// here in f64. Prints a line per case; exits 1 if any is off.
#include "cuda_emulator.h"

#include "../../cuda/prelude.cuh"
#include "../../cuda/rope.cu"

#include <cstdio>

#include "check.h"

namespace {

template <typename T>
using Kernel = void (*)(const T *, const T *, const T *, T *, u64, u64, u64, u64, float, int, int);

template <typename T>
bool run(const char *name, Kernel<T> kernel, double tolerance) {
    const std::size_t batch = 2, heads = 3, len = 5, dim = 8, half = dim / 2;
    const std::size_t count = batch * heads * len * dim;
    std::uint64_t seed = 9;
    const std::vector<T> x = check::random<T>(count, 1.0, seed);
    bool passed = true;
    for (const int per_row : {0, 1}) {
        // Angles p·θ_d of position p; with a table per row the second row's positions
        // differ from the first's.
        const std::size_t tables = per_row ? batch * len : len;
        std::vector<T> cos(tables * dim), sin(tables * dim);
        std::vector<double> angle(tables * dim);
        for (std::size_t t = 0; t < tables; ++t) {
            const double position =
                per_row && t >= len ? (double)(t - len) - 2.0 : (double)(t % len);
            for (std::size_t d = 0; d < dim; ++d) {
                const double a = position * std::pow(10000.0, -(double)(d % half) / half);
                cos[t * dim + d] = check::narrow<T>(std::cos(a));
                sin[t * dim + d] = check::narrow<T>(std::sin(a));
                angle[t * dim + d] = a;
            }
        }
        for (const int to_heads_major : {0, 1}) {
            for (const float sign : {1.0f, -1.0f}) {
                const auto compute = [&] {
                    std::vector<T> out(count, check::narrow<T>(NAN));
                    emulator::launch(dim3(2), dim3(64), [&] {
                        kernel(x.data(), cos.data(), sin.data(), out.data(), batch, heads, len,
                               dim, sign, to_heads_major, per_row);
                    });
                    return out;
                };
                const std::vector<T> out = compute();
                const bool ordered = check::same_bits(out, check::in_reverse(compute));
                std::vector<double> expected(count);
                for (std::size_t b = 0; b < batch; ++b)
                    for (std::size_t h = 0; h < heads; ++h)
                        for (std::size_t l = 0; l < len; ++l) {
                            const std::size_t heads_major = ((b * heads + h) * len + l) * dim;
                            const std::size_t seq_major = ((b * len + l) * heads + h) * dim;
                            const std::size_t from = to_heads_major ? seq_major : heads_major;
                            const std::size_t to = to_heads_major ? heads_major : seq_major;
                            const std::size_t table = (per_row ? b * len + l : l) * dim;
                            for (std::size_t d = 0; d < half; ++d) {
                                // The table as stored, so only the kernel's arithmetic differs.
                                const double c = check::widen(cos[table + d]);
                                const double s = sign * check::widen(sin[table + d]);
                                const double first = check::widen(x[from + d]);
                                const double second = check::widen(x[from + d + half]);
                                expected[to + d] = first * c - second * s;
                                expected[to + d + half] = second * c + first * s;
                            }
                        }
                const double error = check::worst(out, expected, 0, true);
                const bool ok = ordered && error <= tolerance;
                passed &= ok;
                std::printf("rope %-4s per_row %d to_heads_major %d sign %+g: %.1e  %s\n", name,
                            per_row, to_heads_major, sign, error,
                            check::verdict(ok, ordered));
            }
        }
    }
    return passed;
}

}  // namespace

int main() {
    // Relative to the larger of 1 and the expected value; bf16 rounds to within 2⁻⁸.
    bool passed = run<float>("f32", rope_f32, 1e-6);
    passed &= run<unsigned short>("bf16", rope_bf16, 6e-3);
    return passed ? 0 : 1;
}
