// The dropout kernel (dropout.cu) run by the CPU emulator in f32 and bf16 against the
// CPU's own dropout, bit for bit: the masks are a pure function of (stream, index), and
// training relies on the CPU and the GPU drawing the same ones. The cases come on stdin
// from the Rust test, which made them with the CPU op:
//   <dtype: f32|bf16> <count> <stream> <threshold> <scale as f32 bits>
//   <count inputs as bits, hex>
//   <count CPU outputs as bits, hex>
// and ends at end of input. Prints a line per case; exits 1 if any is off or none came.
#include "cuda_emulator.h"

#include "../../cuda/prelude.cuh"
#include "../../cuda/dropout.cu"

#include <bit>
#include <cinttypes>
#include <cstdio>
#include <string>

#include "check.h"

namespace {

template <typename T>
std::vector<T> read_bits(std::size_t count) {
    std::vector<T> values(count);
    for (auto &value : values) {
        unsigned int bits = 0;
        if (std::scanf("%x", &bits) != 1) {
            std::fprintf(stderr, "dropout harness: input ends inside a case\n");
            std::exit(2);
        }
        if constexpr (sizeof(T) == 2) {
            value = (unsigned short)bits;
        } else {
            value = std::bit_cast<float>(bits);
        }
    }
    return values;
}

template <typename T>
using Kernel = void (*)(u64, u64, u64, float, const T *, T *);

template <typename T>
bool run(const char *name, Kernel<T> kernel, u64 count, u64 stream, u64 threshold,
         float scale) {
    const std::vector<T> x = read_bits<T>(count);
    const std::vector<T> expected = read_bits<T>(count);
    // Fewer threads than entries, so each thread strides over several.
    const auto compute = [&] {
        std::vector<T> y(count, check::narrow<T>(NAN));
        emulator::launch(dim3(3), dim3(128), [&] {
            kernel(count, stream, threshold, scale, x.data(), y.data());
        });
        return y;
    };
    const std::vector<T> y = compute();
    const bool ordered = check::same_bits(y, check::in_reverse(compute));
    std::size_t differing = 0, kept = 0;
    for (std::size_t i = 0; i < count; ++i) {
        differing += std::memcmp(&y[i], &expected[i], sizeof(T)) != 0;
        kept += check::widen(y[i]) != 0.0;
    }
    const bool ok = ordered && differing == 0;
    std::printf("dropout %-4s count %" PRIu64 " stream %016" PRIx64 " kept %zu: %zu differ  %s\n",
                name, count, stream, kept, differing, check::verdict(ok, ordered));
    return ok;
}

}  // namespace

int main() {
    bool passed = true;
    int cases = 0;
    char dtype[8];
    unsigned long long count, stream, threshold;
    unsigned int scale_bits;
    while (std::scanf("%7s %llu %llu %llu %x", dtype, &count, &stream, &threshold,
                      &scale_bits) == 5) {
        const float scale = std::bit_cast<float>(scale_bits);
        const std::string kind = dtype;
        if (kind == "f32") {
            passed &= run<float>("f32", dropout_f32, count, stream, threshold, scale);
        } else if (kind == "bf16") {
            passed &= run<unsigned short>("bf16", dropout_bf16, count, stream, threshold, scale);
        } else {
            std::fprintf(stderr, "dropout harness: unknown dtype %s\n", dtype);
            return 2;
        }
        ++cases;
    }
    if (cases == 0) {
        std::printf("dropout: no case on stdin  FAILED\n");
        return 1;
    }
    return passed ? 0 : 1;
}
