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
// Clip mode and telemetry are compile-time template flags, so the common path pays nothing;
// so are the cell variants (layer norm, zoneout, recurrent dropout's masked h), whose kernels
// take one block per row (layer norm's row statistics are block sums).
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
    if (args.hidden_16bit != nullptr) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        args.hidden_16bit[idx + k] = round_bits16(args.format_16bit, static_cast<float>(hidden.v[k]));
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// Hidden gradient: dh = dh_next + grad_output[t], clipped.
// ------------------------------------------------------------------------------------------
// dh = dh_next + dy (grad_output's row `row` at `col`, or none when it is null), clamped with
// kClipValue: the hidden-gradient step of one packed element (hidden_grad_element's, or
// folded into the gate backward: BackwardStepArgs::fold_hidden_grad).
template <typename T, int VEC, int64_t kClip>
__device__ __forceinline__ void add_output_gradient(Pack<T, VEC>& dh, const T* grad_output,
                                                    int64_t stride, int64_t row, int64_t col,
                                                    T clip) {
  if (grad_output != nullptr) {
    const Pack<T, VEC> dy = load<T, VEC>(grad_output + row * stride + col);
#pragma unroll
    for (int k = 0; k < VEC; ++k) dh.v[k] = dh.v[k] + dy.v[k];
  }
  if constexpr (kClip == kClipValue) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) dh.v[k] = clamp_gradient(dh.v[k], clip);
  }
}

// One packed element (row, col): loads, adds, clamps (mode 1), stores; returns sum of dh^2.
template <typename T, int VEC, int64_t kClip>
__device__ __forceinline__ T hidden_grad_element(const HiddenGradStepArgs<T>& args,
                                                 int64_t row, int64_t col) {
  T* dhidden = args.dhidden + row * args.size + col;
  Pack<T, VEC> dh = load<T, VEC>(dhidden);
  add_output_gradient<T, VEC, kClip>(dh, args.grad_output, args.grad_output_stride, row, col,
                                     args.clip);
  T sum = 0;
#pragma unroll
  for (int k = 0; k < VEC; ++k) sum += dh.v[k] * dh.v[k];
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
  Pack<T, VEC> grad_r = load<T, VEC>(args.grad_r + idx);
  if (args.fold_hidden_grad) {  // grad_r is dh_next: dh[t] = dh_next + dy[t], clamped
    add_output_gradient<T, VEC, kClip>(grad_r, args.grad_output, args.grad_output_stride, row,
                                       col, args.clip);
  }
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
    if (args.dgates_16bit != nullptr) {
      uint16_t* const rounded = args.dgates_16bit + row * 4 * H + col;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        rounded[k] = round_bits16(args.format_16bit, static_cast<float>(di.v[k]));
        rounded[H + k] = round_bits16(args.format_16bit, static_cast<float>(df.v[k]));
        rounded[2 * H + k] = round_bits16(args.format_16bit, static_cast<float>(dg.v[k]));
        rounded[3 * H + k] = round_bits16(args.format_16bit, static_cast<float>(dout.v[k]));
      }
    }
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
  const bool output_ok = !args.fold_hidden_grad || args.grad_output == nullptr ||
                         (aligned(args.grad_output) && args.grad_output_stride % V == 0);
  return args.hidden % V == 0 && aligned(args.gates) && aligned(args.cells) && prev_ok &&
         initial_ok && aligned(args.grad_r) && aligned(args.dcell) && aligned(args.dgates) &&
         output_ok;
}

// ------------------------------------------------------------------------------------------
// Cell variants (lstm_cell.h CellVariant: layer norm, zoneout, recurrent dropout's masked
// h): one block per row (a grid-stride loop over rows), its threads striding over the row's
// units, so that layer norm's row statistics are block sums (block_sum: a fixed order,
// deterministic). The same formulas as the CPU twin (csrc/cpu/lstm_rows_cpu.h), from
// lstm_cell.h.
// ------------------------------------------------------------------------------------------
// Mean and 1/sqrt(biased variance + eps) of values[0, n) of this block's row.
template <typename T>
__device__ void row_stats(const T* values, int64_t n, T* scratch, T& mean, T& rstd) {
  T sum = 0;
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) sum += values[k];
  mean = block_sum(sum, scratch) / T(n);
  T squares = 0;
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
    const T centred = values[k] - mean;
    squares += centred * centred;
  }
  rstd = layer_norm_rstd(block_sum(squares, scratch) / T(n));
}

template <typename T>
__device__ __forceinline__ T keep_at(const T* mask_row, T probability, int64_t j) {
  return mask_row != nullptr ? mask_row[j] : probability;
}

template <typename T, unsigned kVariants>
__global__ void __launch_bounds__(kThreads)
    forward_variants_kernel(const ForwardStepArgs<T> args) {
  __shared__ T scratch[32];
  constexpr bool kNorm = (kVariants & kCellLayerNorm) != 0;
  const int64_t H = args.hidden;
  const StepVariants<T>& v = args.variant;
  for (int64_t row = blockIdx.x; row < args.rows; row += gridDim.x) {
    T* gates = args.gates + row * 4 * H;
    T* cell = args.cell_state + row * H;
    T* saved = args.cells + row * H;
    T* hidden = args.hidden_state + row * H;
    T* output = args.output != nullptr ? args.output + row * args.output_stride : nullptr;
    const T* zone_c = v.zoneout_cell_mask != nullptr ? v.zoneout_cell_mask + row * H : nullptr;
    const T* zone_h =
        v.zoneout_hidden_mask != nullptr ? v.zoneout_hidden_mask + row * H : nullptr;
    const T* projection = kNorm ? args.projection + row * 4 * H : nullptr;
    const T* recurrent = kNorm ? args.recurrent + row * 4 * H : nullptr;
    T proj_mean = 0, proj_rstd = 1, rec_mean = 0, rec_rstd = 1;
    if constexpr (kNorm) {
      row_stats(projection, 4 * H, scratch, proj_mean, proj_rstd);
      row_stats(recurrent, 4 * H, scratch, rec_mean, rec_rstd);
    }
    // h[t] and c[t] of unit j from o, c~ and n (LN(c~) g + b, or c~)
    auto finish = [&](int64_t j, T gate_o, T cell_new, T normed) {
      T r = gate_o * CellMath<T>::tanh(normed);
      T c = cell_new;
      if constexpr ((kVariants & kCellZoneoutCell) != 0) {
        c = zoneout(keep_at(zone_c, v.zoneout_cell, j), cell[j], c);
      }
      if constexpr ((kVariants & kCellZoneoutHidden) != 0) {
        r = zoneout(keep_at(zone_h, v.zoneout_hidden, j), hidden[j], r);
      }
      cell[j] = c;
      saved[j] = c;
      hidden[j] = r;
      if (output != nullptr) output[j] = r;
      if constexpr ((kVariants & kCellMaskedHidden) != 0) {
        args.hidden_masked[row * H + j] = r * v.dropout_mask[row * H + j];
      }
    };
    T cell_sum = 0;
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      T pre[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t k = q * H + j;
        if constexpr (kNorm) {
          // G = LN(A) g_ih + LN(R) g_hh + b
          pre[q] = normalize(projection[k], proj_mean, proj_rstd) * v.ln_ih[k] +
                   normalize(recurrent[k], rec_mean, rec_rstd) * v.ln_hh[k];
          if (v.bias != nullptr) pre[q] += v.bias[k];
        } else {
          pre[q] = gates[k];
        }
      }
      const GateValues<T> act = activate_gates(pre[0], pre[1], pre[2], pre[3]);
      const T cell_new = next_cell(act, cell[j]);
      gates[j] = act.i;
      gates[H + j] = act.f;
      gates[2 * H + j] = act.g;
      gates[3 * H + j] = act.o;
      if constexpr (kNorm) {
        saved[j] = cell_new;  // c~ until the cell's statistics are known
        cell_sum += cell_new;
      } else {
        finish(j, act.o, cell_new, cell_new);
      }
    }
    if constexpr (kNorm) {
      const T mean = block_sum(cell_sum, scratch) / T(H);
      T squares = 0;
      for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
        const T centred = saved[j] - mean;
        squares += centred * centred;
      }
      const T rstd = layer_norm_rstd(block_sum(squares, scratch) / T(H));
      for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
        const T cell_new = saved[j];
        finish(j, gates[3 * H + j], cell_new,
               normalize(cell_new, mean, rstd) * v.ln_cell_weight[j] + v.ln_cell_bias[j]);
      }
    }
  }
}

// Backward of one row with variants, in two parts so that norm clipping can scale dL/dc~
// between them (the CPU twin's backward_front / backward_back).
//
// front: dL/dc~ before clipping into dcell, o's gradient into dgates' o block, with zoneout
// of c keep_c * dL/dc[t] into dgates' f block, with layer norm the row's dL/dg_c, dL/db_c;
// returns this thread's share of the sum of squares of dL/dc~.
template <typename T, unsigned kVariants>
__device__ T backward_front_row(const BackwardStepArgs<T>& args, int64_t row, T* scratch) {
  constexpr bool kNorm = (kVariants & kCellLayerNorm) != 0;
  constexpr bool kZoneCell = (kVariants & kCellZoneoutCell) != 0;
  const int64_t H = args.hidden;
  const StepVariants<T>& v = args.variant;
  const T* gates = args.gates + row * 4 * H;
  const T* cell = args.cells + row * H;
  const T* cell_prev = (row < args.prev_split ? args.cells_prev : args.cell_initial) + row * H;
  const T* grad_r = args.grad_r + row * H;
  T* dcell = args.dcell + row * H;
  T* dgates = args.dgates + row * 4 * H;
  const T* zone_c = v.zoneout_cell_mask != nullptr ? v.zoneout_cell_mask + row * H : nullptr;
  const T* zone_h = v.zoneout_hidden_mask != nullptr ? v.zoneout_hidden_mask + row * H : nullptr;
  auto cell_new_at = [&](int64_t j) {
    if constexpr (kZoneCell) {
      const GateValues<T> act{gates[j], gates[H + j], gates[2 * H + j], T(0)};
      return next_cell(act, cell_prev[j]);
    } else {
      return cell[j];
    }
  };
  auto grad_r_at = [&](int64_t j) {
    T dr = grad_r[j];
    if constexpr ((kVariants & kCellZoneoutHidden) != 0) {
      dr *= T(1) - keep_at(zone_h, v.zoneout_hidden, j);
    }
    return dr;
  };
  auto store_dcell = [&](int64_t j, T from_output) {
    const T dcell_in = dcell[j];
    T dc;
    if constexpr (kZoneCell) {
      const T keep = keep_at(zone_c, v.zoneout_cell, j);
      dc = from_output + (T(1) - keep) * dcell_in;
      dgates[H + j] = keep * dcell_in;
    } else {
      dc = from_output + dcell_in;
    }
    dcell[j] = dc;
    return dc * dc;
  };
  T sum = 0;
  if constexpr (!kNorm) {
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      GateValues<T> act;
      act.o = gates[3 * H + j];
      const T tanh_n = CellMath<T>::tanh(cell_new_at(j));
      const T dr = grad_r_at(j);
      dgates[3 * H + j] = output_gate_gradient(act, tanh_n, dr);
      sum += store_dcell(j, output_cell_gradient(act, tanh_n, dr));
    }
  } else {
    T partial = 0;
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) partial += cell_new_at(j);
    const T mean = block_sum(partial, scratch) / T(H);
    partial = 0;
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      const T centred = cell_new_at(j) - mean;
      partial += centred * centred;
    }
    const T rstd = layer_norm_rstd(block_sum(partial, scratch) / T(H));
    T grad_sum = 0, grad_normalized_sum = 0;
    T* ln_grad_row = args.ln_grad_rows + row * kLayerNormGradWidth * H;
    T* grad_weight = ln_grad_row + kGradCellGain * H;
    T* grad_bias = ln_grad_row + kGradCellBias * H;
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      GateValues<T> act;
      act.o = gates[3 * H + j];
      const T normalized = normalize(cell_new_at(j), mean, rstd);
      const T gain = v.ln_cell_weight[j];
      const T tanh_n = CellMath<T>::tanh(normalized * gain + v.ln_cell_bias[j]);
      const T dr = grad_r_at(j);
      const T dn = output_cell_gradient(act, tanh_n, dr);
      dgates[3 * H + j] = output_gate_gradient(act, tanh_n, dr);
      dgates[2 * H + j] = dn;  // scratch until the back part
      grad_weight[j] = dn * normalized;
      grad_bias[j] = dn;
      grad_sum += dn * gain;
      grad_normalized_sum += dn * gain * normalized;
    }
    const T mean_grad = block_sum(grad_sum, scratch) / T(H);
    const T mean_grad_normalized = block_sum(grad_normalized_sum, scratch) / T(H);
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      const T from_output = layer_norm_input_gradient(
          dgates[2 * H + j] * v.ln_cell_weight[j], normalize(cell_new_at(j), mean, rstd), rstd,
          mean_grad, mean_grad_normalized);
      sum += store_dcell(j, from_output);
    }
  }
  return sum;
}

// back: dL/dc~ (scaled or clamped) -> the gate gradients and dL/dc[t-1]; with layer norm
// then LN's backward of the recurrent part. Returns this thread's share of the sum of squares
// of dL/dc~ after clipping.
template <typename T, unsigned kVariants, int64_t kClip>
__device__ T backward_back_row(const BackwardStepArgs<T>& args, int64_t row, T scale,
                               T* scratch) {
  const int64_t H = args.hidden;
  const StepVariants<T>& v = args.variant;
  const T* gates = args.gates + row * 4 * H;
  const T* cell_prev = (row < args.prev_split ? args.cells_prev : args.cell_initial) + row * H;
  T* dcell = args.dcell + row * H;
  T* dgates = args.dgates + row * 4 * H;
  T sum = 0;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    const GateValues<T> act{gates[j], gates[H + j], gates[2 * H + j], T(0)};
    T dc = dcell[j];
    if constexpr (kClip == kClipNorm) dc *= scale;
    if constexpr (kClip == kClipValue) dc = clamp_gradient(dc, args.clip);
    sum += dc * dc;
    T carried = carry_cell_gradient(act, dc);
    if constexpr ((kVariants & kCellZoneoutCell) != 0) carried += dgates[H + j];
    const GateValues<T> grads = cell_gate_gradients(act, cell_prev[j], dc);
    dgates[j] = grads.i;
    dgates[H + j] = grads.f;
    dgates[2 * H + j] = grads.g;
    dcell[j] = carried;
  }
  if constexpr ((kVariants & kCellLayerNorm) != 0) {
    // the backward of G = LN(A) g_ih + LN(R) g_hh + b: dL/dR, dL/dA over dG in dgates, the
    // row's parameter gradients into ln_grad_rows (LayerNormGrad layout)
    __syncthreads();  // the row's dG, written by every thread of the block
    const int64_t G = 4 * H;
    const T* projection = args.projection + row * G;
    const T* recurrent = args.recurrent + row * G;
    T* grad_recurrent = args.grad_recurrent + row * G;
    T* ln_grad_row = args.ln_grad_rows + row * kLayerNormGradWidth * H;
    T proj_mean, proj_rstd, rec_mean, rec_rstd;
    row_stats(projection, G, scratch, proj_mean, proj_rstd);
    row_stats(recurrent, G, scratch, rec_mean, rec_rstd);
    T proj_grad = 0, proj_grad_normalized = 0, rec_grad = 0, rec_grad_normalized = 0;
    for (int64_t k = threadIdx.x; k < G; k += blockDim.x) {
      const T dgate = dgates[k];
      const T proj_normalized = normalize(projection[k], proj_mean, proj_rstd);
      const T rec_normalized = normalize(recurrent[k], rec_mean, rec_rstd);
      ln_grad_row[kGradBias * H + k] = dgate;
      ln_grad_row[kGradInputGain * H + k] = dgate * proj_normalized;
      ln_grad_row[kGradRecurrentGain * H + k] = dgate * rec_normalized;
      proj_grad += dgate * v.ln_ih[k];
      proj_grad_normalized += dgate * v.ln_ih[k] * proj_normalized;
      rec_grad += dgate * v.ln_hh[k];
      rec_grad_normalized += dgate * v.ln_hh[k] * rec_normalized;
    }
    const T proj_mean_grad = block_sum(proj_grad, scratch) / T(G);
    const T proj_mean_grad_normalized = block_sum(proj_grad_normalized, scratch) / T(G);
    const T rec_mean_grad = block_sum(rec_grad, scratch) / T(G);
    const T rec_mean_grad_normalized = block_sum(rec_grad_normalized, scratch) / T(G);
    for (int64_t k = threadIdx.x; k < G; k += blockDim.x) {
      const T dgate = dgates[k];  // each thread reads and writes its own k only
      grad_recurrent[k] = layer_norm_input_gradient(
          dgate * v.ln_hh[k], normalize(recurrent[k], rec_mean, rec_rstd), rec_rstd,
          rec_mean_grad, rec_mean_grad_normalized);
      dgates[k] = layer_norm_input_gradient(
          dgate * v.ln_ih[k], normalize(projection[k], proj_mean, proj_rstd), proj_rstd,
          proj_mean_grad, proj_mean_grad_normalized);
    }
  }
  return sum;
}

// kPass: 0 = the whole step, 1 = norm clipping's first pass (front only; its partial sums are
// of dL/dc~ before clipping). kPartials: write one partial sum per block (telemetry or norm
// clipping; then the grid has at most kReduceBlocks blocks).
template <typename T, unsigned kVariants, int64_t kClip, int kPass, bool kPartials>
__global__ void __launch_bounds__(kThreads)
    backward_variants_kernel(const BackwardStepArgs<T> args) {
  __shared__ T scratch[32];
  T sum = 0;
  for (int64_t row = blockIdx.x; row < args.rows; row += gridDim.x) {
    const T front = backward_front_row<T, kVariants>(args, row, scratch);
    if constexpr (kPass == 1) {
      sum += front;
    } else {
      sum += backward_back_row<T, kVariants, kClip>(args, row, T(1), scratch);
    }
  }
  if constexpr (kPartials) {
    const T total = block_sum(sum, scratch);
    if (threadIdx.x == 0) args.partials[blockIdx.x] = total;
  }
}

// Norm clipping's second pass: the step's scale from the partials, then the back part of
// every row (grid as the first pass's).
template <typename T, unsigned kVariants, bool kSumSquares>
__global__ void __launch_bounds__(kThreads)
    backward_variants_finish_kernel(const BackwardStepArgs<T> args, int partial_count) {
  __shared__ T scratch[32];
  const T total = sum_partials(args.partials, partial_count, scratch);
  const T scale = norm_clip_scale(total, args.clip);
  for (int64_t row = blockIdx.x; row < args.rows; row += gridDim.x) {
    backward_back_row<T, kVariants, kClipNorm>(args, row, scale, scratch);
  }
  if (kSumSquares && blockIdx.x == 0 && threadIdx.x == 0) {
    *args.sum_squares = total * scale * scale;  // after clipping
  }
}

// Layer norm: sums[k] += rows[r][k] over the step's rows in order (one thread per column k;
// deterministic, as the CPU twin's add_rows_in_order).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    add_rows_in_order_kernel(const T* rows, int64_t count, int64_t width, T* sums) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < width;
       k += int64_t(gridDim.x) * blockDim.x) {
    T total = sums[k];
    for (int64_t r = 0; r < count; ++r) total += rows[r * width + k];
    sums[k] = total;
  }
}

// ------------------------------------------------------------------------------------------
// The recurrent part of dL/dh[t-1] with recurrent dropout and/or zoneout of h
// (RecurrentGradStepArgs): dhidden = dropout_mask * recurrent + keep_h * dhidden.
// ------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads)
    recurrent_grad_kernel(const RecurrentGradStepArgs<T> args) {
  for_each_element(args.rows * args.size, args.size, 1, [&](int64_t row, int64_t col) {
    const int64_t idx = row * args.size + col;
    T value = args.recurrent[idx];
    if (args.dropout_mask != nullptr) value *= args.dropout_mask[idx];
    if (args.zoneout) {
      const T keep = args.zoneout_mask != nullptr ? args.zoneout_mask[idx] : args.zoneout_hidden;
      value += keep * args.dhidden[idx];
    }
    args.dhidden[idx] = value;
  });
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

// The cell variants' kernels take one block per row (a grid-stride loop beyond the cap): at
// most kReduceBlocks when they write reduction partials, and at least one then, so that a
// step without rows still writes its (zero) sum.
inline int variant_blocks(int64_t rows, bool reduction) {
  return static_cast<int>(reduction ? std::max<int64_t>(1, std::min<int64_t>(rows, kReduceBlocks))
                                    : std::min<int64_t>(rows, kMaxBlocks));
}

}  // namespace steps_detail
}  // namespace cuda
}  // namespace lstm_fused
