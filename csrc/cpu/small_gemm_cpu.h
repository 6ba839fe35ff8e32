// A register-blocked product for the small per-step GEMMs of the recurrence on the CPU:
// out (rows x n) [+]= a (rows x k) * w, with w (k x n) packed once per call into column
// panels (pack_panels). At the sizes of one step (a few rows, a weight that fits in the core's
// cache) BLAS spends more time re-packing the weight and dispatching than multiplying; this
// loop reads the packed weight straight from cache, kRows rows x kPanelVectors vectors of
// accumulators at a time, without spilling registers.
//
// Panels: columns [p P, (p+1) P) of w (P = kPanelVectors SIMD vectors; the last panel holds
// what is left, padded with zeros to whole vectors) as k rows of P contiguous values. A panel is
// one contiguous block that the rows of a step reuse from L1: in the (k x n) layout its rows sat
// n values apart, which at n = 256 mapped a 32 KiB panel onto a quarter of L1's sets, and each
// row block re-read it from L2 (32 x 128 x 256: 135 -> 180-190 GFLOP/s on one core).
//
// Every output value is the same sum in the same order (k ascending, one FMA per term) whatever
// the blocking: the rows of a step get the same bits however they are split.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace lstm_fused {
namespace cpu {

template <typename T>
struct SmallGemmShape {
  using Vec = at::vec::Vectorized<T>;
  static constexpr int64_t kWidth = Vec::size();
  // AVX-512 (32 registers): 8 rows x 3 vectors = 24 accumulators + 3 panel values + a
  // broadcast; AVX2 (16): 4 x 3 = 12 + 3 + 1 (one core of model 167, 32 x 128 x 256 in
  // float32: AVX-512 8 x 3 180 GFLOP/s, 6 x 4 198, 4 x 4 168; AVX2 4 x 3 113, 4 x 2 108,
  // 6 x 2 77, where gcc spills).
  static constexpr bool kWide = sizeof(Vec) >= 64;
  static constexpr int64_t kRows = kWide ? 8 : 4;
  static constexpr int64_t kPanelVectors = 3;
  static constexpr int64_t kPanel = kPanelVectors * kWidth;

  // Values of the packed weight for n columns and depth k.
  static int64_t packed_size(int64_t k, int64_t n) { return k * padded_columns(n); }
  static int64_t padded_columns(int64_t n) { return (n + kWidth - 1) / kWidth * kWidth; }
};

// Packs w (k x n; element (d, c) at w[d * row_stride + c * column_stride]) into the panels
// of `packed` (SmallGemmShape<T>::packed_size(k, n) values).
template <typename T>
inline void pack_panels(const T* w, int64_t row_stride, int64_t column_stride, int64_t k,
                        int64_t n, T* packed) {
  using Shape = SmallGemmShape<T>;
  const int64_t n_pad = Shape::padded_columns(n);
  for (int64_t column = 0; column < n_pad; column += Shape::kPanel) {
    const int64_t panel = std::min(Shape::kPanel, n_pad - column);
    T* target = packed + column * k;
    if (row_stride == 1) {  // w's columns are contiguous (W^T of a row-major W): read along them
      for (int64_t c = 0; c < panel; ++c) {
        const T* source = w + (column + c) * column_stride;
        const bool real = column + c < n;
        for (int64_t d = 0; d < k; ++d) target[d * panel + c] = real ? source[d] : T(0);
      }
      continue;
    }
    for (int64_t d = 0; d < k; ++d) {
      for (int64_t c = 0; c < panel; ++c) {
        target[d * panel + c] =
            column + c < n ? w[d * row_stride + (column + c) * column_stride] : T(0);
      }
    }
  }
}

// kRows rows of out, the kVectors vectors of one panel starting at out column `column`.
template <typename T, int64_t kRows, int64_t kVectors>
inline void small_gemm_block(const T* a, int64_t lda, const T* panel, int64_t k, int64_t n,
                             int64_t column, T* out, int64_t ldo, bool accumulate) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t width = Vec::size(), stride = kVectors * width;
  Vec sums[kRows][kVectors];
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t v = 0; v < kVectors; ++v) sums[r][v] = Vec(T(0));
  for (int64_t kk = 0; kk < k; ++kk) {
    Vec w[kVectors];
    for (int64_t v = 0; v < kVectors; ++v) w[v] = Vec::loadu(panel + kk * stride + v * width);
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

// Rows [0, rows) of one panel, rows < kRows: blocks of kRows / 2 rows, then of half that, ...
template <typename T, int64_t kRows, int64_t kVectors>
inline void small_gemm_rest(int64_t rows, const T* a, int64_t lda, const T* panel, int64_t k,
                            int64_t n, int64_t column, T* out, int64_t ldo, bool accumulate) {
  if constexpr (kRows > 1) {
    constexpr int64_t half = kRows / 2;
    for (; rows >= half; rows -= half, a += half * lda, out += half * ldo) {
      small_gemm_block<T, half, kVectors>(a, lda, panel, k, n, column, out, ldo, accumulate);
    }
    small_gemm_rest<T, half, kVectors>(rows, a, lda, panel, k, n, column, out, ldo, accumulate);
  }
}

// Panel outer, rows inner: the panel (k x kVectors vectors, 24 KiB at k = 128 in float32 with
// AVX-512) stays in L1 while every row reuses it, so w streams from L2 once per call.
template <typename T, int64_t kVectors>
inline void small_gemm_panel(int64_t rows, const T* a, int64_t lda, const T* panel, int64_t k,
                             int64_t n, int64_t column, T* out, int64_t ldo, bool accumulate) {
  constexpr int64_t kRows = SmallGemmShape<T>::kRows;
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) {
    small_gemm_block<T, kRows, kVectors>(a + r * lda, lda, panel, k, n, column, out + r * ldo,
                                         ldo, accumulate);
  }
  small_gemm_rest<T, kRows, kVectors>(rows - r, a + r * lda, lda, panel, k, n, column,
                                      out + r * ldo, ldo, accumulate);
}

// out (rows x n, row stride ldo) [+]= a (rows x k, row stride lda) * w, w packed by
// pack_panels.
template <typename T>
inline void small_gemm(int64_t rows, const T* a, int64_t lda, const T* packed, int64_t k,
                       int64_t n, T* out, int64_t ldo, bool accumulate) {
  using Shape = SmallGemmShape<T>;
  const int64_t n_pad = Shape::padded_columns(n);
  int64_t column = 0;
  for (; column + Shape::kPanel <= n_pad; column += Shape::kPanel) {
    small_gemm_panel<T, Shape::kPanelVectors>(rows, a, lda, packed + column * k, k, n, column,
                                              out, ldo, accumulate);
  }
  static_assert(Shape::kPanelVectors == 3, "the last panel below holds 0, 1 or 2 vectors");
  const int64_t rest = (n_pad - column) / Shape::kWidth;
  const T* panel = packed + column * k;
  if (rest == 2) {
    small_gemm_panel<T, 2>(rows, a, lda, panel, k, n, column, out, ldo, accumulate);
  } else if (rest == 1) {
    small_gemm_panel<T, 1>(rows, a, lda, panel, k, n, column, out, ldo, accumulate);
  }
}

}  // namespace cpu
}  // namespace lstm_fused
