// The device-agnostic layer driver (csrc/ops.cpp): input GEMM, time loop over the step
// kernels of one device, weight-gradient GEMMs. Each device's TORCH_LIBRARY_IMPL calls these
// with its own DeviceKernels. Shapes and semantics: docs/ARCHITECTURE.md.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "lstm_steps.h"

namespace lstm_fused {

// `options`: LayerOptions::from_list's slots (layer_options.h); `masks`: the mask tensors
// they ask for (recurrent dropout, zoneout).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
    at::TensorList params, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& flow_probe, c10::ArrayRef<double> options,
    at::TensorList masks, const DeviceKernels& kernels);

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, at::Tensor>
layer_backward(const std::optional<at::Tensor>& grad_output,
               const std::optional<at::Tensor>& grad_hy,
               const std::optional<at::Tensor>& grad_cy, const at::Tensor& input,
               const at::Tensor& hx, const at::Tensor& cx, at::TensorList params,
               const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells,
               const at::Tensor& products, const std::optional<at::Tensor>& batch_sizes,
               bool record_flow, c10::ArrayRef<double> options, at::TensorList masks,
               const DeviceKernels& kernels);

// Nothing to set up around a device's kernels.
struct NoEntryGuard {};

// The op schemas' entry points, bound to one device's kernels (the forward only checks
// flow_probe: it rides along for autograd). EntryGuard is constructed for the duration of each
// call (the CPU's flushes subnormals on the calling thread). A device registers them with
//   TORCH_LIBRARY_IMPL(lstm_fused, CUDA, m) { register_layer_ops<cuda::kernels>(m); }
template <const DeviceKernels& (*Kernels)(), typename EntryGuard = NoEntryGuard>
struct LayerOps {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
  forward(
      const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
      at::TensorList params, const std::optional<at::Tensor>& batch_sizes,
      const std::optional<at::Tensor>& flow_probe, c10::ArrayRef<double> options,
      at::TensorList masks) {
    const EntryGuard guard;
    return layer_forward(input, hx, cx, params, batch_sizes, flow_probe, options, masks,
                         Kernels());
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, at::Tensor>
  backward(const std::optional<at::Tensor>& grad_output,
           const std::optional<at::Tensor>& grad_hy, const std::optional<at::Tensor>& grad_cy,
           const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
           at::TensorList params, const at::Tensor& output, const at::Tensor& gates,
           const at::Tensor& cells, const at::Tensor& products,
           const std::optional<at::Tensor>& batch_sizes, bool record_flow,
           c10::ArrayRef<double> options, at::TensorList masks) {
    const EntryGuard guard;
    return layer_backward(grad_output, grad_hy, grad_cy, input, hx, cx, params, output, gates,
                          cells, products, batch_sizes, record_flow, options, masks, Kernels());
  }
};

template <const DeviceKernels& (*Kernels)(), typename EntryGuard = NoEntryGuard,
          typename Library>
void register_layer_ops(Library& m) {
  m.impl("layer_forward", &LayerOps<Kernels, EntryGuard>::forward);
  m.impl("layer_backward", &LayerOps<Kernels, EntryGuard>::backward);
}

}  // namespace lstm_fused
