// A tiny CPU emulation of the CUDA features the persistent kernels use, so the kernels of
// csrc/cuda/lstm_persistent_kernels.cuh run unchanged on a machine without a GPU:
// one fiber (ucontext) per CUDA thread, threadIdx/blockIdx, dynamic shared memory per block,
// __syncthreads (block barrier) and cooperative_groups::this_grid().sync() (grid barrier),
// __ldcg, float4, min, fmaf.
//
// Scheduling: blocks run one at a time, each from one grid barrier to the next; within a
// block, every ready fiber runs until its next barrier (or its end), and a block barrier opens
// when all the block's threads wait at it. The order of blocks and of threads is a parameter
// (forward, reverse, shuffled): a kernel whose results depend on it has a race (two threads
// touching the same memory between two barriers: threads of a block between block barriers,
// blocks between grid barriers), which the emulator's callers detect by comparing the results
// of several orders bit for bit. A barrier that not every thread reaches (divergence, early
// exit, a block barrier against a grid barrier) is reported as an error instead of hanging.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#define LSTM_FUSED_EMULATE_CUDA 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
#define __launch_bounds__(...)

struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float __ldcg(const float* p) { return *p; }
inline float4 __ldcg(const float4* p) { return *p; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }

namespace emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

enum class State { kReady, kBlockBarrier, kGridBarrier, kDone };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  Dim3 thread, block;
  State state = State::kReady;
  float* smem = nullptr;
};

struct Machine {
  ucontext_t scheduler;
  Fiber* current = nullptr;
  std::function<void()> body;
  std::string error;
};

inline Machine& machine() {
  static Machine m;
  return m;
}

inline Fiber& self() { return *machine().current; }

inline void wait(State state) {
  Fiber& f = self();
  f.state = state;
  swapcontext(&f.context, &machine().scheduler);
}

inline void entry() {
  machine().body();
  self().state = State::kDone;
  swapcontext(&self().context, &machine().scheduler);
}

enum class Order { kForward, kReverse, kShuffled };

// Runs body() as a grid of `blocks` x `threads` threads with `smem_bytes` of dynamic shared
// memory per block (filled with NaN: reading what nobody wrote shows). Throws on a barrier
// that cannot open.
inline void launch(int blocks, int threads, size_t smem_bytes, Order order, unsigned seed,
                   std::function<void()> body) {
  constexpr size_t kStack = 64 * 1024;
  Machine& m = machine();
  m.body = std::move(body);
  std::vector<std::vector<float>> smem(blocks,
                                       std::vector<float>(smem_bytes / 4 + 4, std::nanf("")));
  std::vector<Fiber> fibers(static_cast<size_t>(blocks) * threads);
  for (int b = 0; b < blocks; ++b) {
    for (int t = 0; t < threads; ++t) {
      Fiber& f = fibers[static_cast<size_t>(b) * threads + t];
      f.stack.reset(new char[kStack]);
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.get();
      f.context.uc_stack.ss_size = kStack;
      f.context.uc_link = nullptr;
      makecontext(&f.context, &entry, 0);
      f.thread.x = t;
      f.block.x = b;
      // 16-byte aligned, as CUDA's dynamic shared memory
      uintptr_t base = reinterpret_cast<uintptr_t>(smem[b].data());
      f.smem = reinterpret_cast<float*>((base + 15) & ~uintptr_t(15));
    }
  }
  // Blocks run one after the other, each until all its threads wait at the grid barrier (or
  // are done): a block gets a whole grid-barrier interval ahead of the others, so the block
  // order decides which of two blocks touches shared global memory first.
  std::vector<int> block_order(blocks);
  std::vector<int> thread_order(threads);
  for (int b = 0; b < blocks; ++b) block_order[b] = b;
  for (int t = 0; t < threads; ++t) thread_order[t] = t;
  if (order == Order::kReverse) {
    std::reverse(block_order.begin(), block_order.end());
    std::reverse(thread_order.begin(), thread_order.end());
  }
  std::mt19937 rng(seed);
  auto fiber = [&](int b, int t) -> Fiber& { return fibers[static_cast<size_t>(b) * threads + t]; };
  for (;;) {
    if (order == Order::kShuffled) std::shuffle(block_order.begin(), block_order.end(), rng);
    for (int b : block_order) {
      for (;;) {
        if (order == Order::kShuffled) std::shuffle(thread_order.begin(), thread_order.end(), rng);
        for (int t : thread_order) {
          Fiber& f = fiber(b, t);
          if (f.state != State::kReady) continue;
          m.current = &f;
          swapcontext(&m.scheduler, &f.context);
        }
        m.current = nullptr;
        int at_block = 0;
        for (int t = 0; t < threads; ++t) at_block += fiber(b, t).state == State::kBlockBarrier;
        if (at_block == 0) break;  // all at the grid barrier or done
        if (at_block != threads) {
          throw std::runtime_error("emulator: block " + std::to_string(b) + ": " +
                                   std::to_string(at_block) + " of " + std::to_string(threads) +
                                   " threads wait at __syncthreads, the others do not");
        }
        for (int t = 0; t < threads; ++t) fiber(b, t).state = State::kReady;
      }
    }
    size_t done = 0, at_grid = 0;
    for (const Fiber& f : fibers) {
      done += f.state == State::kDone;
      at_grid += f.state == State::kGridBarrier;
    }
    if (done == fibers.size()) return;
    if (at_grid != fibers.size()) {
      throw std::runtime_error("emulator: deadlock: " + std::to_string(at_grid) +
                               " threads at the grid barrier, " + std::to_string(done) +
                               " done, of " + std::to_string(fibers.size()));
    }
    for (Fiber& f : fibers) f.state = State::kReady;
  }
}

}  // namespace emu

#define threadIdx (::emu::self().thread)
#define blockIdx (::emu::self().block)
inline void __syncthreads() { ::emu::wait(::emu::State::kBlockBarrier); }

namespace lstm_fused {
namespace cuda {
namespace persistent_detail {
inline float* dynamic_smem() { return ::emu::self().smem; }
namespace cg {
struct grid_group {
  void sync() const { ::emu::wait(::emu::State::kGridBarrier); }
};
inline grid_group this_grid() { return {}; }
}  // namespace cg
}  // namespace persistent_detail
}  // namespace cuda
}  // namespace lstm_fused
