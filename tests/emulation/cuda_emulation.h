// A tiny CPU emulation of the CUDA features the project's kernels use, so the kernels of
// csrc/cuda/lstm_persistent_kernels.cuh and csrc/cuda/lstm_steps_kernels.cuh run unchanged on a
// machine without a GPU: one fiber (ucontext) per CUDA thread, threadIdx/blockIdx/blockDim/
// gridDim (1-D), dynamic shared memory and __shared__ arrays per block, __syncthreads (block
// barrier), cooperative_groups::this_grid().sync() (grid barrier), __shfl_down_sync (full
// warps of 32 lanes), the tensor cores' mma.sync m16n8k16 on bfloat16 / float16 operands and
// m16n8k8 on TF32 ones, with fp32 accumulators (mma_m16n8k16, mma_m16n8k8_tf32: a warp-wide
// exchange, like a shuffle), the launch of a
// __global__ function (launch_kernel), __ldcg, float4, uint2, min, fmaf, sqrt.
//
// Scheduling: blocks run one at a time, each from one grid barrier to the next; within a
// block, every ready fiber runs until its next barrier, shuffle or mma (or its end); a shuffle
// or mma completes when all 32 lanes of the warp wait at it, a block barrier opens when all the
// block's threads wait at it. The order of blocks and of threads is a parameter (forward,
// reverse, shuffled): a kernel whose results depend on it has a race (two threads touching the
// same memory between two barriers: threads of a block between block barriers, blocks between
// grid barriers or within one launch without them), which the emulator's callers detect by
// comparing the results of several orders bit for bit. A barrier or shuffle that not every
// thread reaches (divergence, early exit, a block barrier against a grid barrier) is reported
// as an error instead of hanging.
//
// __shared__ arrays are thread_local statics, and every block runs its turns on an OS thread
// of its own (the threads take turns: one runs at a time, in the scheduling order), so every
// block has its own arrays, zero at the block's start (a GPU leaves them undefined).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#define LSTM_FUSED_EMULATE_CUDA 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
#define __launch_bounds__(...)
#define __shared__ static thread_local

struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct alignas(8) uint2 {
  unsigned x, y;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline float __ldcg(const float* p) { return *p; }
inline float4 __ldcg(const float4* p) { return *p; }
inline uint2 __ldcg(const uint2* p) { return *p; }
inline unsigned short __ldcg(const unsigned short* p) { return *p; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
using std::sqrt;  // float and double overloads, as in CUDA device code

namespace emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

enum class State { kReady, kShuffle, kMma, kBlockBarrier, kGridBarrier, kDone, kFailed };

constexpr int kWarpSize = 32;

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  Dim3 thread, block;
  State state = State::kReady;
  float* smem = nullptr;
  // At a shuffle: the bytes this lane offers, their size, the distance down to the lane it
  // reads; after it: what it read.
  uint64_t shuffle_offer = 0, shuffle_result = 0;
  size_t shuffle_bytes = 0;
  unsigned shuffle_delta = 0;
  // At an mma: this lane's fragments (A, B, the accumulators C in, D out) and their kind.
  uint32_t mma_a[4] = {}, mma_b[2] = {};
  float mma_acc[4] = {};
  int mma_kind = 0;  // MmaKind
};

enum MmaKind { kMmaBFloat16 = 0, kMmaFloat16 = 1, kMmaTf32 = 2 };

struct Machine {
  ucontext_t scheduler;
  Fiber* current = nullptr;
  std::function<void()> body;
  Dim3 block_dim, grid_dim;
  std::string error;  // set by a fiber that cannot go on; the scheduler throws it
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

// Stops the calling fiber for good; launch() throws `message`.
[[noreturn]] inline void fail(const std::string& message) {
  if (machine().error.empty()) machine().error = message;
  wait(State::kFailed);
  std::abort();  // never resumed
}

// __shfl_down_sync for a full warp: lane l gets the value of lane l + delta, or its own
// value where l + delta is past the warp. All 32 lanes exchange at the same point.
template <typename T>
T shuffle_down(unsigned mask, T value, unsigned delta, int width) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t));
  if (mask != 0xffffffffu || width != kWarpSize) {
    fail("emulator: only full-warp shuffles (mask 0xffffffff, width 32) are emulated");
  }
  Fiber& f = self();
  std::memcpy(&f.shuffle_offer, &value, sizeof(T));
  f.shuffle_bytes = sizeof(T);
  f.shuffle_delta = delta;
  wait(State::kShuffle);
  T result;
  std::memcpy(&result, &f.shuffle_result, sizeof(T));
  return result;
}

// One lane's part of an mma: its fragments in, its D out once all 32 lanes are there.
inline void mma_exchange(int kind, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  Fiber& f = self();
  std::memcpy(f.mma_a, a, sizeof f.mma_a);
  std::memcpy(f.mma_b, b, sizeof f.mma_b);
  std::memcpy(f.mma_acc, d, sizeof f.mma_acc);
  f.mma_kind = kind;
  wait(State::kMma);
  std::memcpy(d, f.mma_acc, sizeof f.mma_acc);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 d, a, b, d: the lane's
// fragments in the layout of the PTX ISA (lstm_persistent_kernels.cuh, mma_step). All 32
// lanes exchange at the same point; each gets D = A B + C for its four places.
inline void mma_m16n8k16(bool bfloat16, float (&d)[4], const uint32_t (&a)[4],
                         const uint32_t (&b)[2]) {
  mma_exchange(bfloat16 ? kMmaBFloat16 : kMmaFloat16, d, a, b);
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 d, a, b, d (mma_step, TF32): as above,
// K = 8, one TF32 value (float bits) per register.
inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  mma_exchange(kMmaTf32, d, a, b);
}

// The value of 16-bit bits, exactly.
inline double bits16_value(uint16_t bits, bool bfloat16) {
  if (bfloat16) {
    const uint32_t wide = uint32_t(bits) << 16;
    float value;
    std::memcpy(&value, &wide, sizeof value);
    return value;
  }
  const double sign = (bits & 0x8000u) ? -1.0 : 1.0;
  const int exponent = (bits >> 10) & 0x1f;
  const int mantissa = bits & 0x3ff;
  if (exponent == 0x1f) return mantissa ? std::nan("") : sign * INFINITY;
  if (exponent == 0) return sign * std::ldexp(double(mantissa), -24);  // subnormal
  return sign * std::ldexp(double(1024 + mantissa), exponent - 25);
}

// D = A B + C of one warp from its lanes' fragments. The hardware's products of 16-bit and
// TF32 values are exact and its sums are fp32 or wider; here each of D's values is its exact
// products and C summed in double, then rounded once to float (the kernels' tests allow the
// operands' rounding error). TF32 operands are taken as the float bits they are (the kernels
// round them first; the hardware ignores the low 13 bits).
inline void complete_mma(Fiber* lanes) {
  double A[16][16], B[16][8];
  const int kind = lanes[0].mma_kind;
  const int depth = kind == kMmaTf32 ? 8 : 16;
  auto half = [&](uint32_t word, int which) {
    return bits16_value(static_cast<uint16_t>(which ? word >> 16 : word & 0xffffu),
                        kind == kMmaBFloat16);
  };
  auto tf32 = [](uint32_t word) {
    float value;
    std::memcpy(&value, &word, sizeof value);
    return double(value);
  };
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const Fiber& f = lanes[lane];
    const int group = lane / 4, quad = lane % 4, pair = 2 * quad;
    if (kind == kMmaTf32) {
      A[group][quad] = tf32(f.mma_a[0]);
      A[group + 8][quad] = tf32(f.mma_a[1]);
      A[group][quad + 4] = tf32(f.mma_a[2]);
      A[group + 8][quad + 4] = tf32(f.mma_a[3]);
      B[quad][group] = tf32(f.mma_b[0]);
      B[quad + 4][group] = tf32(f.mma_b[1]);
      continue;
    }
    for (int h = 0; h < 2; ++h) {
      A[group][pair + h] = half(f.mma_a[0], h);
      A[group + 8][pair + h] = half(f.mma_a[1], h);
      A[group][pair + 8 + h] = half(f.mma_a[2], h);
      A[group + 8][pair + 8 + h] = half(f.mma_a[3], h);
      B[pair + h][group] = half(f.mma_b[0], h);
      B[pair + 8 + h][group] = half(f.mma_b[1], h);
    }
  }
  for (int lane = 0; lane < kWarpSize; ++lane) {
    Fiber& f = lanes[lane];
    const int group = lane / 4, pair = 2 * (lane % 4);
    for (int q = 0; q < 4; ++q) {
      const int row = group + (q >= 2 ? 8 : 0), col = pair + (q & 1);
      double sum = f.mma_acc[q];
      for (int k = 0; k < depth; ++k) sum += A[row][k] * B[k][col];
      f.mma_acc[q] = static_cast<float>(sum);
    }
  }
}

inline void entry() {
  machine().body();
  self().state = State::kDone;
  swapcontext(&self().context, &machine().scheduler);
}

enum class Order { kForward, kReverse, kShuffled };

// The OS thread a block's turns run on (its thread_local storage holds the block's
// __shared__ arrays). run() hands it one turn and waits for it, so one thread runs at a time.
class BlockThread {
 public:
  BlockThread() : thread_([this] { serve(); }) {}
  BlockThread(const BlockThread&) = delete;
  BlockThread& operator=(const BlockThread&) = delete;
  ~BlockThread() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    thread_.join();
  }
  // Runs turn() on this thread; rethrows what it threw.
  void run(const std::function<void()>& turn) {
    std::unique_lock<std::mutex> lock(mutex_);
    turn_ = &turn;
    error_ = nullptr;
    wake_.notify_all();
    wake_.wait(lock, [this] { return turn_ == nullptr; });
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void serve() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [this] { return stop_ || turn_ != nullptr; });
      if (stop_) return;
      try {
        (*turn_)();
      } catch (...) {
        error_ = std::current_exception();
      }
      turn_ = nullptr;
      wake_.notify_all();
    }
  }
  std::mutex mutex_;
  std::condition_variable wake_;
  const std::function<void()>* turn_ = nullptr;
  std::exception_ptr error_;
  bool stop_ = false;
  std::thread thread_;  // last: starts once the members above exist
};

// One block of a launch. Its fibers and thread exist from its first turn until all of its
// fibers are done, so that a launch of many blocks without grid barriers holds one block's
// stacks at a time.
struct Block {
  std::vector<Fiber> fibers;
  std::vector<float> smem;
  std::unique_ptr<BlockThread> thread;
  bool done = false;
};

inline std::string where(int b, int warp = -1) {
  const std::string block = "emulator: block " + std::to_string(b);
  return warp >= 0 ? block + " warp " + std::to_string(warp) : block;
}

// A warp-wide exchange (`what`) completes only when every lane of the warp waits at it, with
// the same kind of operands (`key` of each lane).
template <typename Key>
void require_whole_warp(const Fiber* lanes, size_t waiting, const char* what, Key key, int b,
                        size_t w) {
  const std::string at = where(b, static_cast<int>(w)) + ": ";
  if (waiting != kWarpSize) {
    throw std::runtime_error(at + std::to_string(waiting) + " of " + std::to_string(kWarpSize) +
                             " lanes wait at " + what + ", the others do not");
  }
  for (size_t l = 1; l < kWarpSize; ++l) {
    if (key(lanes[l]) != key(lanes[0])) {
      throw std::runtime_error(at + "lanes meet at " + what + " with operands of different types");
    }
  }
}

// Completes the shuffle or mma of every warp whose lanes wait at one; false when none does.
inline bool complete_shuffles(std::vector<Fiber>& fibers, int b) {
  bool any = false;
  for (size_t w = 0; w * kWarpSize < fibers.size(); ++w) {
    Fiber* lanes = &fibers[w * kWarpSize];
    const size_t lane_count = std::min<size_t>(kWarpSize, fibers.size() - w * kWarpSize);
    size_t at_shuffle = 0, at_mma = 0;
    for (size_t l = 0; l < lane_count; ++l) {
      at_shuffle += lanes[l].state == State::kShuffle;
      at_mma += lanes[l].state == State::kMma;
    }
    if (at_mma > 0) {
      require_whole_warp(lanes, at_mma, "mma.sync", [](const Fiber& f) { return f.mma_kind; }, b,
                         w);
      complete_mma(lanes);
    } else if (at_shuffle > 0) {
      require_whole_warp(lanes, at_shuffle, "__shfl_down_sync",
                         [](const Fiber& f) { return f.shuffle_bytes; }, b, w);
      for (size_t l = 0; l < kWarpSize; ++l) {
        const size_t source = l + lanes[l].shuffle_delta;
        lanes[l].shuffle_result = lanes[source < kWarpSize ? source : l].shuffle_offer;
      }
    } else {
      continue;
    }
    for (size_t l = 0; l < kWarpSize; ++l) lanes[l].state = State::kReady;
    any = true;
  }
  return any;
}

// Runs body() as a grid of `blocks` x `threads` threads with `smem_bytes` of dynamic shared
// memory per block (filled with NaN: reading what nobody wrote shows). Throws on a barrier
// or shuffle that cannot complete.
inline void launch(int blocks, int threads, size_t smem_bytes, Order order, unsigned seed,
                   std::function<void()> body) {
  constexpr size_t kStack = 64 * 1024;
  Machine& m = machine();
  m.body = std::move(body);
  m.error.clear();
  m.block_dim = {static_cast<unsigned>(threads), 1, 1};
  m.grid_dim = {static_cast<unsigned>(blocks), 1, 1};
  std::vector<Block> grid(blocks);
  auto start_block = [&](int b) {
    Block& blk = grid[b];
    blk.smem.assign(smem_bytes / 4 + 4, std::nanf(""));
    blk.fibers = std::vector<Fiber>(threads);  // in place: a ucontext_t must not move
    for (int t = 0; t < threads; ++t) {
      Fiber& f = blk.fibers[t];
      f.stack.reset(new char[kStack]);
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.get();
      f.context.uc_stack.ss_size = kStack;
      f.context.uc_link = nullptr;
      makecontext(&f.context, &entry, 0);
      f.thread.x = t;
      f.block.x = b;
      // 16-byte aligned, as CUDA's dynamic shared memory
      uintptr_t base = reinterpret_cast<uintptr_t>(blk.smem.data());
      f.smem = reinterpret_cast<float*>((base + 15) & ~uintptr_t(15));
    }
  };
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
  for (;;) {
    if (order == Order::kShuffled) std::shuffle(block_order.begin(), block_order.end(), rng);
    for (int b : block_order) {
      Block& blk = grid[b];
      if (blk.done) continue;
      if (!blk.thread) blk.thread = std::make_unique<BlockThread>();
      // One turn of the block: every fiber runs until it waits at the grid barrier or is done.
      blk.thread->run([&] {
        if (blk.fibers.empty()) start_block(b);
        for (;;) {
          if (order == Order::kShuffled) {
            std::shuffle(thread_order.begin(), thread_order.end(), rng);
          }
          for (int t : thread_order) {
            Fiber& f = blk.fibers[t];
            if (f.state != State::kReady) continue;
            m.current = &f;
            swapcontext(&m.scheduler, &f.context);
          }
          m.current = nullptr;
          if (!m.error.empty()) throw std::runtime_error(m.error);
          if (complete_shuffles(blk.fibers, b)) continue;
          int at_block = 0;
          for (const Fiber& f : blk.fibers) at_block += f.state == State::kBlockBarrier;
          if (at_block == 0) break;  // all at the grid barrier or done
          if (at_block != threads) {
            throw std::runtime_error(where(b) + ": " + std::to_string(at_block) + " of " +
                                     std::to_string(threads) +
                                     " threads wait at __syncthreads, the others do not");
          }
          for (Fiber& f : blk.fibers) f.state = State::kReady;
        }
      });
      if (std::all_of(blk.fibers.begin(), blk.fibers.end(),
                      [](const Fiber& f) { return f.state == State::kDone; })) {
        blk = Block();
        blk.done = true;
      }
    }
    size_t done = 0, at_grid = 0;
    for (const Block& blk : grid) {
      if (blk.done) done += threads;
      for (const Fiber& f : blk.fibers) at_grid += f.state == State::kGridBarrier;
    }
    const size_t total = static_cast<size_t>(blocks) * threads;
    if (done == total) return;
    if (at_grid != total) {
      throw std::runtime_error("emulator: deadlock: " + std::to_string(at_grid) +
                               " threads at the grid barrier, " + std::to_string(done) +
                               " done, of " + std::to_string(total));
    }
    for (Block& blk : grid) {
      for (Fiber& f : blk.fibers) f.state = State::kReady;
    }
  }
}

// kernel<<<blocks, threads>>>(args...): a __global__ function on a 1-D grid without dynamic
// shared memory. Every thread gets its own copy of the arguments, as on the device.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), int blocks, int threads, Order order,
                   unsigned seed, const Args&... args) {
  launch(blocks, threads, 0, order, seed, [&] { kernel(args...); });
}

}  // namespace emu

#define threadIdx (::emu::self().thread)
#define blockIdx (::emu::self().block)
#define blockDim (::emu::machine().block_dim)
#define gridDim (::emu::machine().grid_dim)
inline void __syncthreads() { ::emu::wait(::emu::State::kBlockBarrier); }
// the device's trap: the emulated kernel stops with an error (fail)
[[noreturn]] inline void __trap() { ::emu::fail("emulator: __trap()"); }

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = ::emu::kWarpSize) {
  return ::emu::shuffle_down(mask, value, delta, width);
}

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
