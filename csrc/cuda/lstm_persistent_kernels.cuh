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
// memory (L2) into shared memory, multiplies it with its slice (warp tiles of registers, K
// split over warps, partial sums added in a fixed order: deterministic), and runs the gate
// math of lstm_cell.h on its units in the epilogue; the per-row state (c and h_n, or
// dh and dc) stays in shared memory. A grid-wide barrier (cooperative groups) per step
// publishes h[t] (forward, through `output`) or dG[t] (backward, through `dgates`); reads of
// data written by other blocks during the launch bypass L1 (__ldcg). Every cross-thread
// exchange goes through shared memory between block barriers.
//
// The product comes in three kinds (Operand, a template flag of both kernels; persistent::
// Product in the plan):
//   float32    exact fp32 FMA on float32 operands;
//   TF32       float32 layers while torch.backends.cuda.matmul.allow_tf32 is set (as the
//              per-step path's cuBLAS calls then run): the slice and the staged rows are
//              rounded to TF32 (tf32_round, as cvt.rna does) and multiply on the tensor cores,
//              mma.sync m16n8k8 with fp32 accumulators (sm_80 and later);
//   16-bit     the 16-bit GEMM mode of a bfloat16 / float16 layer (ops.cpp
//              gemm_operands_16bit): the W_hh slice and the staged rows are 16-bit in shared
//              memory (half the bytes: a larger H fits) and multiply on the tensor cores,
//              mma.sync m16n8k16 with fp32 accumulators (sm_80 and later). The forward writes
//              h[t] in 16 bits too (the per-step path's hidden_16bit: the same rounding,
//              bits16.h; two steps' buffer, hidden_16bit_steps) and stages those; the
//              backward writes dG[t] in 16 bits (dgates_16bit, the driver's weight GEMMs read
//              it) and stages those. Gates, cells and the state stay fp32.
//
// Shared memory of a block (float offsets from persistent::Plan):
//   [0, stage_offset)              W_hh slice, w_rows x w_pitch values (float32 or 16-bit)
//   [stage_offset, state_offset)   staged operand rows (rows_chunk x stage_pitch values),
//                                  reused for the warps' partial sums (k_slices x rows_chunk
//                                  x partial_cols floats)
//   [state_offset, ...)            per-row state, 2 x B x U
#pragma once

#include <cstdint>
#include <type_traits>

#include "../bits16.h"
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
using persistent::kMmaK;
using persistent::kMmaKTf32;
using persistent::kThreads;
using persistent::kWarps;
using persistent::StepInfo;
using persistent::StepSegments;

// The kind of the recurrent product (see the top of the file).
enum class Operand { kFloat32, kBFloat16, kFloat16, kTf32 };

constexpr bool is_16bit(Operand op) { return op == Operand::kBFloat16 || op == Operand::kFloat16; }

// The plan's name for it.
constexpr persistent::Product product_of(Operand op) {
  return is_16bit(op) ? persistent::Product::k16Bit
         : op == Operand::kTf32 ? persistent::Product::kTf32
                                : persistent::Product::kFma;
}

// What the W_hh slice and the staged rows hold in shared memory: floats (TF32: rounded), or
// 16-bit bits.
template <Operand kOp>
using OperandValue = std::conditional_t<is_16bit(kOp), uint16_t, float>;

// A float32 value of the slice or the staged rows as the product reads it.
template <Operand kOp>
__device__ __forceinline__ float operand_float(float value) {
  if constexpr (kOp == Operand::kTf32) return tf32_round(value);
  return value;
}

template <Operand kOp>
constexpr Bits16 format_of() {
  return kOp == Operand::kFloat16 ? Bits16::kFloat16 : Bits16::kBFloat16;
}

// The plan's numbers the kernels need (int: shared-memory sizes and tile counts are small).
struct DevicePlan {
  int units, w_rows, w_pitch;
  int col_tiles, row_tiles, rows_chunk, k_slices;
  int k_padded;  // K rounded up to the product's granule (4, kMmaKTf32 or kMmaK)
  int k_chunk, stage_pitch, partial_cols;
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
  d.k_padded = static_cast<int>(persistent::round_up(p.k_total, persistent::k_granule(p.product)));
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
  const float* w_hh;       // [4H, H] (float32 kernel)
  const uint16_t* w_hh_16bit;  // [4H, H] 16-bit bits (16-bit kernels)
  const float* h0;         // [B, H] (the same memory as hidden_state: read before the end)
  // 16-bit kernels: h0 in 16 bits [B, H], and h[t] in 16 bits, two steps in turn [2][B][H]
  // (written in the epilogue, staged by the next step: half the bytes of `output`'s rows)
  const uint16_t* h0_16bit;
  uint16_t* hidden_16bit_steps;
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
  const float* w_hh;         // [4H, H] (float32 kernel)
  const uint16_t* w_hh_16bit;  // [4H, H] 16-bit bits (16-bit kernels)
  float* dhidden;            // [B, H] in: dL/dh_n, out: dL/dh0
  float* dcell;              // [B, H] in: dL/dc_n, out: dL/dc0
  float* dgates;             // [N, 4H] out (float32 kernel)
  uint16_t* dgates_16bit;    // [N, 4H] out: dG rounded to 16 bits (16-bit kernels)
  int64_t hidden, batch;
  bool reverse;
  bool vector_loads;
  DevicePlan plan;
  StepSegments segments;
};

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }
inline bool aligned8(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 8 == 0; }

// Kernel parameters from the driver's arguments and a plan that fits (segments already made).
inline void fill_forward_params(const ForwardSequenceArgs<float>& a, const persistent::Plan& plan,
                                ForwardParams& p) {
  p.gates = a.gates;
  p.bias = a.bias;
  p.w_hh = a.w_hh;
  p.w_hh_16bit = a.w_hh_16bit;
  p.h0 = a.h0;
  p.h0_16bit = a.h0_16bit;
  p.hidden_16bit_steps = a.hidden_16bit_steps;
  p.hidden_state = a.hidden_state;
  p.cell_state = a.cell_state;
  p.cells = a.cells;
  p.output = a.output;
  p.output_stride = a.output_stride;
  p.hidden = a.hidden;
  p.batch = a.batch;
  p.reverse = a.reverse;
  // the rows staged: output's and h0's (float32), or the 16-bit h of the steps and h0_16bit
  p.vector_loads = a.hidden % 4 == 0 &&
                   (a.w_hh_16bit != nullptr
                        ? aligned8(a.hidden_16bit_steps) && aligned8(a.h0_16bit)
                        : a.output_stride % 4 == 0 && aligned16(a.output) && aligned16(a.h0));
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
  p.w_hh_16bit = a.w_hh_16bit;
  p.dhidden = a.dhidden;
  p.dcell = a.dcell;
  p.dgates = a.dgates;
  p.dgates_16bit = a.dgates_16bit;
  p.hidden = a.hidden;
  p.batch = a.batch;
  p.reverse = a.reverse;
  // rows of 4H values, read 4 at a time: aligned when the base is
  p.vector_loads = a.dgates_16bit != nullptr ? aligned8(a.dgates_16bit) : aligned16(a.dgates);
  p.plan = device_plan(plan);
}

// What the backward's first phase reads for one (row, unit) of a step.
struct BackwardInputs {
  float i, f, g, o, cell, cell_prev, dy;
};

// ------------------------------------------------------------------------------------------
// Block-level pieces shared by both kernels.
// ------------------------------------------------------------------------------------------

// Four 16-bit values as they lie in memory (two 4-byte words, lowest index in the low half).
__device__ __forceinline__ uint2 pack4(uint16_t v0, uint16_t v1, uint16_t v2, uint16_t v3) {
  uint2 packed;
  packed.x = uint32_t(v0) | (uint32_t(v1) << 16);
  packed.y = uint32_t(v2) | (uint32_t(v3) << 16);
  return packed;
}

// Stage rows [r0, r0 + rows_chunk) x columns [k0, k0 + width) of the shared operand into
// `stage` (row pitch `pitch` values of OperandValue<kOp>); rows at or past r0 + nr, and columns
// at or past k_valid, are zeros. row_ptr(r) gives the start of row r (column 0) in global
// memory, in the product's operand type: float32 rows (copied; rounded to TF32 for a TF32
// product) or 16-bit rows (copied). width % 4 == 0; vector_loads: every 4 values of a row from k0 on are one aligned
// load (then k_valid % 4 == 0, so a group of 4 is all inside or all past it).
template <Operand kOp, typename RowPtr>
__device__ __forceinline__ void stage_rows(OperandValue<kOp>* stage, int pitch, int rows_chunk,
                                           int64_t r0, int nr, int k0, int width,
                                           int64_t k_valid, bool vector_loads, RowPtr row_ptr) {
  using Source = std::remove_cv_t<std::remove_pointer_t<decltype(row_ptr(r0))>>;
  static_assert(std::is_same_v<Source, OperandValue<kOp>>, "rows of the product's operands");
  const int vectors = width / 4;
  const int count = rows_chunk * vectors;
  for (int e = threadIdx.x; e < count; e += kThreads) {
    const int rr = e / vectors;
    const int column = 4 * (e - rr * vectors);
    const int k = k0 + column;
    const bool inside = rr < nr && k < k_valid;
    const Source* src = inside ? row_ptr(r0 + rr) + k : nullptr;
    OperandValue<kOp>* dst = stage + rr * pitch + column;
    if constexpr (std::is_same_v<Source, float>) {
      float4 value = make_float4(0.f, 0.f, 0.f, 0.f);
      if (inside) {
        if (vector_loads) {
          value = __ldcg(reinterpret_cast<const float4*>(src));
        } else {
          value.x = __ldcg(src);
          value.y = k + 1 < k_valid ? __ldcg(src + 1) : 0.f;
          value.z = k + 2 < k_valid ? __ldcg(src + 2) : 0.f;
          value.w = k + 3 < k_valid ? __ldcg(src + 3) : 0.f;
        }
      }
      *reinterpret_cast<float4*>(dst) =
          make_float4(operand_float<kOp>(value.x), operand_float<kOp>(value.y),
                      operand_float<kOp>(value.z), operand_float<kOp>(value.w));
    } else {
      uint2 value = make_uint2(0u, 0u);
      if (inside) {
        if (vector_loads) {
          value = __ldcg(reinterpret_cast<const uint2*>(src));
        } else {
          value = pack4(__ldcg(src), k + 1 < k_valid ? __ldcg(src + 1) : uint16_t(0),
                        k + 2 < k_valid ? __ldcg(src + 2) : uint16_t(0),
                        k + 3 < k_valid ? __ldcg(src + 3) : uint16_t(0));
        }
      }
      *reinterpret_cast<uint2*>(dst) = value;
    }
  }
}

// One warp's share of a staged chunk: acc[i][j] += sum over its K slice of
// stage[row_i][k] * w[col_j][k0 + k]. Lane (rl, cl) holds rows row_base + rl + LR*i and
// columns col_base + cl + LC*j (interleaved, so the lanes of one load hit distinct banks).
// Only the first RT of the tile's rows-per-lane are computed (the others are padding rows of a
// small batch). Columns past the slice are clamped to its last row: their sums are never read.
template <typename Tile, int RT>
__device__ __forceinline__ void accumulate(float (&acc)[Tile::kRowsPerLane * Tile::kColsPerLane],
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
        float s = acc[i * CT + j];
        s = fmaf(a[i].x, b[j].x, s);
        s = fmaf(a[i].y, b[j].y, s);
        s = fmaf(a[i].z, b[j].z, s);
        s = fmaf(a[i].w, b[j].w, s);
        acc[i * CT + j] = s;
      }
    }
  }
}

// d += a b on the tensor cores, one product of the warp (all 32 lanes take part) with fp32
// accumulators, for the product kind kOp. Fragments of lane = 4 * group + quad (PTX ISA,
// "Matrix Fragments for mma.m16n8k16" / "mma.m16n8k8"); the emulator (tests/emulation)
// computes the same fragments on the CPU.
//   16-bit: mma.sync m16n8k16, A 16 x 16 (row-major), B 16 x 8 (column-major), two values per
//   register, the lower index in the low half:
//     a[0] A[group][2 quad, +1]      a[1] A[group + 8][2 quad, +1]
//     a[2] A[group][2 quad + 8, +9]  a[3] A[group + 8][2 quad + 8, +9]
//     b[0] B[2 quad, +1][group]      b[1] B[2 quad + 8, +9][group]
//   TF32: mma.sync m16n8k8, A 16 x 8, B 8 x 8, one value (float bits, low 13 zero) per register:
//     a[0] A[group][quad]  a[1] A[group + 8][quad]  a[2] A[group][quad + 4]
//     a[3] A[group + 8][quad + 4]  b[0] B[quad][group]  b[1] B[quad + 4][group]
//   Both: d[0], d[1] D[group][2 quad, +1]    d[2], d[3] D[group + 8][2 quad, +1]
template <Operand kOp>
__device__ __forceinline__ void mma_step(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
  static_assert(kOp != Operand::kFloat32, "a tensor-core product");
#if defined(LSTM_FUSED_EMULATE_CUDA)
  if constexpr (kOp == Operand::kTf32) {
    ::emu::mma_m16n8k8_tf32(d, a, b);
  } else {
    ::emu::mma_m16n8k16(kOp == Operand::kBFloat16, d, a, b);
  }
#elif defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
  // D and C are the same registers (accumulate in place)
#define LSTM_FUSED_MMA_SYNC(shape_and_types)                                               \
  asm volatile("mma.sync.aligned." shape_and_types                                         \
               " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"        \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                            \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
  if constexpr (kOp == Operand::kBFloat16) {
    LSTM_FUSED_MMA_SYNC("m16n8k16.row.col.f32.bf16.bf16.f32");
  } else if constexpr (kOp == Operand::kFloat16) {
    LSTM_FUSED_MMA_SYNC("m16n8k16.row.col.f32.f16.f16.f32");
  } else {
    LSTM_FUSED_MMA_SYNC("m16n8k8.row.col.f32.tf32.tf32.f32");
  }
#undef LSTM_FUSED_MMA_SYNC
#else
  __trap();  // not reached: the host launches the tensor-core kernels from compute capability 8.0
#endif
#endif
}

// Two neighbouring 16-bit values of shared memory as one register (4-byte aligned).
__device__ __forceinline__ uint32_t pair_at(const uint16_t* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// The tensor-core twin of accumulate: one warp's 16 x (8 NJ) tile, sums over the K steps
// [k_begin, k_end) (units of the product's K: kMmaK, kMmaKTf32) of the staged chunk. The
// tile's row r is staged row row_base + r; its column n is slice row col_base + n (clamped to
// the last, as above). acc[4 j + q] is fragment d[q] of the j-th 8 columns. A register holds
// two neighbouring 16-bit values, or one TF32 value; the second half of a fragment's K lies
// half a step further (see the layouts above). With one column block (NJ = 1, the backward)
// odd steps go to a second set of accumulators, added at the end: two independent chains of
// mma.sync instead of one (its latency, not its rate, bounds a chain).
template <Operand kOp, int NJ>
__device__ __forceinline__ void accumulate_mma(float (&acc)[4 * NJ],
                                               const OperandValue<kOp>* stage, int stage_pitch,
                                               const OperandValue<kOp>* w, int w_pitch,
                                               int w_rows, int k0, int k_begin, int k_end,
                                               int row_base, int col_base, int lane) {
  using Value = OperandValue<kOp>;
  constexpr bool k16 = is_16bit(kOp);
  constexpr int kStep = k16 ? kMmaK : kMmaKTf32, kHalf = kStep / 2;
  auto word = [](const Value* p) -> uint32_t {
    if constexpr (k16) {
      return pair_at(p);
    } else {
      return float_bits(*p);
    }
  };
  const int group = lane / 4, first = (k16 ? 2 : 1) * (lane % 4);
  const Value* const a_top = stage + (row_base + group) * stage_pitch + first;
  const Value* const a_bottom = a_top + 8 * stage_pitch;
  const Value* b_ptr[NJ];
#pragma unroll
  for (int j = 0; j < NJ; ++j) {
    const int col = min(col_base + 8 * j + group, w_rows - 1);
    b_ptr[j] = w + col * w_pitch + k0 + first;
  }
  auto a_fragment = [&](int step, uint32_t (&a)[4]) {
    const int k = kStep * step;
    a[0] = word(a_top + k);
    a[1] = word(a_bottom + k);
    a[2] = word(a_top + k + kHalf);
    a[3] = word(a_bottom + k + kHalf);
  };
  auto b_fragment = [&](int step, int j, uint32_t (&b)[2]) {
    const int k = kStep * step;
    b[0] = word(b_ptr[j] + k);
    b[1] = word(b_ptr[j] + k + kHalf);
  };
  uint32_t a[4], b[2];
  if constexpr (NJ == 1) {
    float odd[4] = {0.f, 0.f, 0.f, 0.f};  // the second chain: odd steps
    float(&even)[4] = *reinterpret_cast<float(*)[4]>(acc);
    int step = k_begin;
    for (; step + 1 < k_end; step += 2) {
      a_fragment(step, a);
      b_fragment(step, 0, b);
      mma_step<kOp>(even, a, b);
      a_fragment(step + 1, a);
      b_fragment(step + 1, 0, b);
      mma_step<kOp>(odd, a, b);
    }
    if (step < k_end) {
      a_fragment(step, a);
      b_fragment(step, 0, b);
      mma_step<kOp>(even, a, b);
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[q] += odd[q];
  } else {
#pragma unroll 2
    for (int step = k_begin; step < k_end; ++step) {
      a_fragment(step, a);
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        b_fragment(step, j, b);
        mma_step<kOp>(*reinterpret_cast<float(*)[4]>(acc + 4 * j), a, b);
      }
    }
  }
}

// The product of one row chunk: rows [r0, r0 + nr) of the operand times the block's slice.
// On return (after a block barrier) `partial` (the staging buffer) holds
// partial[(s * rows_chunk + rr) * partial_cols + c] for the k_slices slices s; the caller sums
// them over s in order. Every thread of the block must call it.
template <typename Tile, Operand kOp, typename RowPtr>
__device__ __forceinline__ void chunk_product(const DevicePlan& plan,
                                              const OperandValue<kOp>* w_s, float* stage,
                                              int64_t r0, int nr, int64_t k_valid,
                                              bool vector_loads, RowPtr row_ptr) {
  constexpr int RT = Tile::kRowsPerLane, CT = Tile::kColsPerLane;
  constexpr int kSums = RT * CT;  // = 4 * (Tile::kCols / 8): the mma fragments of the tile
  static_assert(Tile::kRows == 16 && Tile::kCols % 8 == 0 && kSums == 4 * (Tile::kCols / 8),
                "a warp tile is 16 rows of m16n8 products");
  OperandValue<kOp>* const staged = reinterpret_cast<OperandValue<kOp>*>(stage);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int items = plan.row_tiles * plan.col_tiles;
  const int item = warp % items, slice = warp / items;
  const int row_base = (item / plan.col_tiles) * Tile::kRows;
  const int col_base = (item % plan.col_tiles) * Tile::kCols;
  const int valid_rows = nr - row_base;  // real rows in this warp's row tile (<= 0: none)
  // Warps past items * k_slices, and tiles of padding rows only, have nothing to add (the
  // epilogue reads rows < nr only).
  const bool active = warp < items * plan.k_slices && valid_rows > 0;
  float acc[kSums];
#pragma unroll
  for (int q = 0; q < kSums; ++q) acc[q] = 0.f;
  for (int k0 = 0; k0 < plan.k_padded; k0 += plan.k_chunk) {
    const int width = min(plan.k_chunk, plan.k_padded - k0);
    stage_rows<kOp>(staged, plan.stage_pitch, plan.rows_chunk, r0, nr, k0, width, k_valid,
                    vector_loads, row_ptr);
    __syncthreads();
    if (active) {
      if constexpr (kOp == Operand::kFloat32) {
        const int vectors = width / 4;
        const int v_begin = slice * vectors / plan.k_slices;
        const int v_end = (slice + 1) * vectors / plan.k_slices;
        // Rows per lane that hold real rows: a small batch skips the padding rows' FMAs.
        constexpr int LR = Tile::kLaneRows;
        if (valid_rows > 2 * LR) {
          accumulate<Tile, RT>(acc, stage, plan.stage_pitch, w_s, plan.w_pitch, plan.w_rows,
                               k0, v_begin, v_end, row_base, col_base, lane);
        } else if (valid_rows > LR) {
          accumulate<Tile, (RT < 2 ? RT : 2)>(acc, stage, plan.stage_pitch, w_s, plan.w_pitch,
                                              plan.w_rows, k0, v_begin, v_end, row_base,
                                              col_base, lane);
        } else {
          accumulate<Tile, 1>(acc, stage, plan.stage_pitch, w_s, plan.w_pitch, plan.w_rows, k0,
                              v_begin, v_end, row_base, col_base, lane);
        }
      } else {
        // (16 rows per product: padding rows of a small batch cost nothing extra here)
        const int steps = width / (is_16bit(kOp) ? kMmaK : kMmaKTf32);
        accumulate_mma<kOp, Tile::kCols / 8>(
            acc, staged, plan.stage_pitch, w_s, plan.w_pitch, plan.w_rows, k0,
            slice * steps / plan.k_slices, (slice + 1) * steps / plan.k_slices, row_base,
            col_base, lane);
      }
    }
    __syncthreads();  // the staging buffer is free again (next chunk, or the partial sums)
  }
  if (active) {
    auto partial = [&](int rr, int c) -> float& {
      return stage[(slice * plan.rows_chunk + rr) * plan.partial_cols + c];
    };
    if constexpr (kOp == Operand::kFloat32) {
      const int rl = lane / Tile::kLaneCols, cl = lane % Tile::kLaneCols;
#pragma unroll
      for (int i = 0; i < RT; ++i) {
#pragma unroll
        for (int j = 0; j < CT; ++j) {
          partial(row_base + rl + Tile::kLaneRows * i, col_base + cl + Tile::kLaneCols * j) =
              acc[i * CT + j];
        }
      }
    } else {
      const int group = lane / 4, pair = 2 * (lane % 4);
#pragma unroll
      for (int j = 0; j < Tile::kCols / 8; ++j) {
        const int c = col_base + 8 * j + pair;
        partial(row_base + group, c) = acc[4 * j];
        partial(row_base + group, c + 1) = acc[4 * j + 1];
        partial(row_base + group + 8, c) = acc[4 * j + 2];
        partial(row_base + group + 8, c + 1) = acc[4 * j + 3];
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
template <Operand kOp>
__global__ void __launch_bounds__(kThreads, 1)
    persistent_forward_kernel(const __grid_constant__ ForwardParams p) {
  using Value = OperandValue<kOp>;
  float* const smem = dynamic_smem();
  const DevicePlan& plan = p.plan;
  const int64_t H = p.hidden, B = p.batch;
  const int U = plan.units;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * U;
  const int ub = static_cast<int>(min(static_cast<int64_t>(U), H - j0));  // this block's units
  Value* const w_s = reinterpret_cast<Value*>(smem);  // [4U][w_pitch]
  float* const stage = smem + plan.stage_offset;     // staged h rows / partial sums
  float* const c_s = smem + plan.state_offset;       // [B][U] c of each row
  float* const h_s = c_s + B * U;                    // [B][U] h of each row's last step
  const Value* const w_hh = is_16bit(kOp) ? reinterpret_cast<const Value*>(p.w_hh_16bit)
                                          : reinterpret_cast<const Value*>(p.w_hh);

  // W_hh rows of the block's gates: slice row c = g*U + u is W_hh row g*H + j0 + u; rows of
  // units past the end of H and columns past H are zeros.
  for (int e = threadIdx.x; e < plan.w_rows * plan.k_padded; e += kThreads) {
    const int c = e / plan.k_padded, k = e - c * plan.k_padded;
    const int g = c / U, u = c - g * U;
    Value value = 0;
    if (u < ub && k < H) value = w_hh[(g * H + j0 + u) * H + k];
    if constexpr (kOp == Operand::kTf32) value = tf32_round(value);
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
  int turn = 0;  // 16-bit kernels: the half of hidden_16bit_steps this step writes
  for (int64_t i = 0; i < T; ++i) {
    const int64_t t = persistent::step_at(i, T, p.reverse, /*backward=*/false);
    const StepInfo s = persistent::step_info(p.segments, t, p.reverse, hint);
    if (s.rows == 0) continue;  // the same decision in every block: no barrier needed
    // Rows that continue a sequence read h[t-1] (written by every block at the previous step),
    // the others h0. 16-bit kernels: from the 16-bit copies (the other half of the steps'
    // buffer: nobody writes it during this step, and the grid barrier below separates its
    // next writes from these reads).
    const float* const prev_rows = p.output + s.prev_offset * ld;
    uint16_t* hidden_16bit_out = nullptr;
    const uint16_t* hidden_16bit_in = nullptr;
    if constexpr (is_16bit(kOp)) {
      hidden_16bit_out = p.hidden_16bit_steps + turn * B * H;
      hidden_16bit_in = p.hidden_16bit_steps + (1 - turn) * B * H;
    }
    auto row_ptr = [&](int64_t r) {
      if constexpr (is_16bit(kOp)) {
        return r < s.continuing ? hidden_16bit_in + r * H : p.h0_16bit + r * H;
      } else {
        return r < s.continuing ? prev_rows + r * ld : p.h0 + r * H;
      }
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
      chunk_product<ForwardTile, kOp>(plan, w_s, stage, r0, nr, H, p.vector_loads, row_ptr);
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
        if constexpr (is_16bit(kOp)) {
          hidden_16bit_out[r * H + j0 + u] = round_bits16(format_of<kOp>(), hidden);
        }
        c_s[r * U + u] = cell;
        h_s[r * U + u] = hidden;
      }
      __syncthreads();  // partial sums read; the staging buffer may be reused
    }
    turn = 1 - turn;
    grid.sync();  // h[t] of every unit is in `output` (and in 16 bits in hidden_16bit_steps)
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
template <Operand kOp>
__global__ void __launch_bounds__(kThreads, 1)
    persistent_backward_kernel(const __grid_constant__ BackwardParams p) {
  using Value = OperandValue<kOp>;
  float* const smem = dynamic_smem();
  const DevicePlan& plan = p.plan;
  const int64_t H = p.hidden, B = p.batch, H4 = 4 * p.hidden;
  const int U = plan.units;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * U;
  const int ub = static_cast<int>(min(static_cast<int64_t>(U), H - j0));
  Value* const w_s = reinterpret_cast<Value*>(smem);  // [U][w_pitch]: W_hh[:, j0 + u] transposed
  float* const stage = smem + plan.stage_offset;  // staged dG rows / partial sums
  float* const dh_s = smem + plan.state_offset;   // [B][U] dL/dh (recurrent part)
  float* const dc_s = dh_s + B * U;               // [B][U] dL/dc carried to the previous step
  const Value* const w_hh = is_16bit(kOp) ? reinterpret_cast<const Value*>(p.w_hh_16bit)
                                          : reinterpret_cast<const Value*>(p.w_hh);

  // Consecutive threads read consecutive units of one row of W_hh; columns of K past 4H
  // (16-bit: K padded to kMmaK) are zeros.
  for (int e = threadIdx.x; e < plan.w_rows * plan.k_padded; e += kThreads) {
    const int k = e / U, u = e - k * U;
    Value value = (u < ub && k < H4) ? w_hh[k * H + j0 + u] : Value(0);
    if constexpr (kOp == Operand::kTf32) value = tf32_round(value);
    w_s[u * plan.w_pitch + k] = value;
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
        if constexpr (!is_16bit(kOp)) {
          float* const dg = p.dgates + row * H4 + j;
          dg[0] = grads.i;
          dg[H] = grads.f;
          dg[2 * H] = grads.g;
          dg[3 * H] = grads.o;
        } else {  // the operand of dL/dh[t-1] here and of the driver's weight GEMMs
          constexpr Bits16 format = format_of<kOp>();
          uint16_t* const dg = p.dgates_16bit + row * H4 + j;
          dg[0] = round_bits16(format, grads.i);
          dg[H] = round_bits16(format, grads.f);
          dg[2 * H] = round_bits16(format, grads.g);
          dg[3 * H] = round_bits16(format, grads.o);
        }
        dc_s[r * U + u] = carry_cell_gradient(act, dc);
      }
      grid.sync();  // dG[t] of every unit is in `dgates` (dgates_16bit)
      if (has_next && me < next.rows * ub) load_inputs(next, me, ahead);
      const Value* const step_dgates =
          (is_16bit(kOp) ? reinterpret_cast<const Value*>(p.dgates_16bit)
                         : reinterpret_cast<const Value*>(p.dgates)) +
          s.offset * H4;
      auto row_ptr = [&](int64_t r) -> const Value* { return step_dgates + r * H4; };
      for (int64_t r0 = 0; r0 < s.rows; r0 += plan.rows_chunk) {
        const int nr = static_cast<int>(min(static_cast<int64_t>(plan.rows_chunk), s.rows - r0));
        chunk_product<BackwardTile, kOp>(plan, w_s, stage, r0, nr, H4, p.vector_loads, row_ptr);
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
