// Which SIMD level this copy of the library was compiled for (setup.py builds one library per
// level; lstm_fused/_loader.py loads the best one the CPU has):
//
//   lstm_fused::cpu_simd() -> str      "avx512", "avx2" or "default"
//
// and which instructions the CPU sequence kernels' bfloat16 product runs on
// (bf16_product_cpu.h; "none": bfloat16 layers take the per-step path):
//
//   lstm_fused::cpu_bf16_product() -> str   "amx", "avx512" or "none"
//   lstm_fused::set_cpu_bf16_product(str kind) -> str   "auto", "amx", "avx512" or "none";
//                                                       returns the previous setting
//
// and which library runs the large float32 GEMMs (library_gemm_cpu.h):
//
//   lstm_fused::cpu_gemm_library() -> str   "mkl" or "onednn"
//   lstm_fused::set_cpu_gemm_library(str library) -> str   "auto", "mkl" or "onednn";
//                                                          returns the previous setting
#include <torch/library.h>

#include "bf16_product_cpu.h"
#include "library_gemm_cpu.h"

#include <string>

#ifndef LSTM_FUSED_CPU_SIMD_LEVEL
#define LSTM_FUSED_CPU_SIMD_LEVEL default
#endif
#define LSTM_FUSED_STRINGIFY_(x) #x
#define LSTM_FUSED_STRINGIFY(x) LSTM_FUSED_STRINGIFY_(x)

TORCH_LIBRARY_FRAGMENT(lstm_fused, m) {
  m.def("cpu_simd() -> str",
        []() { return std::string(LSTM_FUSED_STRINGIFY(LSTM_FUSED_CPU_SIMD_LEVEL)); });
  m.def("cpu_bf16_product() -> str", []() {
    return std::string(
        lstm_fused::cpu::bf16_product_name(lstm_fused::cpu::bf16_product_kind()));
  });
  m.def("set_cpu_bf16_product(str kind) -> str",
        [](const std::string& kind) { return lstm_fused::cpu::set_bf16_product(kind); });
  m.def("cpu_gemm_library() -> str", []() {
    return std::string(lstm_fused::cpu::gemm_library_name(lstm_fused::cpu::gemm_library()));
  });
  m.def("set_cpu_gemm_library(str library) -> str", [](const std::string& library) {
    return lstm_fused::cpu::set_gemm_library(library);
  });
}
