#include "library_gemm_cpu.h"

#include "../env_switch.h"

#include <ATen/Config.h>
#include <c10/util/Exception.h>

namespace at {
namespace native {
// oneDNN's matmul behind ATen's bf16 / reduced-precision fp32 mm: result = beta result +
// alpha mat1 mat2 (TORCH_API in libtorch_cpu; its header is not installed with torch). In
// float32 it computes in float32 unless torch.set_float32_matmul_precision allows bf16, as
// torch.mm does.
TORCH_API void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result,
                             float beta, float alpha);
}  // namespace native
}  // namespace at

namespace lstm_fused {
namespace cpu {
namespace {

// What oneDNN's fp32 matmul needs from the CPU and from torch (ATen's mkldnn_bf16_device_check
// asks for AVX-512 F/BW/VL/DQ), and whether the CPU is Intel's.
struct Support {
  bool onednn = false;
  bool intel = false;
};

const Support& support() {
  static const Support s = [] {
    Support found;
#if AT_MKLDNN_ENABLED() && defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    found.onednn = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    found.intel = __builtin_cpu_is("intel");
#endif
    return found;
  }();
  return s;
}

EnvChoice& setting() {
  static EnvChoice choice("LSTM_FUSED_CPU_GEMM", {"auto", "mkl", "onednn"});
  return choice;
}

}  // namespace

GemmLibrary gemm_library() {
  const Support& cpu = support();
  const std::string chosen = setting().get();
  if (!cpu.onednn || chosen == "mkl") return GemmLibrary::kMkl;
  if (chosen == "onednn" || !cpu.intel) return GemmLibrary::kOneDnn;
  return GemmLibrary::kMkl;
}

const char* gemm_library_name(GemmLibrary library) {
  return library == GemmLibrary::kOneDnn ? "onednn" : "mkl";
}

std::string set_gemm_library(const std::string& library) {
  TORCH_CHECK(setting().is_name(library),
              "lstm_fused: the CPU GEMM library must be one of 'auto', 'mkl', 'onednn'; got '",
              library, "'");
  TORCH_CHECK(library != "onednn" || support().onednn,
              "lstm_fused: oneDNN's float32 matmul needs a torch built with oneDNN and a CPU "
              "with AVX-512 (F, BW, VL, DQ)");
  return setting().exchange(library);
}

void onednn_mm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
               bool accumulate) {
  TORCH_INTERNAL_ASSERT(out.is_contiguous() && out.scalar_type() == at::kFloat);
  at::native::mkldnn_matmul(a, b, out, accumulate ? 1.0f : 0.0f, 1.0f);
}

}  // namespace cpu
}  // namespace lstm_fused
