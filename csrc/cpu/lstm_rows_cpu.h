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

#if defined(CPU_CAPABILITY_AVX512)
// exp(x) in float32, under 1 ulp where the result is a normal float below 2.4e38 (checked
// against double on every 0.0007 of [-104, 88.3]): n = round(x log2 e), r = x - n ln 2 in two
// parts (Cody-Waite), exp(r) by Cephes's expf polynomial, times 2^n by vscalefps: 15
// instructions, against about 20 for exp_u20 with its NaN blend (below). The input is clamped to
// [-103.97, 88.376] (min/max with x second, so NaN passes through): the result saturates at
// 2.4e38 instead of overflowing, so 1 / (1 + exp(-x)) never meets infinity, and goes to 0 below.
inline Vectorized<float> exp_avx512(const Vectorized<float>& value) {
  __m512 x = _mm512_min_ps(_mm512_set1_ps(88.3762626647949f), value);
  x = _mm512_max_ps(_mm512_set1_ps(-103.972084045410f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2, high part exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
  p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#endif

template <typename T>
struct CellMath<Vectorized<T>> {
  static Vectorized<T> exp(const Vectorized<T>& x) {
    if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
      return exp_avx512(x);
#else
      // ATen's polynomial exp (about 2 ulp) instead of Sleef's (1 ulp): the gate math is
      // five exps per element, as costly as the step's GEMM at small sizes. It saturates
      // instead of overflowing (sigmoid and tanh still reach exactly 0 / +-1) and would map
      // NaN to a finite value, so NaN is passed through explicitly.
      return Vectorized<T>::blendv(x.exp_u20(), x, x.isnan());
#endif
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

// The element-wise row kernels below run the tail too as one SIMD vector, with masked loads
// and stores of its `count` lanes: a scalar tail costs libm's exp/tanh per element (at H=200 on
// two threads, 8 of each row's 200 units took 5% of the forward), and every unit then gets the
// same formula whatever the slicing, so the bits do not depend on the thread count. The lanes
// past `count` load as 0 and are never stored. Lanes with the body reading lane.load(ptr):
template <typename T>
struct WholeVector {
  static Vectorized<T> load(const T* ptr) { return Vectorized<T>::loadu(ptr); }
  static void store(const Vectorized<T>& value, T* ptr) { value.store(ptr); }
  static T sum_squares(const Vectorized<T>& value) {
    return Lanes<Vectorized<T>, T>::sum_squares(value);
  }
};

template <typename T>
struct PartialVector {
  int64_t count;
  Vectorized<T> load(const T* ptr) const { return Vectorized<T>::loadu(ptr, count); }
  void store(const Vectorized<T>& value, T* ptr) const { value.store(ptr, count); }
  T sum_squares(const Vectorized<T>& value) const {
    T lanes[Vectorized<T>::size()];
    (value * value).store(lanes);
    T total = 0;
    for (int64_t k = 0; k < count; ++k) total += lanes[k];
    return total;
  }
};

// Runs body(lanes, j) over j in [begin, end): whole vectors, then the partial one.
template <typename T, typename Body>
inline void for_each_vector(int64_t begin, int64_t end, const Body& body) {
  constexpr int64_t width = Vectorized<T>::size();
  int64_t j = begin;
  for (; j + width <= end; j += width) body(WholeVector<T>{}, j);
  if (j < end) body(PartialVector<T>{end - j}, j);
}

// ---- One batch row, hidden units [j0, j1). Row pointers; a row of gates holds 4H values
// (i, f, g, o blocks of H), the other rows H. Shared by the per-step kernels (all units) and
// the sequence kernels (each thread its slice of units).

// Forward: pre-activations (gates, + bias (4H) when given, + recurrent when given: the
// slice's four gate blocks at q * recurrent_stride) -> activated gates (in place), c (cell
// in/out, saved copy), r = o*tanh(c) into hidden and output when given. Without kReadGates
// the pre-activations are bias + recurrent alone (the recurrent product held the input's
// part too) and `gates` is only written. Without kSave (inference) neither the activated
// gates nor the saved copy of c are written (`saved_cell` is not used; nor, without
// kReadGates, `gates`).
template <typename T, bool kReadGates = true, bool kSave = true>
inline void forward_row(T* gates, int64_t H, const T* bias, const T* recurrent,
                        int64_t recurrent_stride, T* cell, T* saved_cell, T* hidden, T* output,
                        int64_t j0, int64_t j1) {
  for_each_vector<T>(j0, j1, [&](const auto& lane, int64_t j) {
    using V = Vectorized<T>;
    V pre[4];
    for (int64_t q = 0; q < 4; ++q) {
      pre[q] = kReadGates ? lane.load(gates + q * H + j) : V(T(0));
      if (bias) pre[q] = pre[q] + lane.load(bias + q * H + j);
      if (recurrent) pre[q] = pre[q] + lane.load(recurrent + q * recurrent_stride + (j - j0));
    }
    GateValues<V> act = activate_gates(pre[0], pre[1], pre[2], pre[3]);
    V cell_new = next_cell(act, lane.load(cell + j));
    V hidden_new = cell_output(act, cell_new);
    if constexpr (kSave) {
      lane.store(act.i, gates + j);
      lane.store(act.f, gates + H + j);
      lane.store(act.g, gates + 2 * H + j);
      lane.store(act.o, gates + 3 * H + j);
      lane.store(cell_new, saved_cell + j);
    }
    lane.store(cell_new, cell + j);
    if (hidden) lane.store(hidden_new, hidden + j);
    if (output) lane.store(hidden_new, output + j);
  });
}

// dh_next + dy at j (grad_output may be null), clipped element-wise when kClip == kClipValue:
// the hidden-gradient step of one vector (hidden_grad_row's, or folded into backward_row).
template <int64_t kClip, typename Lane, typename V, typename T>
inline V add_output_gradient(const Lane& lane, V dh, const T* grad_output, T clip, int64_t j) {
  if (grad_output) dh = dh + lane.load(grad_output + j);
  if constexpr (kClip == kClipValue) dh = clamp_gradient(dh, V(clip));
  return dh;
}

// dh = dh_next + dy (dy may be null), clipped element-wise when kClip == kClipValue; returns
// the sum of squares of the result when kSums (else 0).
template <typename T, int64_t kClip, bool kSums>
inline T hidden_grad_row(T* dhidden, const T* grad_output, T clip, int64_t j0, int64_t j1) {
  T row_sum = 0;
  for_each_vector<T>(j0, j1, [&](const auto& lane, int64_t j) {
    using V = Vectorized<T>;
    const V dh_next = lane.load(dhidden + j);
    const V dh = add_output_gradient<kClip>(lane, dh_next, grad_output, clip, j);
    if constexpr (kSums) row_sum += lane.sum_squares(dh);
    lane.store(dh, dhidden + j);
  });
  return row_sum;
}

// Backward of one row: dc, the gate gradients and the carried dc*f; returns the sum of
// squares of dc when kSums (else 0). With kClip == kClipNorm it runs twice: first
// (kFirstPass) it only stores the unclipped dc in dcell; then, with the scale known, it reads
// that dc back and finishes. fold: grad_r is dh_next, and dL/dr = dh_next + grad_output
// (grad_output may be null), clamped with kClipValue (BackwardStepArgs::fold_hidden_grad).
template <typename T, int64_t kClip, bool kFirstPass, bool kSums>
inline T backward_row(const T* gates, int64_t H, const T* cell, const T* cell_prev,
                      const T* grad_r, T* dcell, T* dgates, T clip, T scale, int64_t j0,
                      int64_t j1, bool fold = false, const T* grad_output = nullptr) {
  T row_sum = 0;
  for_each_vector<T>(j0, j1, [&](const auto& lane, int64_t j) {
    using V = Vectorized<T>;
    GateValues<V> act{lane.load(gates + j), lane.load(gates + H + j), lane.load(gates + 2 * H + j),
                      lane.load(gates + 3 * H + j)};
    V dr = lane.load(grad_r + j);
    if (fold) dr = add_output_gradient<kClip>(lane, dr, grad_output, clip, j);
    V tanh_cell;
    V dc;
    if constexpr (kClip == kClipNorm && !kFirstPass) {
      tanh_cell = CellMath<V>::tanh(lane.load(cell + j));
      dc = lane.load(dcell + j) * V(scale);
    } else {
      dc = cell_gradient(act, lane.load(cell + j), dr, lane.load(dcell + j), tanh_cell);
    }
    if constexpr (kClip == kClipValue) dc = clamp_gradient(dc, V(clip));
    if constexpr (kSums) row_sum += lane.sum_squares(dc);
    if constexpr (kFirstPass) {
      lane.store(dc, dcell + j);
      return;
    }
    GateValues<V> grads = gate_gradients(act, lane.load(cell_prev + j), tanh_cell, dr, dc);
    lane.store(grads.i, dgates + j);
    lane.store(grads.f, dgates + H + j);
    lane.store(grads.g, dgates + 2 * H + j);
    lane.store(grads.o, dgates + 3 * H + j);
    lane.store(carry_cell_gradient(act, dc), dcell + j);
  });
  return row_sum;
}

// ---- Cell variants (lstm_cell.h CellVariant), one row, all H units: the per-step kernels'
// path for layer norm, zoneout and recurrent dropout. Row sums go through row_sum (SIMD
// accumulators, then the lanes in order), so a row's result does not depend on the thread.

// Sum over j in [begin, end) of body(LaneType<V>{}, j) (a V).
template <typename T, typename Body>
inline T row_sum(int64_t begin, int64_t end, const Body& body) {
  using Vec = Vectorized<T>;
  Vec accumulator(T(0));
  int64_t j = begin;
  for (; j + Vec::size() <= end; j += Vec::size()) {
    accumulator = accumulator + body(LaneType<Vec>{}, j);
  }
  T lanes[Vec::size()];
  accumulator.store(lanes);
  T total = 0;
  for (int64_t k = 0; k < Vec::size(); ++k) total += lanes[k];
  for (; j < end; ++j) total += body(LaneType<T>{}, j);
  return total;
}

// Mean and 1/sqrt(biased variance + eps) of values[0, n).
template <typename T>
struct RowStats {
  T mean, rstd;
};

template <typename T>
inline RowStats<T> row_stats(const T* values, int64_t n) {
  const T mean = row_sum<T>(0, n, [&](auto lane, int64_t j) {
                   using V = typename decltype(lane)::type;
                   return Lanes<V, T>::load(values + j);
                 }) / T(n);
  const T variance = row_sum<T>(0, n, [&](auto lane, int64_t j) {
                       using V = typename decltype(lane)::type;
                       const V centred = Lanes<V, T>::load(values + j) - V(mean);
                       return centred * centred;
                     }) / T(n);
  return {mean, layer_norm_rstd(variance)};
}

// The keep value of a zoneout state at unit j: the mask's, or the probability.
template <typename V, typename T>
inline V zoneout_keep(const T* mask_row, T probability, int64_t j) {
  return mask_row ? Lanes<V, T>::load(mask_row + j) : V(probability);
}

// One row of the forward step with variants kVariants. Pointers are the row's; `cell` holds
// c[t-1] until the last sweep; with kCellLayerNorm the saved cell first holds c~.
template <typename T, unsigned kVariants>
inline void forward_row_variants(T* gates, int64_t H, const T* projection, const T* recurrent,
                                 T* cell, T* saved_cell, T* hidden, T* output, T* hidden_masked,
                                 const StepVariants<T>& v, const T* zoneout_cell_row,
                                 const T* zoneout_hidden_row, const T* dropout_row) {
  constexpr bool kNorm = (kVariants & kCellLayerNorm) != 0;
  RowStats<T> proj{T(0), T(1)}, rec{T(0), T(1)};
  if constexpr (kNorm) {
    proj = row_stats(projection, 4 * H);
    rec = row_stats(recurrent, 4 * H);
  }
  // h[t] and c[t] of unit j from its activated gates and c~ (and n = LN(c~) g + b or c~)
  auto finish = [&](auto lane, int64_t j, const auto& act, const auto& cell_new,
                    const auto& normed) {
    using V = typename decltype(lane)::type;
    using L = Lanes<V, T>;
    V r = act.o * CellMath<V>::tanh(normed);
    V c = cell_new;
    if constexpr ((kVariants & kCellZoneoutCell) != 0) {
      c = zoneout(zoneout_keep<V>(zoneout_cell_row, v.zoneout_cell, j), L::load(cell + j), c);
    }
    if constexpr ((kVariants & kCellZoneoutHidden) != 0) {
      r = zoneout(zoneout_keep<V>(zoneout_hidden_row, v.zoneout_hidden, j), L::load(hidden + j),
                  r);
    }
    L::store(c, cell + j);
    L::store(c, saved_cell + j);
    L::store(r, hidden + j);
    if (output) L::store(r, output + j);
    if constexpr ((kVariants & kCellMaskedHidden) != 0) {
      L::store(r * L::load(dropout_row + j), hidden_masked + j);
    }
  };
  // sweep 1: the gates, c~ (and its sum)
  const T cell_sum = row_sum<T>(0, H, [&](auto lane, int64_t j) {
    using V = typename decltype(lane)::type;
    using L = Lanes<V, T>;
    V pre[4];
    for (int64_t q = 0; q < 4; ++q) {
      const int64_t k = q * H + j;
      if constexpr (kNorm) {
        // G = LN(A) g_ih + LN(R) g_hh + b
        pre[q] = normalize(L::load(projection + k), V(proj.mean), V(proj.rstd)) *
                     L::load(v.ln_ih + k) +
                 normalize(L::load(recurrent + k), V(rec.mean), V(rec.rstd)) *
                     L::load(v.ln_hh + k);
        if (v.bias) pre[q] = pre[q] + L::load(v.bias + k);
      } else {
        pre[q] = L::load(gates + k);
      }
    }
    GateValues<V> act = activate_gates(pre[0], pre[1], pre[2], pre[3]);
    const V cell_new = next_cell(act, L::load(cell + j));
    L::store(act.i, gates + j);
    L::store(act.f, gates + H + j);
    L::store(act.g, gates + 2 * H + j);
    L::store(act.o, gates + 3 * H + j);
    if constexpr (kNorm) {
      L::store(cell_new, saved_cell + j);
    } else {
      finish(lane, j, act, cell_new, cell_new);
    }
    return cell_new;
  });
  if constexpr (kNorm) {
    const T mean = cell_sum / T(H);
    const T variance = row_sum<T>(0, H, [&](auto lane, int64_t j) {
                         using V = typename decltype(lane)::type;
                         const V centred = Lanes<V, T>::load(saved_cell + j) - V(mean);
                         return centred * centred;
                       }) / T(H);
    const T rstd = layer_norm_rstd(variance);
    // sweep 2: n = LN(c~) g_c + b_c, then the states
    for_each_lane<T>(0, H, [&](auto lane, int64_t j) {
      using V = typename decltype(lane)::type;
      using L = Lanes<V, T>;
      const V cell_new = L::load(saved_cell + j);
      GateValues<V> act;
      act.o = L::load(gates + 3 * H + j);
      const V normed = normalize(cell_new, V(mean), V(rstd)) * L::load(v.ln_cell_weight + j) +
                       L::load(v.ln_cell_bias + j);
      finish(lane, j, act, cell_new, normed);
    });
  }
}

// One row of the backward step with variants, in two parts so that norm clipping can scale
// dL/dc~ between them. Row pointers; cell_prev is c[t-1] (or c0).
//
// backward_front: dL/dc~ before clipping into dcell (dL/dc[t] in), the output gate's
// gradient into dgates' o block, with zoneout of c keep_c * dL/dc[t] into dgates' f block
// (read back by backward_back), with layer norm the row's dL/dg_c and dL/db_c; returns the
// sum of squares of dL/dc~.
template <typename T, unsigned kVariants>
inline T backward_front(const T* gates, int64_t H, const T* cell, const T* cell_prev,
                        const T* grad_r, T* dcell, T* dgates, const StepVariants<T>& v,
                        const T* zoneout_cell_row, const T* zoneout_hidden_row,
                        T* ln_grad_row) {
  constexpr bool kNorm = (kVariants & kCellLayerNorm) != 0;
  constexpr bool kZoneCell = (kVariants & kCellZoneoutCell) != 0;
  // c~: saved as c[t] unless zoneout mixed c[t-1] in
  auto cell_new_at = [&](auto lane, int64_t j) {
    using V = typename decltype(lane)::type;
    using L = Lanes<V, T>;
    if constexpr (kZoneCell) {
      const GateValues<V> act{L::load(gates + j), L::load(gates + H + j),
                              L::load(gates + 2 * H + j), V(0)};
      return next_cell(act, L::load(cell_prev + j));
    } else {
      return L::load(cell + j);
    }
  };
  auto grad_r_at = [&](auto lane, int64_t j) {
    using V = typename decltype(lane)::type;
    V dr = Lanes<V, T>::load(grad_r + j);
    if constexpr ((kVariants & kCellZoneoutHidden) != 0) {
      dr = (V(1) - zoneout_keep<V>(zoneout_hidden_row, v.zoneout_hidden, j)) * dr;
    }
    return dr;
  };
  // dL/dc~ of unit j from dL/dc~ through the output (dn_part) and dL/dc[t] (dcell)
  auto store_dcell = [&](auto lane, int64_t j, const auto& from_output) {
    using V = typename decltype(lane)::type;
    using L = Lanes<V, T>;
    const V dcell_in = L::load(dcell + j);
    V dc;
    if constexpr (kZoneCell) {
      const V keep = zoneout_keep<V>(zoneout_cell_row, v.zoneout_cell, j);
      dc = from_output + (V(1) - keep) * dcell_in;
      L::store(keep * dcell_in, dgates + H + j);
    } else {
      dc = from_output + dcell_in;
    }
    L::store(dc, dcell + j);
    return dc * dc;
  };
  if constexpr (!kNorm) {
    return row_sum<T>(0, H, [&](auto lane, int64_t j) {
      using V = typename decltype(lane)::type;
      using L = Lanes<V, T>;
      GateValues<V> act;
      act.o = L::load(gates + 3 * H + j);
      const V tanh_n = CellMath<V>::tanh(cell_new_at(lane, j));
      const V dr = grad_r_at(lane, j);
      L::store(output_gate_gradient(act, tanh_n, dr), dgates + 3 * H + j);
      return store_dcell(lane, j, output_cell_gradient(act, tanh_n, dr));
    });
  } else {
    const T mean = row_sum<T>(0, H, [&](auto lane, int64_t j) { return cell_new_at(lane, j); }) /
                   T(H);
    const T variance = row_sum<T>(0, H, [&](auto lane, int64_t j) {
                         using V = typename decltype(lane)::type;
                         const V centred = cell_new_at(lane, j) - V(mean);
                         return centred * centred;
                       }) / T(H);
    const T rstd = layer_norm_rstd(variance);
    auto normalized_at = [&](auto lane, int64_t j) {
      using V = typename decltype(lane)::type;
      return normalize(cell_new_at(lane, j), V(mean), V(rstd));
    };
    // dL/dn into dgates' g block (scratch until backward_back), and the means LN's
    // backward needs: of dL/d(normalized) and of its product with normalized
    T sum_grad = 0;
    const T sum_grad_normalized = row_sum<T>(0, H, [&](auto lane, int64_t j) {
      using V = typename decltype(lane)::type;
      using L = Lanes<V, T>;
      GateValues<V> act;
      act.o = L::load(gates + 3 * H + j);
      const V normalized = normalized_at(lane, j);
      const V gain = L::load(v.ln_cell_weight + j);
      const V tanh_n = CellMath<V>::tanh(normalized * gain + L::load(v.ln_cell_bias + j));
      const V dr = grad_r_at(lane, j);
      const V dn = output_cell_gradient(act, tanh_n, dr);
      L::store(output_gate_gradient(act, tanh_n, dr), dgates + 3 * H + j);
      L::store(dn, dgates + 2 * H + j);
      L::store(dn * normalized, ln_grad_row + kGradCellGain * H + j);
      L::store(dn, ln_grad_row + kGradCellBias * H + j);
      return dn * gain * normalized;
    });
    sum_grad = row_sum<T>(0, H, [&](auto lane, int64_t j) {
      using V = typename decltype(lane)::type;
      using L = Lanes<V, T>;
      return L::load(dgates + 2 * H + j) * L::load(v.ln_cell_weight + j);
    });
    const T mean_grad = sum_grad / T(H), mean_grad_normalized = sum_grad_normalized / T(H);
    return row_sum<T>(0, H, [&](auto lane, int64_t j) {
      using V = typename decltype(lane)::type;
      using L = Lanes<V, T>;
      const V grad_normalized = L::load(dgates + 2 * H + j) * L::load(v.ln_cell_weight + j);
      const V from_output = layer_norm_input_gradient(
          grad_normalized, normalized_at(lane, j), V(rstd), V(mean_grad),
          V(mean_grad_normalized));
      return store_dcell(lane, j, from_output);
    });
  }
}

// backward_back: dL/dc~ (dcell, scaled by `scale` for norm clipping, clamped for value
// clipping) -> the gate gradients dG (o's already in dgates) and dL/dc[t-1] into dcell; with
// layer norm then the backward of G = LN(A) g_ih + LN(R) g_hh + b: dL/dR into
// grad_recurrent, dL/dA over dG in dgates, the row's dL/db, dL/dg_ih, dL/dg_hh into
// ln_grad_row (LayerNormGrad layout). Returns the sum of squares of dL/dc~ after clipping
// when kSums.
template <typename T, int64_t kClip, bool kSums, unsigned kVariants>
inline T backward_back(const T* gates, int64_t H, const T* cell_prev, T* dcell, T* dgates,
                       T clip, T scale, const StepVariants<T>& v, const T* projection,
                       const T* recurrent, T* grad_recurrent, T* ln_grad_row) {
  T sum_squares = 0;
  for_each_lane<T>(0, H, [&](auto lane, int64_t j) {
    using V = typename decltype(lane)::type;
    using L = Lanes<V, T>;
    const GateValues<V> act{L::load(gates + j), L::load(gates + H + j),
                            L::load(gates + 2 * H + j), V(0)};
    V dc = L::load(dcell + j);
    if constexpr (kClip == kClipNorm) dc = dc * V(scale);
    if constexpr (kClip == kClipValue) dc = clamp_gradient(dc, V(clip));
    if constexpr (kSums) sum_squares += L::sum_squares(dc);
    V carried = carry_cell_gradient(act, dc);
    if constexpr ((kVariants & kCellZoneoutCell) != 0) carried = carried + L::load(dgates + H + j);
    const GateValues<V> grads = cell_gate_gradients(act, L::load(cell_prev + j), dc);
    L::store(grads.i, dgates + j);
    L::store(grads.f, dgates + H + j);
    L::store(grads.g, dgates + 2 * H + j);
    L::store(carried, dcell + j);
  });
  if constexpr ((kVariants & kCellLayerNorm) != 0) {
    const int64_t G = 4 * H;
    const RowStats<T> proj = row_stats(projection, G), rec = row_stats(recurrent, G);
    T* grad_bias = ln_grad_row + kGradBias * H;
    T* grad_input_gain = ln_grad_row + kGradInputGain * H;
    T* grad_recurrent_gain = ln_grad_row + kGradRecurrentGain * H;
    // the row's parameter gradients (dG kept there: dgates is overwritten below)
    for_each_lane<T>(0, G, [&](auto lane, int64_t k) {
      using V = typename decltype(lane)::type;
      using L = Lanes<V, T>;
      const V dgate = L::load(dgates + k);
      L::store(dgate, grad_bias + k);
      L::store(dgate * normalize(L::load(projection + k), V(proj.mean), V(proj.rstd)),
               grad_input_gain + k);
      L::store(dgate * normalize(L::load(recurrent + k), V(rec.mean), V(rec.rstd)),
               grad_recurrent_gain + k);
    });
    // the means of both norms' backward: of dL/d(normalized) = dG g, and of its product
    // with normalized (= the gain's gradient times the gain)
    auto mean_of = [&](const T* a, const T* b) {
      return row_sum<T>(0, G, [&](auto lane, int64_t k) {
               using V = typename decltype(lane)::type;
               using L = Lanes<V, T>;
               return L::load(a + k) * L::load(b + k);
             }) / T(G);
    };
    const T proj_mean_grad = mean_of(grad_bias, v.ln_ih);
    const T proj_mean_grad_normalized = mean_of(grad_input_gain, v.ln_ih);
    const T rec_mean_grad = mean_of(grad_bias, v.ln_hh);
    const T rec_mean_grad_normalized = mean_of(grad_recurrent_gain, v.ln_hh);
    for_each_lane<T>(0, G, [&](auto lane, int64_t k) {
      using V = typename decltype(lane)::type;
      using L = Lanes<V, T>;
      const V dgate = L::load(grad_bias + k);
      L::store(layer_norm_input_gradient(
                   dgate * L::load(v.ln_hh + k),
                   normalize(L::load(recurrent + k), V(rec.mean), V(rec.rstd)), V(rec.rstd),
                   V(rec_mean_grad), V(rec_mean_grad_normalized)),
               grad_recurrent + k);
      L::store(layer_norm_input_gradient(
                   dgate * L::load(v.ln_ih + k),
                   normalize(L::load(projection + k), V(proj.mean), V(proj.rstd)),
                   V(proj.rstd), V(proj_mean_grad), V(proj_mean_grad_normalized)),
               dgates + k);
    });
  }
  return sum_squares;
}

// sums[k] += rows[r][k] for r = 0, 1, ... in order (k < columns; rows have `stride`
// values): the rows' parameter gradients into their totals, the same bits whatever the
// thread count.
template <typename T>
inline void add_rows_in_order(const T* rows, int64_t count, int64_t stride, T* sums,
                              int64_t columns) {
  for (int64_t r = 0; r < count; ++r) {
    const T* row = rows + r * stride;
    for_each_lane<T>(0, columns, [&](auto lane, int64_t k) {
      using V = typename decltype(lane)::type;
      using L = Lanes<V, T>;
      L::store(L::load(sums + k) + L::load(row + k), sums + k);
    });
  }
}

// Whole-sequence kernels (lstm_sequence_cpu.cpp).
template <typename T>
bool forward_sequence(const ForwardSequenceArgs<T>& args);
template <typename T>
bool backward_sequence(const BackwardSequenceArgs<T>& args);

}  // namespace cpu
}  // namespace lstm_fused
