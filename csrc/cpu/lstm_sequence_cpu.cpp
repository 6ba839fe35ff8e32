// CPU sequence kernels: one direction's whole time loop in one parallel region, the CPU twin
// of a persistent GPU kernel. Each thread owns a slice of hidden units (all four gates of
// them) for the whole sequence: its rows of W_hh (forward) or columns of W_hh (backward) are
// copied and packed once, so they stay in that core's cache, and the gate math follows its
// own small GEMM directly. One barrier per step publishes h[t] (forward) or dG[t] (backward).
// Compared with the per-step kernels this saves, at every step, BLAS's own fork/join, the
// separate pointwise region and re-reading W_hh from another core's cache.
#include <ATen/Parallel.h>
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "../mixed_gemm.h"
#include "../step_weight.h"
#include "bf16_product_cpu.h"
#include "flush_denormals.h"
#include "lstm_rows_cpu.h"

// MKL's C API (mkl_service.h maps mkl_set_num_threads_local to it; the lower-case symbol
// is the Fortran one, which takes a pointer). Weak: absent from torch builds without MKL.
extern "C" int MKL_Set_Num_Threads_Local(int threads) __attribute__((weak));

namespace lstm_fused {
namespace cpu {
namespace {

// Hidden units [begin[k], begin[k+1]) of slice k: whole SIMD vectors, at most one slice per
// thread, and enough multiply-adds per step in each slice (batch x 4 x width x H) that the
// step's barrier is small next to them. A barrier waits for the slowest thread, so on a busy
// machine every extra thread risks a lost time slice per step: small problems run on one.
template <typename T>
std::vector<int64_t> slice_bounds(int64_t hidden, int64_t batch, int64_t threads) {
  constexpr int64_t kMinWorkPerSlice = int64_t(1) << 18;
  const int64_t width = Vectorized<T>::size();
  const int64_t vectors = (hidden + width - 1) / width;
  const int64_t work = std::max<int64_t>(1, batch) * 4 * hidden * hidden;
  const int64_t count = std::max<int64_t>(
      1, std::min({threads, vectors, work / kMinWorkPerSlice}));
  std::vector<int64_t> begin;
  for (int64_t k = 0; k <= count; ++k) {
    begin.push_back(std::min(hidden, vectors * k / count * width));
  }
  return begin;
}

// The most units of any slice of `bounds` (slice_bounds).
int64_t widest_slice(const std::vector<int64_t>& bounds) {
  int64_t widest = 0;
  for (size_t k = 0; k + 1 < bounds.size(); ++k) {
    widest = std::max(widest, bounds[k + 1] - bounds[k]);
  }
  return widest;
}

// BLAS inside our parallel region must run on the calling thread alone (MKL would otherwise
// start its own threads inside a one-thread team, which is not an active parallel region).
class SequentialBlas {
 public:
  SequentialBlas() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  int previous_;
};

// The L2 cache of one core, in bytes (1 MiB where the system does not say).
int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
    const long size = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return size > 0 ? static_cast<int64_t>(size) : (int64_t(1) << 20);
  }();
  return bytes;
}

// Each row's last step, whose h is its h_n.
template <typename T>
std::vector<int64_t> last_steps(const ForwardSequenceArgs<T>& a) {
  std::vector<int64_t> last_step(a.batch, 0);
  if (!a.reverse) {
    for (int64_t t = 0; t < a.steps; ++t)
      for (int64_t r = 0; r < a.batch_sizes[t]; ++r) last_step[r] = t;
  }
  return last_step;
}

// h_n of hidden units [j0, j1): each row's h at its last step.
template <typename T>
void copy_final_hidden(const ForwardSequenceArgs<T>& a, const std::vector<int64_t>& last_step,
                       int64_t j0, int64_t j1) {
  for (int64_t r = 0; r < a.batch; ++r) {
    const T* h = a.output + (a.offsets[last_step[r]] + r) * a.output_stride + j0;
    std::memcpy(a.hidden_state + r * a.hidden + j0, h, (j1 - j0) * sizeof(T));
  }
}

// Row r of step t, hidden units [j0, j1): dh[t] = dh_next + dy, then dc[t] and dG[t] into
// dgates_row (columns q H + j). With kSums, adds the row's sums of squares of dc[t] and dh[t]
// to sums[0] and sums[1].
template <typename T, bool kSums>
void backward_units(const BackwardSequenceArgs<T>& a, int64_t t, int64_t r, int64_t j0,
                    int64_t j1, T* dgates_row, T* sums) {
  const int64_t H = a.hidden, row = a.offsets[t] + r;
  const T* grad_output = a.grad_output ? a.grad_output + row * a.grad_output_stride : nullptr;
  const T dh_sum =
      hidden_grad_row<T, kClipOff, kSums>(a.dhidden + r * H, grad_output, T(0), j0, j1);
  const int64_t prev = a.previous(t);
  const T* cell_prev = r < a.continuing_rows(t) ? a.cells + (a.offsets[prev] + r) * H
                                                 : a.c0 + r * H;
  const T dc_sum = backward_row<T, kClipOff, false, kSums>(
      a.gates + row * 4 * H, H, a.cells + row * H, cell_prev, a.dhidden + r * H,
      a.dcell + r * H, dgates_row, T(0), T(1), j0, j1);
  if constexpr (kSums) {
    sums[0] += dc_sum;
    sums[1] += dh_sum;
  }
}

// Asks for the rows that step t's backward of units [j0, j1) reads (the saved gates, c[t],
// c[t-1], dy), one prefetch per 64-byte line, while the step before it in processing order
// computes: the forward wrote them long before and they sit in L3 or memory, and the gate
// math stalled on its loads of them.
template <typename T>
void prefetch_backward_step(const BackwardSequenceArgs<T>& a, int64_t t, int64_t j0,
                            int64_t j1) {
  constexpr int64_t kLine = 64 / sizeof(T);
  const auto lines = [&](const T* row) {
    for (int64_t j = j0; j < j1; j += kLine) __builtin_prefetch(row + j, 0, 2);
  };
  const int64_t H = a.hidden, prev = a.previous(t);
  for (int64_t r = 0; r < a.batch_sizes[t]; ++r) {
    const int64_t row = a.offsets[t] + r;
    for (int64_t q = 0; q < 4; ++q) lines(a.gates + row * 4 * H + q * H);
    lines(a.cells + row * H);
    lines(r < a.continuing_rows(t) ? a.cells + (a.offsets[prev] + r) * H : a.c0 + r * H);
    if (a.grad_output != nullptr) lines(a.grad_output + row * a.grad_output_stride);
  }
}

// The telemetry's per-step sums: each slice's, added in slice order (no atomics: the same
// bits for the same thread count). slice_sums: [slices, steps, 2].
template <typename T>
void add_slice_sums(const std::vector<T>& slice_sums, int64_t slices, int64_t steps,
                    T* sum_squares) {
  for (int64_t i = 0; i < steps * 2; ++i) {
    T total = 0;
    for (int64_t k = 0; k < slices; ++k) total += slice_sums[k * steps * 2 + i];
    sum_squares[i] = total;
  }
}

template <typename T>
at::TensorOptions options_of() {
  return at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
}

// Rows of x per chunk of the projection inside the kernel (ForwardSequenceArgs::input): the
// widest slice's buffer of x W_ih^T, [rows, 4 width], about a quarter of the core's L2 (there
// it stays, with the slice's W_hh and W_ih, while the steps read it), or as large as the
// slice's W_ih where that is larger (W_ih is read once per chunk; weight_bytes per value of
// it: 2 for bfloat16's); at least a step's rows.
template <typename T>
int64_t projection_chunk_rows(const ForwardSequenceArgs<T>& a, int64_t widest,
                              int64_t weight_bytes = sizeof(T)) {
  const int64_t row_bytes = 4 * widest * static_cast<int64_t>(sizeof(T));
  const int64_t bytes =
      std::max(l2_cache_bytes() / 4, 4 * widest * weight_bytes * a.input_size);
  return std::min(a.offsets_end(), std::max(a.batch, bytes / row_bytes));
}

template <typename T>
bool forward_sequence_impl(const ForwardSequenceArgs<T>& a) {
  if (Blas<T>::gemm() == nullptr) return false;
  // inference with the projection inside: x[t] W_ih^T of a slice's units into its buffer,
  // a chunk of steps at a time, and the step's recurrent product added to it
  const bool project = a.input != nullptr;
  if (project && (a.w_ih == nullptr || a.input_size == 0 || a.cells != nullptr)) return false;
  // a 16-bit output: h[t] rounded into it, and in fp32 into a ring of two steps' rows that the
  // next step's product reads (in place of the output's rows)
  const bool ring = a.output_16bit != nullptr;
  if (ring && !std::is_same_v<T, float>) return false;
  const int64_t H = a.hidden, B = a.batch, I = a.input_size, ld = a.output_stride;
  const std::vector<int64_t> bounds = slice_bounds<T>(H, B, at::get_num_threads());
  const int64_t slices = static_cast<int64_t>(bounds.size()) - 1;
  const int64_t widest = widest_slice(bounds);
  const int64_t chunk_rows = project ? projection_chunk_rows(a, widest) : 0;
  // All rows in one chunk: the buffer would be as large as the driver's (N, 4H) projection,
  // and packing W_ih's slices here costs more than that GEMM at a few rows (one token).
  if (project && chunk_rows >= a.offsets_end()) return false;
  const std::vector<StepChunk> chunks = step_chunks(a, chunk_rows);
  // One slice and a second thread (small problems, whose steps run on one): that thread
  // projects chunk c + 1 into a second buffer while the slice's thread runs chunk c's steps,
  // so the projection's half of the FLOPs leaves the steps' critical path (one barrier per
  // chunk; none per step, as one thread computes every unit).
  const bool pipelined = project && slices == 1 && chunks.size() > 1 && at::get_num_threads() > 1;
  // MKL's packed buffers (see StepWeight), shared out between the slices.
  const int64_t pack_budget = pack_budget_bytes<T>(a.offsets_end() * 4 * H) / slices;
  const at::Tensor w_hh =
      at::from_blob(const_cast<T*>(a.w_hh), {4, H, H}, options_of<T>());
  const at::Tensor w_ih =
      project ? at::from_blob(const_cast<T*>(a.w_ih), {4, H, I}, options_of<T>()) : at::Tensor();
  std::vector<StepWeight<T>> weights, input_weights;
  // per slice: [B, 4 * width] h[t-1] W_hh^T of its units; with `project`, [chunk_rows,
  // 4 * width] x W_ih^T of the chunk's rows, to which each step adds h[t-1] W_hh^T
  std::vector<at::Tensor> recurrent;
  for (int64_t k = 0; k < slices; ++k) {
    const int64_t width = bounds[k + 1] - bounds[k];
    weights.emplace_back(w_hh.narrow(1, bounds[k], width).reshape({4 * width, H}).contiguous(),
                         /*transposed=*/true, B, pack_budget, nullptr, StepThreads::kCallerOnly);
    if (project) {
      input_weights.emplace_back(
          w_ih.narrow(1, bounds[k], width).reshape({4 * width, I}).contiguous(),
          /*transposed=*/true, chunk_rows, pack_budget, nullptr, StepThreads::kCallerOnly);
    }
    recurrent.push_back(at::empty({project ? chunk_rows : B, 4 * width}, options_of<T>()));
  }
  // the pipeline's buffer of the odd chunks (recurrent[0] holds the even ones)
  const at::Tensor odd_chunks =
      pipelined ? at::empty({chunk_rows, 4 * H}, options_of<T>()) : at::Tensor();
  // [2, B, H], then [B, H] each row's h at its last step: h_n, copied to hidden_state at the
  // end (hidden_state is h0, which a row's step may read while another slice writes its h_n)
  const at::Tensor hidden_ring = ring ? at::empty({3, B, H}, options_of<T>()) : at::Tensor();
  T* const ring_data = ring ? hidden_ring.data_ptr<T>() : nullptr;
  T* const final_hidden = ring ? ring_data + 2 * B * H : nullptr;
  const std::vector<int64_t> last_step = last_steps(a);
#pragma omp parallel num_threads(pipelined ? 2 : slices)
  {
    const SequentialBlas sequential;
    const FlushDenormals flush;  // this thread's MXCSR, restored at the region's end
    const int64_t thread = omp_get_thread_num(), team = omp_get_num_threads();
    // the pipeline only if the runtime gave the region its second thread
    const bool overlap = pipelined && team > 1;
    // slice k's x W_ih^T of chunk c's rows (with `project`), or its h[t-1] W_hh^T
    const auto projected = [&](int64_t k, size_t c) {
      return (overlap && c % 2 == 1 ? odd_chunks : recurrent[k]).template data_ptr<T>();
    };
    // rows [r0, r1) of chunk c's projection for slice k
    const auto project_rows = [&](int64_t k, size_t c, int64_t r0, int64_t r1) {
      const int64_t width4 = 4 * (bounds[k + 1] - bounds[k]);
      input_weights[k].multiply(r1 - r0, projected(k, c) + r0 * width4, width4,
                                a.input + (chunks[c].row0 + r0) * I, I, /*accumulate=*/false);
    };
    // processing position s of chunk c, slice k's units
    const auto run_step = [&](int64_t k, size_t c, int64_t s) {
      const StepChunk& chunk = chunks[c];
      const int64_t t = a.time(s);
      const int64_t rows = a.batch_sizes[t], offset = a.offsets[t];
      const int64_t prev = a.previous(t), continuing = a.continuing_rows(t);
      const int64_t j0 = bounds[k], j1 = bounds[k + 1], width = j1 - j0;
      T* rec = projected(k, c) + (project ? (offset - chunk.row0) * 4 * width : 0);
      // Rows that continue a sequence read h[t-1]; rows that start here read h0.
      if (continuing > 0) {
        const T* h_prev =
            ring ? ring_data + ((s + 1) % 2) * B * H : a.output + a.offsets[prev] * ld;
        weights[k].multiply(continuing, rec, 4 * width, h_prev, ring ? H : ld,
                            /*accumulate=*/project);
      }
      if (rows > continuing) {
        weights[k].multiply(rows - continuing, rec + continuing * 4 * width, 4 * width,
                            a.h0 + continuing * H, H, /*accumulate=*/project);
      }
      for (int64_t r = 0; r < rows; ++r) {
        T* const gates_row = project ? nullptr : a.gates + (offset + r) * 4 * H;
        T* const h_row = ring ? ring_data + ((s % 2) * B + r) * H : a.output + (offset + r) * ld;
        T* const cell_row = a.cell_state + r * H;
        if (project) {  // the pre-activations are all in `rec`
          forward_row<T, false, false>(nullptr, H, a.bias, rec + r * 4 * width, width, cell_row,
                                       nullptr, nullptr, h_row, j0, j1);
        } else if (a.cells != nullptr) {
          forward_row<T>(gates_row, H, a.bias, rec + r * 4 * width, width, cell_row,
                         a.cells + (offset + r) * H, nullptr, h_row, j0, j1);
        } else {  // inference: nothing kept for a backward
          forward_row<T, true, false>(gates_row, H, a.bias, rec + r * 4 * width, width,
                                      cell_row, nullptr, nullptr, h_row, j0, j1);
        }
        if constexpr (std::is_same_v<T, float>) {
          if (ring) {
            round_rows(a.output_format == Bits16::kBFloat16 ? at::kBFloat16 : at::kHalf,
                       a.output_16bit + (offset + r) * ld + j0, ld, h_row + j0, H, 1, width);
            if (last_step[r] == t) {
              std::memcpy(final_hidden + r * H + j0, h_row + j0, width * sizeof(T));
            }
          }
        }
      }
    };
    for (size_t c = 0; c < chunks.size(); ++c) {
      if (overlap) {
        if (c == 0) {  // nothing to overlap with yet: both threads project the first chunk
          const int64_t rows = chunks[0].rows;
          project_rows(0, 0, rows * thread / team, rows * (thread + 1) / team);
#pragma omp barrier
        }
        if (thread == 0) {
          for (int64_t s = chunks[c].first; s < chunks[c].end; ++s) run_step(0, c, s);
        } else if (thread == 1 && c + 1 < chunks.size()) {
          project_rows(0, c + 1, 0, chunks[c + 1].rows);
        }
#pragma omp barrier
        continue;
      }
      for (int64_t k = thread; project && k < slices; k += team) {
        project_rows(k, c, 0, chunks[c].rows);
      }
      for (int64_t s = chunks[c].first; s < chunks[c].end; ++s) {
        for (int64_t k = thread; k < slices; k += team) run_step(k, c, s);
#pragma omp barrier
      }
    }
    for (int64_t k = thread; k < slices; k += team) {
      if (!ring) {
        copy_final_hidden(a, last_step, bounds[k], bounds[k + 1]);
        continue;
      }
      for (int64_t r = 0; r < B; ++r) {
        std::memcpy(a.hidden_state + r * H + bounds[k], final_hidden + r * H + bounds[k],
                    (bounds[k + 1] - bounds[k]) * sizeof(T));
      }
    }
  }
  return true;
}

// The forward of a bfloat16 layer in the 16-bit GEMM mode (ForwardSequenceArgs::w_hh_16bit):
// the same slices, each computing its units' pre-activations of a step in one product on bf16
// operands (bf16_product_cpu.h). The input projection (input_16bit) never goes through memory
// as an (N, 4H) fp32 array; it takes one of two forms:
// - fused, while [W_ih, W_hh] of the widest slice stays in half the core's L2: each step's
//   product is [x[t], h[t-1]] [W_ih, W_hh]^T (T100 B32 H128: 0.85x -> 1.0x of nn.LSTM in
//   inference);
// - in chunks, in inference beyond that (where W_ih would stream from L3 at every step: T50
//   B64 H512, 2 MiB per slice, 0.89x -> 0.8x): as forward_sequence_impl's, each slice
//   multiplies a chunk of steps' rows of x by its W_ih into a buffer of its own
//   (projection_chunk_rows), the biases added, and each step's h[t-1] W_hh^T is added to it.
// A training call beyond that declines (nothing written): the driver then calls again with the
// projection in `gates`, which the backward keeps anyway, as one large GEMM.
// The operand rows of the step's product come from a bf16 buffer that the threads fill for the
// next step as they go: x[t+1] (fused; rows split between them) and h[t] (each thread its
// units). Two buffers alternate, so a step's products read one while its gate math fills the
// other. Both start with h0: in the reverse direction of packed input a row that starts late
// finds h0 there (rows never stop and restart).
bool forward_sequence_bf16(const ForwardSequenceArgs<float>& a) {
  const Bf16Product kind = bf16_product_kind();
  if (kind == Bf16Product::kNone) return false;
  // (the output it writes is the operand it rounds for the next product)
  if (a.output_16bit != nullptr && a.output_format != Bits16::kBFloat16) return false;
  const int64_t H = a.hidden, B = a.batch, ld = a.output_stride;
  const std::vector<int64_t> bounds = slice_bounds<float>(H, B, at::get_num_threads());
  const int64_t slices = static_cast<int64_t>(bounds.size()) - 1;
  const int64_t widest = widest_slice(bounds);
  const bool save = a.cells != nullptr;  // else inference: no gates or c[t] kept
  bool fused = false, chunked = false;
  if (a.input_16bit != nullptr) {
    if (a.w_ih_16bit == nullptr) return false;
    fused = 4 * widest * (a.input_size + H) * 2 <= l2_cache_bytes() / 2;
    chunked = !fused && !save && a.input_size > 0;
    if (!fused && !chunked) return false;
  }
  const int64_t chunk_rows = chunked ? projection_chunk_rows(a, widest, /*weight_bytes=*/2) : 0;
  // All rows in one chunk: no smaller than the driver's projection (see forward_sequence_impl).
  if (chunked && chunk_rows >= a.offsets_end()) return false;
  const std::vector<StepChunk> chunks = step_chunks(a, chunk_rows);
  // x[t] is part of each product's operands only when fused.
  const int64_t I = fused ? a.input_size : 0;
  const int64_t padded_rows = Bf16Weight::round_up(B, Bf16Weight::kRowBlock);
  const int64_t depth = Bf16Weight::depth_padding(I + H);  // a row: x[t] (I), h[t-1] (H)
  AlignedBuffer<uint16_t> operands = aligned_zeros<uint16_t>(2 * padded_rows * depth);
  for (int64_t copy = 0; copy < 2; ++copy)
    for (int64_t r = 0; r < B; ++r)
      std::memcpy(operands.get() + (copy * padded_rows + r) * depth + I, a.h0_16bit + r * H,
                  H * 2);
  // x[t] of the step at processing position s into the buffer it reads; rows r = part mod
  // parts of it (the threads share the copy).
  const auto copy_input = [&](int64_t s, int64_t part, int64_t parts) {
    const int64_t t = a.time(s);
    uint16_t* buffer = operands.get() + (s % 2) * padded_rows * depth;
    for (int64_t r = part; r < a.batch_sizes[t]; r += parts)
      std::memcpy(buffer + r * depth, a.input_16bit + (a.offsets[t] + r) * I, I * 2);
  };
  if (a.steps > 0 && I > 0) copy_input(0, 0, 1);
  // In chunks: a chunk's rows of x, read where they lie when they are whole for the product
  // (no padding columns, and the padded rows it reads inside x), else copied padded into a
  // buffer (shared, each thread copies some), made only when a chunk needs it.
  const int64_t input_depth = Bf16Weight::depth_padding(a.input_size);
  const auto in_place = [&](const StepChunk& chunk) {
    return a.input_size == input_depth &&
           chunk.row0 + Bf16Weight::round_up(chunk.rows, Bf16Weight::kRowBlock) <=
               a.offsets_end();
  };
  const bool copies =
      chunked && !std::all_of(chunks.begin(), chunks.end(), in_place);
  AlignedBuffer<uint16_t> chunk_input =
      copies ? aligned_zeros<uint16_t>(Bf16Weight::round_up(chunk_rows, Bf16Weight::kRowBlock) *
                                       input_depth)
             : AlignedBuffer<uint16_t>();
  // Per slice, made by the thread that owns it (in parallel, and into that core's cache):
  // rows q H + j of [W_ih, W_hh] for its units j (of W_hh, and W_ih apart, when in chunks),
  // the step product's output [padded_rows, padded_cols], and in chunks the projection's.
  std::vector<std::unique_ptr<Bf16Weight>> weights(slices), input_weights(slices);
  std::vector<AlignedBuffer<float>> products(slices), projections(slices);
  // With output_16bit: h[t] of the row being computed in fp32, [H] (the slice's units used),
  // before its roundings to bf16 (the next product's operand and the output)
  std::vector<AlignedBuffer<float>> hidden_rows(slices);
  const std::vector<int64_t> last_step = last_steps(a);
#pragma omp parallel num_threads(slices)
  {
    const FlushDenormals flush;  // this thread's MXCSR, restored at the region's end
    const int64_t thread = omp_get_thread_num(), team = omp_get_num_threads();
    for (int64_t k = thread; k < slices; k += team) {
      const int64_t j0 = bounds[k], width = bounds[k + 1] - j0;
      // row n of the slice's W: gate q = n / width, unit j0 + n % width
      Bf16Weight::RowParts recurrent_rows{{}, {}, I}, input_rows{{}, {}, a.input_size};
      for (int64_t q = 0; q < 4; ++q) {
        for (int64_t j = j0; j < j0 + width; ++j) {
          const uint16_t* input_row = a.w_ih_16bit + (q * H + j) * a.input_size;
          const uint16_t* hidden_row = a.w_hh_16bit + (q * H + j) * H;
          recurrent_rows.first.push_back(input_row);
          recurrent_rows.second.push_back(hidden_row);
          input_rows.first.push_back(input_row);
        }
      }
      weights[k] = std::make_unique<Bf16Weight>(recurrent_rows, I + H, kind);
      products[k] = aligned_zeros<float>(padded_rows * weights[k]->padded_cols());
      if (a.output_16bit != nullptr) hidden_rows[k] = aligned_zeros<float>(H);
      if (chunked) {
        input_weights[k] = std::make_unique<Bf16Weight>(input_rows, a.input_size, kind);
        projections[k] = aligned_zeros<float>(
            Bf16Weight::round_up(chunk_rows, Bf16Weight::kRowBlock) * weights[k]->padded_cols());
      }
    }
    for (const StepChunk& chunk : chunks) {
      if (chunked) {
        // in place: no copy and no barrier (the copy was 3% of the samples at T50 B64 H512)
        const bool read_in_place = in_place(chunk);
        const uint16_t* chunk_x =
            read_in_place ? a.input_16bit + chunk.row0 * a.input_size : chunk_input.get();
        if (!read_in_place) {
          for (int64_t r = thread; r < chunk.rows; r += team) {
            std::memcpy(chunk_input.get() + r * input_depth,
                        a.input_16bit + (chunk.row0 + r) * a.input_size, a.input_size * 2);
          }
#pragma omp barrier
        }
        for (int64_t k = thread; k < slices; k += team) {
          const int64_t j0 = bounds[k], width = bounds[k + 1] - j0;
          const int64_t ldp = weights[k]->padded_cols();
          float* projection = projections[k].get();
          input_weights[k]->multiply(chunk.rows, projection, ldp, chunk_x, input_depth);
          // the biases now, in the order the driver's projection adds them (bit for bit)
          for (int64_t r = 0; a.bias != nullptr && r < chunk.rows; ++r)
            for (int64_t q = 0; q < 4; ++q)
              at::vec::map2<float>([](auto x, auto b) { return x + b; },
                                   projection + r * ldp + q * width,
                                   projection + r * ldp + q * width, a.bias + q * H + j0, width);
        }
      }
      for (int64_t s = chunk.first; s < chunk.end; ++s) {
        const int64_t t = a.time(s);
        const int64_t rows = a.batch_sizes[t], offset = a.offsets[t];
        const uint16_t* current = operands.get() + (s % 2) * padded_rows * depth;
        uint16_t* next = operands.get() + ((s + 1) % 2) * padded_rows * depth;
        if (s + 1 < a.steps && I > 0) copy_input(s + 1, thread, team);
        for (int64_t k = thread; k < slices; k += team) {
          const int64_t j0 = bounds[k], j1 = bounds[k + 1], width = j1 - j0;
          const int64_t ldp = weights[k]->padded_cols();
          float* product = products[k].get();
          weights[k]->multiply(rows, product, ldp, current, depth);
          for (int64_t r = 0; r < rows; ++r) {
            float* h_row = a.output_16bit != nullptr ? hidden_rows[k].get()
                                                    : a.output + (offset + r) * ld;
            // out only (and null in inference) when the product held x[t] W_ih^T
            float* gates_row = a.gates != nullptr ? a.gates + (offset + r) * 4 * H : nullptr;
            float* cell_row = a.cell_state + r * H;
            float* saved_cell = save ? a.cells + (offset + r) * H : nullptr;
            float* recurrent = product + r * ldp;
            if (chunked) {  // every pre-activation in `recurrent`, the biases included
              const float* projected =
                  projections[k].get() + (offset - chunk.row0 + r) * ldp;
              at::vec::map2<float>([](auto x, auto p) { return x + p; }, recurrent, recurrent,
                                   projected, 4 * width);
              forward_row<float, false, false>(nullptr, H, nullptr, recurrent, width, cell_row,
                                               nullptr, nullptr, h_row, j0, j1);
            } else if (I > 0 && save) {
              forward_row<float, /*kReadGates=*/false>(gates_row, H, a.bias, recurrent, width,
                                                       cell_row, saved_cell, nullptr, h_row,
                                                       j0, j1);
            } else if (I > 0) {
              forward_row<float, false, /*kSave=*/false>(gates_row, H, a.bias, recurrent,
                                                         width, cell_row, nullptr, nullptr,
                                                         h_row, j0, j1);
            } else if (save) {
              forward_row<float>(gates_row, H, a.bias, recurrent, width, cell_row, saved_cell,
                                 nullptr, h_row, j0, j1);
            } else {
              forward_row<float, true, false>(gates_row, H, a.bias, recurrent, width,
                                              cell_row, nullptr, nullptr, h_row, j0, j1);
            }
            at::vec::convert(h_row + j0,
                             reinterpret_cast<c10::BFloat16*>(next + r * depth + I) + j0,
                             width);
            if (a.output_16bit != nullptr) {
              std::memcpy(a.output_16bit + (offset + r) * ld + j0, next + r * depth + I + j0,
                          width * 2);
              if (last_step[r] == t) {  // h_n (a.h0 is not read here: h0_16bit is)
                std::memcpy(a.hidden_state + r * H + j0, h_row + j0, width * sizeof(float));
              }
            }
          }
        }
#pragma omp barrier
      }
    }
    for (int64_t k = thread; a.output_16bit == nullptr && k < slices; k += team) {
      copy_final_hidden(a, last_step, bounds[k], bounds[k + 1]);
    }
  }
  return true;
}

template <typename T, bool kSums>
bool backward_sequence_impl(const BackwardSequenceArgs<T>& a) {
  if (Blas<T>::gemm() == nullptr) return false;
  const int64_t H = a.hidden, B = a.batch;
  const std::vector<int64_t> bounds = slice_bounds<T>(H, B, at::get_num_threads());
  const int64_t slices = static_cast<int64_t>(bounds.size()) - 1;
  const int64_t pack_budget = pack_budget_bytes<T>(a.offsets_end() * 4 * H) / slices;
  const at::Tensor w_hh = at::from_blob(const_cast<T*>(a.w_hh), {4 * H, H}, options_of<T>());
  std::vector<StepWeight<T>> weights;  // per slice: the columns of W_hh of its units
  for (int64_t k = 0; k < slices; ++k) {
    weights.emplace_back(w_hh.narrow(1, bounds[k], bounds[k + 1] - bounds[k]).contiguous(),
                         /*transposed=*/false, B, pack_budget, nullptr,
                         StepThreads::kCallerOnly);
  }
  // Telemetry: per slice and step, the sums of dc^2 and dh^2 over the slice's units; added
  // up in slice order after the loop (no atomics: the same bits for the same thread count).
  std::vector<T> slice_sums(kSums ? slices * a.steps * 2 : 0, T(0));
#pragma omp parallel num_threads(slices)
  {
    const SequentialBlas sequential;
    const FlushDenormals flush;  // this thread's MXCSR, restored at the region's end
    const int64_t thread = omp_get_thread_num(), team = omp_get_num_threads();
    // Reverse of the forward processing order.
    for (int64_t s = a.steps - 1; s >= 0; --s) {
      const int64_t t = a.time(s);
      const int64_t rows = a.batch_sizes[t], offset = a.offsets[t];
      // dh[t], dc[t] and dG[t] of this thread's units (dh_next of its units is its own).
      for (int64_t k = thread; k < slices; k += team) {
        const int64_t j0 = bounds[k], j1 = bounds[k + 1];
        T* sums = kSums ? &slice_sums[(k * a.steps + t) * 2] : nullptr;
        for (int64_t r = 0; r < rows; ++r) {
          backward_units<T, kSums>(a, t, r, j0, j1, a.dgates + (offset + r) * 4 * H, sums);
        }
      }
#pragma omp barrier
      // dh_next of this thread's units = dG[t] (all units) W_hh[:, units].
      for (int64_t k = thread; k < slices; k += team) {
        weights[k].multiply(rows, a.dhidden + bounds[k], H, a.dgates + offset * 4 * H, 4 * H,
                            /*accumulate=*/false);
      }
    }
  }
  if constexpr (kSums) add_slice_sums(slice_sums, slices, a.steps, a.sum_squares);
  return true;
}

// The backward of a bfloat16 layer in the 16-bit GEMM mode (BackwardSequenceArgs::
// w_hh_16bit): as backward_sequence_impl, with dG[t] rounded to bfloat16 as it is produced, and
// dL/dh[t-1] of a slice's units = dG[t] W_hh[:, units] on bf16 operands. The step's bf16 dG
// alternates between two padded copies (a slice's product may still read step t's while the
// others write step t-1's), and goes to dgates_16bit for the driver's weight GEMMs.
template <bool kSums>
bool backward_sequence_bf16(const BackwardSequenceArgs<float>& a) {
  const Bf16Product kind = bf16_product_kind();
  if (kind == Bf16Product::kNone) return false;
  const int64_t H = a.hidden, B = a.batch;
  const std::vector<int64_t> bounds = slice_bounds<float>(H, B, at::get_num_threads());
  const int64_t slices = static_cast<int64_t>(bounds.size()) - 1;
  const int64_t padded_rows = Bf16Weight::round_up(B, Bf16Weight::kRowBlock);
  const int64_t depth = Bf16Weight::depth_padding(4 * H);
  AlignedBuffer<uint16_t> dgates_16bit = aligned_zeros<uint16_t>(2 * padded_rows * depth);
  AlignedBuffer<float> dgates = aligned_zeros<float>(B * 4 * H);  // one step's, fp32
  // Per slice, made by its thread: the columns j of W_hh of its units (the weights of unit
  // j's dL/dh in every gate) as the rows of the product's W, and the product's output.
  std::vector<std::unique_ptr<Bf16Weight>> weights(slices);
  std::vector<AlignedBuffer<float>> products(slices);
  std::vector<float> slice_sums(kSums ? slices * a.steps * 2 : 0, 0.0f);
#pragma omp parallel num_threads(slices)
  {
    const FlushDenormals flush;  // this thread's MXCSR, restored at the region's end
    const int64_t thread = omp_get_thread_num(), team = omp_get_num_threads();
    for (int64_t k = thread; k < slices; k += team) {
      weights[k] = std::make_unique<Bf16Weight>(Bf16Weight::FromTransposed{},
                                                a.w_hh_16bit + bounds[k], bounds[k + 1] - bounds[k],
                                                4 * H, /*depth_stride=*/H, kind);
      products[k] = aligned_zeros<float>(padded_rows * weights[k]->padded_cols());
    }
    for (int64_t s = a.steps - 1; s >= 0; --s) {
      const int64_t t = a.time(s);
      const int64_t rows = a.batch_sizes[t], offset = a.offsets[t];
      uint16_t* step_16bit = dgates_16bit.get() + (s % 2) * padded_rows * depth;
      for (int64_t k = thread; k < slices; k += team) {
        const int64_t j0 = bounds[k], j1 = bounds[k + 1], width = j1 - j0;
        float* sums = kSums ? &slice_sums[(k * a.steps + t) * 2] : nullptr;
        for (int64_t r = 0; r < rows; ++r) {
          float* dgates_row = dgates.get() + r * 4 * H;
          backward_units<float, kSums>(a, t, r, j0, j1, dgates_row, sums);
          for (int64_t q = 0; q < 4; ++q) {
            uint16_t* rounded = step_16bit + r * depth + q * H + j0;
            at::vec::convert(dgates_row + q * H + j0, reinterpret_cast<c10::BFloat16*>(rounded),
                             width);
            std::memcpy(a.dgates_16bit + (offset + r) * 4 * H + q * H + j0, rounded, width * 2);
          }
        }
        if (s > 0) prefetch_backward_step(a, a.time(s - 1), j0, j1);
      }
#pragma omp barrier
      // dh_next of this thread's units = dG[t] (all units, bf16) W_hh[:, units].
      for (int64_t k = thread; k < slices; k += team) {
        const int64_t j0 = bounds[k], width = bounds[k + 1] - j0;
        const int64_t ldp = weights[k]->padded_cols();
        float* product = products[k].get();
        weights[k]->multiply(rows, product, ldp, step_16bit, depth);
        for (int64_t r = 0; r < rows; ++r) {
          std::memcpy(a.dhidden + r * H + j0, product + r * ldp, width * sizeof(float));
        }
      }
    }
  }
  if constexpr (kSums) add_slice_sums(slice_sums, slices, a.steps, a.sum_squares);
  return true;
}

}  // namespace

template <typename T>
bool forward_sequence(const ForwardSequenceArgs<T>& args) {
  if constexpr (std::is_same_v<T, float>) {
    // (the CPU's 16-bit mode is bfloat16's: float16 layers run on fp32 GEMMs, ops.cpp)
    if (args.w_hh_16bit != nullptr && args.format_16bit == Bits16::kBFloat16) {
      return forward_sequence_bf16(args);
    }
  }
  if (args.w_hh_16bit != nullptr) return false;
  return forward_sequence_impl(args);
}

template <typename T>
bool backward_sequence(const BackwardSequenceArgs<T>& args) {
  if constexpr (std::is_same_v<T, float>) {
    if (args.w_hh_16bit != nullptr && args.format_16bit == Bits16::kBFloat16) {
      return args.sum_squares ? backward_sequence_bf16<true>(args)
                              : backward_sequence_bf16<false>(args);
    }
  }
  if (args.w_hh_16bit != nullptr) return false;
  return args.sum_squares ? backward_sequence_impl<T, true>(args)
                          : backward_sequence_impl<T, false>(args);
}

template bool forward_sequence<float>(const ForwardSequenceArgs<float>&);
template bool forward_sequence<double>(const ForwardSequenceArgs<double>&);
template bool backward_sequence<float>(const BackwardSequenceArgs<float>&);
template bool backward_sequence<double>(const BackwardSequenceArgs<double>&);

}  // namespace cpu
}  // namespace lstm_fused
