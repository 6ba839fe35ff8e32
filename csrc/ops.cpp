// Op schemas and the device-agnostic layer driver.
//
// One call runs one layer (all its directions) over the whole sequence: the input projection
// of all steps as one GEMM, then the recurrence one step at a time (one GEMM + one fused step
// kernel), and in backward the reverse-time loop followed by the weight gradients as large
// GEMMs. GEMMs go through at:: ops, so they run on the input's device (and CUDA stream); the
// step kernels come from the device's DeviceKernels table. All buffers are allocated before
// the time loop. Shapes and semantics: docs/ARCHITECTURE.md.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/flush_denormals.h"
#include "cpu/library_gemm_cpu.h"
#include "layer_options.h"
#include "lstm_layer.h"
#include "lstm_steps.h"
#include "mixed_gemm.h"
#include "step_weight.h"

namespace lstm_fused {
namespace {

// 16-bit inputs are computed in float32 (fp32 accumulation and cell state).
at::ScalarType acc_type(at::ScalarType dtype) {
  return (dtype == at::kHalf || dtype == at::kBFloat16) ? at::kFloat : dtype;
}

// The one rule for a 16-bit layer's GEMMs: with 16-bit operands (fp32 accumulation and
// result; mixed_gemm.h) where the device has such GEMMs and the cell is the plain one without
// a projection: bfloat16 and float16 where the device's kernels bring them
// (StepKernels::gemm_16bit: cuBLAS on tensor cores, on CUDA's direct path; the CPU's call
// replay), and bfloat16 on a CPU with bf16 dot products (MKL); else every GEMM in fp32 on
// converted copies. Either way the gates and the cell state are fp32. In the
// 16-bit mode h[t] is rounded to 16 bits before it multiplies W_hh (as in nn.LSTM, whose h is
// 16-bit), and dG[t] before it multiplies W_hh, W_ih and the saved inputs. The CPU sequence
// kernels take the mode (their product on AMX / AVX512_BF16, bf16_product_cpu.h); where they
// decline, the step loop calls MKL's bf16 GEMM (MixedStepWeight). float16 stays on
// fp32 GEMMs: on a CPU without AMX-FP16, MKL's fp16 GEMM was 10-20% slower than the fp32 path
// (bench/NOTES.md).
bool gemm_operands_16bit(const at::Tensor& input, const LayerOptions& opts,
                         const DeviceKernels& kernels) {
  const at::ScalarType dtype = input.scalar_type();
  if (opts.has_proj || opts.has_variants() || !gemm_16bit_state().load(std::memory_order_relaxed)) {
    return false;
  }
  if (kernels.f32.gemm_16bit != nullptr) {
    return dtype == at::kBFloat16 || dtype == at::kHalf;
  }
  return dtype == at::kBFloat16 && input.device().is_cpu() &&
         cpu_mixed_gemm(dtype) != nullptr && cpu_has_bf16_dot_products();
}

// Time layout of a (possibly packed) sequence: rows of step t are
// [offsets[t], offsets[t] + batch_sizes[t]) of the flattened (N, ...) tensors.
struct Steps {
  int64_t steps = 0;
  int64_t batch = 0;
  int64_t rows_total = 0;
  std::vector<int64_t> batch_sizes;
  std::vector<int64_t> offsets;

  int64_t rows(int64_t t) const { return batch_sizes[t]; }
  // The layout as the kernels see it, for one direction (its step walk: time, previous,
  // continuing_rows).
  SequenceShape shape(int64_t hidden, bool reverse) const {
    return {steps, batch, hidden, batch_sizes.data(), offsets.data(), reverse};
  }
};

Steps make_steps(const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes) {
  Steps layout;
  if (batch_sizes.has_value()) {
    const at::Tensor& sizes = *batch_sizes;
    TORCH_CHECK(sizes.dim() == 1 && sizes.scalar_type() == at::kLong && sizes.device().is_cpu(),
                "lstm_fused: batch_sizes must be a 1-D int64 CPU tensor, got a ", sizes.dim(),
                "-D ", sizes.scalar_type(), " tensor on ", sizes.device());
    TORCH_CHECK(input.dim() == 2, "lstm_fused: packed input must be 2-D (N, input_size), got ",
                input.dim(), "-D");
    const at::Tensor contiguous = sizes.contiguous();
    const int64_t* data = contiguous.data_ptr<int64_t>();
    layout.steps = contiguous.numel();
    layout.batch_sizes.assign(data, data + layout.steps);
    int64_t previous = std::numeric_limits<int64_t>::max();
    for (int64_t t = 0; t < layout.steps; ++t) {
      const int64_t rows = layout.batch_sizes[t];
      TORCH_CHECK(rows >= 0 && rows <= previous,
                  "lstm_fused: batch_sizes must be non-increasing and non-negative, got ",
                  rows, " at step ", t, " after ", t > 0 ? previous : 0);
      previous = rows;
      layout.offsets.push_back(layout.rows_total);
      layout.rows_total += rows;
    }
    layout.batch = layout.steps > 0 ? layout.batch_sizes[0] : 0;
    TORCH_CHECK(layout.rows_total == input.size(0), "lstm_fused: batch_sizes sum to ",
                layout.rows_total, " but the packed input has ", input.size(0), " rows");
  } else {
    TORCH_CHECK(input.dim() == 3, "lstm_fused: input must be 3-D (T, B, input_size), got ",
                input.dim(), "-D");
    layout.steps = input.size(0);
    layout.batch = input.size(1);
    for (int64_t t = 0; t < layout.steps; ++t) {
      layout.batch_sizes.push_back(layout.batch);
      layout.offsets.push_back(t * layout.batch);
    }
    layout.rows_total = layout.steps * layout.batch;
  }
  return layout;
}

// One direction's weights, in the compute type.
struct DirectionParams {
  at::Tensor w_ih, w_hh, b_ih, b_hh, w_hr;  // b_* and w_hr undefined when absent
  // layer_norm: gains of the input and recurrent parts (4H), the cell's gain and bias (H)
  at::Tensor ln_ih, ln_hh, ln_cell_weight, ln_cell_bias;
};

int64_t params_per_direction(const LayerOptions& opts) {
  return 2 + (opts.has_biases ? 2 : 0) + (opts.has_proj ? 1 : 0) + (opts.layer_norm ? 4 : 0);
}

// Index of weight_hr among a direction's params.
int64_t proj_index(const LayerOptions& opts) { return opts.has_biases ? 4 : 2; }

// weights_16bit: W_ih and W_hh stay in the input's 16-bit dtype (gemm_operands_16bit).
std::vector<DirectionParams> split_params(at::TensorList params, const LayerOptions& opts,
                                          at::ScalarType compute, bool weights_16bit = false) {
  const int64_t per_direction = params_per_direction(opts);
  const int64_t directions = opts.directions();
  TORCH_CHECK(static_cast<int64_t>(params.size()) == per_direction * directions,
              "lstm_fused: expected ", per_direction * directions, " parameter tensors, got ",
              params.size());
  std::vector<DirectionParams> result;
  for (int64_t d = 0; d < directions; ++d) {
    auto take = [&](int64_t k) { return params[d * per_direction + k].to(compute).contiguous(); };
    DirectionParams p;
    p.w_ih = weights_16bit ? params[d * per_direction].contiguous() : take(0);
    p.w_hh = weights_16bit ? params[d * per_direction + 1].contiguous() : take(1);
    if (opts.has_biases) {
      p.b_ih = take(2);
      p.b_hh = take(3);
    }
    if (opts.has_proj) p.w_hr = take(proj_index(opts));
    if (opts.layer_norm) {
      const int64_t first = proj_index(opts) + (opts.has_proj ? 1 : 0);
      p.ln_ih = take(first);
      p.ln_hh = take(first + 1);
      p.ln_cell_weight = take(first + 2);
      p.ln_cell_bias = take(first + 3);
    }
    result.push_back(p);
  }
  return result;
}

// The masks of one direction (LayerOptions: what `masks` holds), in the compute type;
// undefined when absent.
struct DirectionMasks {
  at::Tensor dropout;      // (B, P) recurrent dropout
  at::Tensor zone_cell;    // (N, H) zoneout of c, 1 keeps c[t-1]
  at::Tensor zone_hidden;  // (N, P) zoneout of h
};

std::vector<DirectionMasks> split_masks(at::TensorList masks, const LayerOptions& opts,
                                        at::ScalarType compute) {
  std::vector<DirectionMasks> result(opts.directions());
  size_t k = 0;
  auto take = [&](int64_t d) { return masks[k][d].to(compute).contiguous(); };
  for (int64_t d = 0; d < opts.directions(); ++d) {
    k = 0;
    if (opts.recurrent_dropout) result[d].dropout = take(d), ++k;
    if (opts.zoneout_cell_mask()) result[d].zone_cell = take(d), ++k;
    if (opts.zoneout_hidden_mask()) result[d].zone_hidden = take(d), ++k;
  }
  return result;
}

struct Sizes {
  int64_t directions, input_size, hidden, out_size;  // D, I, H, P
};

// ---- Checks at the op boundary ---------------------------------------------------------------
// The ops are public (torch.library users, opcheck, compiled graphs call them directly), so
// every argument is checked before any kernel reads it: shape, dtype and device, each error
// naming the argument with what was expected and what came. The fake kernels (_ops.py) repeat
// these checks with torch._check. Wording follows nn.LSTM where nn.LSTM has the same check.

// name: "lstm_fused: <name> must ..." in every message.
void expect_tensor(const at::Tensor& t, const std::string& name, at::IntArrayRef sizes,
                   at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(t.defined(), "lstm_fused: ", name, " is an undefined tensor");
  TORCH_CHECK(t.device() == device, "lstm_fused: ", name, " must be on ", device,
              " (the input's device), got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "lstm_fused: ", name, " must have dtype ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == sizes, "lstm_fused: ", name, " must have shape ", sizes, ", got ",
              t.sizes());
}

// The name of a direction's k-th parameter (layout of split_params).
const char* param_name(const LayerOptions& opts, int64_t k) {
  if (k == 0) return "weight_ih";
  if (k == 1) return "weight_hh";
  if (opts.has_biases && k == 2) return "bias_ih";
  if (opts.has_biases && k == 3) return "bias_hh";
  if (opts.has_proj && k == proj_index(opts)) return "weight_hr";
  static const char* const kLayerNorm[] = {"layer_norm_ih", "layer_norm_hh",
                                           "layer_norm_cell_weight", "layer_norm_cell_bias"};
  return kLayerNorm[k - proj_index(opts) - (opts.has_proj ? 1 : 0)];
}

Sizes check_layer(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
                  at::TensorList params, const LayerOptions& opts, const Steps& layout) {
  const bool has_biases = opts.has_biases, has_proj = opts.has_proj;
  const int64_t D = opts.directions();
  const at::ScalarType dtype = input.scalar_type();
  const at::Device device = input.device();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "lstm_fused: input must be float16, bfloat16, float32 or float64, got ", dtype);
  const int64_t per_direction = params_per_direction(opts);
  TORCH_CHECK(static_cast<int64_t>(params.size()) == per_direction * D, "lstm_fused: expected ",
              per_direction * D, " parameter tensors (", D, " direction(s) x ", per_direction,
              ": weight_ih, weight_hh", has_biases ? ", bias_ih, bias_hh" : "",
              has_proj ? ", weight_hr" : "",
              opts.layer_norm ? ", layer_norm_ih, layer_norm_hh, layer_norm_cell_weight, "
                                "layer_norm_cell_bias"
                              : "",
              "), got ", params.size());
  // Sizes from direction 0: weight_ih (4H, I), weight_hr (P, H).
  const at::Tensor& w_ih = params[0];
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % 4 == 0 && w_ih.size(0) > 0,
              "lstm_fused: params[0] (weight_ih) must be a 2-D (4*hidden_size, input_size) "
              "tensor with hidden_size > 0, got shape ", w_ih.sizes());
  const int64_t H = w_ih.size(0) / 4;
  const int64_t I = w_ih.size(1);
  int64_t P = H;
  if (has_proj) {
    const at::Tensor& w_hr = params[proj_index(opts)];
    TORCH_CHECK(w_hr.dim() == 2 && w_hr.size(0) > 0,
                "lstm_fused: params[", proj_index(opts), "] (weight_hr) must be a 2-D "
                "(proj_size, hidden_size) tensor with proj_size > 0, got shape ", w_hr.sizes());
    P = w_hr.size(0);
  }
  TORCH_CHECK(input.size(-1) == I, "lstm_fused: input.size(-1) must be equal to input_size. ",
              "Expected ", I, ", got ", input.size(-1));
  TORCH_CHECK(hx.dim() == 3 && hx.size(0) == D && hx.size(1) == layout.batch && hx.size(2) == P,
              "lstm_fused: Expected hidden[0] size (", D, ", ", layout.batch, ", ", P,
              "), got ", hx.sizes());
  TORCH_CHECK(cx.dim() == 3 && cx.size(0) == D && cx.size(1) == layout.batch && cx.size(2) == H,
              "lstm_fused: Expected hidden[1] size (", D, ", ", layout.batch, ", ", H,
              "), got ", cx.sizes());
  for (const at::Tensor& tensor : {hx, cx}) {
    TORCH_CHECK(tensor.device() == device,
                "Input and hidden tensors are not at the same device, found input tensor at ",
                device, " and hidden tensor at ", tensor.device());
    TORCH_CHECK(tensor.scalar_type() == dtype, "lstm_fused: hidden state dtype ",
                tensor.scalar_type(), " does not match input dtype ", dtype);
  }
  for (int64_t index = 0; index < static_cast<int64_t>(params.size()); ++index) {
    const at::Tensor& param = params[index];
    TORCH_CHECK(param.device() == device,
                "Input and parameter tensors are not at the same device, found input tensor at ",
                device, " and parameter tensor at ", param.device());
    TORCH_CHECK(param.scalar_type() == dtype, "lstm_fused: parameter dtype ",
                param.scalar_type(), " does not match input dtype ", dtype);
    const int64_t k = index % per_direction;
    const char* name = param_name(opts, k);
    std::vector<int64_t> expected;
    const int64_t first_norm = proj_index(opts) + (has_proj ? 1 : 0);
    if (k == 0) {
      expected = {4 * H, I};
    } else if (k == 1) {
      expected = {4 * H, P};
    } else if (has_biases && k < 4) {
      expected = {4 * H};
    } else if (has_proj && k == proj_index(opts)) {
      expected = {P, H};
    } else {
      expected = {k < first_norm + 2 ? 4 * H : H};  // the layer-norm gains and bias
    }
    TORCH_CHECK(param.sizes() == at::IntArrayRef(expected), "lstm_fused: params[", index, "] (",
                name, " of direction ", index / per_direction, ") must have shape ",
                at::IntArrayRef(expected), ", got ", param.sizes());
  }
  return {D, I, H, P};
}

// The forward's optional flow_probe: (D, T, 3) in the acc dtype, where the backward writes
// the gradient-flow telemetry, or (D, T, 5) when the autograd (_ops.py) also measures the
// flow from each sequence's own last step.
void check_flow_probe(const std::optional<at::Tensor>& flow_probe, const at::Tensor& input,
                      const Sizes& sz, const Steps& layout) {
  if (!flow_probe.has_value() || !flow_probe->defined()) return;
  const int64_t channels = flow_probe->dim() == 3 && flow_probe->size(2) == 5 ? 5 : 3;
  expect_tensor(*flow_probe, "flow_probe", {sz.directions, layout.steps, channels},
                acc_type(input.scalar_type()), input.device());
}

// `masks`: what the options say it holds (LayerOptions::mask_count), in the input's dtype:
// the recurrent-dropout mask (D, B, P), zoneout masks (D, N, H) for c and (D, N, P) for h.
void check_masks(at::TensorList masks, const LayerOptions& opts, const at::Tensor& input,
                 const Sizes& sz, const Steps& layout) {
  TORCH_CHECK(static_cast<int64_t>(masks.size()) == opts.mask_count(), "lstm_fused: expected ",
              opts.mask_count(), " mask tensor(s) (", opts.recurrent_dropout ? "recurrent_dropout_mask " : "",
              opts.zoneout_cell_mask() ? "zoneout_cell_mask " : "",
              opts.zoneout_hidden_mask() ? "zoneout_hidden_mask " : "",
              "as the options say), got ", masks.size());
  const int64_t D = sz.directions;
  size_t k = 0;
  if (opts.recurrent_dropout) {
    expect_tensor(masks[k++], "masks[0] (recurrent_dropout_mask)", {D, layout.batch, sz.out_size},
                  input.scalar_type(), input.device());
  }
  if (opts.zoneout_cell_mask()) {
    expect_tensor(masks[k], "masks[" + std::to_string(k) + "] (zoneout_cell_mask)",
                  {D, layout.rows_total, sz.hidden}, input.scalar_type(), input.device());
    ++k;
  }
  if (opts.zoneout_hidden_mask()) {
    expect_tensor(masks[k], "masks[" + std::to_string(k) + "] (zoneout_hidden_mask)",
                  {D, layout.rows_total, sz.out_size}, input.scalar_type(), input.device());
  }
}

// layer_backward's tensors beyond the forward's: the gradients of the outputs and what the
// forward saved.
void check_backward(const std::optional<at::Tensor>& grad_output,
                    const std::optional<at::Tensor>& grad_hy,
                    const std::optional<at::Tensor>& grad_cy, const at::Tensor& input,
                    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells,
                    const at::Tensor& products, const LayerOptions& opts, const Sizes& sz,
                    const Steps& layout) {
  const int64_t D = sz.directions, H = sz.hidden, P = sz.out_size, N = layout.rows_total;
  const at::ScalarType dtype = input.scalar_type(), acc = acc_type(dtype);
  const at::Device device = input.device();
  const std::vector<int64_t> output_sizes =
      input.dim() == 3 ? std::vector<int64_t>{layout.steps, layout.batch, D * P}
                       : std::vector<int64_t>{N, D * P};
  expect_tensor(output, "output", output_sizes, dtype, device);
  expect_tensor(gates, "gates", {D, N, 4 * H}, acc, device);
  expect_tensor(cells, "cells", {D, N, H}, acc, device);
  if (opts.layer_norm) {
    expect_tensor(products, "products", {D, 2, N, 4 * H}, acc, device);
  } else {
    expect_tensor(products, "products", {0}, acc, device);
  }
  if (grad_output.has_value() && grad_output->defined()) {
    expect_tensor(*grad_output, "grad_output", output_sizes, dtype, device);
  }
  if (grad_hy.has_value() && grad_hy->defined()) {
    expect_tensor(*grad_hy, "grad_hy", {D, layout.batch, P}, dtype, device);
  }
  if (grad_cy.has_value() && grad_cy->defined()) {
    expect_tensor(*grad_cy, "grad_cy", {D, layout.batch, H}, dtype, device);
  }
}

template <typename T>
const StepKernels<T>& kernels_for(const DeviceKernels& kernels);
template <>
const StepKernels<float>& kernels_for<float>(const DeviceKernels& kernels) {
  return kernels.f32;
}
template <>
const StepKernels<double>& kernels_for<double>(const DeviceKernels& kernels) {
  return kernels.f64;
}

// dst[r, :cols] = src[r, :cols] for rows r (row strides ldd, lds), on `device`: the device's
// raw-pointer copy where it has one (StepKernels::copy_rows), on the CPU a plain loop (inside
// the time loop, at:: views and copy_ cost more than the copy itself).
template <typename T>
void copy_rows(const StepKernels<T>& kernels, const at::Device& device, T* dst, int64_t ldd,
               const T* src, int64_t lds, int64_t rows, int64_t cols) {
  if (kernels.copy_rows != nullptr) {
    kernels.copy_rows(dst, ldd, src, lds, rows, cols);
    return;
  }
  if (device.is_cpu()) {
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(dst + r * ldd, src + r * lds, cols * sizeof(T));
    }
    return;
  }
  const auto options =
      at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value).device(device);
  at::from_blob(dst, {rows, cols}, {ldd, 1}, options)
      .copy_(at::from_blob(const_cast<T*>(src), {rows, cols}, {lds, 1}, options));
}

// Columns of direction d in a (rows, D*P) tensor.
at::Tensor direction_columns(const at::Tensor& t, int64_t d, int64_t width) {
  return t.narrow(1, d * width, width);
}

// Whether the driver offers the case to the device's sequence kernels at all: switched on, and
// a sequence with rows (lstm_steps.h: they are never called for an empty one).
template <typename T>
bool sequence_kernels_on(const StepKernels<T>& kernels, const Steps& layout) {
  return layout.rows_total > 0 &&
         (kernels.sequence_enabled == nullptr || kernels.sequence_enabled());
}

// The variant bits of a direction's step kernels (lstm_cell.h CellVariant). With a projection
// the driver mixes and masks h itself (h is the projection's output, not the kernel's).
unsigned step_variants(const LayerOptions& opts) {
  unsigned bits = kCellPlain;
  if (opts.layer_norm) bits |= kCellLayerNorm;
  if (opts.zoneout_cell > 0) bits |= kCellZoneoutCell;
  if (opts.zoneout_hidden > 0 && !opts.has_proj) bits |= kCellZoneoutHidden;
  if (opts.recurrent_dropout && !opts.has_proj) bits |= kCellMaskedHidden;
  return bits;
}

// A direction's StepVariants with the parameters set (the per-step mask rows are set by the
// loops).
template <typename T>
StepVariants<T> variants_of(const LayerOptions& opts, const DirectionParams& p) {
  StepVariants<T> v;
  v.variants = step_variants(opts);
  if (opts.layer_norm) {
    v.ln_ih = p.ln_ih.data_ptr<T>();
    v.ln_hh = p.ln_hh.data_ptr<T>();
    v.ln_cell_weight = p.ln_cell_weight.data_ptr<T>();
    v.ln_cell_bias = p.ln_cell_bias.data_ptr<T>();
  }
  v.zoneout_cell = static_cast<T>(opts.zoneout_cell);
  v.zoneout_hidden = static_cast<T>(opts.zoneout_hidden);
  return v;
}

// Rows [offset, offset + rows) of a (N, width) tensor's data, or null.
template <typename T>
const T* rows_at(const at::Tensor& t, int64_t offset, int64_t width) {
  return t.defined() ? t.data_ptr<T>() + offset * width : nullptr;
}

// keep (a (rows, width) view, or the probability when undefined) as a factor for at:: ops.
at::Tensor keep_or(const at::Tensor& mask_rows, double probability, const at::Tensor& like) {
  return mask_rows.defined() ? mask_rows : at::scalar_tensor(probability, like.options());
}

// The 16-bit mode's per-step calls in the driver's compute type (the mode is float only).
template <typename T>
void multiply_16bit(const MixedStepWeight& weight, int64_t rows, T* out, int64_t ldo,
                    const void* a, int64_t lda, bool accumulate) {
  if constexpr (std::is_same_v<T, float>) {
    weight.multiply(rows, out, ldo, a, lda, accumulate);
  } else {
    TORCH_INTERNAL_ASSERT(false, "lstm_fused: 16-bit GEMMs accumulate in float32");
  }
}

template <typename T>
void forward_direction(const Steps& layout, const Sizes& sz, int64_t d, bool reverse,
                       const DirectionParams& p, const DirectionMasks& m,
                       const LayerOptions& opts, const at::Tensor& x2d, at::Tensor h_state,
                       at::Tensor c_state, at::Tensor gates, at::Tensor cells,
                       at::Tensor products, at::Tensor output, const StepKernels<T>& kernels,
                       const at::Tensor& h0_16bit) {
  const int64_t H = sz.hidden, P = sz.out_size, N = layout.rows_total;
  const bool has_proj = p.w_hr.defined();
  // The 16-bit GEMM mode (gemm_operands_16bit): x2d, W_ih, W_hh and h0_16bit are 16-bit.
  const bool low = h0_16bit.defined();
  const MixedColumnMajorGemm gemm_16bit = kernels.gemm_16bit;
  // The sequence kernels run the plain cell only (in the 16-bit mode where the device's kernel
  // has it, ForwardSequenceArgs::w_hh_16bit; else it declines and the step loop runs).
  const bool try_sequence = !has_proj && !opts.has_variants() && kernels.forward_sequence &&
                            sequence_kernels_on(kernels, layout);
  const at::Tensor bias = p.b_ih.defined() ? p.b_ih + p.b_hh : at::Tensor();
  // Inference (LayerOptions::inference: gates and cells undefined): this direction's work
  // buffers, freed with it. c[t] is not kept where the kernels allow it (StepKernels::
  // forward_unsaved, the plain cell), and then no (N, 4H) input projection either: the
  // sequence kernel computes it itself, a chunk of steps at a time (ForwardSequenceArgs::input,
  // input_16bit), and the step loop a chunk at a time into a buffer of the chunk's size
  // (StepKernels::inference_chunk_bytes; not with layer norm, whose products are whole).
  const bool inference = !gates.defined();
  const auto options = p.w_hh.options().dtype(c10::CppTypeToScalarType<T>::value);
  // an inference call on kernels that keep nothing (the CPU's)
  const bool inference_unsaved = inference && kernels.forward_unsaved;
  const bool unsaved = inference_unsaved && !opts.has_variants();
  const int64_t chunk_rows =
      inference_unsaved && kernels.inference_chunk_bytes > 0 && !opts.layer_norm
          ? std::max<int64_t>(layout.batch,
                              kernels.inference_chunk_bytes / (4 * H * int64_t(sizeof(T))))
          : 0;
  const bool project_inside = try_sequence && (low || unsaved);
  if (!cells.defined() && !unsaved) cells = at::empty({N, H}, options);
  T* const cells_data = cells.defined() ? cells.data_ptr<T>() : nullptr;
  // The input projection of rows [row0, row0 + count) into `into` (count, 4H), the biases
  // added unless a sequence kernel adds them in its gate math (saving a pass over the gates).
  // With layer norm: x W_ih^T into products[0] (saved for the backward), normalised with the
  // biases added by the step kernel.
  const auto project = [&](at::Tensor into, int64_t row0, int64_t count) {
    if (count == 0) return;
    const at::Tensor x_rows = x2d.narrow(0, row0, count);
    if (low) {
      if (bias.defined() && !try_sequence) into.copy_(bias.expand_as(into));
      mixed_mm(into, x_rows, p.w_ih.t(), /*accumulate=*/bias.defined() && !try_sequence,
               gemm_16bit);
    } else if (opts.layer_norm) {
      at::Tensor projected = products[0];
      dense_mm(projected, x_rows, p.w_ih.t(), /*accumulate=*/false);
    } else if (bias.defined() && !try_sequence) {
      dense_addmm(into, bias, x_rows, p.w_ih.t());
    } else {
      dense_mm(into, x_rows, p.w_ih.t(), /*accumulate=*/false);
    }
  };
  // the step loop projects a chunk of steps at a time (else `gates` holds every row's)
  const bool project_chunks = !project_inside && chunk_rows > 0;
  if (!project_inside) {
    if (!gates.defined()) {
      gates = at::empty({project_chunks ? std::min(N, chunk_rows) : N, 4 * H}, options);
    }
    if (!project_chunks) project(gates, 0, N);
  }
  const SequenceShape walk = layout.shape(H, reverse);
  const std::vector<StepChunk> chunks = step_chunks(walk, project_chunks ? chunk_rows : 0);
  // A 16-bit output (a 16-bit layer where the sequence kernel writes one, forward_impl): the
  // kernel writes it (ForwardSequenceArgs::output_16bit); where it declines, the step loop
  // writes this direction's fp32 rows into a buffer of its own, converted at the end.
  const at::Tensor output_16bit =
      output.scalar_type() != c10::CppTypeToScalarType<T>::value ? output : at::Tensor();
  if (try_sequence) {
    ForwardSequenceArgs<T> args;
    static_cast<SequenceShape&>(args) = walk;
    args.gates = gates.defined() ? gates.data_ptr<T>() : nullptr;
    args.bias = bias.defined() ? bias.data_ptr<T>() : nullptr;
    const at::Tensor w_hh = p.w_hh.contiguous();
    const at::Tensor h0_operand = low ? h0_16bit.contiguous() : h0_16bit;
    // (ForwardSequenceArgs::hidden_16bit_steps: 4 B H bytes)
    const at::Tensor hidden_steps = low && kernels.forward_sequence_hidden_16bit_steps
                                        ? at::empty({2, layout.batch, H}, x2d.options())
                                        : at::Tensor();
    const at::Tensor w_ih = project_inside ? p.w_ih.contiguous() : at::Tensor();
    args.input_size = sz.input_size;
    if (low) {
      TORCH_INTERNAL_ASSERT(w_hh.scalar_type() == x2d.scalar_type() && x2d.is_contiguous());
      args.w_hh = nullptr;
      args.w_hh_16bit = static_cast<const uint16_t*>(w_hh.const_data_ptr());
      args.h0_16bit = static_cast<const uint16_t*>(h0_operand.const_data_ptr());
      args.input_16bit = static_cast<const uint16_t*>(x2d.const_data_ptr());
      args.w_ih_16bit = static_cast<const uint16_t*>(w_ih.const_data_ptr());
      args.format_16bit = bits16_of(x2d.scalar_type());
      args.hidden_16bit_steps =
          hidden_steps.defined() ? static_cast<uint16_t*>(hidden_steps.data_ptr()) : nullptr;
    } else {
      args.w_hh = w_hh.data_ptr<T>();
      if (project_inside) {
        args.input = x2d.data_ptr<T>();
        args.w_ih = w_ih.data_ptr<T>();
      }
    }
    args.h0 = h_state.data_ptr<T>();
    args.hidden_state = h_state.data_ptr<T>();
    args.cell_state = c_state.data_ptr<T>();
    args.cells = cells_data;
    if (output_16bit.defined()) {
      args.output = nullptr;
      args.output_16bit = static_cast<uint16_t*>(output_16bit.data_ptr()) + d * P;
      args.output_format = bits16_of(output_16bit.scalar_type());
    } else {
      args.output = output.data_ptr<T>() + d * P;
    }
    args.output_stride = output.size(1);
    if (kernels.forward_sequence(args)) return;
    if (project_inside) {
      // declined the projection inside (or the mode): the projection as one GEMM, and again
      if (!gates.defined()) gates = at::empty({N, 4 * H}, options);
      project(gates, 0, N);
      args.gates = gates.data_ptr<T>();
      args.input_16bit = nullptr;
      args.w_ih_16bit = nullptr;
      args.input = nullptr;
      args.w_ih = nullptr;
      if (kernels.forward_sequence(args)) return;
    }
    // declined: the step kernels need the biases in the gates
    if (bias.defined() && N > 0) gates.add_(bias);
  }
  if (output_16bit.defined()) output = at::empty({N, P}, options);
  const int64_t out_stride = output.size(1), out_column = output_16bit.defined() ? 0 : d * P;
  at::Tensor r_buffer = has_proj ? at::empty({layout.batch, H}, options) : at::Tensor();
  // layer norm: the steps' recurrent products, kept apart from the gates (and saved)
  T* const recurrent_data = opts.layer_norm ? products[1].data_ptr<T>() : nullptr;
  // recurrent dropout: h[t] * M, the input of the next step's product (h0 * M first)
  at::Tensor masked = m.dropout.defined() ? h_state * m.dropout : at::Tensor();
  // zoneout of h with a projection: the projection's output h~ before the mix
  const bool mix_projected = has_proj && opts.zoneout_hidden > 0;
  at::Tensor projected = mix_projected ? at::empty({layout.batch, P}, options) : at::Tensor();
  const int64_t pack_budget = pack_budget_bytes<T>(N * 4 * H);
  const std::optional<StepWeight<T>> recurrent =
      low ? std::nullopt
          : std::make_optional<StepWeight<T>>(p.w_hh, /*transposed=*/true, layout.batch,
                                              pack_budget, kernels.gemm);
  // 16-bit mode: the product's input, h[t-1] rounded to 16 bits (h0 as given first)
  const std::optional<MixedStepWeight> recurrent_16bit =
      low ? std::make_optional<MixedStepWeight>(p.w_hh, /*transposed=*/true, gemm_16bit)
          : std::nullopt;
  at::Tensor h_16bit = low ? h0_16bit.clone(at::MemoryFormat::Contiguous) : at::Tensor();
  const Bits16 format_16bit = low ? bits16_of(h_16bit.scalar_type()) : Bits16::kBFloat16;
  const std::optional<StepWeight<T>> projection =
      has_proj ? std::make_optional<StepWeight<T>>(p.w_hr, true, layout.batch, pack_budget,
                                                   kernels.gemm)
               : std::nullopt;
  T* const gates_data = gates.data_ptr<T>();
  T* const hidden_data = h_state.data_ptr<T>();
  T* const r_data = has_proj ? r_buffer.data_ptr<T>() : nullptr;
  T* const masked_data = masked.defined() ? masked.data_ptr<T>() : nullptr;
  StepVariants<T> variants = variants_of<T>(opts, p);
  if (opts.layer_norm && bias.defined()) variants.bias = bias.data_ptr<T>();
  T* const projection_data = opts.layer_norm ? products[0].data_ptr<T>() : nullptr;
  std::size_t next_chunk = 0;
  int64_t chunk_row0 = 0;  // the first row whose projection `gates` holds
  for (int64_t s = 0; s < layout.steps; ++s) {
    if (next_chunk < chunks.size() && s == chunks[next_chunk].first) {
      const StepChunk& chunk = chunks[next_chunk++];
      chunk_row0 = chunk.row0;
      if (project_chunks) project(gates.narrow(0, 0, chunk.rows), chunk.row0, chunk.rows);
    }
    const int64_t t = walk.time(s);
    const int64_t rows = layout.rows(t), offset = layout.offsets[t];
    if (rows == 0) continue;
    T* const step_gates = gates_data + (offset - chunk_row0) * 4 * H;
    const T* const h_in = masked_data ? masked_data : hidden_data;
    T* const step_recurrent = recurrent_data ? recurrent_data + offset * 4 * H : nullptr;
    if (low) {
      multiply_16bit<T>(*recurrent_16bit, rows, step_gates, 4 * H, h_16bit.const_data_ptr(), P,
                        /*accumulate=*/true);
    } else if (step_recurrent) {
      recurrent->multiply(rows, step_recurrent, 4 * H, h_in, P, /*accumulate=*/false);
    } else {
      recurrent->multiply(rows, step_gates, 4 * H, h_in, P, /*accumulate=*/true);
    }
    ForwardStepArgs<T> args;
    args.rows = rows;
    args.hidden = H;
    args.gates = step_gates;
    args.cell_state = c_state.data_ptr<T>();
    args.cells = cells_data ? cells_data + offset * H : nullptr;
    args.hidden_state = has_proj ? r_data : hidden_data;
    args.output = has_proj ? nullptr : output.data_ptr<T>() + offset * out_stride + out_column;
    args.output_stride = out_stride;
    args.variant = variants;
    args.variant.zoneout_cell_mask = rows_at<T>(m.zone_cell, offset, H);
    args.variant.zoneout_hidden_mask = has_proj ? nullptr : rows_at<T>(m.zone_hidden, offset, P);
    args.variant.dropout_mask = has_proj ? nullptr : rows_at<T>(m.dropout, 0, P);
    args.recurrent = step_recurrent;
    args.projection = projection_data ? projection_data + offset * 4 * H : nullptr;
    args.hidden_masked = has_proj ? nullptr : masked_data;
    if (low) {  // h[t] in 16 bits for the next product, written by the gate kernel
      args.hidden_16bit = static_cast<uint16_t*>(h_16bit.data_ptr());
      args.format_16bit = format_16bit;
    }
    kernels.forward(args);
    if (has_proj) {
      if (mix_projected) {
        // h[t] = d_h h[t-1] + (1 - d_h) h~[t] on the projection's output
        projection->multiply(rows, projected.data_ptr<T>(), P, r_data, H, false);
        at::Tensor h_rows = h_state.narrow(0, 0, rows);
        const at::Tensor keep = keep_or(
            m.zone_hidden.defined() ? m.zone_hidden.narrow(0, offset, rows) : at::Tensor(),
            opts.zoneout_hidden, h_rows);
        h_rows.copy_(h_rows * keep + projected.narrow(0, 0, rows) * (1 - keep));
      } else {
        projection->multiply(rows, hidden_data, P, r_data, H, /*accumulate=*/false);
      }
      if (masked_data) {
        at::Tensor masked_rows = masked.narrow(0, 0, rows);
        at::mul_out(masked_rows, h_state.narrow(0, 0, rows), m.dropout.narrow(0, 0, rows));
      }
      copy_rows<T>(kernels, output.device(),
                   output.data_ptr<T>() + offset * out_stride + out_column,
                   out_stride, hidden_data, P, rows, P);
    }
  }
  if (output_16bit.defined()) direction_columns(output_16bit, d, P).copy_(output);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, at::TensorList params,
    at::TensorList masks, const LayerOptions& opts, const Steps& layout, const Sizes& sz,
    const DeviceKernels& kernels) {
  const at::ScalarType compute = c10::CppTypeToScalarType<T>::value;
  const int64_t D = sz.directions, H = sz.hidden, P = sz.out_size, N = layout.rows_total;
  const auto options = input.options().dtype(compute);
  const bool low = gemm_operands_16bit(input, opts, kernels);
  const at::Tensor x2d =
      input.reshape({N, sz.input_size}).to(low ? input.scalar_type() : compute).contiguous();
  std::vector<DirectionParams> dir_params = split_params(params, opts, compute, low);
  std::vector<DirectionMasks> dir_masks = split_masks(masks, opts, compute);
  const StepKernels<T>& step_kernels = kernels_for<T>(kernels);
  // A 16-bit layer's output in its dtype where the device's sequence kernel writes that
  // (forward_direction); else computed in the compute type and converted at the end
  const bool output_16bit = std::is_same_v<T, float> &&
                            (input.scalar_type() == at::kBFloat16 ||
                             input.scalar_type() == at::kHalf) &&
                            step_kernels.forward_sequence_output_16bit;
  at::Tensor output =
      at::empty({N, D * P}, output_16bit ? options.dtype(input.scalar_type()) : options);
  // What the backward reads, unless this is an inference call (then each direction makes its
  // own work buffers, and the three come back empty).
  const bool keep = !opts.inference;
  at::Tensor gates = keep ? at::empty({D, N, 4 * H}, options) : at::empty({0}, options);
  at::Tensor cells = keep ? at::empty({D, N, H}, options) : at::empty({0}, options);
  // layer norm's backward reads the products it normalised (recomputing them would cost two
  // GEMMs of the input projection's size)
  at::Tensor products = opts.layer_norm && keep ? at::empty({D, 2, N, 4 * H}, options)
                                                : at::empty({0}, options);
  at::Tensor hy = hx.to(compute, /*non_blocking=*/false, /*copy=*/true).contiguous();
  at::Tensor cy = cx.to(compute, /*non_blocking=*/false, /*copy=*/true).contiguous();
  for (int64_t d = 0; d < D; ++d) {
    const at::Tensor direction_products =
        !opts.layer_norm ? products
        : keep           ? products[d]
                         : at::empty({2, N, 4 * H}, options);  // work buffers of layer norm
    forward_direction<T>(layout, sz, d, /*reverse=*/d == 1, dir_params[d], dir_masks[d], opts,
                         x2d, hy[d], cy[d], keep ? gates[d] : at::Tensor(),
                         keep ? cells[d] : at::Tensor(), direction_products, output,
                         step_kernels, low ? hx[d] : at::Tensor());
  }
  at::Tensor output_shaped = input.dim() == 3
                                 ? output.view({layout.steps, layout.batch, D * P})
                                 : output;
  return {output_shaped.to(input.scalar_type()), hy.to(input.scalar_type()),
          cy.to(input.scalar_type()), gates, cells, products};
}

// Rows [row, row + count) of r = o*tanh(c) of one direction, from its saved gates and cells.
at::Tensor recompute_r(const at::Tensor& gates_d, const at::Tensor& cells_d, int64_t row,
                       int64_t count, int64_t H) {
  return at::tanh(cells_d.narrow(0, row, count))
      .mul_(gates_d.narrow(0, row, count).narrow(1, 3 * H, H));
}

// Rows per chunk when r is recomputed: (N, H) temporaries would add to the peak memory.
int64_t recompute_chunk_rows(int64_t H) { return std::max<int64_t>(1, (int64_t(1) << 16) / H); }

// Each row's value at the previous step of its sequence, (N, X): values (N, X) shifted by
// one step, and initial (B, X) where a sequence starts (rows of step t: their batch rows).
at::Tensor previous_rows(const Steps& layout, bool reverse, const at::Tensor& values,
                         const at::Tensor& initial) {
  const int64_t N = layout.rows_total, B = layout.batch;
  if (N == layout.steps * B && N > 0) {
    return reverse ? at::cat({values.narrow(0, B, N - B), initial})
                   : at::cat({initial, values.narrow(0, 0, N - B)});
  }
  at::Tensor previous = at::empty({N, values.size(1)}, values.options());
  const SequenceShape walk = layout.shape(values.size(1), reverse);
  for (int64_t t = 0; t < layout.steps; ++t) {
    const int64_t rows = layout.rows(t);
    if (rows == 0) continue;
    const int64_t continuing = walk.continuing_rows(t);
    at::Tensor target = previous.narrow(0, layout.offsets[t], rows);
    if (continuing > 0) {
      const int64_t prev = walk.previous(t);
      target.narrow(0, 0, continuing).copy_(values.narrow(0, layout.offsets[prev], continuing));
    }
    if (continuing < rows) {
      target.narrow(0, continuing, rows - continuing)
          .copy_(initial.narrow(0, continuing, rows - continuing));
    }
  }
  return previous;
}

// A per-batch-row tensor (B, X) repeated for the rows of every step, (N, X).
at::Tensor per_row(const Steps& layout, const at::Tensor& per_batch) {
  if (layout.rows_total == layout.steps * layout.batch) {
    return per_batch.repeat({layout.steps, 1});
  }
  std::vector<at::Tensor> parts;
  for (int64_t t = 0; t < layout.steps; ++t) parts.push_back(per_batch.narrow(0, 0, layout.rows(t)));
  return parts.empty() ? per_batch.narrow(0, 0, 0) : at::cat(parts);
}

// r = o * tanh(n) of all rows of one direction with the cell variants: n = LN(c~) g_c + b_c
// (layer norm) or c~, c~ = f*c[t-1] + i*g recomputed from the saved gates where zoneout made
// the saved c[t] differ from it. (N, H); the variants' path is not held to nn.LSTM's memory.
at::Tensor recompute_r_variants(const at::Tensor& gates_d, const at::Tensor& cells_d,
                                const at::Tensor& c0_d, const DirectionParams& p,
                                const LayerOptions& opts, const Steps& layout, bool reverse,
                                int64_t H) {
  at::Tensor cell_new = cells_d;
  if (opts.zoneout_cell > 0) {
    const at::Tensor cell_prev = previous_rows(layout, reverse, cells_d, c0_d);
    cell_new = gates_d.narrow(1, H, H) * cell_prev +
               gates_d.narrow(1, 0, H) * gates_d.narrow(1, 2 * H, H);
  }
  const at::Tensor normed =
      opts.layer_norm
          ? at::layer_norm(cell_new, {H}, p.ln_cell_weight, p.ln_cell_bias, kLayerNormEps)
          : cell_new;
  return at::tanh(normed).mul_(gates_d.narrow(1, 3 * H, H));
}

// h[t] of all steps as the recurrence used them, (N, D*P) in the compute type. For 16-bit
// inputs the saved output was rounded to 16 bits after the fact, so h is recomputed from the
// saved fp32 gates and cells (r = o*tanh(c), then h = r W_hr^T with a projection): dW_hh then
// sees the values the forward multiplied by W_hh. (Same size as the float copy it replaces.)
// With the cell variants r is recomputed as recompute_r_variants does, and zoneout of h runs
// its recurrence h[t] = d_h h[t-1] + (1 - d_h) h~[t] again, step by step.
at::Tensor recurrent_outputs(const at::Tensor& output, const at::Tensor& gates,
                             const at::Tensor& cells, const at::Tensor& h0,
                             const at::Tensor& c0, const std::vector<DirectionParams>& params,
                             const std::vector<DirectionMasks>& masks, const LayerOptions& opts,
                             const Steps& layout, const Sizes& sz, at::ScalarType compute) {
  const int64_t N = layout.rows_total, D = sz.directions, H = sz.hidden, P = sz.out_size;
  if (output.scalar_type() == compute) return output.reshape({N, D * P});
  at::Tensor h_all = at::empty({N, D * P}, output.options().dtype(compute));
  const int64_t chunk = recompute_chunk_rows(H);
  for (int64_t d = 0; d < D; ++d) {
    const at::Tensor columns = direction_columns(h_all, d, P);
    if (opts.has_variants()) {
      const at::Tensor r =
          recompute_r_variants(gates[d], cells[d], c0[d], params[d], opts, layout, d == 1, H);
      const at::Tensor fresh = params[d].w_hr.defined() ? dense_mm(r, params[d].w_hr.t()) : r;
      if (opts.zoneout_hidden == 0) {
        columns.copy_(fresh);
        continue;
      }
      const SequenceShape walk = layout.shape(P, d == 1);
      for (int64_t s = 0; s < layout.steps; ++s) {
        const int64_t t = walk.time(s), rows = layout.rows(t), offset = layout.offsets[t];
        if (rows == 0) continue;
        const int64_t continuing = walk.continuing_rows(t);
        at::Tensor h_prev = h0[d].narrow(0, 0, rows).clone();
        if (continuing > 0) {
          h_prev.narrow(0, 0, continuing)
              .copy_(columns.narrow(0, layout.offsets[walk.previous(t)], continuing));
        }
        const at::Tensor keep = keep_or(
            masks[d].zone_hidden.defined() ? masks[d].zone_hidden.narrow(0, offset, rows)
                                           : at::Tensor(),
            opts.zoneout_hidden, h_prev);
        columns.narrow(0, offset, rows)
            .copy_(h_prev * keep + fresh.narrow(0, offset, rows) * (1 - keep));
      }
      continue;
    }
    for (int64_t row = 0; row < N; row += chunk) {
      const int64_t count = std::min(chunk, N - row);
      const at::Tensor r = recompute_r(gates[d], cells[d], row, count, H);
      columns.narrow(0, row, count)
          .copy_(params[d].w_hr.defined() ? dense_mm(r, params[d].w_hr.t()) : r);
    }
  }
  return h_all;
}

// The large GEMMs of the backward: out (fp32 or fp64) [+]= a b, in the compute type, or with
// the 16-bit operands of gemm_operands_16bit.
void backward_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                   MixedColumnMajorGemm gemm_16bit = nullptr) {
  if (a.scalar_type() != out.scalar_type()) {
    mixed_mm(out, a, b, accumulate, gemm_16bit);
  } else {
    dense_mm(out, a, b, accumulate);
  }
}

// dW_hh = sum over rows of dG[row]^T h[t-1][row] (h0 where a sequence starts), in `dtype`.
at::Tensor grad_recurrent_weight(const Steps& layout, int64_t d, bool reverse, int64_t P,
                                 const at::Tensor& output2d, const at::Tensor& h0,
                                 const at::Tensor& dgates, at::ScalarType dtype,
                                 MixedColumnMajorGemm gemm_16bit) {
  const int64_t N = layout.rows_total, B = layout.batch;
  const at::Tensor outputs = direction_columns(output2d, d, P);
  const at::Tensor dgates_t = dgates.t();
  at::Tensor grad = at::empty({dgates.size(1), P}, dgates.options().dtype(dtype));
  if (N == layout.steps * B && N > 0) {
    // Equal batch sizes: the outputs shifted by one step, and h0 for the first step; two
    // GEMMs on views instead of gathering h[t-1] into an (N, P) copy.
    const int64_t first = reverse ? N - B : 0;
    backward_gemm(grad, dgates_t.narrow(1, first, B), h0, /*accumulate=*/false, gemm_16bit);
    backward_gemm(grad, dgates_t.narrow(1, reverse ? 0 : B, N - B),
                  outputs.narrow(0, reverse ? B : 0, N - B), /*accumulate=*/true, gemm_16bit);
    return grad;
  }
  backward_gemm(grad, dgates_t, previous_rows(layout, reverse, outputs, h0), false, gemm_16bit);
  return grad;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, at::Tensor>
backward_impl(const std::optional<at::Tensor>& grad_output,
              const std::optional<at::Tensor>& grad_hy, const std::optional<at::Tensor>& grad_cy,
              const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
              at::TensorList params, const at::Tensor& output, const at::Tensor& gates,
              const at::Tensor& cells, const at::Tensor& products, at::TensorList masks,
              const LayerOptions& opts,
              const Steps& layout, const Sizes& sz, bool record_flow,
              const DeviceKernels& kernels) {
  const bool has_biases = opts.has_biases, has_proj = opts.has_proj;
  const double bptt_clip = opts.bptt_clip;
  const at::ScalarType compute = c10::CppTypeToScalarType<T>::value;
  const int64_t D = sz.directions, H = sz.hidden, P = sz.out_size, N = layout.rows_total;
  const int64_t I = sz.input_size;
  const auto options = input.options().dtype(compute);
  const StepKernels<T>& step_kernels = kernels_for<T>(kernels);
  const MixedColumnMajorGemm gemm_16bit = step_kernels.gemm_16bit;
  // The 16-bit GEMM mode: x2d, W_ih, W_hh, h0 and output2d are 16-bit (the outputs are the
  // h[t] the forward's products used), and dG is rounded to 16 bits step by step into
  // dgates_16bit, the operand of every product that reads it.
  const bool low = gemm_operands_16bit(input, opts, kernels);
  const at::ScalarType operands = low ? input.scalar_type() : compute;
  std::vector<DirectionParams> dir_params = split_params(params, opts, compute, low);
  std::vector<DirectionMasks> dir_masks = split_masks(masks, opts, compute);
  const at::Tensor x2d = input.reshape({N, I}).to(operands).contiguous();
  const at::Tensor h0 = hx.to(operands).contiguous();
  const at::Tensor c0 = cx.to(compute).contiguous();
  const at::Tensor output2d =
      low ? output.reshape({N, D * P})
          : recurrent_outputs(output, gates, cells, h0, c0, dir_params, dir_masks, opts, layout,
                              sz, compute);
  at::Tensor dy;
  if (grad_output.has_value() && grad_output->defined()) {
    dy = grad_output->reshape({N, D * P}).to(compute).contiguous();
  }
  at::Tensor dh_state = (grad_hy.has_value() && grad_hy->defined())
                            ? grad_hy->to(compute, false, /*copy=*/true).contiguous()
                            : at::zeros({D, layout.batch, P}, options);
  at::Tensor dc_state = (grad_cy.has_value() && grad_cy->defined())
                            ? grad_cy->to(compute, false, /*copy=*/true).contiguous()
                            : at::zeros({D, layout.batch, H}, options);
  const int64_t clip_mode = opts.clip_mode();
  // Sums of squares of dL/dc[t] and dL/dh[t] per direction and step (telemetry).
  at::Tensor sum_squares =
      record_flow ? at::zeros({D, layout.steps, 2}, options) : at::Tensor();
  // The step kernels' reduction scratch (telemetry, norm clipping), reused by every step.
  const bool reduces = record_flow || clip_mode == kClipNorm;
  at::Tensor partials = (step_kernels.reduce_partials > 0 && reduces)
                            ? at::empty({step_kernels.reduce_partials}, options)
                            : at::Tensor();
  T* const partials_data = partials.defined() ? partials.data_ptr<T>() : nullptr;

  // dL/dx, made where its first GEMM writes it: not beside the weight gradients' GEMMs of
  // the first direction (their packed operands), at the backward's peak
  at::Tensor grad_input;
  std::vector<at::Tensor> grad_params;
  // dG of all steps; in the 16-bit mode only one step's in fp32 (the kernel's output), and
  // all of them rounded in dgates_16bit
  at::Tensor dgates = at::empty({low ? layout.batch : N, 4 * H}, options);
  at::Tensor dgates_16bit = low ? at::empty({N, 4 * H}, input.options()) : at::Tensor();
  const Bits16 format_16bit = low ? bits16_of(input.scalar_type()) : Bits16::kBFloat16;
  at::Tensor dr_buffer = has_proj ? at::empty({layout.batch, H}, options) : at::Tensor();
  at::Tensor dh_all = has_proj ? at::empty({N, P}, options) : at::Tensor();
  // Cell variants' buffers: dL/dh[t-1]'s recurrent part before the masks (recurrent dropout,
  // zoneout of h), and with a projection and zoneout of h, (1 - d_h) dL/dh[t].
  const bool masked_recurrent = opts.recurrent_dropout || opts.zoneout_hidden > 0;
  at::Tensor recurrent_grad_buffer =
      masked_recurrent ? at::empty({layout.batch, P}, options) : at::Tensor();
  const bool scale_projected = has_proj && opts.zoneout_hidden > 0;
  at::Tensor dh_new = scale_projected ? at::empty({layout.batch, P}, options) : at::Tensor();
  // The hidden-gradient step folded into the gate backward kernel (BackwardStepArgs::
  // fold_hidden_grad): one pass over dh and, on CUDA, one launch less per step. Not with a
  // projection (dh is then the projection's input), norm clipping or telemetry (they need
  // dh's sum over the step first), or a cell variant.
  const bool fold_hidden =
      !has_proj && clip_mode != kClipNorm && !record_flow && !opts.has_variants();
  for (int64_t d = 0; d < D; ++d) {
    const bool reverse = d == 1;
    const DirectionParams& p = dir_params[d];
    const DirectionMasks& m = dir_masks[d];
    at::Tensor dh = dh_state[d];
    at::Tensor dc = dc_state[d];
    const at::Tensor gates_d = gates[d].to(compute).contiguous();
    const at::Tensor cells_d = cells[d].to(compute).contiguous();
    const at::Tensor c0_d = c0[d];
    const SequenceShape walk = layout.shape(H, reverse);
    // The recurrent product's input of every row, h[t-1] * M, where it differs from the
    // outputs (recurrent dropout).
    at::Tensor h_in_all;
    if (opts.recurrent_dropout) {
      h_in_all = previous_rows(layout, reverse, direction_columns(output2d, d, P), h0[d]);
      h_in_all.mul_(per_row(layout, m.dropout));
    }
    // layer norm: the saved products A and R of all steps; the step kernels give dL/dR,
    // dL/dA (in dgates) and the parameters' gradients, summed over the rows as they go
    at::Tensor projection_all, recurrent_all, grad_recurrent_all, ln_grad_rows, ln_grad_sums;
    if (opts.layer_norm) {
      projection_all = products[d][0].to(compute).contiguous();
      recurrent_all = products[d][1].to(compute).contiguous();
      grad_recurrent_all = at::empty({N, 4 * H}, options);
      ln_grad_rows = at::empty({layout.batch, kLayerNormGradWidth * H}, options);
      ln_grad_sums = at::zeros({kLayerNormGradWidth * H}, options);
    }
    bool looped = false;
    if (!has_proj && clip_mode == kClipOff && !opts.has_variants() &&
        step_kernels.backward_sequence && sequence_kernels_on(step_kernels, layout) &&
        (!record_flow || step_kernels.backward_sequence_flow)) {
      BackwardSequenceArgs<T> args;
      static_cast<SequenceShape&>(args) = walk;
      args.gates = gates_d.data_ptr<T>();
      args.cells = cells_d.data_ptr<T>();
      args.c0 = c0_d.data_ptr<T>();
      args.grad_output = dy.defined() ? dy.data_ptr<T>() + d * P : nullptr;
      args.grad_output_stride = D * P;
      const at::Tensor w_hh = p.w_hh.contiguous();
      args.dhidden = dh.data_ptr<T>();
      args.dcell = dc.data_ptr<T>();
      if (low) {
        TORCH_INTERNAL_ASSERT(w_hh.scalar_type() == operands);
        args.w_hh = nullptr;
        args.dgates = nullptr;
        args.w_hh_16bit = static_cast<const uint16_t*>(w_hh.const_data_ptr());
        args.dgates_16bit = static_cast<uint16_t*>(dgates_16bit.data_ptr());
        args.format_16bit = format_16bit;
      } else {
        args.w_hh = w_hh.data_ptr<T>();
        args.dgates = dgates.data_ptr<T>();
      }
      args.sum_squares =
          record_flow ? sum_squares.data_ptr<T>() + d * layout.steps * 2 : nullptr;
      looped = step_kernels.backward_sequence(args);
    }
    // The per-step loop (its weights are only packed when it runs).
    const int64_t pack_budget = pack_budget_bytes<T>(gates_d.numel());
    const std::optional<StepWeight<T>> recurrent =
        (looped || low) ? std::nullopt
                        : std::make_optional<StepWeight<T>>(p.w_hh, /*transposed=*/false,
                                                            layout.batch, pack_budget,
                                                            step_kernels.gemm);
    const std::optional<MixedStepWeight> recurrent_16bit =
        low ? std::make_optional<MixedStepWeight>(p.w_hh, /*transposed=*/false, gemm_16bit)
            : std::nullopt;
    const std::optional<StepWeight<T>> projection =
        (has_proj && !looped)
            ? std::make_optional<StepWeight<T>>(p.w_hr, false, layout.batch, pack_budget,
                                                step_kernels.gemm)
            : std::nullopt;
    const StepVariants<T> variants = variants_of<T>(opts, p);
    // Reverse of the forward processing order.
    for (int64_t s = layout.steps - 1; s >= 0 && !looped; --s) {
      const int64_t t = walk.time(s);
      const int64_t rows = layout.rows(t), offset = layout.offsets[t];
      if (rows == 0) continue;
      // (pointer arithmetic, not sum_squares[d][t]: two tensor ops per step add up)
      T* step_sums =
          record_flow ? sum_squares.data_ptr<T>() + (d * layout.steps + t) * 2 : nullptr;

      T* const step_grad_output =
          dy.defined() ? dy.data_ptr<T>() + offset * D * P + d * P : nullptr;
      if (!fold_hidden) {
        HiddenGradStepArgs<T> hidden_args;
        hidden_args.rows = rows;
        hidden_args.size = P;
        hidden_args.grad_output = step_grad_output;
        hidden_args.grad_output_stride = D * P;
        hidden_args.dhidden = dh.data_ptr<T>();
        hidden_args.clip_mode = clip_mode;
        hidden_args.clip = static_cast<T>(bptt_clip);
        hidden_args.sum_squares = record_flow ? step_sums + 1 : nullptr;
        hidden_args.partials = partials_data;
        step_kernels.hidden_grad(hidden_args);
      }

      T* const dh_data = dh.data_ptr<T>();
      const T* grad_r = dh_data;
      if (has_proj) {
        // zoneout of h: h~[t] gets (1 - d_h) dL/dh[t] (without a projection the step kernel
        // scales grad_r itself)
        const T* grad_projected = dh_data;
        if (scale_projected) {
          const at::Tensor dh_rows = dh.narrow(0, 0, rows);
          const at::Tensor keep = keep_or(
              m.zone_hidden.defined() ? m.zone_hidden.narrow(0, offset, rows) : at::Tensor(),
              opts.zoneout_hidden, dh_rows);
          at::Tensor dh_new_rows = dh_new.narrow(0, 0, rows);
          at::mul_out(dh_new_rows, dh_rows, 1 - keep);
          grad_projected = dh_new.data_ptr<T>();
        }
        copy_rows<T>(step_kernels, dh_all.device(), dh_all.data_ptr<T>() + offset * P, P,
                     grad_projected, P, rows, P);
        projection->multiply(rows, dr_buffer.data_ptr<T>(), H, grad_projected, P,
                             /*accumulate=*/false);
        grad_r = dr_buffer.data_ptr<T>();
      }
      const int64_t prev = walk.previous(t);
      BackwardStepArgs<T> args;
      args.rows = rows;
      args.hidden = H;
      args.gates = gates_d.data_ptr<T>() + offset * 4 * H;
      args.cells = cells_d.data_ptr<T>() + offset * H;
      args.cells_prev = prev >= 0 ? cells_d.data_ptr<T>() + layout.offsets[prev] * H : nullptr;
      args.cell_initial = c0_d.data_ptr<T>();
      args.prev_split = walk.continuing_rows(t);
      args.grad_r = grad_r;
      args.dcell = dc.data_ptr<T>();
      args.dgates = dgates.data_ptr<T>() + (low ? 0 : offset * 4 * H);
      args.clip_mode = clip_mode;
      args.clip = static_cast<T>(bptt_clip);
      args.sum_squares = record_flow ? step_sums : nullptr;
      args.partials = partials_data;
      args.variant = variants;
      args.variant.zoneout_cell_mask = rows_at<T>(m.zone_cell, offset, H);
      args.variant.zoneout_hidden_mask = has_proj ? nullptr : rows_at<T>(m.zone_hidden, offset, P);
      if (opts.layer_norm) {
        args.projection = projection_all.data_ptr<T>() + offset * 4 * H;
        args.recurrent = recurrent_all.data_ptr<T>() + offset * 4 * H;
        args.grad_recurrent = grad_recurrent_all.data_ptr<T>() + offset * 4 * H;
        args.ln_grad_rows = ln_grad_rows.data_ptr<T>();
        args.ln_grad_sums = ln_grad_sums.data_ptr<T>();
      }
      if (low) {  // dG[t] in 16 bits for its products, written by the gate backward kernel
        args.dgates_16bit = static_cast<uint16_t*>(dgates_16bit.data_ptr()) + offset * 4 * H;
        args.format_16bit = format_16bit;
      }
      if (fold_hidden) {  // grad_r = dh holds dh_next
        args.fold_hidden_grad = true;
        args.grad_output = step_grad_output;
        args.grad_output_stride = D * P;
      }
      step_kernels.backward(args);

      // Recurrent gradient for the previous step: dh_next = dG[t] W_hh (dR[t] W_hh with
      // layer norm), masked by the recurrent dropout and joined by zoneout's direct path.
      const T* grad_product = opts.layer_norm ? args.grad_recurrent : args.dgates;
      if (low) {
        multiply_16bit<T>(*recurrent_16bit, rows, dh_data, P, args.dgates_16bit, 4 * H,
                          /*accumulate=*/false);
      } else if (masked_recurrent) {
        recurrent->multiply(rows, recurrent_grad_buffer.data_ptr<T>(), P, grad_product, 4 * H,
                            /*accumulate=*/false);
        RecurrentGradStepArgs<T> combine;
        combine.rows = rows;
        combine.size = P;
        combine.recurrent = recurrent_grad_buffer.data_ptr<T>();
        combine.dropout_mask = rows_at<T>(m.dropout, 0, P);
        combine.zoneout = opts.zoneout_hidden > 0;
        combine.zoneout_mask = rows_at<T>(m.zone_hidden, offset, P);
        combine.zoneout_hidden = static_cast<T>(opts.zoneout_hidden);
        combine.dhidden = dh_data;
        step_kernels.recurrent_grad(combine);
      } else {
        recurrent->multiply(rows, dh_data, P, grad_product, 4 * H, /*accumulate=*/false);
      }
    }
    // dy is read by the steps only: not held through the last direction's GEMMs (in the
    // compute type it is a converted copy)
    if (d == D - 1) dy = at::Tensor();
    // Weight, bias and input gradients as large GEMMs over all steps. dgates holds
    // dL/d(x W_ih^T) (with layer norm the step kernels put it there, after the norm's
    // backward); the recurrent product's gradient is dG, or dL/dR with layer norm.
    const at::Tensor& grad_projection = low ? dgates_16bit : dgates;
    at::Tensor grad_w_ih = at::empty({4 * H, I}, options);
    backward_gemm(grad_w_ih, grad_projection.t(), x2d, /*accumulate=*/false, gemm_16bit);
    grad_params.push_back(grad_w_ih);
    const at::Tensor& recurrent_grad = opts.layer_norm ? grad_recurrent_all : grad_projection;
    if (h_in_all.defined()) {
      grad_params.push_back(dense_mm(recurrent_grad.t(), h_in_all));
    } else {
      grad_params.push_back(grad_recurrent_weight(layout, d, reverse, P, output2d, h0[d],
                                                  recurrent_grad, compute, gemm_16bit));
    }
    if (has_biases) {
      at::Tensor grad_bias;
      if (opts.layer_norm) {
        grad_bias = ln_grad_sums.narrow(0, kGradBias * H, 4 * H).clone();
      } else if (low) {
        // the column sums of the 16-bit dG as a product with ones: a 16-bit GEMM with fp32
        // accumulation, several times faster than a reduction that converts every value
        grad_bias = at::empty({1, 4 * H}, options);
        backward_gemm(grad_bias, at::ones({1, N}, grad_projection.options()), grad_projection,
                      /*accumulate=*/false, gemm_16bit);
        grad_bias = grad_bias.view({4 * H});
      } else {
        grad_bias = dgates.sum(0);
      }
      grad_params.push_back(grad_bias);
      grad_params.push_back(grad_bias.clone());
    }
    if (has_proj) {
      // dW_hr = sum over rows of dh^T r, r = o*tanh(c) recomputed in row chunks (not an
      // (N, H) copy: this path is also held to nn.LSTM's peak memory).
      at::Tensor grad_w_hr = at::zeros({P, H}, options);
      if (opts.has_variants()) {
        dense_mm(grad_w_hr, dh_all.t(),
                 recompute_r_variants(gates_d, cells_d, c0_d, p, opts, layout, reverse, H),
                 /*accumulate=*/true);
      } else {
        const int64_t chunk = recompute_chunk_rows(H);
        for (int64_t row = 0; row < N; row += chunk) {
          const int64_t count = std::min(chunk, N - row);
          dense_mm(grad_w_hr, dh_all.narrow(0, row, count).t(),
                   recompute_r(gates_d, cells_d, row, count, H), /*accumulate=*/true);
        }
      }
      grad_params.push_back(grad_w_hr);
    }
    if (opts.layer_norm) {
      // (copies: the op's outputs must not share storage)
      grad_params.push_back(ln_grad_sums.narrow(0, kGradInputGain * H, 4 * H).clone());
      grad_params.push_back(ln_grad_sums.narrow(0, kGradRecurrentGain * H, 4 * H).clone());
      grad_params.push_back(ln_grad_sums.narrow(0, kGradCellGain * H, H).clone());
      grad_params.push_back(ln_grad_sums.narrow(0, kGradCellBias * H, H).clone());
    }
    if (d == 0) grad_input = at::empty({N, I}, options);
    backward_gemm(grad_input, grad_projection, p.w_ih, /*accumulate=*/d > 0, gemm_16bit);
  }
  // dG is read by nothing after the GEMMs: freed before the conversions below
  dgates = at::Tensor();
  dgates_16bit = at::Tensor();
  for (size_t k = 0; k < grad_params.size(); ++k) {
    grad_params[k] = grad_params[k].to(params[k].scalar_type());
  }
  at::Tensor flow;
  if (record_flow) {
    // Mean forget gate of the rows active at each step (0 for a step without rows, as the
    // reference backend reports it). Steps
    // of equal batch size are one contiguous (steps, rows) block of rows, so a few whole-tensor
    // ops per run do it (a loop of small ops per step cost ~5% of the backward at T=100): in a
    // fixed order, with no atomics and no host-to-device copy.
    const at::Tensor row_means = gates.narrow(2, H, H).mean(2);  // (D, N)
    at::Tensor forget_mean = at::empty({D, layout.steps}, options);
    for (int64_t begin = 0; begin < layout.steps;) {
      const int64_t rows = layout.batch_sizes[begin];
      int64_t end = begin + 1;
      while (end < layout.steps && layout.batch_sizes[end] == rows) ++end;
      at::Tensor target = forget_mean.narrow(1, begin, end - begin);
      if (rows == 0) {
        target.zero_();
      } else {
        target.copy_(row_means.narrow(1, layout.offsets[begin], (end - begin) * rows)
                         .view({D, end - begin, rows})
                         .mean(2));
      }
      begin = end;
    }
    flow = at::stack({sum_squares.select(2, 0).sqrt(), sum_squares.select(2, 1).sqrt(),
                      forget_mean},
                     2);
  } else {
    flow = at::empty({0}, options);
  }
  const at::ScalarType dtype = input.scalar_type();
  return {grad_input.view(input.sizes()).to(dtype), dh_state.to(dtype), dc_state.to(dtype),
          grad_params, flow};
}

// fn(T{}) with T the compute type of the input (float for the 16-bit types, fp32 accumulation).
template <typename Fn>
auto dispatch_compute(const at::Tensor& input, const Fn& fn) {
  const at::ScalarType compute = acc_type(input.scalar_type());
  if (compute == at::kDouble) return fn(double{});
  TORCH_CHECK(compute == at::kFloat, "lstm_fused: unsupported dtype ", input.scalar_type(),
              " (expected float16, bfloat16, float32 or float64)");
  return fn(float{});
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, at::TensorList params,
    const std::optional<at::Tensor>& batch_sizes, const std::optional<at::Tensor>& flow_probe,
    c10::ArrayRef<double> options, at::TensorList masks, const DeviceKernels& kernels) {
  // The driver's own at:: calls compute in the dtypes it chose; autocast (still on when a
  // backward runs inside an autocast region) would recast some GEMM operands and mix dtypes.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const LayerOptions opts = LayerOptions::from_list(options);
  const Steps layout = make_steps(input, batch_sizes);
  const Sizes sz = check_layer(input, hx, cx, params, opts, layout);
  check_flow_probe(flow_probe, input, sz, layout);
  check_masks(masks, opts, input, sz, layout);
  c10::OptionalDeviceGuard device_guard(input.device());
  return dispatch_compute(input, [&](auto compute) {
    return forward_impl<decltype(compute)>(input, hx, cx, params, masks, opts, layout, sz,
                                           kernels);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, at::Tensor>
layer_backward(const std::optional<at::Tensor>& grad_output,
               const std::optional<at::Tensor>& grad_hy,
               const std::optional<at::Tensor>& grad_cy, const at::Tensor& input,
               const at::Tensor& hx, const at::Tensor& cx, at::TensorList params,
               const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells,
               const at::Tensor& products, const std::optional<at::Tensor>& batch_sizes,
               bool record_flow, c10::ArrayRef<double> options, at::TensorList masks,
               const DeviceKernels& kernels) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // as above
  const LayerOptions opts = LayerOptions::from_list(options);
  const Steps layout = make_steps(input, batch_sizes);
  const Sizes sz = check_layer(input, hx, cx, params, opts, layout);
  check_backward(grad_output, grad_hy, grad_cy, input, output, gates, cells, products, opts, sz,
                 layout);
  check_masks(masks, opts, input, sz, layout);
  c10::OptionalDeviceGuard device_guard(input.device());
  return dispatch_compute(input, [&](auto compute) {
    return backward_impl<decltype(compute)>(grad_output, grad_hy, grad_cy, input, hx, cx, params,
                                            output, gates, cells, products, masks, opts, layout,
                                            sz, record_flow, kernels);
  });
}

// `options`: the layer's options as one list (layer_options.h, lstm_fused/options.py);
// `masks`: the per-call mask tensors the options ask for (check_masks).
TORCH_LIBRARY(lstm_fused, m) {
  m.def(
      "layer_forward(Tensor input, Tensor hx, Tensor cx, Tensor[] params, Tensor? batch_sizes, "
      "Tensor? flow_probe, float[] options, Tensor[] masks) "
      "-> (Tensor output, Tensor hy, Tensor cy, Tensor gates, Tensor cells, Tensor products)");
  m.def(
      "layer_backward(Tensor? grad_output, Tensor? grad_hy, Tensor? grad_cy, Tensor input, "
      "Tensor hx, Tensor cx, Tensor[] params, Tensor output, Tensor gates, Tensor cells, "
      "Tensor products, Tensor? batch_sizes, bool record_flow, float[] options, "
      "Tensor[] masks) "
      "-> (Tensor grad_input, Tensor grad_hx, Tensor grad_cx, Tensor[] grad_params, "
      "Tensor flow)");
}

// The kernel table the layer ops of `device` run with.
const DeviceKernels& kernels_of_device(const c10::Device& device) {
#ifdef LSTM_FUSED_WITH_CUDA
  if (device.is_cuda()) return cuda::kernels();
#endif
  TORCH_CHECK(device.is_cpu(), "lstm_fused: no kernels for device ", device);
  return cpu::kernels();
}

// The 16-bit GEMM mode's switch and rule (gemm_operands_16bit), for lstm_fused.set_16bit_gemm
// and the tests.
TORCH_LIBRARY_FRAGMENT(lstm_fused, m) {
  m.def("set_16bit_gemm(bool enabled) -> bool",
        [](bool enabled) { return gemm_16bit_state().exchange(enabled); });
  // The CPU GEMM a layer's large products run on, for the bench's large-GEMM rate: float32
  // and float64 by dense_mm (cpu::gemm_library()), 16-bit operands into a float32 result by
  // the 16-bit mode's mixed_mm.
  m.def("cpu_mm(Tensor a, Tensor b) -> Tensor", [](const at::Tensor& a, const at::Tensor& b) {
    TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && a.dim() == 2 && b.dim() == 2 &&
                    a.size(1) == b.size(0) && a.scalar_type() == b.scalar_type(),
                "lstm_fused.cpu_mm: needs two CPU matrices of one dtype, (m x k) and (k x n)");
    if (a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf) {
      at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options().dtype(at::kFloat));
      mixed_mm(out, a, b, /*accumulate=*/false);
      return out;
    }
    return dense_mm(a, b);
  });
  m.def("gemm_operands_16bit(Tensor input, float[] options) -> bool",
        [](const at::Tensor& input, c10::ArrayRef<double> options) {
          return gemm_operands_16bit(input, LayerOptions::from_list(options),
                                     kernels_of_device(input.device()));
        });
}

TORCH_LIBRARY_IMPL(lstm_fused, CPU, m) {
  register_layer_ops<cpu::kernels, cpu::FlushDenormals>(m);
}

}  // namespace lstm_fused
