// CPU step kernels: the gate math of lstm_cell.h over at::vec::Vectorized<T> (SIMD exp/tanh
// from Sleef when the build enables AVX2), parallel over batch rows with at::parallel_for.
// Reductions (sum of squares for gradient-flow telemetry and norm clipping) are summed per row
// by one thread and then over rows in order, so results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../lstm_cell.h"
#include "../lstm_steps.h"

namespace lstm_fused {

using at::vec::Vectorized;

template <typename T>
struct CellMath<Vectorized<T>> {
  static Vectorized<T> exp(const Vectorized<T>& x) { return x.exp(); }
  static Vectorized<T> tanh(const Vectorized<T>& x) {
    if constexpr (std::is_same_v<T, float>) {
      // tanh(x) = 2 sigmoid(2x) - 1: one exp instead of Sleef's tanh, which costs as much as
      // the step's GEMM at small sizes. Exact at +-inf, NaN stays NaN; near 0 the absolute
      // error is a few float32 ulps of 1 (the tests hold it to nn.LSTM at 1e-5).
      const Vectorized<T> two(2);
      return two / (Vectorized<T>(1) + (Vectorized<T>(0) - two * x).exp()) - Vectorized<T>(1);
    } else {
      return x.tanh();
    }
  }
  // at::vec::clamp is built on maximum/minimum, which propagate NaN.
  static Vectorized<T> clamp(const Vectorized<T>& x, const Vectorized<T>& lo,
                             const Vectorized<T>& hi) {
    return at::vec::clamp(x, lo, hi);
  }
};

namespace cpu {
namespace {

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

// Runs body(LaneType<V>{}, j) over j in [0, n): SIMD vectors first, scalars for the tail.
template <typename T, typename Body>
inline void for_each_lane(int64_t n, const Body& body) {
  using Vec = Vectorized<T>;
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) body(LaneType<Vec>{}, j);
  for (; j < n; ++j) body(LaneType<T>{}, j);
}

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

template <typename T>
void forward_step_impl(const ForwardStepArgs<T>& args) {
  const int64_t H = args.hidden;
  at::parallel_for(0, args.rows, row_grain(4 * H), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* gates = args.gates + r * 4 * H;
      T* cell = args.cell_state + r * H;
      T* saved_cell = args.cells + r * H;
      T* hidden = args.hidden_state + r * H;
      T* output = args.output ? args.output + r * args.output_stride : nullptr;
      for_each_lane<T>(H, [&](auto lane, int64_t j) {
        using V = typename decltype(lane)::type;
        using L = Lanes<V, T>;
        GateValues<V> act = activate_gates(L::load(gates + j), L::load(gates + H + j),
                                           L::load(gates + 2 * H + j),
                                           L::load(gates + 3 * H + j));
        V cell_new = next_cell(act, L::load(cell + j));
        V hidden_new = cell_output(act, cell_new);
        L::store(act.i, gates + j);
        L::store(act.f, gates + H + j);
        L::store(act.g, gates + 2 * H + j);
        L::store(act.o, gates + 3 * H + j);
        L::store(cell_new, cell + j);
        L::store(cell_new, saved_cell + j);
        L::store(hidden_new, hidden + j);
        if (output) L::store(hidden_new, output + j);
      });
    }
  });
}

template <typename T, int64_t kClip, bool kSumSquares>
void hidden_grad_impl(const HiddenGradStepArgs<T>& args) {
  const int64_t P = args.size;
  constexpr bool kRowSums = kSumSquares || kClip == kClipNorm;
  std::vector<T> row_sums(kRowSums ? args.rows : 0);
  at::parallel_for(0, args.rows, row_grain(P), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* dhidden = args.dhidden + r * P;
      const T* grad_output =
          args.grad_output ? args.grad_output + r * args.grad_output_stride : nullptr;
      T row_sum = 0;
      for_each_lane<T>(P, [&](auto lane, int64_t j) {
        using V = typename decltype(lane)::type;
        using L = Lanes<V, T>;
        V dh = L::load(dhidden + j);
        if (grad_output) dh = dh + L::load(grad_output + j);
        if constexpr (kClip == kClipValue) dh = clamp_gradient(dh, V(args.clip));
        if constexpr (kRowSums) row_sum += L::sum_squares(dh);
        L::store(dh, dhidden + j);
      });
      if constexpr (kRowSums) row_sums[r] = row_sum;
    }
  });
  if constexpr (!kRowSums) return;
  T sum_squares = total(row_sums);
  if constexpr (kClip == kClipNorm) {
    const T scale = norm_clip_scale(sum_squares, args.clip);
    if (scale != T(1)) {
      const int64_t count = args.rows * P;
      at::parallel_for(0, count, 16384, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) args.dhidden[k] *= scale;
      });
      sum_squares *= scale * scale;
    }
  }
  if (kSumSquares && args.sum_squares) *args.sum_squares = sum_squares;
}

// One row of the backward step. With kClip == kClipNorm it runs twice: first (kFirstPass)
// it only stores the unclipped dc in dcell and returns its sum of squares; then, with the
// scale known, it reads that dc back and finishes.
template <typename T, int64_t kClip, bool kFirstPass>
T backward_row(const BackwardStepArgs<T>& args, int64_t r, T scale) {
  const int64_t H = args.hidden;
  const T* gates = args.gates + r * 4 * H;
  const T* cell = args.cells + r * H;
  const T* cell_prev =
      r < args.prev_split ? args.cells_prev + r * H : args.cell_initial + r * H;
  const T* grad_r = args.grad_r + r * H;
  T* dcell = args.dcell + r * H;
  T* dgates = args.dgates + r * 4 * H;
  T row_sum = 0;
  for_each_lane<T>(H, [&](auto lane, int64_t j) {
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
    if constexpr (kClip == kClipValue) dc = clamp_gradient(dc, V(args.clip));
    row_sum += L::sum_squares(dc);
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

template <typename T, int64_t kClip, bool kSumSquares>
void backward_impl(const BackwardStepArgs<T>& args) {
  const int64_t grain = row_grain(4 * args.hidden);
  std::vector<T> row_sums(args.rows);
  T scale = 1;
  if constexpr (kClip == kClipNorm) {
    at::parallel_for(0, args.rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        row_sums[r] = backward_row<T, kClip, true>(args, r, T(1));
    });
    scale = norm_clip_scale(total(row_sums), args.clip);
  }
  at::parallel_for(0, args.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      row_sums[r] = backward_row<T, kClip, false>(args, r, scale);
  });
  if (kSumSquares && args.sum_squares) *args.sum_squares = total(row_sums);
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
  static void run(const BackwardStepArgs<T>& args) { backward_impl<T, kClip, kSumSquares>(args); }
};

template <typename T>
void forward_step(const ForwardStepArgs<T>& args) {
  forward_step_impl(args);
}

template <typename T>
void hidden_grad_step(const HiddenGradStepArgs<T>& args) {
  dispatch_flags<T, HiddenGrad>(args);
}

template <typename T>
void backward_step(const BackwardStepArgs<T>& args) {
  dispatch_flags<T, Backward>(args);
}

}  // namespace

const DeviceKernels& kernels() {
  static const DeviceKernels table{
      {&forward_step<float>, &hidden_grad_step<float>, &backward_step<float>},
      {&forward_step<double>, &hidden_grad_step<double>, &backward_step<double>}};
  return table;
}

}  // namespace cpu
}  // namespace lstm_fused
