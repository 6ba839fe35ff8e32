// A register-blocked product for the small per-step GEMMs of the recurrence on the CPU:
// out (rows x n) [+]= a (rows x k) * wt, with wt (k x n_pad) prepared once per call (n padded
// to whole SIMD vectors with zeros). At the sizes of one step (a few rows, a weight that fits
// in the core's cache) BLAS spends more time re-packing the weight and dispatching than
// multiplying; this loop reads the prepared weight straight from cache, 4 rows x 4 vectors of
// accumulators at a time with AVX-512 (4 x 2 with AVX2), without spilling registers.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace lstm_fused {
namespace cpu {

template <typename T, int64_t kRows, int64_t kVectors>
inline void small_gemm_block(const T* a, int64_t lda, const T* wt, int64_t k, int64_t n_pad,
                             int64_t n, int64_t column, T* out, int64_t ldo, bool accumulate) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t width = Vec::size();
  Vec sums[kRows][kVectors];
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t v = 0; v < kVectors; ++v) sums[r][v] = Vec(T(0));
  for (int64_t kk = 0; kk < k; ++kk) {
    Vec w[kVectors];
    for (int64_t v = 0; v < kVectors; ++v) w[v] = Vec::loadu(wt + kk * n_pad + column + v * width);
    for (int64_t r = 0; r < kRows; ++r) {
      const Vec a_value(a[r * lda + kk]);
      for (int64_t v = 0; v < kVectors; ++v) sums[r][v] = at::vec::fmadd(a_value, w[v], sums[r][v]);
    }
  }
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t v = 0; v < kVectors; ++v) {
      const int64_t begin = column + v * width;
      const int64_t count = std::min(width, n - begin);
      if (count <= 0) break;
      T* target = out + r * ldo + begin;
      Vec value = sums[r][v];
      if (accumulate) value = value + Vec::loadu(target, count);
      value.store(target, count);
    }
  }
}

// Column blocks outer, rows inner: a column block of W (k x 4 vectors, 32 KiB at k=128 in
// float32) stays in L1 while every row reuses it, so W streams from L2 once per call.
template <typename T, int64_t kVectors>
inline void small_gemm_columns(int64_t rows, const T* a, int64_t lda, const T* wt, int64_t k,
                               int64_t n_pad, int64_t n, int64_t column, T* out, int64_t ldo,
                               bool accumulate) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    small_gemm_block<T, 4, kVectors>(a + r * lda, lda, wt, k, n_pad, n, column, out + r * ldo,
                                     ldo, accumulate);
  }
  for (; r < rows; ++r) {
    small_gemm_block<T, 1, kVectors>(a + r * lda, lda, wt, k, n_pad, n, column, out + r * ldo,
                                     ldo, accumulate);
  }
}

template <typename T>
inline void small_gemm(int64_t rows, const T* a, int64_t lda, const T* wt, int64_t k,
                       int64_t n_pad, int64_t n, T* out, int64_t ldo, bool accumulate) {
  constexpr int64_t width = at::vec::Vectorized<T>::size();
  // Vectors per column block: 4 rows x 4 vectors = 16 accumulators (+ 4 + 1) fit the 32
  // registers of AVX-512; AVX2 has 16, so 4 x 2 there.
  constexpr int64_t kBlock = sizeof(at::vec::Vectorized<T>) >= 64 ? 4 : 2;
  int64_t column = 0;
  for (; column + kBlock * width <= n_pad; column += kBlock * width)
    small_gemm_columns<T, kBlock>(rows, a, lda, wt, k, n_pad, n, column, out, ldo, accumulate);
  for (; column < n_pad; column += width)
    small_gemm_columns<T, 1>(rows, a, lda, wt, k, n_pad, n, column, out, ldo, accumulate);
}

}  // namespace cpu
}  // namespace lstm_fused
