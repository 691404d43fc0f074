// What the emulated kernel harnesses share: reproducible random inputs, bf16 as its bits,
// and the largest difference from a reference in f64.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace check {

// Sums of uniforms: roughly normal, unit variance, reproducible anywhere.
inline double normal(std::uint64_t &state) {
    double sum = 0.0;
    for (int i = 0; i < 12; ++i) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        sum += (double)(state >> 11) / 9007199254740992.0;
    }
    return sum - 6.0;
}

inline double widen(float x) { return x; }
inline double widen(unsigned short bits) { return __uint_as_float((unsigned int)bits << 16); }

// A value of type T (float, or bf16 as its bits) nearest x.
template <typename T>
T narrow(double x) {
    if constexpr (sizeof(T) == 2) {
        return to_bf16((float)x);
    } else {
        return (T)x;
    }
}

template <typename T>
std::vector<T> random(std::size_t count, double scale, std::uint64_t &state) {
    std::vector<T> values(count);
    for (auto &value : values) value = narrow<T>(normal(state) * scale);
    return values;
}

// The largest |got − expected|, or with `relative` the largest |got − expected| ÷
// max(1, |expected|); a NaN counts as infinitely far, an infinity must match.
template <typename T>
double worst(const std::vector<T> &got, const std::vector<double> &expected,
             std::size_t offset = 0, bool relative = false) {
    double worst = 0.0;
    for (std::size_t i = 0; i < expected.size(); ++i) {
        const double x = widen(got[offset + i]), y = expected[i];
        const double scale = relative ? std::max(1.0, std::abs(y)) : 1.0;
        const double difference = std::isinf(x) || std::isinf(y) ? (x == y ? 0.0 : INFINITY)
                                                                 : std::abs(x - y) / scale;
        worst = std::isnan(difference) ? INFINITY : std::max(worst, difference);
    }
    return worst;
}

// `compute()` with the emulator's warps run last first, each as far ahead as it can go:
// results that differ from the usual order's (`same_bits`) show a race no barrier orders.
template <typename Compute>
auto in_reverse(Compute compute) {
    emulator::warps_run_ahead = true;
    const auto result = compute();
    emulator::warps_run_ahead = false;
    return result;
}

template <typename T>
bool same_bits(const std::vector<T> &a, const std::vector<T> &b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// A harness line's last word: "ok", or why not.
inline const char *verdict(bool ok, bool ordered) {
    return ok ? "ok" : ordered ? "FAILED" : "FAILED (differs with the threads' order)";
}

}  // namespace check
