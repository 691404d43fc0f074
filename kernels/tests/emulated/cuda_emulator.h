// Runs the trainer's CUDA C kernels on the CPU, so that their logic is tested on machines
// without a GPU (the CUDA build only compiles them; only a GPU host runs them natively).
//
// A launch runs its blocks one after another. A block's threads are cooperative fibers
// (ucontext) on the calling thread: each runs until it reaches a barrier (__syncthreads,
// or a warp-wide exchange: shuffles and tensor-core products), and a barrier opens once
// every thread that has not returned waits at it. `__shared__` is `static`, so a block's
// threads share it, as on the GPU. A barrier that can never open (threads of a block
// waiting at different barriers) aborts with the state of every thread.
//
// Races between threads that no barrier orders show as results that differ when the
// threads run in another order between barriers (`emulator::warps_run_ahead`: warps last
// first, each running ahead), which the harnesses check; a race both orders settle alike
// goes unseen. What it cannot show: timing, memory coalescing and bank conflicts, register
// pressure.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define TRAINER_KERNELS_EMULATED 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__ __restrict
#define __align__(bytes) __attribute__((aligned(bytes)))

struct uint3 {
    unsigned int x, y, z;
};

struct dim3 {
    unsigned int x, y, z;
    dim3(unsigned int x = 1, unsigned int y = 1, unsigned int z = 1) : x(x), y(y), z(z) {}
};

// Set by the scheduler before it resumes a thread.
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

inline float __uint_as_float(unsigned int bits) {
    float x;
    std::memcpy(&x, &bits, 4);
    return x;
}
inline float __int_as_float(int bits) { return __uint_as_float((unsigned int)bits); }
inline unsigned int __float_as_uint(float x) {
    unsigned int bits;
    std::memcpy(&bits, &x, 4);
    return bits;
}
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

namespace emulator {

enum class State { Runnable, AtBlockBarrier, AtWarpBarrier, Returned };

struct Fiber {
    ucontext_t context;
    std::vector<char> stack;
    State state = State::Runnable;
};

inline constexpr std::size_t kStackBytes = 64 * 1024;
// The order threads run in between barriers: each to its next barrier in turn (false),
// or warp by warp from the last, each warp as far as it can go before the next (true). A
// kernel whose results differ between the two has a race its barriers do not order:
// harnesses run both ways and compare.
inline bool warps_run_ahead = false;
inline ucontext_t scheduler;
inline std::vector<Fiber> fibers;
inline std::size_t current = 0;
inline std::function<void()> body;

inline void run_current() {
    body();
    fibers[current].state = State::Returned;
}

inline void wait(State barrier) {
    fibers[current].state = barrier;
    swapcontext(&fibers[current].context, &scheduler);
}

inline unsigned int lane() { return (unsigned int)(current % 32); }

// One word per thread for warp-wide exchanges: each writes its own, all wait, each reads
// the others', all wait again before any writes anew.
struct Fragments {
    std::uint64_t word;
    unsigned int a[4], b[2];
};
inline std::vector<Fragments> exchange;

inline const char *name(State state) {
    switch (state) {
        case State::Runnable: return "runnable";
        case State::AtBlockBarrier: return "at __syncthreads";
        case State::AtWarpBarrier: return "at a warp exchange";
        case State::Returned: return "returned";
    }
    return "?";
}

[[noreturn]] inline void deadlock() {
    std::fprintf(stderr, "emulated block (%u, %u, %u): no barrier can open\n", blockIdx.x,
                 blockIdx.y, blockIdx.z);
    for (std::size_t i = 0; i < fibers.size(); ++i)
        std::fprintf(stderr, "  thread %zu: %s\n", i, name(fibers[i].state));
    std::exit(2);
}

// Opens the warp exchange of the warp starting at thread `warp` if all its threads that
// have not returned wait at it.
inline bool open_warp(std::size_t warp) {
    const std::size_t end = std::min(warp + 32, fibers.size());
    bool all_at_warp = true, any = false;
    for (std::size_t i = warp; i < end; ++i) {
        if (fibers[i].state == State::Returned) continue;
        any = true;
        all_at_warp &= fibers[i].state == State::AtWarpBarrier;
    }
    if (!any || !all_at_warp) return false;
    for (std::size_t i = warp; i < end; ++i)
        if (fibers[i].state == State::AtWarpBarrier) fibers[i].state = State::Runnable;
    return true;
}

// Opens every barrier all the threads it concerns wait at; false when none could open.
inline bool open_barriers() {
    bool opened = false, all_at_block = true, any_waiting = false;
    for (const Fiber &fiber : fibers) {
        if (fiber.state == State::Returned) continue;
        any_waiting = true;
        all_at_block &= fiber.state == State::AtBlockBarrier;
    }
    if (!any_waiting) return true;
    if (all_at_block) {
        for (Fiber &fiber : fibers)
            if (fiber.state == State::AtBlockBarrier) fiber.state = State::Runnable;
        return true;
    }
    for (std::size_t warp = 0; warp < fibers.size(); warp += 32) opened |= open_warp(warp);
    return opened;
}

inline void run_block(std::size_t threads) {
    fibers.resize(threads);
    exchange.assign(threads, Fragments{});
    for (std::size_t i = 0; i < threads; ++i) {
        Fiber &fiber = fibers[i];
        fiber.stack.resize(kStackBytes);
        fiber.state = State::Runnable;
        getcontext(&fiber.context);
        fiber.context.uc_stack.ss_sp = fiber.stack.data();
        fiber.context.uc_stack.ss_size = fiber.stack.size();
        fiber.context.uc_link = &scheduler;
        makecontext(&fiber.context, run_current, 0);
    }
    const auto resume = [](std::size_t i) {
        if (fibers[i].state != State::Runnable) return;
        current = i;
        threadIdx = {(unsigned int)(i % blockDim.x), (unsigned int)(i / blockDim.x % blockDim.y),
                     (unsigned int)(i / (blockDim.x * blockDim.y))};
        swapcontext(&scheduler, &fibers[i].context);
    };
    for (;;) {
        if (!warps_run_ahead) {
            // Every thread in turn to its next barrier.
            for (std::size_t i = 0; i < threads; ++i) resume(i);
        } else {
            // Warp by warp, last first, each as far as its own exchanges let it go: a warp
            // runs ahead of the others between block barriers, as hardware may let it.
            for (std::size_t warp = (threads - 1) / 32 * 32 + 32; warp > 0;) {
                warp -= 32;
                do {
                    for (std::size_t i = std::min(warp + 32, threads); i > warp;) resume(--i);
                } while (open_warp(warp));
            }
        }
        bool all_returned = true;
        for (const Fiber &fiber : fibers) all_returned &= fiber.state == State::Returned;
        if (all_returned) return;
        if (!open_barriers()) deadlock();
    }
}

// Runs `kernel` over the grid, block by block.
inline void launch(dim3 grid, dim3 block, std::function<void()> kernel) {
    gridDim = grid;
    blockDim = block;
    body = std::move(kernel);
    for (unsigned int z = 0; z < grid.z; ++z)
        for (unsigned int y = 0; y < grid.y; ++y)
            for (unsigned int x = 0; x < grid.x; ++x) {
                blockIdx = {x, y, z};
                run_block((std::size_t)block.x * block.y * block.z);
            }
}

}  // namespace emulator

inline void __syncthreads() { emulator::wait(emulator::State::AtBlockBarrier); }

template <typename T>
T __shfl_xor_sync(unsigned int, T value, int lane_mask) {
    static_assert(sizeof(T) <= 8, "a shuffle moves at most 64 bits");
    using emulator::current, emulator::exchange;
    std::memcpy(&exchange[current].word, &value, sizeof(T));
    emulator::wait(emulator::State::AtWarpBarrier);
    T result;
    const std::size_t source = (current & ~std::size_t{31}) | (emulator::lane() ^ lane_mask);
    std::memcpy(&result, &exchange[source].word, sizeof(T));
    emulator::wait(emulator::State::AtWarpBarrier);
    return result;
}

// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`, from the fragment layouts of the
// PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type"): with
// g = lane / 4 and t = lane % 4, a lane holds A's rows g (registers 0 and 2) and g + 8
// (1 and 3) at columns 2t, 2t + 1 (registers 0, 1) and 2t + 8, 2t + 9 (2, 3); B's
// column g at rows 2t, 2t + 1 (register 0) and 2t + 8, 2t + 9 (1); and D's rows g
// (entries 0, 1) and g + 8 (2, 3) at columns 2t and 2t + 1. The lower index of each pair
// is the register's low half.
inline void mma_bf16_16x8x16(float (&d)[4], const unsigned int (&a)[4],
                             const unsigned int (&b)[2]) {
    using emulator::current, emulator::exchange;
    std::memcpy(exchange[current].a, a, sizeof a);
    std::memcpy(exchange[current].b, b, sizeof b);
    emulator::wait(emulator::State::AtWarpBarrier);
    const std::size_t warp = current & ~std::size_t{31};
    const auto half = [](unsigned int word, int k) {
        return __uint_as_float(k % 2 == 0 ? word << 16 : word & 0xffff0000u);
    };
    const auto left = [&](int row, int k) {
        const unsigned int word =
            exchange[warp + (row % 8) * 4 + (k % 8) / 2].a[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
        return half(word, k);
    };
    const auto right = [&](int k, int column) {
        return half(exchange[warp + column * 4 + (k % 8) / 2].b[k >= 8 ? 1 : 0], k);
    };
    const int g = (int)emulator::lane() / 4, t = (int)emulator::lane() % 4;
    float result[4];
    for (int e = 0; e < 4; ++e) {
        const int row = g + (e >= 2 ? 8 : 0), column = 2 * t + e % 2;
        float sum = d[e];
        for (int k = 0; k < 16; ++k) sum += left(row, k) * right(k, column);
        result[e] = sum;
    }
    emulator::wait(emulator::State::AtWarpBarrier);
    std::memcpy(d, result, sizeof result);
}
