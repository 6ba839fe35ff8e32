// Which library runs the large float32 GEMMs of a layer call on the CPU (the input projection,
// and the backward's input and weight gradients; the per-step products are StepWeight's):
// MKL's sgemm through ATen, or oneDNN's matmul, both from the running libtorch. MKL takes its
// AVX-512 kernels only on Intel CPUs; on an AMD Zen 5 with AVX-512 it ran at the AVX2 rate,
// half of oneDNN's (bench/NOTES.md), while oneDNN's own LSTM, nn.LSTM's, runs at oneDNN's.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace lstm_fused {
namespace cpu {

enum class GemmLibrary { kMkl, kOneDnn };

// The library now in use: the setting (LSTM_FUSED_CPU_GEMM at start-up, set_gemm_library)
// "mkl", "onednn" or "auto", where "auto" is oneDNN on CPUs that are not Intel's and have
// the AVX-512 oneDNN needs (F, BW, VL, DQ), else MKL.
GemmLibrary gemm_library();
const char* gemm_library_name(GemmLibrary library);
// Sets "auto", "mkl" or "onednn"; returns the previous setting.
std::string set_gemm_library(const std::string& library);

// out [+]= a b for float32 CPU tensors through oneDNN (out contiguous; a and b any strides).
void onednn_mm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate);

}  // namespace cpu

// The GEMMs of the layer driver in the compute type, for every device: out [+]= a b. On the
// CPU in float32 by the library of cpu::gemm_library(), else at::mm_out / addmm_.
inline void dense_mm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                     bool accumulate) {
  if (out.numel() == 0) return;
  if (out.is_cpu() && out.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat &&
      b.scalar_type() == at::kFloat && out.is_contiguous() && a.size(1) > 0 &&
      cpu::gemm_library() == cpu::GemmLibrary::kOneDnn) {
    cpu::onednn_mm(out, a, b, accumulate);
  } else if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

// A new (m x n) tensor a b.
inline at::Tensor dense_mm(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  dense_mm(out, a, b, /*accumulate=*/false);
  return out;
}

// out = bias (a row, broadcast) + a b.
inline void dense_addmm(at::Tensor& out, const at::Tensor& bias, const at::Tensor& a,
                        const at::Tensor& b) {
  if (out.is_cpu() && out.scalar_type() == at::kFloat &&
      cpu::gemm_library() == cpu::GemmLibrary::kOneDnn) {
    out.copy_(bias.expand_as(out));
    dense_mm(out, a, b, /*accumulate=*/true);
  } else {
    at::addmm_out(out, bias, a, b);
  }
}

}  // namespace lstm_fused
