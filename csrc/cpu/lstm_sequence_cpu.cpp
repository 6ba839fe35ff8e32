// CPU sequence kernels: one direction's whole time loop in one parallel region, the CPU twin
// of a persistent GPU kernel. Each thread owns a slice of hidden units (all four gates of
// them) for the whole sequence: its rows of W_hh (forward) or columns of W_hh (backward) are
// copied and packed once, so they stay in that core's cache, and the gate math follows its
// own small GEMM directly. One barrier per step publishes h[t] (forward) or dG[t] (backward).
// Compared with the per-step kernels this saves, at every step, BLAS's own fork/join, the
// separate pointwise region and re-reading W_hh from another core's cache.
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../step_weight.h"
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

template <typename T>
at::TensorOptions options_of() {
  return at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
}

template <typename T>
bool forward_sequence_impl(const ForwardSequenceArgs<T>& a) {
  if (Blas<T>::gemm() == nullptr) return false;
  const int64_t H = a.hidden, B = a.batch, ld = a.output_stride;
  const std::vector<int64_t> bounds = slice_bounds<T>(H, B, at::get_num_threads());
  const int64_t slices = static_cast<int64_t>(bounds.size()) - 1;
  // MKL's packed buffers (see StepWeight), shared out between the slices.
  const int64_t pack_budget = pack_budget_bytes<T>(a.offsets_end() * 4 * H) / slices;
  const at::Tensor w_hh =
      at::from_blob(const_cast<T*>(a.w_hh), {4, H, H}, options_of<T>());
  std::vector<StepWeight<T>> weights;
  std::vector<at::Tensor> recurrent;  // per slice: [B, 4 * width] h[t-1] W_hh^T of its units
  for (int64_t k = 0; k < slices; ++k) {
    const int64_t width = bounds[k + 1] - bounds[k];
    weights.emplace_back(w_hh.narrow(1, bounds[k], width).reshape({4 * width, H}).contiguous(),
                         /*transposed=*/true, B, pack_budget);
    recurrent.push_back(at::empty({B, 4 * width}, options_of<T>()));
  }
  // Each row's last step, whose h is its h_n.
  std::vector<int64_t> last_step(B, 0);
  if (!a.reverse) {
    for (int64_t t = 0; t < a.steps; ++t)
      for (int64_t r = 0; r < a.batch_sizes[t]; ++r) last_step[r] = t;
  }
#pragma omp parallel num_threads(slices)
  {
    const SequentialBlas sequential;
    const FlushDenormals flush;  // this thread's MXCSR, restored at the region's end
    const int64_t thread = omp_get_thread_num(), team = omp_get_num_threads();
    for (int64_t s = 0; s < a.steps; ++s) {
      const int64_t t = a.time(s);
      const int64_t rows = a.batch_sizes[t], offset = a.offsets[t];
      const int64_t prev = a.previous(t), continuing = a.continuing_rows(t);
      for (int64_t k = thread; k < slices; k += team) {
        const int64_t j0 = bounds[k], j1 = bounds[k + 1], width = j1 - j0;
        T* rec = recurrent[k].data_ptr<T>();
        // Rows that continue a sequence read h[t-1]; rows that start here read h0.
        if (continuing > 0) {
          weights[k].multiply(continuing, rec, 4 * width, a.output + a.offsets[prev] * ld, ld,
                              /*accumulate=*/false);
        }
        if (rows > continuing) {
          weights[k].multiply(rows - continuing, rec + continuing * 4 * width, 4 * width,
                              a.h0 + continuing * H, H, /*accumulate=*/false);
        }
        for (int64_t r = 0; r < rows; ++r) {
          forward_row<T>(a.gates + (offset + r) * 4 * H, H, a.bias, rec + r * 4 * width, width,
                         a.cell_state + r * H, a.cells + (offset + r) * H, nullptr,
                         a.output + (offset + r) * ld, j0, j1);
        }
      }
#pragma omp barrier
    }
    for (int64_t k = thread; k < slices; k += team) {
      const int64_t j0 = bounds[k], width = bounds[k + 1] - j0;
      for (int64_t r = 0; r < B; ++r) {
        const T* h = a.output + (a.offsets[last_step[r]] + r) * ld + j0;
        std::memcpy(a.hidden_state + r * H + j0, h, width * sizeof(T));
      }
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
                         /*transposed=*/false, B, pack_budget);
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
      const int64_t prev = a.previous(t), continuing = a.continuing_rows(t);
      // dh[t], dc[t] and dG[t] of this thread's units (dh_next of its units is its own).
      for (int64_t k = thread; k < slices; k += team) {
        const int64_t j0 = bounds[k], j1 = bounds[k + 1];
        T dc_sum = 0, dh_sum = 0;
        for (int64_t r = 0; r < rows; ++r) {
          const T* grad_output =
              a.grad_output ? a.grad_output + (offset + r) * a.grad_output_stride : nullptr;
          dh_sum += hidden_grad_row<T, kClipOff, kSums>(a.dhidden + r * H, grad_output, T(0),
                                                        j0, j1);
          const T* cell_prev =
              r < continuing ? a.cells + (a.offsets[prev] + r) * H : a.c0 + r * H;
          dc_sum += backward_row<T, kClipOff, false, kSums>(
              a.gates + (offset + r) * 4 * H, H, a.cells + (offset + r) * H, cell_prev,
              a.dhidden + r * H, a.dcell + r * H, a.dgates + (offset + r) * 4 * H, T(0), T(1),
              j0, j1);
        }
        if constexpr (kSums) {
          slice_sums[(k * a.steps + t) * 2] = dc_sum;
          slice_sums[(k * a.steps + t) * 2 + 1] = dh_sum;
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
  if constexpr (kSums) {
    for (int64_t i = 0; i < a.steps * 2; ++i) {
      T total = 0;
      for (int64_t k = 0; k < slices; ++k) total += slice_sums[k * a.steps * 2 + i];
      a.sum_squares[i] = total;
    }
  }
  return true;
}

}  // namespace

template <typename T>
bool forward_sequence(const ForwardSequenceArgs<T>& args) {
  return forward_sequence_impl(args);
}

template <typename T>
bool backward_sequence(const BackwardSequenceArgs<T>& args) {
  return args.sum_squares ? backward_sequence_impl<T, true>(args)
                          : backward_sequence_impl<T, false>(args);
}

template bool forward_sequence<float>(const ForwardSequenceArgs<float>&);
template bool forward_sequence<double>(const ForwardSequenceArgs<double>&);
template bool backward_sequence<float>(const BackwardSequenceArgs<float>&);
template bool backward_sequence<double>(const BackwardSequenceArgs<double>&);

}  // namespace cpu
}  // namespace lstm_fused
