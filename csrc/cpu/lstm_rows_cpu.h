// Row-level CPU kernels: the gate math of lstm_cell.h over at::vec::Vectorized<T> (SIMD
// exp/tanh from Sleef when the build enables AVX2/AVX-512) for one batch row and a range of
// hidden units. The per-step kernels (lstm_steps_cpu.cpp) and the sequence kernels
// (lstm_sequence_cpu.cpp) are loops over these.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

#include "../lstm_cell.h"
#include "../lstm_steps.h"

namespace lstm_fused {

using at::vec::Vectorized;

template <typename T>
struct CellMath<Vectorized<T>> {
  static Vectorized<T> exp(const Vectorized<T>& x) {
    if constexpr (std::is_same_v<T, float>) {
      // ATen's polynomial exp (about 2 ulp) instead of Sleef's (1 ulp): the gate math is
      // five exps per element, as costly as the step's GEMM at small sizes. It saturates
      // instead of overflowing (sigmoid and tanh still reach exactly 0 / +-1) and would map
      // NaN to a finite value, so NaN is passed through explicitly.
      return Vectorized<T>::blendv(x.exp_u20(), x, x.isnan());
    } else {
      return x.exp();
    }
  }
  static Vectorized<T> tanh(const Vectorized<T>& x) {
    if constexpr (std::is_same_v<T, float>) {
      // tanh(x) = 2 sigmoid(2x) - 1: one exp instead of Sleef's tanh. Exact at +-inf, NaN
      // stays NaN; near 0 the absolute error is a few float32 ulps of 1 (the tests hold it to
      // nn.LSTM at 1e-5).
      const Vectorized<T> two(2);
      return two * reciprocal(Vectorized<T>(1) + exp(Vectorized<T>(0) - two * x)) -
             Vectorized<T>(1);
    } else {
      return x.tanh();
    }
  }
  // 1/x for the sigmoids' 1/(1 + exp(-x)), x in [1, FLT_MAX] or NaN: in float32 the
  // hardware's approximate reciprocal refined by one Newton step (about 1 ulp; a division
  // costs several times more and the gate math has five per element).
  static Vectorized<T> reciprocal(const Vectorized<T>& x) {
    if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
      const Vectorized<T> estimate(_mm512_rcp14_ps(x));
#elif defined(CPU_CAPABILITY_AVX2)
      const Vectorized<T> estimate(_mm256_rcp_ps(x));
#else
      return Vectorized<T>(1) / x;
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
      // Where the estimate is 0 (x = inf or near FLT_MAX: exp saturated) the Newton step
      // would compute 0 * inf = NaN; 0 is the answer there.
      const Vectorized<T> refined = estimate * (Vectorized<T>(2) - x * estimate);
      return Vectorized<T>::blendv(refined, estimate, estimate == Vectorized<T>(0));
#endif
    } else {
      return Vectorized<T>(1) / x;
    }
  }
  // at::vec::clamp is built on maximum/minimum, which propagate NaN.
  static Vectorized<T> clamp(const Vectorized<T>& x, const Vectorized<T>& lo,
                             const Vectorized<T>& hi) {
    return at::vec::clamp(x, lo, hi);
  }
};

namespace cpu {

// Loads and stores that read the same for a SIMD vector and for a scalar tail element.
template <typename V, typename T>
struct Lanes;

template <typename T>
struct Lanes<Vectorized<T>, T> {
  static constexpr int64_t width = Vectorized<T>::size();
  static Vectorized<T> load(const T* ptr) { return Vectorized<T>::loadu(ptr); }
  static void store(const Vectorized<T>& value, T* ptr) { value.store(ptr); }
  static T sum_squares(const Vectorized<T>& value) {
    T lanes[Vectorized<T>::size()];
    (value * value).store(lanes);
    T total = 0;
    for (int64_t k = 0; k < width; ++k) total += lanes[k];
    return total;
  }
};

template <typename T>
struct Lanes<T, T> {
  static constexpr int64_t width = 1;
  static T load(const T* ptr) { return *ptr; }
  static void store(T value, T* ptr) { *ptr = value; }
  static T sum_squares(T value) { return value * value; }
};

template <typename V>
struct LaneType {
  using type = V;
};

// Runs body(LaneType<V>{}, j) over j in [begin, end): SIMD vectors first, scalars for the tail.
template <typename T, typename Body>
inline void for_each_lane(int64_t begin, int64_t end, const Body& body) {
  using Vec = Vectorized<T>;
  int64_t j = begin;
  for (; j + Vec::size() <= end; j += Vec::size()) body(LaneType<Vec>{}, j);
  for (; j < end; ++j) body(LaneType<T>{}, j);
}

// ---- One batch row, hidden units [j0, j1). Row pointers; a row of gates holds 4H values
// (i, f, g, o blocks of H), the other rows H. Shared by the per-step kernels (all units) and
// the sequence kernels (each thread its slice of units).

// Forward: pre-activations (gates, + bias (4H) when given, + recurrent when given: the
// slice's four gate blocks at q * recurrent_stride) -> activated gates (in place), c (cell
// in/out, saved copy), r = o*tanh(c) into hidden and output when given.
template <typename T>
inline void forward_row(T* gates, int64_t H, const T* bias, const T* recurrent,
                        int64_t recurrent_stride, T* cell, T* saved_cell, T* hidden, T* output,
                        int64_t j0, int64_t j1) {
  for_each_lane<T>(j0, j1, [&](auto lane, int64_t j) {
    using V = typename decltype(lane)::type;
    using L = Lanes<V, T>;
    V pre[4];
    for (int64_t q = 0; q < 4; ++q) {
      pre[q] = L::load(gates + q * H + j);
      if (bias) pre[q] = pre[q] + L::load(bias + q * H + j);
      if (recurrent) pre[q] = pre[q] + L::load(recurrent + q * recurrent_stride + (j - j0));
    }
    GateValues<V> act = activate_gates(pre[0], pre[1], pre[2], pre[3]);
    V cell_new = next_cell(act, L::load(cell + j));
    V hidden_new = cell_output(act, cell_new);
    L::store(act.i, gates + j);
    L::store(act.f, gates + H + j);
    L::store(act.g, gates + 2 * H + j);
    L::store(act.o, gates + 3 * H + j);
    L::store(cell_new, cell + j);
    L::store(cell_new, saved_cell + j);
    if (hidden) L::store(hidden_new, hidden + j);
    if (output) L::store(hidden_new, output + j);
  });
}

// dh = dh_next + dy (dy may be null), clipped element-wise when kClip == kClipValue; returns
// the sum of squares of the result when kSums (else 0).
template <typename T, int64_t kClip, bool kSums>
inline T hidden_grad_row(T* dhidden, const T* grad_output, T clip, int64_t j0, int64_t j1) {
  T row_sum = 0;
  for_each_lane<T>(j0, j1, [&](auto lane, int64_t j) {
    using V = typename decltype(lane)::type;
    using L = Lanes<V, T>;
    V dh = L::load(dhidden + j);
    if (grad_output) dh = dh + L::load(grad_output + j);
    if constexpr (kClip == kClipValue) dh = clamp_gradient(dh, V(clip));
    if constexpr (kSums) row_sum += L::sum_squares(dh);
    L::store(dh, dhidden + j);
  });
  return row_sum;
}

// Backward of one row: dc, the gate gradients and the carried dc*f; returns the sum of
// squares of dc when kSums (else 0). With kClip == kClipNorm it runs twice: first
// (kFirstPass) it only stores the unclipped dc in dcell; then, with the scale known, it reads
// that dc back and finishes.
template <typename T, int64_t kClip, bool kFirstPass, bool kSums>
inline T backward_row(const T* gates, int64_t H, const T* cell, const T* cell_prev,
                      const T* grad_r, T* dcell, T* dgates, T clip, T scale, int64_t j0,
                      int64_t j1) {
  T row_sum = 0;
  for_each_lane<T>(j0, j1, [&](auto lane, int64_t j) {
    using V = typename decltype(lane)::type;
    using L = Lanes<V, T>;
    GateValues<V> act{L::load(gates + j), L::load(gates + H + j), L::load(gates + 2 * H + j),
                      L::load(gates + 3 * H + j)};
    V dr = L::load(grad_r + j);
    V tanh_cell;
    V dc;
    if constexpr (kClip == kClipNorm && !kFirstPass) {
      tanh_cell = CellMath<V>::tanh(L::load(cell + j));
      dc = L::load(dcell + j) * V(scale);
    } else {
      dc = cell_gradient(act, L::load(cell + j), dr, L::load(dcell + j), tanh_cell);
    }
    if constexpr (kClip == kClipValue) dc = clamp_gradient(dc, V(clip));
    if constexpr (kSums) row_sum += L::sum_squares(dc);
    if constexpr (kFirstPass) {
      L::store(dc, dcell + j);
      return;
    }
    GateValues<V> grads = gate_gradients(act, L::load(cell_prev + j), tanh_cell, dr, dc);
    L::store(grads.i, dgates + j);
    L::store(grads.f, dgates + H + j);
    L::store(grads.g, dgates + 2 * H + j);
    L::store(grads.o, dgates + 3 * H + j);
    L::store(carry_cell_gradient(act, dc), dcell + j);
  });
  return row_sum;
}

// Whole-sequence kernels (lstm_sequence_cpu.cpp).
template <typename T>
bool forward_sequence(const ForwardSequenceArgs<T>& args);
template <typename T>
bool backward_sequence(const BackwardSequenceArgs<T>& args);

}  // namespace cpu
}  // namespace lstm_fused
