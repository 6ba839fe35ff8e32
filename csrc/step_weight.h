// Products with a weight that is reused at every time step (W_hh, W_hr): direct BLAS calls
// and MKL's packed GEMM on the CPU, at:: ops elsewhere. Used by the layer driver (ops.cpp) and
// the CPU sequence kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/blas_symbols.h"
#include "cpu/library_gemm_cpu.h"
#include "cpu/small_gemm_cpu.h"
#include "lstm_steps.h"

namespace lstm_fused {

template <typename T>
struct Blas;
template <>
struct Blas<float> {
  static auto gemm() { return &sgemm_; }
};
template <>
struct Blas<double> {
  static auto gemm() { return &dgemm_; }
};

// Memory a StepWeight may spend on MKL's packed buffer: a quarter of the saved gates
// (gate_elements values of T) of the time loop it serves.
template <typename T>
int64_t pack_budget_bytes(int64_t gate_elements) {
  return gate_elements * static_cast<int64_t>(sizeof(T)) / 4;
}

// Who runs a StepWeight's CPU product: BLAS with the library's threads (the driver's step
// loop), or the calling thread alone (one slice of a sequence kernel's parallel region).
enum class StepThreads { kLibrary, kCallerOnly };

// The weight of one product per step (W_hh, W_hr): out (rows x n) [+]= a (rows x k) * op(W),
// op(W) = W^T when `transposed` (W: n x k) else W (W: k x n); out and a are row-major with row
// strides ldo/lda. Pointers, not tensor views: at the sizes of one step, creating views and
// going through the dispatcher costs as much as the product itself. On the CPU the product is
// a direct BLAS call, and in float32 with MKL, W is packed once per call into MKL's internal
// layout so the per-step GEMMs skip re-packing it (at batch 8 that packing was a third of the
// product's time). MKL's packed buffer is at least ~7.5 MiB whatever W's size, so W is packed
// only when that fits `pack_budget_bytes` (the driver allows a quarter of the saved gates:
// long sequences, where the buffer is noise in the peak memory). Steps with fewer rows
// (packed sequences) use the plain call. Where MKL lacks its AVX-512 kernels (AMD CPUs:
// cpu::gemm_library() is oneDNN) large weights take oneDNN's matmul instead, or our loop in a
// sequence kernel's slice. With a `device_gemm` (StepKernels::gemm: cuBLAS on
// CUDA) it is one call of it with raw pointers; else, off the CPU, at::addmm/at::mm.
template <typename T>
class StepWeight {
 public:
  StepWeight(const at::Tensor& weight, bool transposed, int64_t max_rows,
             int64_t pack_budget_bytes = 0, ColumnMajorGemm<T> device_gemm = nullptr,
             StepThreads threads = StepThreads::kLibrary)
      : weight_(weight), transposed_(transposed), max_rows_(max_rows), device_gemm_(device_gemm) {
    n_ = transposed ? weight.size(0) : weight.size(1);
    k_ = transposed ? weight.size(1) : weight.size(0);
    if (device_gemm_ != nullptr) {
      TORCH_INTERNAL_ASSERT(weight.dim() == 2 && weight.stride(1) == 1,
                            "StepWeight: the device GEMM needs a row-major weight");
      return;
    }
    constexpr int64_t kIntMax = std::numeric_limits<int>::max();
    blas_ = weight.device().is_cpu() && Blas<T>::gemm() != nullptr && max_rows <= kIntMax &&
            n_ <= kIntMax && k_ <= kIntMax && weight.stride(0) <= kIntMax &&
            weight.stride(1) == 1;
    // Where MKL runs only its AVX2 kernels (cpu::gemm_library() is oneDNN), a float32 slice
    // takes the loop at any size, and the step loop's larger weights take oneDNN.
    const bool without_mkl = std::is_same_v<T, float> && weight.device().is_cpu() &&
                             cpu::gemm_library() == cpu::GemmLibrary::kOneDnn;
    const int64_t small_limit =
        threads == StepThreads::kCallerOnly
            ? (without_mkl ? std::numeric_limits<int64_t>::max() : kSmallWeightElementsOneThread)
            : kSmallWeightElements;
    if (weight.device().is_cpu() && n_ * k_ <= small_limit && max_rows > 0) {
      // Small weights: our own register-blocked loop over op(W) packed into column panels.
      prepared_ = at::empty({cpu::SmallGemmShape<T>::packed_size(k_, n_)}, weight.options());
      const at::Tensor w = transposed ? weight.t() : weight;  // (k x n)
      cpu::pack_panels<T>(w.data_ptr<T>(), w.stride(0), w.stride(1), k_, n_,
                          prepared_.data_ptr<T>());
      return;
    }
    if (without_mkl) {
      onednn_ = true;
      return;
    }
    if constexpr (std::is_same_v<T, float>) {
      if (blas_ && cblas_sgemm_pack_get_size && cblas_sgemm_pack && cblas_sgemm_compute &&
          max_rows > 0 && n_ > 0 && k_ > 0) {
        const size_t bytes = cblas_sgemm_pack_get_size(kCblasBMatrix, max_rows, n_, k_);
        if (static_cast<int64_t>(bytes) > pack_budget_bytes) return;
        packed_ = at::empty({static_cast<int64_t>(bytes / sizeof(float)) + 16},
                            weight.options());
        cblas_sgemm_pack(kCblasRowMajor, kCblasBMatrix, transposed ? kCblasTrans : kCblasNoTrans,
                         static_cast<int>(max_rows), n_, k_, 1.0f, weight.data_ptr<float>(),
                         static_cast<int>(weight.stride(0)), packed_.data_ptr<float>());
      }
    }
  }

  void multiply(int64_t rows, T* out, int64_t ldo, const T* a, int64_t lda,
                bool accumulate) const {
    if (rows == 0 || n_ == 0) return;
    if (prepared_.defined()) {
      cpu::small_gemm<T>(rows, a, lda, prepared_.data_ptr<T>(), k_, n_, out, ldo, accumulate);
      return;
    }
    if constexpr (std::is_same_v<T, float>) {
      if (packed_.defined() && rows == max_rows_) {
        cblas_sgemm_compute(kCblasRowMajor, kCblasNoTrans, kCblasPacked, static_cast<int>(rows),
                            n_, k_, a, static_cast<int>(lda), packed_.data_ptr<float>(), n_,
                            accumulate ? 1.0f : 0.0f, out, static_cast<int>(ldo));
        return;
      }
    }
    // Row-major out = a op(W) is column-major out^T = op(W)^T a^T (BLAS's and cuBLAS's
    // convention): m = n_ columns of out, n = rows, W with leading dimension stride(0).
    const char trans_w = transposed_ ? 'T' : 'N', trans_a = 'N';
    const T alpha = 1, beta = accumulate ? 1 : 0;
    if (device_gemm_ != nullptr) {
      device_gemm_(trans_w, trans_a, n_, rows, k_, alpha, weight_.data_ptr<T>(),
                   weight_.stride(0), a, lda, beta, out, ldo);
      return;
    }
    if (blas_ && !onednn_) {
      const int m = n_, n = static_cast<int>(rows), k = k_;
      const int ldw = static_cast<int>(weight_.stride(0)), lda_ = static_cast<int>(lda),
                ldo_ = static_cast<int>(ldo);
      Blas<T>::gemm()(&trans_w, &trans_a, &m, &n, &k, &alpha, weight_.data_ptr<T>(), &ldw, a,
                      &lda_, &beta, out, &ldo_);
      return;
    }
    const auto options = weight_.options();
    at::Tensor out_view = at::from_blob(out, {rows, n_}, {ldo, 1}, options);
    const at::Tensor a_view = at::from_blob(const_cast<T*>(a), {rows, k_}, {lda, 1}, options);
    const at::Tensor rhs = transposed_ ? weight_.t() : weight_;
    dense_mm(out_view, a_view, rhs, accumulate);
  }

 private:
  at::Tensor weight_;
  bool transposed_;
  int64_t max_rows_;
  ColumnMajorGemm<T> device_gemm_;
  // Weights up to this many elements use cpu::small_gemm, larger ones BLAS. Where BLAS may
  // use the library's threads, up to 512 KiB in float32: beyond, its threads win over one
  // core's loop. Where the caller's thread multiplies alone (a sequence kernel's slice, BLAS
  // sequential), up to 2 MiB: at T50 B64 H512 (a slice's W_hh 1024 x 512) the loop took 1.05M
  // cycles per step against 1.19M for MKL's packed GEMM (model 167, 2026-12-02).
  static constexpr int64_t kSmallWeightElements = int64_t(1) << 17;
  static constexpr int64_t kSmallWeightElementsOneThread = int64_t(1) << 19;
  bool blas_ = false;
  bool onednn_ = false;  // views and dense_mm (oneDNN) instead of BLAS: large float32 weights
  int n_ = 0, k_ = 0;
  at::Tensor packed_;
  at::Tensor prepared_;  // op(W) in cpu::pack_panels's layout, for cpu::small_gemm
};

}  // namespace lstm_fused
