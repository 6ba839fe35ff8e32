// Which SIMD level this copy of the library was compiled for (setup.py builds one library per
// level; lstm_fused/_loader.py loads the best one the CPU has):
//
//   lstm_fused::cpu_simd() -> str      "avx512", "avx2" or "default"
#include <torch/library.h>

#include <string>

#ifndef LSTM_FUSED_CPU_SIMD_LEVEL
#define LSTM_FUSED_CPU_SIMD_LEVEL default
#endif
#define LSTM_FUSED_STRINGIFY_(x) #x
#define LSTM_FUSED_STRINGIFY(x) LSTM_FUSED_STRINGIFY_(x)

TORCH_LIBRARY_FRAGMENT(lstm_fused, m) {
  m.def("cpu_simd() -> str",
        []() { return std::string(LSTM_FUSED_STRINGIFY(LSTM_FUSED_CPU_SIMD_LEVEL)); });
}
