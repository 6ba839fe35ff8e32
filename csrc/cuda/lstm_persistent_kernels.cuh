// Device code of the persistent recurrent kernels (stage 2 of the GPU plan). Included by
// lstm_persistent_cuda.cu (the host side: checks, plan, cooperative launch) and, with
// LSTM_FUSED_EMULATE_CUDA defined, by the CPU emulator of tests/emulation/, which runs these
// very kernels with one fiber per CUDA thread and real block / grid barriers (so the indexing,
// the barriers and the numbers are checked on a machine without a GPU).
//
// Each block owns U consecutive hidden units j0 .. j0+U-1 (all four gates of them) and keeps
// its slice of W_hh in shared memory for the whole sequence:
//   forward   the 4U rows of W_hh of its gates (4U x H)
//   backward  the U columns of W_hh of its units (U x 4H, stored transposed)
// Per step the block stages the operand every block needs (h[t-1], or dG[t]) from global
// memory (L2) into shared memory, multiplies it with its slice (exact fp32 FMA, warp tiles of
// registers, K split over warps, partial sums added in a fixed order: deterministic), and runs
// the gate math of lstm_cell.h on its units in the epilogue; the per-row state (c and h_n, or
// dh and dc) stays in shared memory. A grid-wide barrier (cooperative groups) per step
// publishes h[t] (forward, through `output`) or dG[t] (backward, through `dgates`); reads of
// data written by other blocks during the launch bypass L1 (__ldcg). No warp-level intrinsics:
// every cross-thread exchange goes through shared memory between block barriers.
//
// Shared memory of a block (float offsets from persistent::Plan):
//   [0, stage_offset)              W_hh slice, w_rows x w_pitch
//   [stage_offset, state_offset)   staged operand rows (rows_chunk x stage_pitch), reused for
//                                  the warps' partial sums (k_slices x rows_chunk x partial_cols)
//   [state_offset, ...)            per-row state, 2 x B x U
#pragma once

#include <cstdint>

#include "../lstm_cell.h"
#include "../lstm_steps.h"
#include "persistent_plan.h"

#ifndef LSTM_FUSED_EMULATE_CUDA
#include <cooperative_groups.h>
#endif

namespace lstm_fused {
namespace cuda {
namespace persistent_detail {

#ifndef LSTM_FUSED_EMULATE_CUDA
namespace cg = cooperative_groups;

__device__ __forceinline__ float* dynamic_smem() {
  extern __shared__ float4 smem_vec[];
  return reinterpret_cast<float*>(smem_vec);
}
#endif

using persistent::BackwardTile;
using persistent::ForwardTile;
using persistent::kThreads;
using persistent::kWarps;
using persistent::StepInfo;
using persistent::StepSegments;

// The plan's numbers the kernels need (int: shared-memory sizes and tile counts are small).
struct DevicePlan {
  int units, w_rows, w_pitch;
  int col_tiles, row_tiles, rows_chunk, k_slices;
  int k4, k_chunk, stage_pitch, partial_cols;
  int stage_offset, state_offset;
};

inline DevicePlan device_plan(const persistent::Plan& p) {
  DevicePlan d;
  d.units = static_cast<int>(p.units);
  d.w_rows = static_cast<int>(p.w_rows);
  d.w_pitch = static_cast<int>(p.w_pitch);
  d.col_tiles = static_cast<int>(p.col_tiles);
  d.row_tiles = static_cast<int>(p.row_tiles);
  d.rows_chunk = static_cast<int>(p.rows_chunk);
  d.k_slices = static_cast<int>(p.k_slices);
  d.k4 = static_cast<int>(persistent::round_up(p.k_total, 4));
  d.k_chunk = static_cast<int>(p.k_chunk);
  d.stage_pitch = static_cast<int>(p.stage_pitch);
  d.partial_cols = static_cast<int>(p.partial_cols);
  d.stage_offset = static_cast<int>(p.stage_offset);
  d.state_offset = static_cast<int>(p.state_offset);
  return d;
}

struct ForwardParams {
  float* gates;            // [N, 4H] in: x W_ih^T, out: activated gates
  const float* bias;       // [4H] b_ih + b_hh, added to the pre-activations; may be null
  const float* w_hh;       // [4H, H]
  const float* h0;         // [B, H] (the same memory as hidden_state: read before the end)
  float* hidden_state;     // [B, H] out: h_n
  float* cell_state;       // [B, H] in: c0, out: c_n
  float* cells;            // [N, H] out: c[t]
  float* output;           // [N, >=H] out: h[t], row stride output_stride
  int64_t output_stride;
  int64_t hidden, batch;
  bool reverse;
  bool vector_loads;       // the staged rows are 16-byte aligned (H % 4 == 0, aligned strides)
  DevicePlan plan;
  StepSegments segments;
};

struct BackwardParams {
  const float* gates;        // [N, 4H] activated gates
  const float* cells;        // [N, H] c[t]
  const float* c0;           // [B, H]
  const float* grad_output;  // [N, >=H] row stride grad_output_stride; may be null
  int64_t grad_output_stride;
  const float* w_hh;         // [4H, H]
  float* dhidden;            // [B, H] in: dL/dh_n, out: dL/dh0
  float* dcell;              // [B, H] in: dL/dc_n, out: dL/dc0
  float* dgates;             // [N, 4H] out
  int64_t hidden, batch;
  bool reverse;
  bool vector_loads;
  DevicePlan plan;
  StepSegments segments;
};

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Kernel parameters from the driver's arguments and a plan that fits (segments already made).
inline void fill_forward_params(const ForwardSequenceArgs<float>& a, const persistent::Plan& plan,
                                ForwardParams& p) {
  p.gates = a.gates;
  p.bias = a.bias;
  p.w_hh = a.w_hh;
  p.h0 = a.h0;
  p.hidden_state = a.hidden_state;
  p.cell_state = a.cell_state;
  p.cells = a.cells;
  p.output = a.output;
  p.output_stride = a.output_stride;
  p.hidden = a.hidden;
  p.batch = a.batch;
  p.reverse = a.reverse;
  p.vector_loads = a.hidden % 4 == 0 && a.output_stride % 4 == 0 && aligned16(a.output) &&
                   aligned16(a.h0);
  p.plan = device_plan(plan);
}

inline void fill_backward_params(const BackwardSequenceArgs<float>& a,
                                 const persistent::Plan& plan, BackwardParams& p) {
  p.gates = a.gates;
  p.cells = a.cells;
  p.c0 = a.c0;
  p.grad_output = a.grad_output;
  p.grad_output_stride = a.grad_output_stride;
  p.w_hh = a.w_hh;
  p.dhidden = a.dhidden;
  p.dcell = a.dcell;
  p.dgates = a.dgates;
  p.hidden = a.hidden;
  p.batch = a.batch;
  p.reverse = a.reverse;
  p.vector_loads = aligned16(a.dgates);  // rows of 4H floats: aligned when the base is
  p.plan = device_plan(plan);
}

// What the backward's first phase reads for one (row, unit) of a step.
struct BackwardInputs {
  float i, f, g, o, cell, cell_prev, dy;
};

// ------------------------------------------------------------------------------------------
// Block-level pieces shared by both kernels.
// ------------------------------------------------------------------------------------------

// Stage rows [r0, r0 + rows_chunk) x columns [k0, k0 + width) of the shared operand into
// `stage` (row pitch `pitch`); rows at or past r0 + nr, and columns at or past k_valid, are
// zeros. row_ptr(r) gives the start of row r (column 0) in global memory. width % 4 == 0.
template <typename RowPtr>
__device__ __forceinline__ void stage_rows(float* stage, int pitch, int rows_chunk, int64_t r0,
                                           int nr, int k0, int width, int64_t k_valid,
                                           bool vector_loads, RowPtr row_ptr) {
  const int vectors = width / 4;
  const int count = rows_chunk * vectors;
  for (int e = threadIdx.x; e < count; e += kThreads) {
    const int rr = e / vectors;
    const int k = k0 + 4 * (e - rr * vectors);
    float4 value = make_float4(0.f, 0.f, 0.f, 0.f);
    if (rr < nr) {
      const float* src = row_ptr(r0 + rr);
      if (vector_loads) {
        value = __ldcg(reinterpret_cast<const float4*>(src + k));
      } else {
        value.x = k + 0 < k_valid ? __ldcg(src + k + 0) : 0.f;
        value.y = k + 1 < k_valid ? __ldcg(src + k + 1) : 0.f;
        value.z = k + 2 < k_valid ? __ldcg(src + k + 2) : 0.f;
        value.w = k + 3 < k_valid ? __ldcg(src + k + 3) : 0.f;
      }
    }
    *reinterpret_cast<float4*>(stage + rr * pitch + 4 * (e - rr * vectors)) = value;
  }
}

// One warp's share of a staged chunk: acc[i][j] += sum over its K slice of
// stage[row_i][k] * w[col_j][k0 + k]. Lane (rl, cl) holds rows row_base + rl + LR*i and
// columns col_base + cl + LC*j (interleaved, so the lanes of one load hit distinct banks).
// Only the first RT of the tile's rows-per-lane are computed (the others are padding rows of a
// small batch). Columns past the slice are clamped to its last row: their sums are never read.
template <typename Tile, int RT>
__device__ __forceinline__ void accumulate(float (&acc)[Tile::kRowsPerLane][Tile::kColsPerLane],
                                           const float* stage, int stage_pitch,
                                           const float* w, int w_pitch, int w_rows, int k0,
                                           int v_begin, int v_end, int row_base, int col_base,
                                           int lane) {
  static_assert(RT >= 1 && RT <= Tile::kRowsPerLane, "rows per lane");
  constexpr int CT = Tile::kColsPerLane;
  const int rl = lane / Tile::kLaneCols, cl = lane % Tile::kLaneCols;
  const float* a_ptr[RT];
  const float* b_ptr[CT];
#pragma unroll
  for (int i = 0; i < RT; ++i) a_ptr[i] = stage + (row_base + rl + Tile::kLaneRows * i) * stage_pitch;
#pragma unroll
  for (int j = 0; j < CT; ++j) {
    const int col = min(col_base + cl + Tile::kLaneCols * j, w_rows - 1);
    b_ptr[j] = w + col * w_pitch + k0;
  }
#pragma unroll 2
  for (int v = v_begin; v < v_end; ++v) {
    float4 a[RT], b[CT];
#pragma unroll
    for (int i = 0; i < RT; ++i) a[i] = *reinterpret_cast<const float4*>(a_ptr[i] + 4 * v);
#pragma unroll
    for (int j = 0; j < CT; ++j) b[j] = *reinterpret_cast<const float4*>(b_ptr[j] + 4 * v);
#pragma unroll
    for (int i = 0; i < RT; ++i) {
#pragma unroll
      for (int j = 0; j < CT; ++j) {
        float s = acc[i][j];
        s = fmaf(a[i].x, b[j].x, s);
        s = fmaf(a[i].y, b[j].y, s);
        s = fmaf(a[i].z, b[j].z, s);
        s = fmaf(a[i].w, b[j].w, s);
        acc[i][j] = s;
      }
    }
  }
}

// The product of one row chunk: rows [r0, r0 + nr) of the operand times the block's slice.
// On return (after a block barrier) `partial` (the staging buffer) holds
// partial[(s * rows_chunk + rr) * partial_cols + c] for the k_slices slices s; the caller sums
// them over s in order. Every thread of the block must call it.
template <typename Tile, typename RowPtr>
__device__ __forceinline__ void chunk_product(const DevicePlan& plan, const float* w_s,
                                              float* stage, int64_t r0, int nr,
                                              int64_t k_valid, bool vector_loads,
                                              RowPtr row_ptr) {
  constexpr int RT = Tile::kRowsPerLane, CT = Tile::kColsPerLane;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int items = plan.row_tiles * plan.col_tiles;
  const int item = warp % items, slice = warp / items;
  const int row_base = (item / plan.col_tiles) * Tile::kRows;
  const int col_base = (item % plan.col_tiles) * Tile::kCols;
  const int valid_rows = nr - row_base;  // real rows in this warp's row tile (<= 0: none)
  // Warps past items * k_slices, and tiles of padding rows only, have nothing to add (the
  // epilogue reads rows < nr only).
  const bool active = warp < items * plan.k_slices && valid_rows > 0;
  float acc[RT][CT];
#pragma unroll
  for (int i = 0; i < RT; ++i) {
#pragma unroll
    for (int j = 0; j < CT; ++j) acc[i][j] = 0.f;
  }
  for (int k0 = 0; k0 < plan.k4; k0 += plan.k_chunk) {
    const int width = min(plan.k_chunk, plan.k4 - k0);
    stage_rows(stage, plan.stage_pitch, plan.rows_chunk, r0, nr, k0, width, k_valid,
               vector_loads, row_ptr);
    __syncthreads();
    if (active) {
      const int vectors = width / 4;
      const int v_begin = slice * vectors / plan.k_slices;
      const int v_end = (slice + 1) * vectors / plan.k_slices;
      // Rows per lane that hold real rows: a small batch skips the padding rows' FMAs.
      constexpr int LR = Tile::kLaneRows;
      if (valid_rows > 2 * LR) {
        accumulate<Tile, RT>(acc, stage, plan.stage_pitch, w_s, plan.w_pitch, plan.w_rows, k0,
                             v_begin, v_end, row_base, col_base, lane);
      } else if (valid_rows > LR) {
        accumulate<Tile, (RT < 2 ? RT : 2)>(acc, stage, plan.stage_pitch, w_s, plan.w_pitch,
                                            plan.w_rows, k0, v_begin, v_end, row_base,
                                            col_base, lane);
      } else {
        accumulate<Tile, 1>(acc, stage, plan.stage_pitch, w_s, plan.w_pitch, plan.w_rows, k0,
                            v_begin, v_end, row_base, col_base, lane);
      }
    }
    __syncthreads();  // the staging buffer is free again (next chunk, or the partial sums)
  }
  if (active) {
    const int rl = lane / Tile::kLaneCols, cl = lane % Tile::kLaneCols;
#pragma unroll
    for (int i = 0; i < RT; ++i) {
      const int rr = row_base + rl + Tile::kLaneRows * i;
#pragma unroll
      for (int j = 0; j < CT; ++j) {
        const int c = col_base + cl + Tile::kLaneCols * j;
        stage[(slice * plan.rows_chunk + rr) * plan.partial_cols + c] = acc[i][j];
      }
    }
  }
  __syncthreads();
}

// Sum of the k_slices partial sums of (row rr of the chunk, column c), in slice order.
__device__ __forceinline__ float sum_partials(const DevicePlan& plan, const float* partial, int rr,
                                              int c) {
  float sum = 0.f;
  for (int s = 0; s < plan.k_slices; ++s) {
    sum += partial[(s * plan.rows_chunk + rr) * plan.partial_cols + c];
  }
  return sum;
}

// ------------------------------------------------------------------------------------------
// Forward: G = Gx[t] + h[t-1] W_hh^T for the block's gate columns, then the cell.
// ------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads, 1)
    persistent_forward_kernel(const __grid_constant__ ForwardParams p) {
  float* const smem = dynamic_smem();
  const DevicePlan& plan = p.plan;
  const int64_t H = p.hidden, B = p.batch;
  const int U = plan.units;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * U;
  const int ub = static_cast<int>(min(static_cast<int64_t>(U), H - j0));  // this block's units
  float* const w_s = smem;                           // [4U][w_pitch]
  float* const stage = smem + plan.stage_offset;     // staged h rows / partial sums
  float* const c_s = smem + plan.state_offset;       // [B][U] c of each row
  float* const h_s = c_s + B * U;                    // [B][U] h of each row's last step

  // W_hh rows of the block's gates: slice row c = g*U + u is W_hh row g*H + j0 + u; rows of
  // units past the end of H and columns past H are zeros.
  for (int e = threadIdx.x; e < plan.w_rows * plan.k4; e += kThreads) {
    const int c = e / plan.k4, k = e - c * plan.k4;
    const int g = c / U, u = c - g * U;
    float value = 0.f;
    if (u < ub && k < H) value = p.w_hh[(g * H + j0 + u) * H + k];
    w_s[c * plan.w_pitch + k] = value;
  }
  for (int64_t e = threadIdx.x; e < B * ub; e += kThreads) {
    const int64_t r = e / ub;
    const int u = static_cast<int>(e - r * ub);
    c_s[r * U + u] = p.cell_state[r * H + j0 + u];
  }
  __syncthreads();

  cg::grid_group grid = cg::this_grid();
  const int64_t T = p.segments.steps;
  const int64_t ld = p.output_stride;
  int hint = 0;
  for (int64_t i = 0; i < T; ++i) {
    const int64_t t = persistent::step_at(i, T, p.reverse, /*backward=*/false);
    const StepInfo s = persistent::step_info(p.segments, t, p.reverse, hint);
    if (s.rows == 0) continue;  // the same decision in every block: no barrier needed
    // Rows that continue a sequence read h[t-1] (written by every block at the previous step),
    // the others h0.
    const float* const prev_rows = p.output + s.prev_offset * ld;
    auto row_ptr = [&](int64_t r) -> const float* {
      return r < s.continuing ? prev_rows + r * ld : p.h0 + r * H;
    };
    for (int64_t r0 = 0; r0 < s.rows; r0 += plan.rows_chunk) {
      const int nr = static_cast<int>(min(static_cast<int64_t>(plan.rows_chunk), s.rows - r0));
      auto gates_of = [&](int e) {
        const int rr = e / ub;
        return p.gates + (s.offset + r0 + rr) * 4 * H + j0 + (e - rr * ub);
      };
      // The input projection of this thread's first epilogue element, loaded before the
      // product so that its (device-memory) latency hides behind the staging and the FMAs.
      float first[4] = {0.f, 0.f, 0.f, 0.f};
      if (static_cast<int>(threadIdx.x) < nr * ub) {
        const float* g = gates_of(threadIdx.x);
#pragma unroll
        for (int q = 0; q < 4; ++q) first[q] = g[q * H];
      }
      chunk_product<ForwardTile>(plan, w_s, stage, r0, nr, H, p.vector_loads, row_ptr);
      for (int e = threadIdx.x; e < nr * ub; e += kThreads) {
        const int rr = e / ub, u = e - rr * ub;
        const int64_t r = r0 + rr, row = s.offset + r;
        float* const g = gates_of(e);
        float x[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          x[q] = e == static_cast<int>(threadIdx.x) ? first[q] : g[q * H];
          if (p.bias != nullptr) x[q] += p.bias[q * H + j0 + u];
        }
        const GateValues<float> act = activate_gates(
            x[0] + sum_partials(plan, stage, rr, u),
            x[1] + sum_partials(plan, stage, rr, U + u),
            x[2] + sum_partials(plan, stage, rr, 2 * U + u),
            x[3] + sum_partials(plan, stage, rr, 3 * U + u));
        const float cell = next_cell(act, c_s[r * U + u]);
        const float hidden = cell_output(act, cell);
        g[0] = act.i;
        g[H] = act.f;
        g[2 * H] = act.g;
        g[3 * H] = act.o;
        p.cells[row * H + j0 + u] = cell;
        p.output[row * ld + j0 + u] = hidden;
        c_s[r * U + u] = cell;
        h_s[r * U + u] = hidden;
      }
      __syncthreads();  // partial sums read; the staging buffer may be reused
    }
    grid.sync();  // h[t] of every unit is in `output`
  }
  // After the last barrier no block reads h0 any more, so h_n may overwrite it.
  for (int64_t e = threadIdx.x; e < B * ub; e += kThreads) {
    const int64_t r = e / ub;
    const int u = static_cast<int>(e - r * ub);
    p.hidden_state[r * H + j0 + u] = h_s[r * U + u];
    p.cell_state[r * H + j0 + u] = c_s[r * U + u];
  }
}

// ------------------------------------------------------------------------------------------
// Backward: per step, the block's units first (dh, dc, dG[t] written to dgates), one grid
// barrier, then dh_next[:, units] = dG[t] W_hh[:, units].
// ------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads, 1)
    persistent_backward_kernel(const __grid_constant__ BackwardParams p) {
  float* const smem = dynamic_smem();
  const DevicePlan& plan = p.plan;
  const int64_t H = p.hidden, B = p.batch, H4 = 4 * p.hidden;
  const int U = plan.units;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * U;
  const int ub = static_cast<int>(min(static_cast<int64_t>(U), H - j0));
  float* const w_s = smem;                        // [U][w_pitch]: W_hh[:, j0 + u] transposed
  float* const stage = smem + plan.stage_offset;  // staged dG rows / partial sums
  float* const dh_s = smem + plan.state_offset;   // [B][U] dL/dh (recurrent part)
  float* const dc_s = dh_s + B * U;               // [B][U] dL/dc carried to the previous step

  // Consecutive threads read consecutive units of one row of W_hh.
  for (int e = threadIdx.x; e < plan.w_rows * plan.k4; e += kThreads) {
    const int k = e / U, u = e - k * U;
    w_s[u * plan.w_pitch + k] = (u < ub) ? p.w_hh[k * H + j0 + u] : 0.f;
  }
  for (int64_t e = threadIdx.x; e < B * ub; e += kThreads) {
    const int64_t r = e / ub;
    const int u = static_cast<int>(e - r * ub);
    dh_s[r * U + u] = p.dhidden[r * H + j0 + u];
    dc_s[r * U + u] = p.dcell[r * H + j0 + u];
  }
  __syncthreads();

  cg::grid_group grid = cg::this_grid();
  const int64_t T = p.segments.steps;
  int hint = p.segments.count - 1;
  auto info = [&](int64_t i) {
    return persistent::step_info(p.segments, persistent::step_at(i, T, p.reverse, true),
                                 p.reverse, hint);
  };
  // This thread's first element of a step's first phase, loaded one step ahead (during the
  // previous step's product) so that the device-memory latency is off the critical path.
  const int me = static_cast<int>(threadIdx.x);
  auto load_inputs = [&](const StepInfo& s, int e, BackwardInputs& in) {
    const int64_t r = e / ub;
    const int64_t row = s.offset + r, j = j0 + (e - r * ub);
    const float* g = p.gates + row * H4 + j;
    in.i = g[0];
    in.f = g[H];
    in.g = g[2 * H];
    in.o = g[3 * H];
    in.cell = p.cells[row * H + j];
    in.cell_prev = r < s.continuing ? p.cells[(s.prev_offset + r) * H + j] : p.c0[r * H + j];
    in.dy = p.grad_output != nullptr ? p.grad_output[row * p.grad_output_stride + j] : 0.f;
  };
  BackwardInputs ahead{};
  StepInfo s = info(0);
  if (me < s.rows * ub) load_inputs(s, me, ahead);
  for (int64_t i = 0; i < T; ++i) {
    const bool has_next = i + 1 < T;
    const StepInfo next = has_next ? info(i + 1) : StepInfo{0, 0, 0, 0};
    if (s.rows > 0) {  // the same decision in every block
      // dh[t] = dy[t] + dh_next, dc, dG[t] of the block's units (rows that start at this step
      // read c0 as their previous cell).
      for (int64_t e = me; e < s.rows * ub; e += kThreads) {
        const int64_t r = e / ub;
        const int u = static_cast<int>(e - r * ub);
        const int64_t row = s.offset + r, j = j0 + u;
        BackwardInputs in = ahead;
        if (e != me) load_inputs(s, static_cast<int>(e), in);
        const float dh = dh_s[r * U + u] + in.dy;
        const GateValues<float> act{in.i, in.f, in.g, in.o};
        float tanh_cell;
        const float dc = cell_gradient(act, in.cell, dh, dc_s[r * U + u], tanh_cell);
        const GateValues<float> grads = gate_gradients(act, in.cell_prev, tanh_cell, dh, dc);
        float* const dg = p.dgates + row * H4 + j;
        dg[0] = grads.i;
        dg[H] = grads.f;
        dg[2 * H] = grads.g;
        dg[3 * H] = grads.o;
        dc_s[r * U + u] = carry_cell_gradient(act, dc);
      }
      grid.sync();  // dG[t] of every unit is in `dgates`
      if (has_next && me < next.rows * ub) load_inputs(next, me, ahead);
      const float* const step_dgates = p.dgates + s.offset * H4;
      auto row_ptr = [&](int64_t r) -> const float* { return step_dgates + r * H4; };
      for (int64_t r0 = 0; r0 < s.rows; r0 += plan.rows_chunk) {
        const int nr = static_cast<int>(min(static_cast<int64_t>(plan.rows_chunk), s.rows - r0));
        chunk_product<BackwardTile>(plan, w_s, stage, r0, nr, H4, p.vector_loads, row_ptr);
        for (int e = me; e < nr * ub; e += kThreads) {
          const int rr = e / ub, u = e - rr * ub;
          dh_s[(r0 + rr) * U + u] = sum_partials(plan, stage, rr, u);
        }
        __syncthreads();
      }
      // No barrier here: the next step's first phase touches only this block's units, and the
      // dG rows it writes are not the ones other blocks may still be reading.
    } else if (has_next && me < next.rows * ub) {
      load_inputs(next, me, ahead);
    }
    s = next;
  }
  for (int64_t e = threadIdx.x; e < B * ub; e += kThreads) {
    const int64_t r = e / ub;
    const int u = static_cast<int>(e - r * ub);
    p.dhidden[r * H + j0 + u] = dh_s[r * U + u];
    p.dcell[r * H + j0 + u] = dc_s[r * U + u];
  }
}

}  // namespace persistent_detail
}  // namespace cuda
}  // namespace lstm_fused
