// GEMMs with 16-bit operands (bfloat16, float16) and an fp32 result, accumulated in fp32: the
// products of a layer whose input is 16-bit, where the device has them (the rule is
// gemm_operands_16bit in ops.cpp). On the CPU they are MKL's cblas_gemm_bf16bf16f32 and
// cblas_gemm_f16f16f32 from the running libtorch, which use AVX512_BF16 / AMX / AVX512_FP16
// where the CPU has them; the 16-bit values are read as they are (no fp32 copy of the weights
// or of the input), and the gates and the cell state stay fp32.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <atomic>
#include <cstdint>
#include <limits>

#include "cpu/bf16_product_cpu.h"
#include "cpu/blas_symbols.h"
#include "cpu/library_gemm_cpu.h"
#include "env_switch.h"
#include "lstm_steps.h"

namespace lstm_fused {

using MixedGemm = void (*)(int, int, int, int, int, int, float, const uint16_t*, int,
                           const uint16_t*, int, float, float*, int);

// The CPU's 16-bit GEMM for `dtype`, or null.
inline MixedGemm cpu_mixed_gemm(at::ScalarType dtype) {
  if (dtype == at::kBFloat16) return cblas_gemm_bf16bf16f32;
  if (dtype == at::kHalf) return cblas_gemm_f16f16f32;
  return nullptr;
}

// The bit format of a 16-bit dtype (bits16.h).
inline Bits16 bits16_of(at::ScalarType dtype) {
  TORCH_INTERNAL_ASSERT(dtype == at::kBFloat16 || dtype == at::kHalf,
                        "lstm_fused: not a 16-bit dtype: ", dtype);
  return dtype == at::kBFloat16 ? Bits16::kBFloat16 : Bits16::kFloat16;
}

inline const uint16_t* bits_of(const at::Tensor& t) {
  return static_cast<const uint16_t*>(t.const_data_ptr());
}

// Whether the CPU has bf16 dot-product instructions (AVX512_BF16 or AMX-BF16). Without them
// MKL's bf16 GEMM widens to fp32 inside, and the measured fp32 path is kept.
inline bool cpu_has_bf16_dot_products() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
  }();
  return has;
#else
  return false;
#endif
}

// The switch (on unless LSTM_FUSED_16BIT_GEMM says off; lstm_fused.set_16bit_gemm): off, a
// 16-bit layer computes every GEMM in fp32 on converted copies, as before.
inline std::atomic<bool>& gemm_16bit_state() {
  static std::atomic<bool> on{env_flag("LSTM_FUSED_16BIT_GEMM", true)};
  return on;
}

namespace mixed_detail {
// A 2-D operand as a row-major BLAS matrix: no-trans with ld = stride(0) when its rows are
// contiguous, trans of its transpose when its columns are.
struct Operand {
  int trans;
  int64_t ld;
};

inline bool as_operand(const at::Tensor& t, Operand* op) {
  const int64_t rows = t.size(0), cols = t.size(1);
  if (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, cols)) {
    *op = {kCblasNoTrans, t.stride(0)};
    return true;
  }
  if (t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(1, rows)) {
    *op = {kCblasTrans, t.stride(1)};
    return true;
  }
  return false;
}
}  // namespace mixed_detail

// out (fp32, m x n) = a (m x k) b (k x n), + out when accumulate; a and b 2-D of the same
// 16-bit dtype, any layout. With a `device_gemm` (StepKernels::gemm_16bit) one call of it;
// else on the CPU with MKL one call of its 16-bit GEMM, else (other devices, other layouts)
// the product of fp32 copies.
inline void mixed_mm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                     MixedColumnMajorGemm device_gemm = nullptr) {
  TORCH_INTERNAL_ASSERT(out.scalar_type() == at::kFloat && a.scalar_type() == b.scalar_type());
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate) out.zero_();
    return;
  }
  mixed_detail::Operand op_a, op_b;
  if (device_gemm != nullptr) {
    TORCH_INTERNAL_ASSERT(out.stride(1) == 1 && out.stride(0) >= n,
                          "mixed_mm: the device GEMM needs a row-major result");
    // an operand as it is where its rows or its columns are contiguous, else a contiguous copy
    const auto matrix = [](const at::Tensor& t, mixed_detail::Operand* op) {
      if (mixed_detail::as_operand(t, op)) return t;
      const at::Tensor copy = t.contiguous();
      mixed_detail::as_operand(copy, op);
      return copy;
    };
    const at::Tensor a_matrix = matrix(a, &op_a), b_matrix = matrix(b, &op_b);
    // Row-major out = a b is column-major out^T = b^T a^T, and a row-major operand's
    // transpose flag is its column-major transpose's.
    device_gemm(bits16_of(a.scalar_type()), op_b.trans == kCblasTrans ? 'T' : 'N',
                op_a.trans == kCblasTrans ? 'T' : 'N', n, m, k, 1.0f, bits_of(b_matrix), op_b.ld,
                bits_of(a_matrix), op_a.ld, accumulate ? 1.0f : 0.0f, out.data_ptr<float>(),
                out.stride(0));
    return;
  }
  // Where MKL lacks the CPU's AVX-512 kernels (cpu::gemm_library(): AMD) its bf16 GEMM
  // widens to fp32 at its AVX2 rate, a quarter of the CPU's bf16 dot products: there bfloat16
  // takes cpu::bf16_mm, on the sequence kernels' product.
  if (a.device().is_cpu() && a.scalar_type() == at::kBFloat16 && out.stride(1) == 1 &&
      cpu::gemm_library() == cpu::GemmLibrary::kOneDnn) {
    const cpu::Bf16Product kind = cpu::bf16_product_kind();
    if (kind != cpu::Bf16Product::kNone) {
      cpu::bf16_mm(m, n, k, bits_of(a), a.stride(0), a.stride(1), bits_of(b), b.stride(0),
                   b.stride(1), out.data_ptr<float>(), out.stride(0), accumulate, kind);
      return;
    }
  }
  const MixedGemm gemm = a.device().is_cpu() ? cpu_mixed_gemm(a.scalar_type()) : nullptr;
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  if (gemm != nullptr && out.stride(1) == 1 && out.stride(0) >= n && out.stride(0) <= kIntMax &&
      m <= kIntMax && n <= kIntMax && k <= kIntMax && mixed_detail::as_operand(a, &op_a) &&
      mixed_detail::as_operand(b, &op_b) && op_a.ld <= kIntMax && op_b.ld <= kIntMax) {
    gemm(kCblasRowMajor, op_a.trans, op_b.trans, static_cast<int>(m), static_cast<int>(n),
         static_cast<int>(k), 1.0f, static_cast<const uint16_t*>(a.const_data_ptr()), static_cast<int>(op_a.ld),
         static_cast<const uint16_t*>(b.const_data_ptr()), static_cast<int>(op_b.ld),
         accumulate ? 1.0f : 0.0f, out.data_ptr<float>(), static_cast<int>(out.stride(0)));
    return;
  }
  if (accumulate) {
    out.addmm_(a.to(at::kFloat), b.to(at::kFloat));
  } else {
    at::mm_out(out, a.to(at::kFloat), b.to(at::kFloat));
  }
}

// The per-step product of the recurrence in the 16-bit GEMM mode (StepWeight's twin):
// out (rows x n, fp32, row stride ldo) [+]= a (rows x k, 16-bit, row stride lda) * op(W),
// op(W) = W^T when `transposed` (W: n x k) else W (k x n). Raw pointers: one call per step
// (the device's StepKernels::gemm_16bit, else MKL's), no tensor views (see StepWeight).
class MixedStepWeight {
 public:
  MixedStepWeight(const at::Tensor& weight, bool transposed,
                  MixedColumnMajorGemm device_gemm = nullptr)
      : weight_(weight.contiguous()), transposed_(transposed), device_gemm_(device_gemm),
        gemm_(device_gemm != nullptr ? nullptr : cpu_mixed_gemm(weight.scalar_type())) {
    TORCH_INTERNAL_ASSERT(
        (device_gemm_ != nullptr || (gemm_ != nullptr && weight_.device().is_cpu())) &&
            weight_.dim() == 2,
        "MixedStepWeight: no 16-bit GEMM for ", weight.scalar_type(), " on ", weight.device());
    format_ = bits16_of(weight_.scalar_type());
    n_ = transposed ? weight_.size(0) : weight_.size(1);
    k_ = transposed ? weight_.size(1) : weight_.size(0);
  }

  void multiply(int64_t rows, float* out, int64_t ldo, const void* a, int64_t lda,
                bool accumulate) const {
    if (rows == 0 || n_ == 0) return;
    if (device_gemm_ != nullptr) {
      // column-major out^T = op(W)^T a^T, as StepWeight's device call
      device_gemm_(format_, transposed_ ? 'T' : 'N', 'N', n_, rows, k_, 1.0f, bits_of(weight_),
                   weight_.stride(0), static_cast<const uint16_t*>(a), lda,
                   accumulate ? 1.0f : 0.0f, out, ldo);
      return;
    }
    gemm_(kCblasRowMajor, kCblasNoTrans, transposed_ ? kCblasTrans : kCblasNoTrans,
          static_cast<int>(rows), static_cast<int>(n_), static_cast<int>(k_), 1.0f,
          static_cast<const uint16_t*>(a),
          static_cast<int>(lda), static_cast<const uint16_t*>(weight_.const_data_ptr()),
          static_cast<int>(weight_.stride(0)), accumulate ? 1.0f : 0.0f, out,
          static_cast<int>(ldo));
  }

 private:
  at::Tensor weight_;
  bool transposed_;
  MixedColumnMajorGemm device_gemm_;
  MixedGemm gemm_;
  Bits16 format_;
  int64_t n_ = 0, k_ = 0;
};

// dst[r, :cols] = src[r, :cols] rounded to the 16-bit `dtype` (row strides ldd, lds), for
// r < rows, on the CPU: the 16-bit operand of the next product (h[t], dG[t]).
inline void round_rows(at::ScalarType dtype, void* dst, int64_t ldd, const float* src,
                       int64_t lds, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    if (dtype == at::kBFloat16) {
      at::vec::convert(src + r * lds, static_cast<c10::BFloat16*>(dst) + r * ldd, cols);
    } else {
      TORCH_INTERNAL_ASSERT(dtype == at::kHalf);
      at::vec::convert(src + r * lds, static_cast<c10::Half*>(dst) + r * ldd, cols);
    }
  }
}

}  // namespace lstm_fused
