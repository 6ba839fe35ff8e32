// CPU step kernels: loops over the row kernels of lstm_rows_cpu.h, parallel over batch rows
// with at::parallel_for. Reductions (sum of squares for gradient-flow telemetry and norm
// clipping) are summed per row by one thread and then over rows in order, so results do not
// depend on the thread count.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <cmath>
#include <vector>

#include "../mixed_gemm.h"
#include "flush_denormals.h"
#include "lstm_rows_cpu.h"

namespace lstm_fused {
namespace cpu {
namespace {

// Rows per task: enough elements that a thread's share outweighs waking it.
inline int64_t row_grain(int64_t elements_per_row) {
  constexpr int64_t kElementsPerTask = 16384;
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, elements_per_row));
}

// Sum of per-row partial sums in row order (deterministic), then optional norm rescaling.
template <typename T>
T total(const std::vector<T>& row_sums) {
  T sum = 0;
  for (T value : row_sums) sum += value;
  return sum;
}

template <typename T>
T norm_clip_scale(T sum_squares, T clip) {
  const T norm = std::sqrt(sum_squares);
  return norm > clip ? clip / norm : T(1);
}

// The 16-bit mode's copy (ForwardStepArgs::hidden_16bit, BackwardStepArgs::dgates_16bit) of
// rows [begin, end) of src (row width and stride `width`); the mode is float's only.
template <typename T>
void round_rows_16bit(Bits16 format, uint16_t* dst, const T* src, int64_t width, int64_t begin,
                      int64_t end) {
  if constexpr (std::is_same_v<T, float>) {
    round_rows(format == Bits16::kBFloat16 ? at::kBFloat16 : at::kHalf, dst + begin * width,
               width, src + begin * width, width, end - begin, width);
  } else {
    TORCH_INTERNAL_ASSERT(false, "lstm_fused: 16-bit GEMMs accumulate in float32");
  }
}

template <typename T>
void forward_step_impl(const ForwardStepArgs<T>& args) {
  const int64_t H = args.hidden;
  // a hidden unit's forward is five transcendental functions: about 16 element-wise values'
  // work (at B32 H128 one thread took ~11 us per step, two ~6)
  parallel_for(0, args.rows, row_grain(16 * H), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* const output = args.output ? args.output + r * args.output_stride : nullptr;
      if (args.cells != nullptr) {
        forward_row<T>(args.gates + r * 4 * H, H, nullptr, nullptr, 0, args.cell_state + r * H,
                       args.cells + r * H, args.hidden_state + r * H, output, 0, H);
      } else {  // inference: nothing kept for a backward
        forward_row<T, true, false>(args.gates + r * 4 * H, H, nullptr, nullptr, 0,
                                    args.cell_state + r * H, nullptr, args.hidden_state + r * H,
                                    output, 0, H);
      }
      if (args.hidden_16bit != nullptr) {
        round_rows_16bit(args.format_16bit, args.hidden_16bit, args.hidden_state, H, r, r + 1);
      }
    }
  });
}

template <typename T, int64_t kClip, bool kSumSquares>
void hidden_grad_impl(const HiddenGradStepArgs<T>& args) {
  const int64_t P = args.size;
  constexpr bool kRowSums = kSumSquares || kClip == kClipNorm;
  std::vector<T> row_sums(kRowSums ? args.rows : 0);
  parallel_for(0, args.rows, row_grain(P), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* grad_output =
          args.grad_output ? args.grad_output + r * args.grad_output_stride : nullptr;
      const T row_sum = hidden_grad_row<T, kClip, kRowSums>(args.dhidden + r * P, grad_output,
                                                            args.clip, 0, P);
      if constexpr (kRowSums) row_sums[r] = row_sum;
    }
  });
  if constexpr (!kRowSums) return;
  T sum_squares = total(row_sums);
  if constexpr (kClip == kClipNorm) {
    const T scale = norm_clip_scale(sum_squares, args.clip);
    if (scale != T(1)) {
      const int64_t count = args.rows * P;
      parallel_for(0, count, 16384, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) args.dhidden[k] *= scale;
      });
      sum_squares *= scale * scale;
    }
  }
  if (kSumSquares && args.sum_squares) *args.sum_squares = sum_squares;
}

// Row r of a backward step.
template <typename T, int64_t kClip, bool kFirstPass, bool kSums>
T backward_step_row(const BackwardStepArgs<T>& args, int64_t r, T scale) {
  const int64_t H = args.hidden;
  const T* cell_prev =
      r < args.prev_split ? args.cells_prev + r * H : args.cell_initial + r * H;
  const T* grad_output = args.fold_hidden_grad && args.grad_output
                            ? args.grad_output + r * args.grad_output_stride
                            : nullptr;
  return backward_row<T, kClip, kFirstPass, kSums>(
      args.gates + r * 4 * H, H, args.cells + r * H, cell_prev, args.grad_r + r * H,
      args.dcell + r * H, args.dgates + r * 4 * H, args.clip, scale, 0, H,
      args.fold_hidden_grad, grad_output);
}

template <typename T, int64_t kClip, bool kSumSquares>
void backward_impl(const BackwardStepArgs<T>& args) {
  // a unit's backward: one tanh and about twenty products, some 8 values' work
  const int64_t grain = row_grain(8 * args.hidden);
  std::vector<T> row_sums(args.rows);
  T scale = 1;
  if constexpr (kClip == kClipNorm) {
    parallel_for(0, args.rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        row_sums[r] = backward_step_row<T, kClip, true, true>(args, r, T(1));
    });
    scale = norm_clip_scale(total(row_sums), args.clip);
  }
  parallel_for(0, args.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      row_sums[r] = backward_step_row<T, kClip, false, kSumSquares>(args, r, scale);
  });
  if (kSumSquares && args.sum_squares) *args.sum_squares = total(row_sums);
}

// The forward step with cell variants: rows in parallel, each row by forward_row_variants.
template <typename T, unsigned kVariants>
void forward_variants_impl(const ForwardStepArgs<T>& args) {
  const int64_t H = args.hidden;
  const StepVariants<T>& v = args.variant;
  // layer norm sweeps a row about six times (its statistics): more work per row
  const int64_t grain = row_grain(((kVariants & kCellLayerNorm) != 0 ? 24 : 4) * H);
  at::parallel_for(0, args.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      auto row_of = [&](const T* base, int64_t width) {
        return base ? base + r * width : nullptr;
      };
      forward_row_variants<T, kVariants>(
          args.gates + r * 4 * H, H, row_of(args.projection, 4 * H),
          row_of(args.recurrent, 4 * H), args.cell_state + r * H,
          args.cells + r * H, args.hidden_state + r * H,
          args.output ? args.output + r * args.output_stride : nullptr,
          args.hidden_masked ? args.hidden_masked + r * H : nullptr, v,
          row_of(v.zoneout_cell_mask, H), row_of(v.zoneout_hidden_mask, H),
          row_of(v.dropout_mask, H));
    }
  });
}

// Runtime variant bits -> the template flag (all 16 combinations).
template <template <unsigned> class Impl, typename Args>
void dispatch_variants(unsigned variants, const Args& args) {
  switch (variants & 15u) {
    case 0: return Impl<0>::run(args);
    case 1: return Impl<1>::run(args);
    case 2: return Impl<2>::run(args);
    case 3: return Impl<3>::run(args);
    case 4: return Impl<4>::run(args);
    case 5: return Impl<5>::run(args);
    case 6: return Impl<6>::run(args);
    case 7: return Impl<7>::run(args);
    case 8: return Impl<8>::run(args);
    case 9: return Impl<9>::run(args);
    case 10: return Impl<10>::run(args);
    case 11: return Impl<11>::run(args);
    case 12: return Impl<12>::run(args);
    case 13: return Impl<13>::run(args);
    case 14: return Impl<14>::run(args);
    default: return Impl<15>::run(args);
  }
}

template <typename T>
struct ForwardVariants {
  template <unsigned kVariants>
  struct Impl {
    static void run(const ForwardStepArgs<T>& args) {
      if constexpr (kVariants == kCellPlain) {
        forward_step_impl(args);
      } else {
        forward_variants_impl<T, kVariants>(args);
      }
    }
  };
};

// The backward step with cell variants: backward_front then backward_back per row; with
// norm clipping all rows' fronts first, for the step's scale.
template <typename T, int64_t kClip, bool kSumSquares, unsigned kVariants>
void backward_variants_impl(const BackwardStepArgs<T>& args) {
  const int64_t H = args.hidden;
  const StepVariants<T>& v = args.variant;
  const int64_t grain = row_grain(((kVariants & kCellLayerNorm) != 0 ? 48 : 8) * H);
  std::vector<T> row_sums(args.rows);
  auto front = [&](int64_t r) {
    auto row_of = [&](auto* base, int64_t width) { return base ? base + r * width : nullptr; };
    const T* cell_prev =
        r < args.prev_split ? args.cells_prev + r * H : args.cell_initial + r * H;
    return backward_front<T, kVariants>(
        args.gates + r * 4 * H, H, args.cells + r * H, cell_prev, args.grad_r + r * H,
        args.dcell + r * H, args.dgates + r * 4 * H, v, row_of(v.zoneout_cell_mask, H),
        row_of(v.zoneout_hidden_mask, H), row_of(args.ln_grad_rows, kLayerNormGradWidth * H));
  };
  auto back = [&](int64_t r, T scale) {
    const T* cell_prev =
        r < args.prev_split ? args.cells_prev + r * H : args.cell_initial + r * H;
    return backward_back<T, kClip, kSumSquares, kVariants>(
        args.gates + r * 4 * H, H, cell_prev, args.dcell + r * H, args.dgates + r * 4 * H,
        args.clip, scale, v, args.projection ? args.projection + r * 4 * H : nullptr,
        args.recurrent ? args.recurrent + r * 4 * H : nullptr,
        args.grad_recurrent ? args.grad_recurrent + r * 4 * H : nullptr,
        args.ln_grad_rows ? args.ln_grad_rows + r * kLayerNormGradWidth * H : nullptr);
  };
  T scale = 1;
  if constexpr (kClip == kClipNorm) {
    at::parallel_for(0, args.rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) row_sums[r] = front(r);
    });
    scale = norm_clip_scale(total(row_sums), args.clip);
  }
  at::parallel_for(0, args.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if constexpr (kClip != kClipNorm) front(r);
      row_sums[r] = back(r, scale);
    }
  });
  if constexpr ((kVariants & kCellLayerNorm) != 0) {
    // columns in parallel, each column's rows in order
    const int64_t width = kLayerNormGradWidth * H;
    const int64_t lanes = Vectorized<T>::size();
    at::parallel_for(0, (width + lanes - 1) / lanes, std::max<int64_t>(1, 4096 / args.rows),
                     [&](int64_t begin, int64_t end) {
      const int64_t first = begin * lanes, last = std::min(width, end * lanes);
      add_rows_in_order(args.ln_grad_rows + first, args.rows, width, args.ln_grad_sums + first,
                        last - first);
    });
  }
  if (kSumSquares && args.sum_squares) *args.sum_squares = total(row_sums);
}

// The recurrent part of dL/dh[t-1] (RecurrentGradStepArgs): element-wise, rows in parallel.
template <typename T>
void recurrent_grad_step(const RecurrentGradStepArgs<T>& args) {
  const int64_t P = args.size;
  at::parallel_for(0, args.rows, row_grain(P), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* recurrent = args.recurrent + r * P;
      const T* dropout = args.dropout_mask ? args.dropout_mask + r * P : nullptr;
      const T* zone = args.zoneout_mask ? args.zoneout_mask + r * P : nullptr;
      T* dhidden = args.dhidden + r * P;
      for_each_lane<T>(0, P, [&](auto lane, int64_t j) {
        using V = typename decltype(lane)::type;
        using L = Lanes<V, T>;
        V value = L::load(recurrent + j);
        if (dropout) value = value * L::load(dropout + j);
        if (args.zoneout) {
          value = value + zoneout_keep<V>(zone, args.zoneout_hidden, j) * L::load(dhidden + j);
        }
        L::store(value, dhidden + j);
      });
    }
  });
}

// Runtime clip mode / telemetry flag -> compile-time template arguments.
template <typename T, template <typename, int64_t, bool> class Impl, typename Args>
void dispatch_flags(const Args& args) {
  const bool sums = args.sum_squares != nullptr;
  switch (args.clip_mode) {
    case kClipValue:
      return sums ? Impl<T, kClipValue, true>::run(args) : Impl<T, kClipValue, false>::run(args);
    case kClipNorm:
      return sums ? Impl<T, kClipNorm, true>::run(args) : Impl<T, kClipNorm, false>::run(args);
    default:
      return sums ? Impl<T, kClipOff, true>::run(args) : Impl<T, kClipOff, false>::run(args);
  }
}

template <typename T, int64_t kClip, bool kSumSquares>
struct HiddenGrad {
  static void run(const HiddenGradStepArgs<T>& args) {
    hidden_grad_impl<T, kClip, kSumSquares>(args);
  }
};

template <typename T, int64_t kClip, bool kSumSquares>
struct Backward {
  template <unsigned kVariants>
  struct Impl {
    static void run(const BackwardStepArgs<T>& args) {
      if constexpr (kVariants == kCellPlain) {
        backward_impl<T, kClip, kSumSquares>(args);
      } else {
        backward_variants_impl<T, kClip, kSumSquares, kVariants>(args);
      }
    }
  };
  static void run(const BackwardStepArgs<T>& args) {
    // kCellMaskedHidden plays no part in the backward step
    const unsigned variants = args.variant.variants & ~unsigned(kCellMaskedHidden);
    TORCH_INTERNAL_ASSERT(!args.fold_hidden_grad || (variants == kCellPlain && kClip != kClipNorm),
                          "lstm_fused: the hidden-gradient step folded in where it cannot be");
    if (variants == kCellPlain) return backward_impl<T, kClip, kSumSquares>(args);
    dispatch_variants<Impl>(variants, args);
  }
};

template <typename T>
void forward_step(const ForwardStepArgs<T>& args) {
  if (args.variant.variants == kCellPlain) return forward_step_impl(args);
  dispatch_variants<ForwardVariants<T>::template Impl>(args.variant.variants, args);
}

template <typename T>
void hidden_grad_step(const HiddenGradStepArgs<T>& args) {
  dispatch_flags<T, HiddenGrad>(args);
}

template <typename T>
void backward_step(const BackwardStepArgs<T>& args) {
  dispatch_flags<T, Backward>(args);
  // (after the step: norm clipping rescales dG at its end)
  if (args.dgates_16bit != nullptr) {
    round_rows_16bit(args.format_16bit, args.dgates_16bit, args.dgates, 4 * args.hidden, 0,
                     args.rows);
  }
}

// ---- The device's raw-pointer calls, replayed on the CPU (tests) ---------------------------
// With the switch on (lstm_fused::set_cpu_device_call_replay), the CPU op runs the driver's
// time loop the way it runs on CUDA: the per-step products through StepKernels::gemm in
// cuBLAS's column-major convention and the row copies through StepKernels::copy_rows, each
// here a plain reference loop with cuBLAS's / cudaMemcpy2D's argument rules, so that a wrong
// pointer, leading dimension, transpose or offset shows as a wrong result (and under
// ./dev sanitize as an out-of-bounds access). The 16-bit GEMM mode's products
// (StepKernels::gemm_16bit: cuBLAS on tensor cores on CUDA) are replayed too, for bfloat16
// and float16. The sequence kernels are off then.
std::atomic<bool> replay_on{false};
std::atomic<int64_t> replayed_gemms{0};
std::atomic<int64_t> replayed_copies{0};
std::atomic<int64_t> replayed_gemms_16bit{0};  // StepKernels::gemm_16bit

// cuBLAS's CUBLAS_STATUS_INVALID_VALUE conditions on a column-major GEMM's arguments.
void check_replayed_gemm(char transa, char transb, int64_t m, int64_t n, int64_t k, int64_t lda,
                         int64_t ldb, int64_t ldc) {
  TORCH_CHECK((transa == 'N' || transa == 'T') && (transb == 'N' || transb == 'T'),
              "replayed gemm: transpose flags must be N or T, got ", transa, transb);
  TORCH_CHECK(m >= 0 && n >= 0 && k >= 0, "replayed gemm: negative size");
  TORCH_CHECK(lda >= std::max<int64_t>(1, transa == 'N' ? m : k) &&
                  ldb >= std::max<int64_t>(1, transb == 'N' ? k : n) &&
                  ldc >= std::max<int64_t>(1, m),
              "replayed gemm: a leading dimension is too small (m=", m, " n=", n, " k=", k,
              " lda=", lda, " ldb=", ldb, " ldc=", ldc, ")");
}

// C = alpha op(A) op(B) + beta C in cuBLAS's column-major convention, each element of A and B
// read through `load` and the products summed in Acc (C unread when beta is 0).
template <typename Acc, typename In, typename Load>
void reference_product(char transa, char transb, int64_t m, int64_t n, int64_t k, Acc alpha,
                       const In* a, int64_t lda, const In* b, int64_t ldb, Acc beta, Acc* c,
                       int64_t ldc, const Load& load) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      Acc sum = 0;
      for (int64_t l = 0; l < k; ++l) {
        const Acc a_il = load(transa == 'N' ? a[i + l * lda] : a[l + i * lda]);
        const Acc b_lj = load(transb == 'N' ? b[l + j * ldb] : b[j + l * ldb]);
        sum += a_il * b_lj;
      }
      Acc& out = c[i + j * ldc];
      out = alpha * sum + (beta == Acc(0) ? Acc(0) : beta * out);
    }
  }
}

template <typename T>
void reference_gemm(char transa, char transb, int64_t m, int64_t n, int64_t k, T alpha,
                    const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                    int64_t ldc) {
  check_replayed_gemm(transa, transb, m, n, k, lda, ldb, ldc);
  replayed_gemms.fetch_add(1, std::memory_order_relaxed);
  reference_product<T>(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc,
                       [](T value) { return value; });
}

// The 16-bit mode's product (cublasGemmEx with 16-bit A, B, float32 C, CUBLAS_COMPUTE_32F):
// the 16-bit values decoded by c10 (exactly), summed in float32.
void reference_gemm_16bit(Bits16 format, char transa, char transb, int64_t m, int64_t n,
                          int64_t k, float alpha, const uint16_t* a, int64_t lda,
                          const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  check_replayed_gemm(transa, transb, m, n, k, lda, ldb, ldc);
  replayed_gemms_16bit.fetch_add(1, std::memory_order_relaxed);
  if (format == Bits16::kBFloat16) {
    reference_product<float>(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc,
                             [](uint16_t bits) {
                               return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
                             });
  } else {
    reference_product<float>(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc,
                             [](uint16_t bits) {
                               return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
                             });
  }
}

template <typename T>
void reference_copy_rows(T* dst, int64_t ldd, const T* src, int64_t lds, int64_t rows,
                         int64_t cols) {
  // cudaMemcpy2D: the pitches must hold a row
  TORCH_CHECK(rows >= 0 && cols >= 0 && ldd >= cols && lds >= cols,
              "replayed copy: pitch smaller than the width (ldd=", ldd, " lds=", lds,
              " cols=", cols, ")");
  replayed_copies.fetch_add(1, std::memory_order_relaxed);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * ldd, src + r * lds, cols * sizeof(T));
}

// An inference call's input projection in the step loop, a chunk at a time: about a core's
// L2, so that a chunk is read back from cache by its steps, and a few GEMM calls per sequence.
constexpr int64_t kInferenceChunkBytes = int64_t(1) << 20;

template <typename T>
StepKernels<T> step_kernels(bool replay) {
  StepKernels<T> k;
  k.forward = &forward_step<T>;
  k.hidden_grad = &hidden_grad_step<T>;
  k.backward = &backward_step<T>;
  k.recurrent_grad = &recurrent_grad_step<T>;
  if (replay) {
    k.gemm = &reference_gemm<T>;
    k.copy_rows = &reference_copy_rows<T>;
    if constexpr (std::is_same_v<T, float>) {
      k.gemm_16bit = &reference_gemm_16bit;
    }
  } else {
    k.forward_sequence = &forward_sequence<T>;
    k.backward_sequence = &backward_sequence<T>;
    k.backward_sequence_flow = true;
    // (the replay stands in for CUDA's kernels, which write c[t] always)
    k.forward_unsaved = true;
    k.inference_chunk_bytes = kInferenceChunkBytes;
    k.forward_sequence_output_16bit = true;
  }
  return k;
}

}  // namespace

const DeviceKernels& kernels() {
  static const DeviceKernels table{step_kernels<float>(false), step_kernels<double>(false)};
  static const DeviceKernels replay{step_kernels<float>(true), step_kernels<double>(true)};
  return replay_on.load(std::memory_order_relaxed) ? replay : table;
}

}  // namespace cpu

TORCH_LIBRARY_FRAGMENT(lstm_fused, m) {
  m.def("set_cpu_device_call_replay(bool enabled) -> bool",
        [](bool enabled) { return cpu::replay_on.exchange(enabled); });
  m.def("cpu_device_call_replay_counts() -> int[]", []() {
    return std::vector<int64_t>{cpu::replayed_gemms.load(), cpu::replayed_copies.load(),
                                cpu::replayed_gemms_16bit.load()};
  });
}

}  // namespace lstm_fused
