// The fused per-step kernels of one LSTM direction: the interface every device implements.
//
// The layer driver (ops.cpp) owns all allocation and the GEMMs; it calls these once per time
// step on buffers it owns. They take raw pointers and sizes only (no torch types), in the
// compute ("acc") type T = float or double; the CUDA versions also take the stream to run on.
// Row r of a step is batch element r; only the first `rows` batch elements are active at a
// step (packed sequences are sorted by decreasing length).
//
// Gradient clipping modes (docs/ARCHITECTURE.md): 0 off, 1 element-wise clamp to
// [-clip, clip], 2 rescale so the L2 norm over the step's rows is at most clip.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "bits16.h"
#include "lstm_cell.h"

namespace lstm_fused {

enum ClipMode : int64_t { kClipOff = 0, kClipValue = 1, kClipNorm = 2 };

// The cell variants of a step (lstm_cell.h CellVariant; LayerOptions). Every pointer is null
// and every value 0 unless its variant is on; `variants` says which are (the kernels turn the
// bits into template flags, so the plain cell runs the plain code).
template <typename T>
struct StepVariants {
  unsigned variants = kCellPlain;
  // kCellLayerNorm: the layer norms' gains and biases.
  const T* ln_ih = nullptr;           // [4H] gain of LN(x W_ih^T)
  const T* ln_hh = nullptr;           // [4H] gain of LN((h[t-1] * M) W_hh^T)
  const T* ln_cell_weight = nullptr;  // [H]
  const T* ln_cell_bias = nullptr;    // [H]
  const T* bias = nullptr;            // [4H] b_ih + b_hh, or null (no biases)
  // kCellZoneoutCell / kCellZoneoutHidden: per-row masks (1 keeps the previous state), row
  // stride H; null: the probability below keeps it (eval mode: the expectation).
  const T* zoneout_cell_mask = nullptr;
  T zoneout_cell = 0;
  const T* zoneout_hidden_mask = nullptr;
  T zoneout_hidden = 0;
  // kCellMaskedHidden: the recurrent-dropout mask, [rows, H] (row stride H).
  const T* dropout_mask = nullptr;
};

template <typename T>
struct ForwardStepArgs {
  int64_t rows;          // active batch rows at this step
  int64_t hidden;        // H
  T* gates;              // [rows, 4H] in: pre-activations (x W_ih^T + b + h W_hh^T; with
                         //            layer norm not read: `projection`, `recurrent` apart);
                         //            out: activated gates i, f, g, o (saved for backward)
  T* cell_state;         // [rows, H]  in: c[t-1], out: c[t]
  T* cells;              // [rows, H]  out: c[t] (the saved copy). Null (plain cell, kernels
                         //            with StepKernels::forward_unsaved): inference, neither
                         //            c[t] nor the activated gates are written back
  T* hidden_state;       // [rows, H]  out: r[t] = o*tanh(c[t]) (h[t], or the projection's
                         //            input); with kCellZoneoutHidden in: h[t-1], out: h[t]
  T* output;             // [rows, >=H] out, row stride output_stride: also h[t]; may be null
  int64_t output_stride;
  StepVariants<T> variant = {};
  // kCellLayerNorm: the products the gates normalise, [rows, 4H] each
  const T* projection = nullptr;  // A = x W_ih^T
  const T* recurrent = nullptr;   // R = (h[t-1] * M) W_hh^T
  T* hidden_masked = nullptr;     // kCellMaskedHidden: [rows, H] out: h[t] * dropout_mask
  // The 16-bit GEMM mode (plain cell): [rows, H] out, may be null: h[t] rounded to 16 bits
  // (bits16.h), the next step's product operand, written with h[t] (no pass of its own).
  uint16_t* hidden_16bit = nullptr;
  Bits16 format_16bit = Bits16::kBFloat16;
};

// Layer norm's parameter gradients of one row: kLayerNormGradWidth * H values, at these
// offsets (in units of H): dL/d(b_ih + b_hh) = dG (4H), dL/dg_ih (4H), dL/dg_hh (4H),
// dL/dg_c (H), dL/db_c (H).
constexpr int64_t kLayerNormGradWidth = 14;
enum LayerNormGrad : int64_t {
  kGradBias = 0,
  kGradInputGain = 4,
  kGradRecurrentGain = 8,
  kGradCellGain = 12,
  kGradCellBias = 13,
};

// dh[t] = grad_output[t] + dh_next, then clipped; written over dhidden.
template <typename T>
struct HiddenGradStepArgs {
  int64_t rows;
  int64_t size;                // P (the width of h: proj_size, or H)
  const T* grad_output;        // [rows, >=P] row stride grad_output_stride; may be null (zeros)
  int64_t grad_output_stride;
  T* dhidden;                  // [rows, P] in: dh_next (recurrent part), out: dh[t]
  int64_t clip_mode;
  T clip;
  T* sum_squares;              // out (may be null): sum over rows of dh[t]^2 after clipping
  // Device scratch of StepKernels::reduce_partials values for the reduction of sum_squares and
  // of norm clipping (owned by the driver, allocated once per call); null where not needed.
  T* partials = nullptr;
};

template <typename T>
struct BackwardStepArgs {
  int64_t rows;
  int64_t hidden;              // H
  const T* gates;              // [rows, 4H] activated gates of step t
  const T* cells;              // [rows, H]  c[t]
  const T* cells_prev;         // rows [0, prev_split): c[t-1] of the same sequence, stride H
  const T* cell_initial;       // rows [prev_split, rows): c0 of the row, at row*H
  int64_t prev_split;
  const T* grad_r;             // [rows, H] dL/dr[t] (dh[t], or dh[t] W_hr with projection)
  T* dcell;                    // [rows, H] in: dc_next = dL/dc[t+1]*f[t+1]; out: dL/dc[t]*f[t]
  T* dgates;                   // [rows, 4H] out: gradients of the gate pre-activations (with
                               //   layer norm: of the input projection x W_ih^T)
  int64_t clip_mode;
  T clip;
  T* sum_squares;              // out (may be null): sum over rows of dL/dc[t]^2 after clipping
  T* partials = nullptr;       // as HiddenGradStepArgs::partials
  // Cell variants: with zoneout of c, `cells` is c[t] after zoneout, dcell in: dL/dc[t],
  // out: dL/dc[t-1] from this step, and dL/dc[t] of telemetry and clipping is that of the new
  // cell c~[t]; with kCellZoneoutHidden (no projection) grad_r is dL/dh[t], scaled by (1-d_h)
  // here. kCellMaskedHidden plays no part in this kernel.
  StepVariants<T> variant = {};
  // kCellLayerNorm:
  const T* projection = nullptr;  // [rows, 4H] A = x W_ih^T (the forward's)
  const T* recurrent = nullptr;   // [rows, 4H] R = (h[t-1] * M) W_hh^T (the forward's)
  T* grad_recurrent = nullptr;    // [rows, 4H] out: dL/dR
  // [rows, kLayerNormGradWidth * H] scratch: each row's parameter gradients, which the
  // kernel then adds, row after row in order (deterministic), to ln_grad_sums
  // [kLayerNormGradWidth * H] (LayerNormGrad layout; the driver zeroes it once).
  T* ln_grad_rows = nullptr;
  T* ln_grad_sums = nullptr;
  // The 16-bit GEMM mode (plain cell): [rows, 4H] out, may be null: dG[t] (what dgates gets)
  // rounded to 16 bits (bits16.h), the operand of dL/dh[t-1] and of the weight GEMMs,
  // written with dgates (no pass of its own).
  uint16_t* dgates_16bit = nullptr;
  Bits16 format_16bit = Bits16::kBFloat16;
  // The hidden-gradient step folded in (the plain cell without a projection, clipping off or
  // by value, no telemetry; the driver then skips StepKernels::hidden_grad): grad_r holds
  // dh_next, and the kernel uses dh[t] = dh_next + grad_output[t] in its place, clamped to
  // [-clip, clip] with kClipValue (as HiddenGradStepArgs would have made it). dh[t] is not
  // written back: the next product overwrites dhidden with dh_next of step t-1.
  bool fold_hidden_grad = false;
  const T* grad_output = nullptr;  // [rows, >=H] row stride grad_output_stride; null: zeros
  int64_t grad_output_stride = 0;
};

// The recurrent part of dL/dh[t-1] from step t, with recurrent dropout and/or zoneout of h:
//   dhidden = dropout_mask * recurrent + keep_h * dhidden
template <typename T>
struct RecurrentGradStepArgs {
  int64_t rows;
  int64_t size;                 // P
  const T* recurrent;           // [rows, P] dG[t] W_hh (with layer norm: dR[t] W_hh)
  const T* dropout_mask;        // [rows, P] or null (no recurrent dropout)
  bool zoneout;                 // zoneout of h: keep_h * dL/dh[t] flows to h[t-1] directly
  const T* zoneout_mask;        // [rows, P] 1 keeps h[t-1]; null: zoneout_hidden as keep
  T zoneout_hidden;
  T* dhidden;                   // [rows, P] in: dL/dh[t] (after clipping), out: dL/dh[t-1]
};

// One direction's whole time loop in one call (persistent kernels: the recurrent weight stays
// on chip / in each core's cache, one barrier per step). Only for the plain case: no
// projection (P == H), no clipping; telemetry only where StepKernels::backward_sequence_flow.
// Batch sizes as in a PackedSequence (equal for unpacked input); rows of step t are
// [offsets[t], offsets[t] + batch_sizes[t]). The driver calls them only for a sequence with at
// least one row (the state of an empty one is h0, c0 unchanged).
struct SequenceShape {
  int64_t steps, batch, hidden;
  const int64_t* batch_sizes;  // host memory
  const int64_t* offsets;      // host memory
  bool reverse;
  // N, the number of rows of all steps.
  int64_t offsets_end() const {
    return steps == 0 ? 0 : offsets[steps - 1] + batch_sizes[steps - 1];
  }
  // Step t at processing position s of this direction.
  int64_t time(int64_t s) const { return reverse ? steps - 1 - s : s; }
  // The step processed before t, or -1 when t is the direction's first step.
  int64_t previous(int64_t t) const {
    const int64_t prev = reverse ? t + 1 : t - 1;
    return (prev < 0 || prev >= steps) ? -1 : prev;
  }
  // Rows of step t whose sequence was already active at the previous step (the rest start
  // from h0/c0: only in the reverse direction of packed input).
  int64_t continuing_rows(int64_t t) const {
    const int64_t prev = previous(t);
    return prev < 0 ? 0 : std::min(batch_sizes[t], batch_sizes[prev]);
  }
};

// Consecutive processing positions [first, end) of a direction whose rows [row0, row0 + rows)
// of x are one chunk of the input projection (a step's rows are contiguous, and so are those
// of consecutive steps in either direction).
struct StepChunk {
  int64_t first, end, row0, rows;
};

// The chunks of at most max_rows rows each (at least one step each); one chunk of all steps
// when max_rows is 0.
inline std::vector<StepChunk> step_chunks(const SequenceShape& a, int64_t max_rows) {
  std::vector<StepChunk> chunks;
  for (int64_t s = 0; s < a.steps;) {
    StepChunk chunk{s, s, 0, 0};
    while (chunk.end < a.steps &&
           (chunk.end == s || max_rows == 0 ||
            chunk.rows + a.batch_sizes[a.time(chunk.end)] <= max_rows)) {
      chunk.rows += a.batch_sizes[a.time(chunk.end)];
      ++chunk.end;
    }
    chunk.row0 = std::min(a.offsets[a.time(chunk.first)], a.offsets[a.time(chunk.end - 1)]);
    chunks.push_back(chunk);
    s = chunk.end;
  }
  return chunks;
}

template <typename T>
struct ForwardSequenceArgs : SequenceShape {
  T* gates;                    // [N, 4H] in: input projection x W_ih^T; out: activations
                               // (not written when cells is null; null itself when also
                               // out only: input_16bit)
  const T* bias;               // [4H] b_ih + b_hh, added to the pre-activations; may be null
  const T* w_hh;               // [4H, H]
  const T* h0;                 // [B, H]
  T* hidden_state;             // [B, H] out: h_n
  T* cell_state;               // [B, H] in: c0, out: c_n
  T* cells;                    // [N, H] out: c[t]; null (StepKernels::forward_unsaved):
                               // inference, nothing kept for a backward
  T* output;                   // [N, >=H] out: h[t], row stride output_stride (or null:
                               // output_16bit)
  int64_t output_stride;
  // The 16-bit GEMM mode (ops.cpp gemm_operands_16bit: a bfloat16 layer on the CPU, bfloat16
  // or float16 on CUDA's direct path): W_hh and h0 as 16-bit bits of format_16bit in place of
  // w_hh, and h[t] rounded to 16 bits before it multiplies W_hh (the CUDA kernels round it as
  // they stage it, from `output`; the CPU's start from h0_16bit and keep their own copy).
  // With input_16bit the kernel computes the input projection too, step by step with the
  // recurrent product ([x[t], h[t-1]] [W_ih, W_hh]^T), and `gates` is out only; it may decline
  // that (returning false, nothing written) when the projection is better done as one large
  // GEMM, and the driver then calls again with the projection in `gates` and input_16bit null
  // (in inference the CPU's computes it a chunk of steps at a time instead, see
  // lstm_sequence_cpu.cpp; CUDA's always decline it). Kernels without the mode decline it.
  const uint16_t* w_hh_16bit = nullptr;  // [4H, H]
  const uint16_t* h0_16bit = nullptr;    // [B, H]
  const uint16_t* input_16bit = nullptr;  // [N, input_size] x
  const uint16_t* w_ih_16bit = nullptr;   // [4H, input_size]
  int64_t input_size = 0;
  Bits16 format_16bit = Bits16::kBFloat16;  // of the four above (the CPU's take bfloat16 only)
  // [2, B, H] scratch of the mode (the driver's, where StepKernels::
  // forward_sequence_hidden_16bit_steps): CUDA's kernels keep h[t] in 16 bits there, two
  // steps in turn, and stage the next step's product operand from it (half the bytes of the
  // fp32 rows of `output`).
  uint16_t* hidden_16bit_steps = nullptr;
  // A 16-bit layer (bfloat16 in the mode, or float16/bfloat16 on fp32 GEMMs; only where
  // StepKernels::forward_sequence_output_16bit): h[t] rounded to output_format here (row
  // stride output_stride) in place of `output` (then null), the layer's output as the driver
  // returns it, so that no fp32 (N, H) copy is made and converted. h_n (hidden_state) stays
  // fp32.
  uint16_t* output_16bit = nullptr;
  Bits16 output_format = Bits16::kBFloat16;
  // Inference (gates and cells null; StepKernels::forward_unsaved): x and W_ih in place of the
  // projection, which the kernel computes a chunk of steps at a time into a buffer of the
  // chunk's size, so that no (N, 4H) array exists. Kernels without it decline (nothing
  // written), and the driver calls again with the projection in `gates`.
  const T* input = nullptr;  // [N, input_size] x
  const T* w_ih = nullptr;   // [4H, input_size]
};

template <typename T>
struct BackwardSequenceArgs : SequenceShape {
  const T* gates;              // [N, 4H] activated gates
  const T* cells;              // [N, H] c[t]
  const T* c0;                 // [B, H]
  const T* grad_output;        // [N, >=H] row stride grad_output_stride; may be null
  int64_t grad_output_stride;
  const T* w_hh;               // [4H, H]
  T* dhidden;                  // [B, H] in: dL/dh_n, out: dL/dh0
  T* dcell;                    // [B, H] in: dL/dc_n, out: dL/dc0
  T* dgates;                   // [N, 4H] out
  // [steps, 2] out, may be null (then no telemetry): per step t, the sums over its rows of
  // dL/dc[t]^2 and dL/dh[t]^2. Only set for kernels with StepKernels::backward_sequence_flow.
  T* sum_squares = nullptr;
  // The 16-bit GEMM mode (ForwardSequenceArgs::w_hh_16bit): W_hh as 16-bit bits of
  // format_16bit in place of w_hh, and dG[t] rounded to 16 bits (the operand of dL/dh[t-1] and
  // of the driver's weight GEMMs) into dgates_16bit [N, 4H] in place of dgates (null). Kernels
  // without it decline.
  const uint16_t* w_hh_16bit = nullptr;
  uint16_t* dgates_16bit = nullptr;
  Bits16 format_16bit = Bits16::kBFloat16;  // (the CPU's take bfloat16 only)
};

// A GEMM in BLAS's column-major convention, as cuBLAS and Fortran BLAS define it:
// C (m x n, leading dimension ldc) = alpha op(A) op(B) + beta C, op = transposed for 'T';
// C is not read when beta is 0. On the device's current stream.
template <typename T>
using ColumnMajorGemm = void (*)(char transa, char transb, int64_t m, int64_t n, int64_t k,
                                 T alpha, const T* a, int64_t lda, const T* b, int64_t ldb,
                                 T beta, T* c, int64_t ldc);

// dst[r, 0:cols] = src[r, 0:cols] for r < rows (row strides ldd, lds in elements), on the
// device's current stream.
template <typename T>
using CopyRows = void (*)(T* dst, int64_t ldd, const T* src, int64_t lds, int64_t rows,
                          int64_t cols);

// The 16-bit GEMM mode's product on a device (ColumnMajorGemm's twin): A and B of 16-bit
// `format` (bit patterns), C float32, accumulated in float32 (tensor cores on CUDA).
using MixedColumnMajorGemm = void (*)(Bits16 format, char transa, char transb, int64_t m,
                                      int64_t n, int64_t k, float alpha, const uint16_t* a,
                                      int64_t lda, const uint16_t* b, int64_t ldb, float beta,
                                      float* c, int64_t ldc);

// One device's step kernels for one compute type. The CUDA ones run on the current stream of
// the current device (the driver sets the device guard) and never synchronise the host.
// sum_squares pointers point to memory of the same device as the other buffers.
template <typename T>
struct StepKernels {
  void (*forward)(const ForwardStepArgs<T>&);
  void (*hidden_grad)(const HiddenGradStepArgs<T>&);
  void (*backward)(const BackwardStepArgs<T>&);
  void (*recurrent_grad)(const RecurrentGradStepArgs<T>&) = nullptr;
  // Optional (null: the driver loops over the step kernels). They return false when they do
  // not take the case (sizes, resources); the driver then loops over the step kernels.
  bool (*forward_sequence)(const ForwardSequenceArgs<T>&) = nullptr;
  bool (*backward_sequence)(const BackwardSequenceArgs<T>&) = nullptr;
  // backward_sequence records telemetry (BackwardSequenceArgs::sum_squares).
  bool backward_sequence_flow = false;
  // Optional: false when the sequence kernels are switched off, so that the driver plans the
  // per-step path from the start (the input GEMM then adds the biases; no second pass).
  bool (*sequence_enabled)() = nullptr;
  // Size of the scratch the step kernels' reductions need (HiddenGradStepArgs::partials), in
  // values of T; 0 when they need none (the driver then passes null).
  int64_t reduce_partials = 0;
  // Optional: the per-step products and row copies of the driver's time loop as raw-pointer
  // calls on the device (StepWeight, copy_rows in ops.cpp): no tensor views, no dispatcher
  // inside the loop. Null: the CPU's own paths (BLAS, packed GEMM, memcpy).
  ColumnMajorGemm<T> gemm = nullptr;
  CopyRows<T> copy_rows = nullptr;
  // Optional (float only): the device's 16-bit GEMM mode (gemm_operands_16bit in ops.cpp):
  // every product of a bfloat16 or float16 layer on 16-bit operands (the step kernels write
  // h[t] and dG[t] in 16 bits too: ForwardStepArgs::hidden_16bit, BackwardStepArgs::
  // dgates_16bit). Null: the CPU's own (MKL), or fp32 GEMMs on converted copies.
  MixedColumnMajorGemm gemm_16bit = nullptr;
  // The plain cell's forward kernels (step and sequence) take cells == nullptr: an inference
  // call, whose activated gates and c[t] nobody reads, keeps neither. False: the driver gives
  // them scratch to write.
  bool forward_unsaved = false;
  // With forward_unsaved: the driver's step loop computes an inference call's input projection
  // this many bytes of it at a time (at least a step's), in place of all steps' at once. 0:
  // at once (a device where one large GEMM beats the memory it saves).
  int64_t inference_chunk_bytes = 0;
  // forward_sequence writes a 16-bit layer's output in 16 bits (ForwardSequenceArgs::
  // output_16bit); the driver then allocates it so (ops.cpp forward_impl).
  bool forward_sequence_output_16bit = false;
  // forward_sequence uses ForwardSequenceArgs::hidden_16bit_steps in the 16-bit GEMM mode (the
  // driver then allocates it).
  bool forward_sequence_hidden_16bit_steps = false;
};

struct DeviceKernels {
  StepKernels<float> f32;
  StepKernels<double> f64;
};

namespace cpu {
const DeviceKernels& kernels();  // csrc/cpu/lstm_steps_cpu.cpp
}  // namespace cpu

namespace cuda {
const DeviceKernels& kernels();  // csrc/cuda/lstm_steps_cuda.cu
}  // namespace cuda

}  // namespace lstm_fused
