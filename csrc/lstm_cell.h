// Gate math of one LSTM cell, for one element (or one SIMD vector of elements).
//
// Shared by every backend: the CPU step kernels instantiate these templates with
// at::vec::Vectorized<T> (and plain T for tails), the CUDA kernels with float/double.
// So the arithmetic the CPU tests check is the arithmetic the GPU runs.
//
// Gate order i, f, g, o as in torch.nn.LSTM. Notation follows docs/ARCHITECTURE.md.
// No torch headers here: this file is also compiled by nvcc for device code.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LSTM_HD __host__ __device__ __forceinline__
#else
#define LSTM_HD inline
#endif

namespace lstm_fused {

// exp/tanh/reciprocal/clamp for one value type. Specialised here for float and double; the CPU
// kernels add a
// specialisation for at::vec::Vectorized<T>. (A traits struct rather than overloads so a
// specialisation declared after this header is still found at instantiation.)
template <typename V>
struct CellMath;

template <>
struct CellMath<float> {
  LSTM_HD static float exp(float x) {
#ifdef __CUDA_ARCH__
    return ::expf(x);
#else
    return std::exp(x);
#endif
  }
  LSTM_HD static float reciprocal(float x) { return float(1) / x; }
  LSTM_HD static float clamp(float x, float lo, float hi) {
    return x > hi ? hi : (x < lo ? lo : x);  // NaN compares false: passes through
  }
  LSTM_HD static float tanh(float x) {
#ifdef __CUDA_ARCH__
    return ::tanhf(x);
#else
    return std::tanh(x);
#endif
  }
  LSTM_HD static float sqrt(float x) {
#ifdef __CUDA_ARCH__
    return ::sqrtf(x);
#else
    return std::sqrt(x);
#endif
  }
};

template <>
struct CellMath<double> {
  LSTM_HD static double exp(double x) {
#ifdef __CUDA_ARCH__
    return ::exp(x);
#else
    return std::exp(x);
#endif
  }
  LSTM_HD static double reciprocal(double x) { return double(1) / x; }
  LSTM_HD static double clamp(double x, double lo, double hi) {
    return x > hi ? hi : (x < lo ? lo : x);  // NaN compares false: passes through
  }
  LSTM_HD static double tanh(double x) {
#ifdef __CUDA_ARCH__
    return ::tanh(x);
#else
    return std::tanh(x);
#endif
  }
  LSTM_HD static double sqrt(double x) {
#ifdef __CUDA_ARCH__
    return ::sqrt(x);
#else
    return std::sqrt(x);
#endif
  }
};

// 1 / (1 + exp(-x)): exp(-x) overflows to +inf for x << 0, giving exactly 0, and underflows
// to 0 for x >> 0, giving exactly 1, so +-1e4 are finite and correct; NaN stays NaN.
template <typename V>
LSTM_HD V sigmoid(V x) {
  return CellMath<V>::reciprocal(V(1) + CellMath<V>::exp(V(0) - x));
}

template <typename V>
struct GateValues {
  V i, f, g, o;
};

// Forward for one element: pre-activations in, activated gates, new cell and output out.
//   c = f*c_prev + i*g ;  r = o*tanh(c)   (r is h, or the input of the projection)
template <typename V>
LSTM_HD GateValues<V> activate_gates(V pre_i, V pre_f, V pre_g, V pre_o) {
  GateValues<V> gates;
  gates.i = sigmoid(pre_i);
  gates.f = sigmoid(pre_f);
  gates.g = CellMath<V>::tanh(pre_g);
  gates.o = sigmoid(pre_o);
  return gates;
}

template <typename V>
LSTM_HD V next_cell(const GateValues<V>& gates, V cell_prev) {
  return gates.f * cell_prev + gates.i * gates.g;
}

template <typename V>
LSTM_HD V cell_output(const GateValues<V>& gates, V cell) {
  return gates.o * CellMath<V>::tanh(cell);
}

// Backward, first half: the total gradient w.r.t. c[t],
//   dc = dc_next + dr*o*(1 - tanh(c)^2),  with dc_next = dL/dc[t+1] * f[t+1] (already scaled).
// Returns dc; tanh_cell receives tanh(c) for the second half.
template <typename V>
LSTM_HD V cell_gradient(const GateValues<V>& gates, V cell, V grad_r, V dcell_next,
                        V& tanh_cell) {
  tanh_cell = CellMath<V>::tanh(cell);
  return dcell_next + grad_r * gates.o * (V(1) - tanh_cell * tanh_cell);
}

// Backward, second half: gradients of the gate pre-activations, from the (possibly clipped)
// dc. The derivatives use the saved activations: sigma' = s(1-s), tanh' = 1 - t^2.
template <typename V>
LSTM_HD GateValues<V> gate_gradients(const GateValues<V>& gates, V cell_prev, V tanh_cell,
                                     V grad_r, V dcell) {
  GateValues<V> grads;
  grads.i = dcell * gates.g * gates.i * (V(1) - gates.i);
  grads.f = dcell * cell_prev * gates.f * (V(1) - gates.f);
  grads.g = dcell * gates.i * (V(1) - gates.g * gates.g);
  grads.o = grad_r * tanh_cell * gates.o * (V(1) - gates.o);
  return grads;
}

// The cell-state highway: what flows on to step t-1 (the constant error carousel).
template <typename V>
LSTM_HD V carry_cell_gradient(const GateValues<V>& gates, V dcell) {
  return dcell * gates.f;
}

// Element-wise gradient clipping (Graves 2013): clamp to [-clip, clip]; NaN stays NaN.
template <typename V>
LSTM_HD V clamp_gradient(V value, V clip) {
  return CellMath<V>::clamp(value, V(0) - clip, clip);
}

// ---- Cell variants (LayerOptions: layer_norm, recurrent_dropout, zoneout) -------------------
// The kernels take them as compile-time flags, a CellVariant bit set, so that the plain cell
// (kCellPlain) is the code above and nothing else. The formulas (docs/ARCHITECTURE.md):
//   G = LN(x W_ih^T) g_ih + LN((h[t-1] * M) W_hh^T) g_hh + b      (LN over the 4H entries)
//   c~ = f*c[t-1] + i*g ;  r = o * tanh(LN(c~) g_c + b_c)          (LN over the H entries)
//   c[t] = d_c*c[t-1] + (1-d_c)*c~ ;  h[t] = d_h*h[t-1] + (1-d_h)*h~,  h~ = r (or r W_hr^T)
// with d a 0/1 mask (training) or the zoneout probability (eval).
enum CellVariant : unsigned {
  kCellPlain = 0,
  kCellLayerNorm = 1u,       // the gates' recurrent part and the cell are layer-normalised
  kCellZoneoutCell = 2u,     // c[t] mixes c[t-1] in
  kCellZoneoutHidden = 4u,   // h[t] mixes h[t-1] in (in the cell kernel: no projection)
  kCellMaskedHidden = 8u,    // the kernel also writes h[t] * M (recurrent dropout's input)
};

constexpr double kLayerNormEps = 1e-5;  // lstm_fused.options.LAYER_NORM_EPS

// 1 / sqrt(var + eps) of a row whose biased variance is `variance`.
template <typename T>
LSTM_HD T layer_norm_rstd(T variance) {
  return T(1) / CellMath<T>::sqrt(variance + T(kLayerNormEps));
}

template <typename V>
LSTM_HD V normalize(V value, V mean, V rstd) {
  return (value - mean) * rstd;
}

// dL/dv of v -> normalized = (v - mean) * rstd, given the gradient of `normalized` and the
// row means of that gradient and of its product with `normalized`.
template <typename V>
LSTM_HD V layer_norm_input_gradient(V grad_normalized, V normalized, V rstd, V mean_grad,
                                    V mean_grad_normalized) {
  return rstd * (grad_normalized - mean_grad - normalized * mean_grad_normalized);
}

// keep*previous + (1-keep)*next: zoneout of one state (keep = mask or probability).
template <typename V>
LSTM_HD V zoneout(V keep, V previous, V next) {
  return keep * previous + (V(1) - keep) * next;
}

// r = o * tanh(n): the gradients of o's pre-activation and of n.
template <typename V>
LSTM_HD V output_gate_gradient(const GateValues<V>& gates, V tanh_n, V grad_r) {
  return grad_r * tanh_n * gates.o * (V(1) - gates.o);
}

template <typename V>
LSTM_HD V output_cell_gradient(const GateValues<V>& gates, V tanh_n, V grad_r) {
  return grad_r * gates.o * (V(1) - tanh_n * tanh_n);
}

// Gate gradients (i, f, g) from dL/dc~ (o's comes from output_gate_gradient).
template <typename V>
LSTM_HD GateValues<V> cell_gate_gradients(const GateValues<V>& gates, V cell_prev,
                                          V dcell_new) {
  GateValues<V> grads;
  grads.i = dcell_new * gates.g * gates.i * (V(1) - gates.i);
  grads.f = dcell_new * cell_prev * gates.f * (V(1) - gates.f);
  grads.g = dcell_new * gates.i * (V(1) - gates.g * gates.g);
  grads.o = V(0);
  return grads;
}

}  // namespace lstm_fused
