// Device code of the CUDA step kernels (GPU plan, stage 1), and the launch shapes their host
// side uses. Included by lstm_steps_cuda.cu (the host side: dispatch, launches, the kernels()
// table) and, with LSTM_FUSED_EMULATE_CUDA defined, by tests/emulation/steps_emulator.cpp,
// which runs these very kernels on the CPU (one fiber per CUDA thread, real block barriers and
// warp shuffles, tests/test_steps_emulated.py) with the same launch shapes. No torch includes.
//
// One fused pointwise kernel per time step and pass. The gate math is lstm_cell.h's,
// instantiated for float/double, so the GPU runs the arithmetic the CPU tests check.
// Semantics mirror csrc/cpu/lstm_steps_cpu.cpp.
//
// Two kernel shapes:
//  - the fast path (no telemetry, clip mode off or element-wise): one thread per VEC
//    consecutive elements of a row, a grid-stride loop over rows*H/VEC;
//  - the reduction path (sum_squares wanted, or norm clipping), in two stages: stage 1 does the
//    element work over up to kReduceBlocks blocks and writes one partial sum per block into the
//    driver's scratch (HiddenGradStepArgs::partials); stage 2 adds the partials in a fixed
//    order (deterministic, no atomics) and, for norm clipping, every block of it computes the
//    same total, hence the same scale, and finishes its share of the elements. So the reduction
//    spreads over the GPU (a single block took tens of microseconds per step at B=64 H=1024)
//    and the norm-clip scale is known without a host round trip.
// Clip mode and telemetry are compile-time template flags, so the common path pays nothing.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../lstm_cell.h"
#include "../lstm_steps.h"

namespace lstm_fused {
namespace cuda {
namespace steps_detail {

constexpr int kThreads = 256;          // block size of every step kernel
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loop beyond this
// Most blocks of a reduction's stage 1: stage 2 reads their partials one per thread.
constexpr int kReduceBlocks = kThreads;

// VEC consecutive values in one aligned access (16 bytes for float x4 and double x2).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load(const T* ptr) {
  return *reinterpret_cast<const Pack<T, VEC>*>(ptr);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* ptr, const Pack<T, VEC>& value) {
  *reinterpret_cast<Pack<T, VEC>*>(ptr) = value;
}

// Deterministic sum over the block: warp shuffles in a fixed tree, then warp 0 sums the
// warps' partials. blockDim.x must be a multiple of 32 (at most 1024). Every thread gets the
// total. `partial` is a __shared__ T[32]; it may be reused after the call returns.
template <typename T>
__device__ T block_sum(T value, T* partial) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    value += __shfl_down_sync(0xffffffffu, value, offset);
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x >> 5;
    value = lane < warps ? partial[lane] : T(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
      value += __shfl_down_sync(0xffffffffu, value, offset);
    if (lane == 0) partial[0] = value;
  }
  __syncthreads();
  const T total = partial[0];
  __syncthreads();
  return total;
}

// Same rule as the CPU twin: rescale when the norm exceeds clip.
template <typename T>
__device__ __forceinline__ T norm_clip_scale(T sum_squares, T clip) {
  const T norm = sqrt(sum_squares);
  return norm > clip ? clip / norm : T(1);
}

// Stage 2's total: partials[0, count) added in a fixed order (count <= blockDim.x), the same
// bits in every block.
template <typename T>
__device__ T sum_partials(const T* partials, int count, T* scratch) {
  return block_sum(static_cast<int>(threadIdx.x) < count ? partials[threadIdx.x] : T(0), scratch);
}

// Grid-stride loop over the `count` packed elements of a step: body(row, col).
template <typename Body>
__device__ __forceinline__ void for_each_element(int64_t count, int64_t per_row, int vec,
                                                 const Body& body) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < count;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = e / per_row;
    body(row, (e - row * per_row) * vec);
  }
}

// Reduction stage 1 of every two-stage reduction: the sum of element(row, col) over this
// block's share of the step's rows x per_row packed elements, in a fixed order, written to
// partials[blockIdx.x].
template <typename T, typename Element>
__device__ __forceinline__ void write_block_partial(int64_t rows, int64_t per_row, int vec,
                                                    T* partials, const Element& element) {
  __shared__ T scratch[32];
  T sum = 0;
  for_each_element(rows * per_row, per_row, vec,
                   [&](int64_t row, int64_t col) { sum += element(row, col); });
  const T total = block_sum(sum, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// ------------------------------------------------------------------------------------------
// Forward: gates (pre-activations, in place) -> activated gates, c[t], r[t].
// ------------------------------------------------------------------------------------------
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    forward_step_kernel(const ForwardStepArgs<T> args) {
  const int64_t H = args.hidden;
  const int64_t per_row = H / VEC;
  const int64_t count = args.rows * per_row;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < count;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = e / per_row;
    const int64_t col = (e - row * per_row) * VEC;
    T* gates = args.gates + row * 4 * H + col;
    const int64_t idx = row * H + col;
    const Pack<T, VEC> pre_i = load<T, VEC>(gates);
    const Pack<T, VEC> pre_f = load<T, VEC>(gates + H);
    const Pack<T, VEC> pre_g = load<T, VEC>(gates + 2 * H);
    const Pack<T, VEC> pre_o = load<T, VEC>(gates + 3 * H);
    const Pack<T, VEC> cell_prev = load<T, VEC>(args.cell_state + idx);
    Pack<T, VEC> gi, gf, gg, go, cell, hidden;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const GateValues<T> act = activate_gates(pre_i.v[k], pre_f.v[k], pre_g.v[k], pre_o.v[k]);
      cell.v[k] = next_cell(act, cell_prev.v[k]);
      hidden.v[k] = cell_output(act, cell.v[k]);
      gi.v[k] = act.i;
      gf.v[k] = act.f;
      gg.v[k] = act.g;
      go.v[k] = act.o;
    }
    store(gates, gi);
    store(gates + H, gf);
    store(gates + 2 * H, gg);
    store(gates + 3 * H, go);
    store(args.cell_state + idx, cell);
    store(args.cells + idx, cell);
    store(args.hidden_state + idx, hidden);
    if (args.output != nullptr) store(args.output + row * args.output_stride + col, hidden);
  }
}

// ------------------------------------------------------------------------------------------
// Hidden gradient: dh = dh_next + grad_output[t], clipped.
// ------------------------------------------------------------------------------------------
// One packed element (row, col): loads, adds, clamps (mode 1), stores; returns sum of dh^2.
template <typename T, int VEC, int64_t kClip>
__device__ __forceinline__ T hidden_grad_element(const HiddenGradStepArgs<T>& args,
                                                 int64_t row, int64_t col) {
  T* dhidden = args.dhidden + row * args.size + col;
  Pack<T, VEC> dh = load<T, VEC>(dhidden);
  if (args.grad_output != nullptr) {
    const Pack<T, VEC> dy =
        load<T, VEC>(args.grad_output + row * args.grad_output_stride + col);
#pragma unroll
    for (int k = 0; k < VEC; ++k) dh.v[k] = dh.v[k] + dy.v[k];
  }
  T sum = 0;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    if constexpr (kClip == kClipValue) dh.v[k] = clamp_gradient(dh.v[k], args.clip);
    sum += dh.v[k] * dh.v[k];
  }
  store(dhidden, dh);
  return sum;
}

template <typename T, int VEC, int64_t kClip>
__global__ void __launch_bounds__(kThreads)
    hidden_grad_kernel(const HiddenGradStepArgs<T> args) {
  const int64_t per_row = args.size / VEC;
  for_each_element(args.rows * per_row, per_row, VEC, [&](int64_t row, int64_t col) {
    hidden_grad_element<T, VEC, kClip>(args, row, col);
  });
}

// Reduction stage 1: the element work, one partial sum of dh^2 per block.
template <typename T, int VEC, int64_t kClip>
__global__ void __launch_bounds__(kThreads)
    hidden_grad_partial_kernel(const HiddenGradStepArgs<T> args) {
  write_block_partial<T>(args.rows, args.size / VEC, VEC, args.partials,
                         [&](int64_t row, int64_t col) {
                           return hidden_grad_element<T, VEC, kClip>(args, row, col);
                         });
}

// Reduction stage 2: the total; norm clipping rescales (grid as stage 1's), else one block.
template <typename T, int VEC, int64_t kClip, bool kSumSquares>
__global__ void __launch_bounds__(kThreads)
    hidden_grad_finish_kernel(const HiddenGradStepArgs<T> args, int partial_count) {
  __shared__ T scratch[32];
  T total = sum_partials(args.partials, partial_count, scratch);
  if constexpr (kClip == kClipNorm) {
    const T scale = norm_clip_scale(total, args.clip);
    if (scale != T(1)) {  // the same decision in every thread of every block
      const int64_t per_row = args.size / VEC;
      for_each_element(args.rows * per_row, per_row, VEC, [&](int64_t row, int64_t col) {
        T* dhidden = args.dhidden + row * args.size + col;
        Pack<T, VEC> dh = load<T, VEC>(dhidden);
#pragma unroll
        for (int k = 0; k < VEC; ++k) dh.v[k] *= scale;
        store(dhidden, dh);
      });
      total *= scale * scale;
    }
  }
  if (kSumSquares && blockIdx.x == 0 && threadIdx.x == 0) *args.sum_squares = total;
}

// ------------------------------------------------------------------------------------------
// Backward: dc, clipping, gate gradients, carried dc.
// ------------------------------------------------------------------------------------------
// kPass: 0 = the whole step; 1 = norm clipping's first pass (store the unclipped dc in dcell,
// return its sum of squares); 2 = its second pass (read dc back, scale, finish).
// Returns the sum of dc^2 after clipping (before it for pass 1).
template <typename T, int VEC, int64_t kClip, int kPass>
__device__ __forceinline__ T backward_element(const BackwardStepArgs<T>& args, int64_t row,
                                              int64_t col, T scale) {
  const int64_t H = args.hidden;
  const T* gates = args.gates + row * 4 * H + col;
  const int64_t idx = row * H + col;
  T* dcell_ptr = args.dcell + idx;
  const Pack<T, VEC> cell = load<T, VEC>(args.cells + idx);
  const Pack<T, VEC> grad_r = load<T, VEC>(args.grad_r + idx);
  const Pack<T, VEC> dcell_in = load<T, VEC>(dcell_ptr);
  const Pack<T, VEC> gate_o = load<T, VEC>(gates + 3 * H);
  T sum = 0;
  if constexpr (kPass == 1) {
    const Pack<T, VEC> gate_i = load<T, VEC>(gates);
    const Pack<T, VEC> gate_f = load<T, VEC>(gates + H);
    const Pack<T, VEC> gate_g = load<T, VEC>(gates + 2 * H);
    Pack<T, VEC> dc;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const GateValues<T> act{gate_i.v[k], gate_f.v[k], gate_g.v[k], gate_o.v[k]};
      T tanh_cell;
      dc.v[k] = cell_gradient(act, cell.v[k], grad_r.v[k], dcell_in.v[k], tanh_cell);
      sum += dc.v[k] * dc.v[k];
    }
    store(dcell_ptr, dc);
    return sum;
  } else {
    const Pack<T, VEC> gate_i = load<T, VEC>(gates);
    const Pack<T, VEC> gate_f = load<T, VEC>(gates + H);
    const Pack<T, VEC> gate_g = load<T, VEC>(gates + 2 * H);
    const T* prev = row < args.prev_split ? args.cells_prev : args.cell_initial;
    const Pack<T, VEC> cell_prev = load<T, VEC>(prev + idx);
    Pack<T, VEC> di, df, dg, dout, dcell_out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const GateValues<T> act{gate_i.v[k], gate_f.v[k], gate_g.v[k], gate_o.v[k]};
      T tanh_cell;
      T dc;
      if constexpr (kPass == 2) {
        tanh_cell = CellMath<T>::tanh(cell.v[k]);
        dc = dcell_in.v[k] * scale;
      } else {
        dc = cell_gradient(act, cell.v[k], grad_r.v[k], dcell_in.v[k], tanh_cell);
      }
      if constexpr (kClip == kClipValue) dc = clamp_gradient(dc, args.clip);
      sum += dc * dc;
      const GateValues<T> grads = gate_gradients(act, cell_prev.v[k], tanh_cell, grad_r.v[k], dc);
      di.v[k] = grads.i;
      df.v[k] = grads.f;
      dg.v[k] = grads.g;
      dout.v[k] = grads.o;
      dcell_out.v[k] = carry_cell_gradient(act, dc);
    }
    T* dgates = args.dgates + row * 4 * H + col;
    store(dgates, di);
    store(dgates + H, df);
    store(dgates + 2 * H, dg);
    store(dgates + 3 * H, dout);
    store(dcell_ptr, dcell_out);
    return sum;
  }
}

template <typename T, int VEC, int64_t kClip>
__global__ void __launch_bounds__(kThreads)
    backward_step_kernel(const BackwardStepArgs<T> args) {
  const int64_t per_row = args.hidden / VEC;
  for_each_element(args.rows * per_row, per_row, VEC, [&](int64_t row, int64_t col) {
    backward_element<T, VEC, kClip, 0>(args, row, col, T(1));
  });
}

// Reduction stage 1, one partial sum per block: of dc^2 before clipping for norm clipping
// (kPass 1: dc stored in dcell, the gate gradients wait for the scale), else the whole step
// (kPass 0) and dc^2 after clipping.
template <typename T, int VEC, int64_t kClip, int kPass>
__global__ void __launch_bounds__(kThreads)
    backward_partial_kernel(const BackwardStepArgs<T> args) {
  write_block_partial<T>(args.rows, args.hidden / VEC, VEC, args.partials,
                         [&](int64_t row, int64_t col) {
                           return backward_element<T, VEC, kClip, kPass>(args, row, col, T(1));
                         });
}

// Reduction stage 2: the total; norm clipping finishes the step with the scale (kPass 2, grid
// as stage 1's), else one block writes the sum.
template <typename T, int VEC, int64_t kClip, bool kSumSquares>
__global__ void __launch_bounds__(kThreads)
    backward_finish_kernel(const BackwardStepArgs<T> args, int partial_count) {
  __shared__ T scratch[32];
  T total = sum_partials(args.partials, partial_count, scratch);
  if constexpr (kClip == kClipNorm) {
    const T scale = norm_clip_scale(total, args.clip);
    const int64_t per_row = args.hidden / VEC;
    for_each_element(args.rows * per_row, per_row, VEC, [&](int64_t row, int64_t col) {
      backward_element<T, VEC, kClip, 2>(args, row, col, scale);
    });
    total *= scale * scale;  // the sum of squares after clipping
  }
  if (kSumSquares && blockIdx.x == 0 && threadIdx.x == 0) *args.sum_squares = total;
}

// ------------------------------------------------------------------------------------------
// Launch shapes (host side; shared with the emulator so that it runs the grids the GPU runs).
// ------------------------------------------------------------------------------------------
template <typename T>
constexpr int kVec = 16 / sizeof(T);  // 4 floats or 2 doubles per 16-byte access

template <typename T>
bool aligned(const T* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

// Whether a step can run with VEC = kVec<T>: the width divides the row and every buffer (and
// row stride) it touches is 16-byte aligned. Else it runs with VEC = 1.
template <typename T>
bool forward_vectorizable(const ForwardStepArgs<T>& args) {
  constexpr int V = kVec<T>;
  return args.hidden % V == 0 && aligned(args.gates) && aligned(args.cell_state) &&
         aligned(args.cells) && aligned(args.hidden_state) &&
         (args.output == nullptr || (aligned(args.output) && args.output_stride % V == 0));
}

template <typename T>
bool hidden_grad_vectorizable(const HiddenGradStepArgs<T>& args) {
  constexpr int V = kVec<T>;
  return args.size % V == 0 && aligned(args.dhidden) &&
         (args.grad_output == nullptr ||
          (aligned(args.grad_output) && args.grad_output_stride % V == 0));
}

template <typename T>
bool backward_vectorizable(const BackwardStepArgs<T>& args) {
  constexpr int V = kVec<T>;
  // cells_prev / cell_initial may be null when no row reads them.
  const bool prev_ok = args.prev_split == 0 || aligned(args.cells_prev);
  const bool initial_ok = args.prev_split >= args.rows || aligned(args.cell_initial);
  return args.hidden % V == 0 && aligned(args.gates) && aligned(args.cells) && prev_ok &&
         initial_ok && aligned(args.grad_r) && aligned(args.dcell) && aligned(args.dgates);
}

// Grid of the fast path (and of a reduction's stage 1 before the kReduceBlocks cap).
inline int64_t blocks_for(int64_t count) {
  return std::max<int64_t>(1, std::min<int64_t>((count + kThreads - 1) / kThreads, kMaxBlocks));
}

// The two grids of a reduction. Stage 1 has at least one block, so that a step without rows
// still writes its (zero) sum; stage 2 sums the stage 1 partials in one block, or in every
// block of stage 1's grid when it also finishes a norm-clipped step.
struct ReduceGrid {
  int partial_blocks;  // stage 1, and the number of partials stage 2 adds
  int finish_blocks;   // stage 2
};

inline ReduceGrid reduce_grid(int64_t count, bool norm_clip) {
  const int blocks = static_cast<int>(std::min<int64_t>(blocks_for(count), kReduceBlocks));
  return {blocks, norm_clip ? blocks : 1};
}

}  // namespace steps_detail
}  // namespace cuda
}  // namespace lstm_fused
